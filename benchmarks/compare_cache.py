"""Feature caching, pruning and both, at the same MAC budgets, on probes the searches never saw
(issue 13 item 4).

    python benchmarks/compare_cache.py                   # built-in model, OBS, 50 % and 35 % of dense MACs
    python benchmarks/compare_cache.py --stages 10 --intervals 1 2 3    # 2-step stages: any k > 1 acts as 2
    python benchmarks/compare_cache.py --tiny            # smoke run: proves the script works; numbers meaningless
    python benchmarks/compare_cache.py --search-seed 1   # every search again with another search seed (own runs)

Rows, per MAC budget (a fraction of the dense trajectory's MACs):
- dense;
- cache-only, uniform interval: level 0 in every stage, the largest allowed k everywhere (its MACs
  are what caching alone reaches: with stages of w steps at most w − 1 of every w steps are cached);
- level-only Diff-ES: the search with cache interval 1 in every stage (`model.cache_intervals [1]`),
  budgeted in MACs like the others (for width pruning the same search as the level budget);
- level-only + fixed cache interval (the paper's stacking): levels searched with k fixed in every
  stage (`model.cache_intervals [k]`) at the same MAC budget;
- joint search: a level and an interval per stage (`--intervals`; default the config's
  `model.cache_intervals`: [1, 2, 3, 4] in configs/tiny_joint.yaml, 5 stages of 4 steps), its mutation
  weighing interval and level moves by `model.interval_rate` (`--interval-rate`; default: the model's,
  every single-stage move alike). Its run folder names the rate (joint-uniform, joint-ir0.5, …), so a
  row searched with another rate is never reused for it.
Every search runs `diffes-pl fit` on one shared trajectory store (resumed when a run stopped, skipped
when finished). Scored on fresh probes (another seed, more probes): SSIM and PSNR vs dense, plus
the denoiser's declared metrics (class accuracy and digits-FID for the built-in model); MACs (from
the schedules' own cost tables); CPU latency per image (routed + cached; timed in rounds, every row
once per round, median over the rounds).
Also the paired difference joint − stacking in SSIM over the same unseen probes (mean, standard error,
probes better / worse), so a gap can be told from noise. Prints a table; writes
benchmarks/results/compare_cache.json (`--tiny`: compare_cache_tiny.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml
from _evidence import write_report
from _runs import TINY as SMOKE
from _runs import fit

ROOT = Path(__file__).resolve().parents[1]
# the smoke setting of the test suite (tests/helpers/search_runs.py): 4 stages of 2 steps, few probes, Wanda
TINY = ["--model.pruner", "diffes_pl.pruners.WandaPruner", *SMOKE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny_joint.yaml"))
    parser.add_argument("--runs", default=str(ROOT / "runs/compare_cache"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--fixed-interval", type=int, default=2, help="k of the stacking row")
    parser.add_argument("--intervals", type=int, nargs="+", default=None,
                        help="k values of the joint search (default: the config's model.cache_intervals)")
    parser.add_argument("--interval-rate", type=float, default=None,
                        help="model.interval_rate of the joint search (default: the model's default, every "
                             "single-stage move equally likely; 0.5: the joint searches before the setting)")
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--eval-probes", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=99991)
    parser.add_argument("--latency-batch-size", type=int, default=8)
    parser.add_argument("--latency-repeats", type=int, default=5, help="timing rounds (every row once per round)")
    parser.add_argument("--stages", type=int, default=None,
                        help="stages of the 20-step partition (default: the config's; configs/tiny_joint.yaml: "
                             "5, 4 steps each, where k = 2, 3, 4 differ); e.g. 10 (2 steps each: k = 3 acts as "
                             "k = 2). Own runs and store: <runs>_s<stages>")
    parser.add_argument("--search-seed", type=int, default=None,
                        help="model.search_seed of every search (default: the config's): a replicate of the "
                             "comparison with other random moves, same calibration and probes. Own runs (and store: "
                             "copy <runs>/store there to skip calibrating again): <runs>_seed<s>")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke setting: 4 stages of 8 steps, 1 generation, 16 probes, 1 latency repeat")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.intervals is None:
        args.intervals = yaml.safe_load(Path(args.config).read_text())["model"].get("cache_intervals") or [1, 2]
    if args.tiny:
        args.generations, args.eval_probes, args.latency_batch_size, args.latency_repeats = 1, 16, 2, 1
    extra = (TINY if args.tiny else []) + ([] if args.stages is None else ["--model.num_stages", str(args.stages)])
    suffix = ("_tiny" if args.tiny else "") + ("" if args.stages is None else f"_s{args.stages}") \
        + ("" if args.search_seed is None else f"_seed{args.search_seed}")
    if args.search_seed is not None:
        extra += ["--model.search_seed", str(args.search_seed)]
    out = Path(args.out or Path(__file__).parent / "results" / f"compare_cache{suffix}.json")
    runs = Path(args.runs + suffix)
    searches = {"level-only Diff-ES": [1], f"level-only + fixed k={args.fixed_interval}": [args.fixed_interval],
                "joint search": sorted(set(args.intervals))}

    from diffes_pl.caching.installed import install_schedule
    from diffes_pl.caching.budget import step_cost_table
    from diffes_pl.cli import DiffESCLI
    from diffes_pl.evaluation.generate import latency_per_image
    from diffes_pl.schedule import Schedule
    from diffes_pl.step_costs import StepCosts
    from diffes_pl.search.holdout import evaluate_schedules
    from diffes_pl.search.settings import resolve_cache_branch

    def run_dir(budget: float, ks: list[int]) -> Path:
        rate = "uniform" if args.interval_rate is None else f"ir{args.interval_rate:g}"
        slug = "level" if ks == [1] else f"fixed{ks[0]}" if len(ks) == 1 else f"joint-{rate}"
        return runs / f"{budget:g}" / slug

    def common(budget: float, name: str, ks: list[int]) -> list[str]:
        rate = [] if len(ks) == 1 or args.interval_rate is None else ["--model.interval_rate", str(args.interval_rate)]
        return ["--config", args.config, *extra, "--trainer.default_root_dir", str(run_dir(budget, ks)),
                "--trainer.max_epochs", str(args.generations), "--model.store", str(runs / "store"),
                "--model.cache_intervals", json.dumps(ks), "--model.mac_budget", str(budget), *rate]

    for budget in args.budgets:  # the searches (sequential: one shared store, calibrated once)
        for name, ks in searches.items():
            fit(common(budget, name, ks), run_dir(budget, ks))

    first = common(args.budgets[0], "joint search", searches["joint search"])
    cli = DiffESCLI(args=first, run=False)  # run=False: no subcommand
    module, trainer = cli.model, cli.trainer
    module.ensure_store(trainer, cli.datamodule, log=lambda *_: None)
    context = module.prepare(trainer.default_root_dir)
    adapter, partition, store = context.adapter, context.partition, context.store
    H, w, S = context.levels_max, partition.steps_per_stage, partition.num_stages
    branch = resolve_cache_branch(adapter, module.settings.cache_branch)
    table = step_cost_table(adapter, store, partition, branch=branch)
    costs = StepCosts.parse(table, S, H)
    k_max = max(max(args.intervals), args.fixed_interval)
    cache_only_ks = [min(k_max, ws) for ws in w]
    cache_only_macs = costs.trajectory_macs([0] * S, cache_only_ks, w)
    dense_macs = costs.dense_macs(w)
    cache_only = Schedule([0] * S, H, 0, list(w), partition=partition.to_dict(), cache_intervals=cache_only_ks,
                          cache_branch=branch, mac_budget=cache_only_macs / dense_macs, step_costs=table)

    report: dict = {"config": args.config, "tiny": args.tiny, "generations": args.generations,
                    "eval_probes": args.eval_probes, "eval_seed": args.eval_seed, "cache_branch": branch,
                    "joint_interval_rate": module.settings.interval_rate, "search_seed": module.settings.search_seed,
                    "budgets": {}}
    def latency(schedule: Schedule | None) -> float:
        """Seconds per image of one timed sampling run (after one warm-up), routed + cached as `schedule`."""
        with install_schedule(adapter, store, schedule) as installed:
            return latency_per_image(adapter, installed.router, batch_size=args.latency_batch_size,
                                     sampler=context.sampler, steps=context.steps, guidance=context.guidance,
                                     repeats=1, cache=installed.cache)

    for budget in args.budgets:
        schedules = {f"cache-only k={max(cache_only_ks)}": cache_only}
        search_fitness = {}
        for name, ks in searches.items():
            schedules[name] = Schedule.load(run_dir(budget, ks) / "schedule.json")
            search_fitness[name] = schedules[name].fitness
        results = evaluate_schedules(context, schedules, num_probes=args.eval_probes, probe_seed=args.eval_seed,
                                     per_probe=("ssim",))
        per_probe = {name: torch.tensor(row.pop("ssim_per_probe"), dtype=torch.float64) for name, row in results.items()}
        stacking = f"level-only + fixed k={args.fixed_interval}"
        d = per_probe["joint search"] - per_probe[stacking]  # paired: the same unseen probes
        paired = {"against": stacking, "ssim_mean": float(d.mean()), "ssim_se": float(d.std() / len(d) ** 0.5),
                  "probes_better": int((d > 0).sum()), "probes_worse": int((d < 0).sum()), "probes": len(d)}
        for name, row in results.items():
            schedule = schedules.get(name)
            row["mac_fraction"] = row["macs"] / results["dense"]["macs"]
            row["search_fitness"] = search_fitness.get(name)
            row["generations"] = None if name not in searches else schedule.extra.get("generations")
        # latency in rounds, every row once per round (median over rounds): a change of the machine's
        # load then hits every row alike instead of whichever row was being timed
        times: dict[str, list[float]] = {name: [] for name in results}
        for _ in range(args.latency_repeats):
            for name in results:
                times[name].append(latency(schedules.get(name)))
        for name, row in results.items():
            row["latency_s"] = statistics.median(times[name])
        report["budgets"][f"{budget:g}"] = results
        report.setdefault("joint_minus_stacking", {})[f"{budget:g}"] = paired
        print(f"\nMAC budget {100 * budget:g} % of dense; {S} stages of {list(w)} steps, H = {H}, cache branch "
              f"{branch}; {args.eval_probes} unseen probes{' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
        print(f"{'schedule':30s} {'levels / intervals':34s} {'MACs %':>7s} {'SSIM':>7s} {'PSNR':>6s} "
              f"{'acc %':>6s} {'dFID':>7s} {'ms/img':>8s}")
        for name, row in results.items():
            shown = "dense" if row["levels"] is None else \
                " ".join(map(str, row["levels"])) + " / " + " ".join(map(str, row.get("intervals", [1] * S)))
            acc = f"{100 * row['class_accuracy']:6.1f}" if "class_accuracy" in row else f"{'':>6s}"
            fid = f"{row['digits_fid']:7.3f}" if "digits_fid" in row else f"{'':>7s}"
            print(f"{name:30s} {shown:34s} {100 * row['mac_fraction']:7.2f} {row['ssim']:7.4f} {row['psnr']:6.2f} "
                  f"{acc} {fid} {1000 * row['latency_s']:8.2f}")
        print(f"joint search − stacking, paired over the {paired['probes']} probes: SSIM {paired['ssim_mean']:+.5f} "
              f"± {paired['ssim_se']:.5f} (s.e.); joint better on {paired['probes_better']}, worse on "
              f"{paired['probes_worse']}")
    write_report(out, report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
