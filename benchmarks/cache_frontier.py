"""Caching and pruning as quality-vs-MACs frontiers over search seeds: does choosing a cache interval
per stage (the joint search) beat pruning first and caching at a fixed interval (stacking) at EQUAL
MACs? (issue 26 part 4)

    python benchmarks/cache_frontier.py --jobs 2     # 5 budgets × 3 searches × 3 seeds, 30 generations (hours on 2 cores)
    python benchmarks/cache_frontier.py --tiny       # smoke run: numbers meaningless

Setting: configs/tiny_joint.yaml (built-in model, OBS, 5 stages of 4 DDIM steps, cache branch at the
middle block), racing 8 → 16 → 64 probes, `--generations` generations, one shared store. Curves:
- level-only: Diff-ES with cache interval 1 everywhere (`model.cache_intervals [1]`), MAC-budgeted;
- stacking: levels searched with a fixed interval k in every stage (`[k]`, `--fixed-interval` 2) —
  the stronger form of "prune, then cache at k": the level search already sees the cache;
- joint: a level and an interval per stage (`[1, 2, 3, 4]`);
- cache-only: no pruning, the same interval k in every stage, k = 2, 3, 4 (fixed points; caching
  alone cannot go below what k = 4 leaves).
Each search runs at every `--budgets` fraction of dense MACs (default 30 … 70 %) and every search seed.

Scored on TEST probe blocks (`_evidence.py`; seed b's schedules on block b): SSIM vs dense per
probe, KID / FID of the digits features against the held-out digits, MAC fraction of each schedule as
found (a search may end below its budget). Decision per budget: the joint schedule against the
stacking FRONTIER at the joint schedule's own MACs — per probe, the stacking SSIM linearly
interpolated between the two stacking schedules (same seed) whose MACs bracket it — paired over the
pooled probes (bootstrap interval + sign-flip, 95 %): "above" (win), "on" (tie), "below" (loss). Where
a seed's joint schedule lies outside the stacking points' MAC range it meets the nearest point, and the
decision counts only one way: above when it beats the cheapest stacking point at fewer MACs, below when
it loses to the dearest at more MACs; anything else is "outside". Never a point compared with one
further along. KID and FID, which cannot be interpolated probe by probe: the joint against the stacking
schedule of the same budget (`compare`), with both MAC fractions.
Writes benchmarks/results/cache_frontier.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _evidence import (add_search_arguments, block_seed, compare, heldout_features, score_block, summarise, to_json,
                       write_report)
from _runs import TINY, fit_many, load_run

from diffes_pl.evaluation.intervals import paired_difference

ROOT = Path(__file__).resolve().parents[1]


def interpolate(points: list[tuple[float, list[float]]], mac: float) -> list[float] | None:
    """Per-probe values of a frontier [(MAC fraction, per-probe values)] linearly interpolated at `mac`;
    None outside the MAC range the points span."""
    points = sorted(points, key=lambda p: p[0])
    for (m0, v0), (m1, v1) in zip(points, points[1:]):
        if m0 <= mac <= m1:
            t = 0.0 if m1 == m0 else (mac - m0) / (m1 - m0)
            return [a + t * (b - a) for a, b in zip(v0, v1)]
    return None


def frontier_reference(points: list[tuple[float, list[float]]], mac: float) -> tuple[list[float], str]:
    """What a schedule at `mac` is compared with on a frontier [(MAC fraction, per-probe values)]: the
    interpolated values and "inside" where two points bracket `mac`; else the nearest point and the side
    `mac` lies on ("cheaper": fewer MACs than every point, "dearer": more than every point)."""
    inside = interpolate(points, mac)
    if inside is not None:
        return inside, "inside"
    points = sorted(points, key=lambda p: p[0])
    return (points[0][1], "cheaper") if mac < points[0][0] else (points[-1][1], "dearer")


def position(decision: str, sides: list[str]) -> str:
    """Where the joint schedules lie against the stacking frontier, from the paired test's decision and
    where each seed's schedule fell (`frontier_reference`). Against a nearest point it counts only in
    the direction that holds on any frontier that gains quality with MACs: better than the cheapest point
    at fewer MACs is above; worse than the dearest point at more MACs is below; else "outside"."""
    if decision == "win" and "dearer" not in sides:
        return "above"
    if decision == "loss" and "cheaper" not in sides:
        return "below"
    if decision == "tie" and all(side == "inside" for side in sides):
        return "on"
    return "outside"


def cache_only(context, module, k: int):
    """Level 0 in every stage and interval k (at most each stage's steps)."""
    from diffes_pl.caching.budget import step_cost_table
    from diffes_pl.schedule import Schedule
    from diffes_pl.search.settings import resolve_cache_branch
    from diffes_pl.step_costs import StepCosts

    partition, S = context.partition, context.partition.num_stages
    w = partition.steps_per_stage
    branch = resolve_cache_branch(context.adapter, module.settings.cache_branch)
    table = step_cost_table(context.adapter, context.store, partition, branch=branch)
    costs = StepCosts.parse(table, S, context.levels_max)
    ks = [min(k, ws) for ws in w]
    fraction = costs.trajectory_macs([0] * S, ks, w) / costs.dense_macs(w)
    return Schedule([0] * S, context.levels_max, 0, list(w), partition=partition.to_dict(), cache_intervals=ks,
                    cache_branch=branch, mac_budget=fraction, step_costs=table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny_joint.yaml"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--fixed-interval", type=int, default=2)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 4])
    add_search_arguments(parser, probes=200)
    parser.add_argument("--tiny", action="store_true", help="smoke setting: 4 stages of 2 steps, 2 budgets, 2 seeds")
    parser.add_argument("--runs", default=str(ROOT / "runs/cache_frontier"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.generations, args.eval_probes, args.seeds, args.n_boot, args.race = 2, 12, args.seeds[:2], 100, "[2,4]"
        args.budgets, args.intervals = [0.45, 0.6, 0.75], [1, 2]
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))
    out = Path(args.out or Path(__file__).parent / "results" / f"cache_frontier{'_tiny' if args.tiny else ''}.json")
    curves = {"level-only": [1], f"stacking k={args.fixed_interval}": [args.fixed_interval],
              "joint": sorted(set(args.intervals))}
    slug = {"level-only": "level", f"stacking k={args.fixed_interval}": f"fixed{args.fixed_interval}", "joint": "joint"}

    def common(curve: str, budget: float, seed: int) -> list[str]:
        return ["--config", args.config, *(TINY if args.tiny else []), "--model.store", str(runs / "store"),
                "--trainer.default_root_dir", str(runs / f"{budget:g}" / f"{slug[curve]}-{seed}"),
                "--trainer.max_epochs", str(args.generations), "--trainer.callbacks", "[]",
                "--model.cache_intervals", json.dumps(curves[curve]), "--model.mac_budget", str(budget),
                "--model.search_seed", str(seed), "--model.race_probes", args.race]

    jobs = [(common(c, b, s), runs / f"{b:g}" / f"{slug[c]}-{s}") for s in args.seeds for b in args.budgets
            for c in curves]
    fit_many(jobs[:1], 1)  # the shared store, alone
    fit_many(jobs[1:], args.jobs)
    module, context, _ = load_run(jobs[0][0])

    from diffes_pl.schedule import Schedule

    fixed = {f"cache-only k={k}": cache_only(context, module, k) for k in range(2, max(args.intervals) + 1)}
    real = heldout_features()
    blocks: dict[str, list[dict]] = {}
    for b, seed in enumerate(args.seeds):
        schedules = {**fixed, **{f"{c} @ {budget:g}": Schedule.load(runs / f"{budget:g}" / f"{slug[c]}-{seed}" /
                                                                      "schedule.json")
                                 for c in curves for budget in args.budgets}}
        for row, result in score_block(context, schedules, args.eval_probes, block_seed(args.probe_set, b), real).items():
            blocks.setdefault(row, []).append(result)
    dense_macs = blocks["dense"][0]["macs"]
    rows = {}
    for row, blks in blocks.items():
        rows[row] = {"levels": [blk["levels"] for blk in blks], "intervals": [blk["intervals"] for blk in blks],
                     "mac_fraction": [blk["macs"] / dense_macs for blk in blks], **summarise(blks, real, args.n_boot)}
    stacking = f"stacking k={args.fixed_interval}"
    decisions = {}
    P = args.eval_probes
    for budget in args.budgets:
        joint = rows[f"joint @ {budget:g}"]
        diffs, sides = [], []
        for b in range(len(args.seeds)):
            points = [(rows[f"{stacking} @ {x:g}"]["mac_fraction"][b],
                       rows[f"{stacking} @ {x:g}"]["ssim_per_probe"][b * P:(b + 1) * P]) for x in args.budgets]
            frontier, side = frontier_reference(points, joint["mac_fraction"][b])
            sides.append(side)
            diffs += [j - f for j, f in zip(joint["ssim_per_probe"][b * P:(b + 1) * P], frontier)]
        d = paired_difference(torch.tensor(diffs), torch.zeros(len(diffs)), n_boot=args.n_boot).to_dict()
        d["position"], d["sides"] = position(d["decision"], sides), sides
        d["joint_mac_fraction"] = joint["mac_fraction"]
        decisions[f"{budget:g}"] = d
    # KID / FID cannot be interpolated probe by probe: the joint and stacking schedules of one budget,
    # each with its MACs (a joint win counts where its MACs are not above stacking's)
    same_budget = {f"{budget:g}": {**compare(rows[f"joint @ {budget:g}"], rows[f"{stacking} @ {budget:g}"], real,
                                             args.n_boot),
                                   "joint_mac_fraction": rows[f"joint @ {budget:g}"]["mac_fraction"],
                                   "stacking_mac_fraction": rows[f"{stacking} @ {budget:g}"]["mac_fraction"]}
                   for budget in args.budgets}
    report = {"tiny": args.tiny, "config": args.config, "generations": args.generations, "seeds": args.seeds,
              "race": args.race, "budgets": args.budgets, "probe_set": args.probe_set, "eval_probes": P,
              "n_boot": args.n_boot, "probe_seeds": [block_seed(args.probe_set, b) for b in range(len(args.seeds))],
              "rows": to_json(rows), "joint_vs_stacking_frontier": decisions,
              "joint_vs_stacking_same_budget": same_budget}
    print(f"\nQuality vs MACs, {len(args.seeds)} seeds × {args.generations} generations; {args.probe_set} probes "
          f"{len(args.seeds)} × {P}{' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
    print(f"{'row':28s} {'MACs % per seed':>24s} {'SSIM':>15s} {'KID×1e3':>9s}")
    for row, r in rows.items():
        macs = " ".join(f"{100 * m:.1f}" for m in r["mac_fraction"])
        a = r["across_seeds"]["ssim"]
        print(f"{row:28s} {macs:>24s} {a['mean']:7.4f}±{a['std']:.4f} {1e3 * r['pooled']['kid']:9.3f}")
    print("joint − stacking frontier at the joint schedule's MACs (SSIM, pooled probes, 95 %):")
    for budget, d in decisions.items():
        where = "" if set(d["sides"]) == {"inside"} else f" (joint MACs vs the frontier per seed: {' '.join(d['sides'])})"
        print(f"  budget {budget}: {d['mean_diff']:+.5f} [{d['low']:+.5f}, {d['high']:+.5f}] p {d['p_value']:.3g}"
              f" → {d['position']}{where}")
    print(f"joint − {stacking} at the same budget (pooled probes, 95 %; MACs % mean over seeds):")
    for budget, d in same_budget.items():
        macs = [100 * sum(d[k]) / len(d[k]) for k in ("joint_mac_fraction", "stacking_mac_fraction")]
        print(f"  budget {budget}: MACs {macs[0]:.2f} vs {macs[1]:.2f}; " + "; ".join(
            f"{m} {d[m]['mean_diff'] * (1e3 if m == 'kid' else 1):+.4g} {d[m]['decision']}" for m in ("ssim", "kid", "fid")))
    write_report(out, report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
