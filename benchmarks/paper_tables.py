"""The paper's tables on the built-in model, for every pruner (issue 14 item 5).

    python benchmarks/paper_tables.py                          # 6 settings, 4 generations: 63 min on 2 busy CPU cores
    python benchmarks/paper_tables.py --settings obs-50        # one setting
    python benchmarks/paper_tables.py --tiny                   # smoke run: seconds-scale, numbers meaningless

Settings (built-in tiny DiT on digits, 10 stages of 2 DDIM steps): width pruning with OBS
(configs/tiny_obs.yaml) and Wanda (configs/tiny_wanda.yaml) at levels 2 and 4 of 8 (25 % and 50 % of
the heads and MLP channels), depth pruning (configs/tiny_depth.yaml) of 1 and 2 of the 6 blocks on
average. Each pruner's trajectory store is built once and shared by its two sparsities (the store key
does not hold the target level).

Rows per setting, all at the same budget: dense; uniform; the MosaicDiff-style heuristic; OBS-Diff
(OBS only: ONE pruned model for the whole trajectory from timestep-weighted Hessians, blocks pruned in
3 groups in turn — configs/tiny_obsdiff.yaml — on its own 1-stage store); random search and greedy
search with the same number of fitness evaluations as Diff-ES; Diff-ES (`diffes-pl fit`). The default
4 generations (68 evaluations per search) is what fit the time box on 2 busy cores; the paper runs 100.

Columns, on probes no search saw (another seed, `--eval-probes` of them): SSIM and PSNR vs the dense
model on the same probes, class accuracy (digits classifier), digits-FID against the 297 HELD-OUT real
digits (`digits_fid_heldout`) and against the training digits (`digits_fid_train`, the fitness
metric's), MACs of the 20-step trajectory (fraction of dense), CPU latency per image (routed, median
of repeats at `--latency-batch-size`).

Every `diffes-pl fit` is resumed when it stopped and skipped when it finished; the baselines' searches
and each setting's table are cached in the run folders (`--runs`), so a rerun only redoes what is
missing. Prints one table per setting; writes benchmarks/results/paper_tables.json
(`--tiny`: paper_tables_tiny.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from _runs import TINY, fit, load_run, same_budget_schedules

ROOT = Path(__file__).resolve().parents[1]
# name: (pruner = configs/tiny_<pruner>.yaml, target level); H = 8 (width) or 6 blocks (depth)
SETTINGS = {
    "obs-25": ("obs", 2), "obs-50": ("obs", 4),
    "wanda-25": ("wanda", 2), "wanda-50": ("wanda", 4),
    "depth-1of6": ("depth", 1), "depth-2of6": ("depth", 2),
}
SEARCHES = ("random search", "greedy search", "Diff-ES")


def heldout_digits_fid():
    """digits-FID of a row's images against the held-out real digits (the `test` split)."""
    from diffes_pl.data.digits import load_digits_split
    from diffes_pl.evaluation.digits_features import DigitsFID

    real, _ = load_digits_split("test")
    fid = DigitsFID((real + 1) / 2)
    return lambda inputs: fid(inputs.images)


def latency(context, schedule, args) -> float:
    """Seconds per image of a full routed sampling run (dense when `schedule` is None)."""
    from diffes_pl.evaluation.generate import latency_per_image
    from diffes_pl.routing import Router

    router = None if schedule is None else Router(context.adapter, context.store, schedule)
    try:
        return latency_per_image(context.adapter, router, batch_size=args.latency_batch_size,
                                 sampler=context.sampler, steps=context.steps, guidance=context.guidance,
                                 repeats=args.latency_repeats)
    finally:
        if router is not None:
            router.remove()


