"""The paper's Table 7 (Diff-ES composed with DeepCache and with DPM-Solver) in its shape, on the
built-in model, with the paper's SDXL MACs column computed on the meta device (issue 13).

    python benchmarks/table7.py            # built-in model, OBS, 50 % of dense MACs, 30 generations, 500 probes
    python benchmarks/table7.py --tiny     # smoke run: proves the script works; numbers meaningless

Rows (the paper's, plus the dense 10-step solver for reference):
- Dense: 20 DDIM steps (the reference every row is scored against);
- Diff-ES: the level-only search at `--budget` of the dense trajectory's MACs (`configs/tiny_joint.yaml`
  with `model.cache_intervals [1]` and 10 stages of 2 steps) — the same run folder and store as
  `benchmarks/compare_cache.py --stages 10` (`<runs>/<budget>/level`, default runs/compare_cache_s10), so
  a finished compare_cache run is reused, not searched again;
- DeepCache + Diff-ES: the paper's stacking — block caching at interval k (`--interval`, the search's
  cache branch) put on Diff-ES's searched levels as they are, no new search: fewer MACs than the budget;
- DPM-Solver 10 steps + Diff-ES: a level-only search with DPM-Solver++ 2M at 10 steps (10 stages of
  one step: its own store, `<runs>/store-dpm10`) at the same fraction of ITS dense trajectory.
Columns, on probes no search saw: MACs of the trajectory (counted) and their fraction of dense-20;
SSIM and PSNR against the dense 20-step DDIM images of the same probes (the DPM rows too); class
accuracy and digits-FID (the built-in model's declared metrics).

SDXL column: SDXL-base's UNet (`dp.load_denoiser(<sdxl>, weights=False, device="meta")`, 1024², 77
tokens, batch 1, no CFG duplicate — the README's MACs convention), width-pruned at level `--sdxl-level`
of H = 10 (3: the paper's OBS 30 %) in every one of 10 stages of 2 Euler steps; `caching.budget.
width_step_cost_table` counts a full and a DeepCache-cached step per level with the first units of
every group kept (no store: width MACs depend only on how many units remain, and SDXL's groups are all
divisible by 10, so every schedule of mean level 3 costs the same — asserted here). DeepCache: skip
branch `--sdxl-branch` (1: down block 1 and its mirror stay; every branch is in the JSON), interval k
in stages of 2 steps (one full, one cached step per stage). 10 steps: 10 stages of 1 step.
Prints the table next to the paper's; writes benchmarks/results/table7.json (`--tiny`: table7_tiny.json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _runs import TINY as SMOKE
from _runs import fit, load_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.pruner", "diffes_pl.pruners.WandaPruner", *SMOKE]
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# paper Table 7 (SDXL, 20 Euler steps unless stated; FACTS.md): T MACs, FID
PAPER = {"dense": (67.64, 25.46), "Diff-ES": (52.45, 25.87), "DeepCache + Diff-ES": (36.05, 27.10),
         "DPM-Solver 10 steps (dense)": (None, None), "DPM-Solver 10 steps + Diff-ES": (26.23, 25.67)}


def sdxl_column(level: int, branch: int, interval: int, levels_max: int = 10, stages: int = 10) -> dict:
    """MACs of each row's configuration on SDXL-base (module docstring), counted on the meta device."""
    import diffes_pl as dp
    from diffes_pl.caching import feature_cache, step_macs
    from diffes_pl.caching.budget import width_step_cost_table
    from diffes_pl.macs import install_uniform_width
    from diffes_pl.step_costs import StepCosts

    adapter = dp.load_denoiser(SDXL, weights=False, device="meta")
    table = width_step_cost_table(adapter, levels_max, branch=branch)
    full = table["full"]
    if any(full[l] - full[0] != l * (full[1] - full[0]) for l in range(levels_max + 1)):
        raise RuntimeError(f"SDXL's full-step MACs are not affine in the level: {full}")
    costs = StepCosts.parse(table, stages, levels_max)
    w20, w10, levels = [2] * stages, [1] * stages, [level] * stages
    branches = {}
    install_uniform_width(adapter, level, levels_max)
    try:
        for b in range(len(adapter.denoiser.down_blocks)):
            with feature_cache(adapter, intervals=2, branch=b) as cache:
                f, c = step_macs(adapter, cache)
            branches[b] = {"full_step": f, "cached_step": c, "k2_20_steps": stages * (f + c)}
    finally:
        adapter.restore_dense()
    return {"model": SDXL, "levels_max": levels_max, "level": level, "branch": branch, "interval": interval,
            "step_costs": table, "deepcache_branches_at_level": branches, "macs": {
                "dense": costs.dense_macs(w20),
                "Diff-ES": costs.trajectory_macs(levels, None, w20),
                "DeepCache + Diff-ES": costs.trajectory_macs(levels, [interval] * stages, w20),
                "DPM-Solver 10 steps (dense)": costs.dense_macs(w10),
                "DPM-Solver 10 steps + Diff-ES": costs.trajectory_macs(levels, None, w10)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny_joint.yaml"))
    parser.add_argument("--runs", default=str(ROOT / "runs/compare_cache_s10"),
                        help="run folder shared with compare_cache.py (its level-only run is reused)")
    parser.add_argument("--budget", type=float, default=0.5, help="Diff-ES's MAC budget (fraction of dense)")
    parser.add_argument("--interval", type=int, default=2, help="DeepCache's k on the built-in model")
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--eval-probes", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=99991)
    parser.add_argument("--sdxl-level", type=int, default=3, help="of H = 10: 3 is the paper's 30 %%")
    parser.add_argument("--sdxl-branch", type=int, default=1)
    parser.add_argument("--sdxl-interval", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="smoke setting: 1 generation, 16 probes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.generations, args.eval_probes = 1, 16
    # the paper's Table 7 setting: 10 stages of 2 steps (DeepCache k = 2: one full, one cached step per
    # stage; DPM-Solver at 10 steps: 10 stages of one step), whatever the config's stages
    extra = TINY if args.tiny else ["--model.num_stages", "10"]
    out = Path(args.out or Path(__file__).parent / "results" / f"table7{'_tiny' if args.tiny else ''}.json")
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))

    from diffes_pl.caching.budget import step_cost_table
    from diffes_pl.schedule import Schedule
    from diffes_pl.step_costs import StepCosts
    from diffes_pl.search.holdout import dense_outputs, evaluate_schedules
    from diffes_pl.search.settings import resolve_cache_branch

    def search(folder: str, store: str, *more: str):
        common = ["--config", args.config, *extra, "--trainer.default_root_dir", str(runs / f"{args.budget:g}" / folder),
                  "--trainer.max_epochs", str(args.generations), "--model.store", str(runs / store),
                  "--model.cache_intervals", "[1]", "--model.mac_budget", str(args.budget), *more]
        fit(common, runs / f"{args.budget:g}" / folder)
        module, context, _ = load_run(common)
        return module, context, Schedule.load(runs / f"{args.budget:g}" / folder / "schedule.json")

    module, ctx20, diffes = search("level", "store")
    _, ctx10, diffes10 = search("level-dpm10", "store-dpm10", "--model.sampler", "dpm", "--model.steps", str(
        ctx20.partition.num_steps // 2))
    # the paper's stacking: DeepCache's k on Diff-ES's searched levels, no new search
    partition, S, H = ctx20.partition, ctx20.partition.num_stages, ctx20.levels_max
    branch = resolve_cache_branch(ctx20.adapter, module.settings.cache_branch)
    table = step_cost_table(ctx20.adapter, ctx20.store, partition, branch=branch)
    costs, w = StepCosts.parse(table, S, H), partition.steps_per_stage
    ks = [min(args.interval, ws) for ws in w]
    stacked = Schedule(diffes.levels, H, diffes.target_level, list(w), partition=partition.to_dict(),
                       cache_intervals=ks, cache_branch=branch, step_costs=table,
                       mac_budget=costs.trajectory_macs(diffes.levels, ks, w) / costs.dense_macs(w))

    kw = dict(num_probes=args.eval_probes, probe_seed=args.eval_seed)
    rows = evaluate_schedules(ctx20, {"Diff-ES": diffes, "DeepCache + Diff-ES": stacked}, **kw)
    dpm = evaluate_schedules(ctx10, {"DPM-Solver 10 steps + Diff-ES": diffes10}, reference=dense_outputs(ctx20, **kw), **kw)
    rows["DPM-Solver 10 steps (dense)"] = dpm["dense"]
    rows["DPM-Solver 10 steps + Diff-ES"] = dpm["DPM-Solver 10 steps + Diff-ES"]
    for name, row in rows.items():
        row["mac_fraction"] = row["macs"] / rows["dense"]["macs"]
        searched = {"Diff-ES": diffes, "DeepCache + Diff-ES": diffes, "DPM-Solver 10 steps + Diff-ES": diffes10}.get(name)
        row["search_fitness"] = None if searched is None or name == "DeepCache + Diff-ES" else searched.fitness
        row["generations"] = None if searched is None else searched.extra.get("generations")
    sdxl = sdxl_column(args.sdxl_level, args.sdxl_branch, args.sdxl_interval)

    note = " (TINY SMOKE RUN: not a result)" if args.tiny else ""
    print(f"\nTable 7 on the built-in model{note}: Diff-ES at {100 * args.budget:g} % of dense MACs, "
          f"{args.generations} generations, DeepCache k = {args.interval} at block {branch}; "
          f"{args.eval_probes} unseen probes, SSIM/PSNR vs dense {ctx20.steps}-step DDIM. SDXL: level {args.sdxl_level} of 10, "
          f"DeepCache branch {args.sdxl_branch}, k = {args.sdxl_interval}.")
    print(f"{'row':30s} {'MACs %':>7s} {'SSIM':>7s} {'PSNR':>6s} {'acc %':>6s} {'dFID':>7s} | "
          f"{'SDXL T':>7s} {'paper T':>7s} {'paper FID':>9s}")
    for name, row in rows.items():
        paper_t, paper_fid = PAPER[name]
        print(f"{name:30s} {100 * row['mac_fraction']:7.2f} {row['ssim']:7.4f} {row['psnr']:6.2f} "
              f"{100 * row.get('class_accuracy', float('nan')):6.1f} {row.get('digits_fid', float('nan')):7.3f} | "
              f"{sdxl['macs'][name] / 1e12:7.2f} {'' if paper_t is None else f'{paper_t:.2f}':>7s} "
              f"{'' if paper_fid is None else f'{paper_fid:.2f}':>9s}")
    report = {"config": args.config, "tiny": args.tiny, "budget": args.budget, "generations": args.generations,
              "eval_probes": args.eval_probes, "eval_seed": args.eval_seed, "interval": args.interval,
              "cache_branch": branch, "rows": rows, "sdxl": sdxl,
              "paper": {k: {"tera_macs": t, "fid": f} for k, (t, f) in PAPER.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print("wrote", out)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