def run_setting(name: str, args, extra: list[str], runs: Path) -> tuple[dict, bool]:
    """One setting's table: its searches (resumable), the baselines and every row scored; and whether
    it was read back from an earlier run's folder (`table.json`) instead of computed now."""
    from diffes_pl.schedule import Schedule
    from diffes_pl.search.holdout import evaluate_schedules

    pruner, target = SETTINGS[name]
    folder = runs / name
    cached = folder / "table.json"
    wanted = {"eval_probes": args.eval_probes, "eval_seed": args.eval_seed, "generations": args.generations}
    if cached.exists():
        table = json.loads(cached.read_text())
        if all(table.get(k) == v for k, v in wanted.items()):
            return table, True
    config = str(ROOT / f"configs/tiny_{pruner}.yaml")
    common = ["--config", config, *extra, "--trainer.default_root_dir", str(folder / "diffes"),
              "--trainer.max_epochs", str(args.generations), "--model.store", str(runs / f"{pruner}-store"),
              "--model.target_level", str(target)]
    fit(common, folder / "diffes")
    module, context, _ = load_run(common)
    schedules, info = same_budget_schedules(module, folder / "diffes", cache=folder / "baselines.json")
    fid = heldout_digits_fid()
    results = evaluate_schedules(context, schedules, num_probes=args.eval_probes, probe_seed=args.eval_seed,
                                 extra_metrics={"digits_fid_heldout": fid})
    where = {row: context for row in results}  # each row's run context (denoiser, store, sampling)
    if pruner == "obs":  # OBS-Diff: one model for every step, on its own 1-stage store, same unseen probes
        od_run = folder / "obsdiff"
        od_common = ["--config", str(ROOT / "configs/tiny_obsdiff.yaml"), *extra, "--model.num_stages", "1",
                     "--trainer.default_root_dir", str(od_run), "--trainer.max_epochs", "1",
                     "--model.target_level", str(target), "--model.pruner.init_args.sequential_level", str(target)]
        fit(od_common, od_run)
        _, od_context, _ = load_run(od_common)
        obsdiff = Schedule.load(od_run / "schedule.json")
        od = evaluate_schedules(od_context, {"OBS-Diff": obsdiff}, num_probes=args.eval_probes,
                                probe_seed=args.eval_seed, extra_metrics={"digits_fid_heldout": fid})
        # same probes, same dense model: its dense row must be ours (else the two are not comparable)
        same = abs(od["dense"]["digits_fid_heldout"] - results["dense"]["digits_fid_heldout"]) < 1e-6
        if not same or od["dense"]["macs"] != results["dense"]["macs"]:
            raise RuntimeError(f"OBS-Diff's dense reference differs from the stage-wise run's: {od['dense']} "
                               f"vs {results['dense']}")
        schedules["OBS-Diff"], where["OBS-Diff"] = obsdiff, od_context
        results["OBS-Diff"] = od["OBS-Diff"]
        info["search_fitness"]["OBS-Diff"] = obsdiff.fitness
    order = ["dense", "uniform", "mosaicdiff heuristic", "OBS-Diff", *SEARCHES]
    evals = {"random search": info["random"], "greedy search": info["greedy"],
             "Diff-ES": {"evals_used": info["evaluations"], "evals_budget": info["evaluations"]}}
    rows = {}
    for row_name in [r for r in order if r in results]:
        row = results[row_name]
        row["digits_fid_train"] = row.pop("digits_fid")  # the fitness metric's real set: training digits
        row["mac_fraction"] = row["macs"] / results["dense"]["macs"]
        row["search_fitness"] = info["search_fitness"].get(row_name)
        if row_name in evals:
            row["evals_used"] = evals[row_name]["evals_used"]
            row["evals_budget"] = evals[row_name]["evals_budget"]
            row["stopped_early"] = evals[row_name].get("stopped_early", False)
        row["latency_s"] = latency(where[row_name], schedules.get(row_name), args)
        rows[row_name] = row
    for row in rows.values():
        row["speedup"] = rows["dense"]["latency_s"] / row["latency_s"]
    H = context.levels_max
    table = {**wanted, "config": config, "pruner": module.pruner.name, "target_level": target, "levels_max": H,
             "sparsity": target / H, "depth": bool(context.store.depth), "num_stages": context.partition.num_stages,
             "steps": context.steps, "evaluations": info["evaluations"],
             "generations_run": Schedule.load(folder / "diffes" / "schedule.json").extra.get("generations"),
             "rows": rows}
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(cached)
    return table, False


def print_table(name: str, table: dict, args) -> None:
    unit = "blocks" if table["depth"] else "heads and MLP channels"
    print(f"\n{name}: {table['pruner']}, level {table['target_level']} of {table['levels_max']} "
          f"({100 * table['sparsity']:.1f} % of the {unit}), {table['num_stages']} stages, "
          f"{table['evaluations']} fitness evaluations per search; {args.eval_probes} unseen probes"
          f"{' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
    print(f"{'schedule':22s} {'levels':22s} {'evals':>5s} {'fit':>7s} {'SSIM':>7s} {'PSNR':>6s} {'acc %':>6s} "
          f"{'dFID-ho':>8s} {'dFID-tr':>8s} {'MACs %':>7s} {'ms/img':>7s} {'speedup':>7s}")
    for row_name, row in table["rows"].items():
        levels = "-" if row["levels"] is None else " ".join(map(str, row["levels"]))
        fit_value = "" if row["search_fitness"] is None else f"{row['search_fitness']:7.4f}"
        psnr = "inf" if row["psnr"] == float("inf") else f"{row['psnr']:6.2f}"
        print(f"{row_name:22s} {levels:22s} {row.get('evals_used', ''):>5} {fit_value:>7s} {row['ssim']:7.4f} "
              f"{psnr:>6s} {100 * row['class_accuracy']:6.1f} {row['digits_fid_heldout']:8.3f} "
              f"{row['digits_fid_train']:8.3f} {100 * row['mac_fraction']:7.2f} {1000 * row['latency_s']:7.2f} "
              f"{row['speedup']:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--generations", type=int, default=4,
                        help="Diff-ES generations (max_epochs); the baselines get as many fitness evaluations")
    parser.add_argument("--eval-probes", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=99991)
    parser.add_argument("--latency-batch-size", type=int, default=16)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke setting: 4 stages of 2 steps, 6 probes, 1 generation, 16 unseen probes")
    parser.add_argument("--runs", default=str(ROOT / "runs/paper_tables"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.generations, args.eval_probes, args.latency_batch_size, args.latency_repeats = 1, 16, 2, 1
    extra = TINY if args.tiny else []
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))
    out = Path(args.out or Path(__file__).parent / "results" / f"paper_tables{'_tiny' if args.tiny else ''}.json")
    start = time.time()
    report = {"tiny": args.tiny, "generations": args.generations, "eval_probes": args.eval_probes,
              "eval_seed": args.eval_seed, "latency_batch_size": args.latency_batch_size,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"torch threads {torch.get_num_threads()}", "settings": {}, "reused": []}
    for name in args.settings:
        table, reused = run_setting(name, args, extra, runs)
        report["settings"][name] = table
        if reused:
            report["reused"].append(name)
        print_table(name, table, args)
    report["elapsed_s"] = time.time() - start  # this invocation only: `reused` settings were computed before
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({report['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
