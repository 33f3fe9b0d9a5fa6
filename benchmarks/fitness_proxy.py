"""Does the search's fitness rank schedules as held-out distribution quality does? (issue 26 part 8)

    python benchmarks/fitness_proxy.py --setting wanda-50     # after paper_tables.py ran that setting
    python benchmarks/fitness_proxy.py --setting depth-2of6 --metric ssim_minus_kid   # after fitness_ablation.py
    python benchmarks/fitness_proxy.py --tiny                 # smoke run: numbers meaningless

The schedules are the ones paper_tables' searches of `--setting` already evaluated (Diff-ES and random
search, search seed `--seed`: their evaluations.jsonl), fully scored (not raced out), distinct, all at
the setting's budget: `--schedules` of them evenly spaced in search fitness (SSIM vs dense on the
search's 64 probes), the best of each search included. Each is sampled on one TEST probe block
(`_evidence.py`, block `--seed`) and scored there: SSIM vs dense, KID and FID of the digits features
against the 297 held-out digits. Reported: Spearman's ρ between the search fitness and each held-out
score (KID and FID negated, so that ρ > 0 means "higher fitness, better held-out score"), with a
percentile bootstrap interval over schedules (95 %), and the spread of the held-out scores next to
the noise of one score (KID's bootstrap interval on the dense row).
If ρ(fitness, held-out SSIM) is high but ρ(fitness, −KID) is not, more search on this fitness buys
fidelity to the dense model and no distribution quality.
`--metric` (default ssim): another fitness of fitness_ablation.py, whose Diff-ES archive (its only search)
is read instead. Each schedule's fitness is also recomputed on the test block ("retest": the same
metric, e.g. KID against the TRAINING digits, on other probes): ρ(search fitness, retest) is how well
the fitness on the search's 64 probes ranks schedules at all, and the search's pick's drop from its
search fitness to its retest (next to the others' mean drop) is the winner's curse of selecting on a
noisy estimate. Writes benchmarks/results/fitness_proxy_<setting>.json (another metric:
fitness_proxy_<setting>_<metric>.json).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _evidence import add_probe_arguments, block_seed, heldout_features, row_statistics, score_block, write_report
from _runs import TINY, load_run
from fitness_ablation import METRICS, run_folder
from paper_tables import SETTINGS, schedule_of, setting_arguments

from diffes_pl.fitness import get_metric
from diffes_pl.search.archive_file import read_evaluations

ROOT = Path(__file__).resolve().parents[1]


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0 … n−1, ties given their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's of the (tie-averaged) ranks; nan when one side is constant."""
    rx, ry = ranks(np.asarray(x)), ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def rho_interval(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """ρ and its percentile bootstrap interval (schedules resampled), 95 %."""
    rng = np.random.default_rng(seed)
    boot = [spearman(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(n_boot))]
    boot = np.asarray(boot)[np.isfinite(boot)]  # a resample of one repeated schedule has no ranks
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"rho": spearman(x, y), "low": float(low), "high": float(high)}


def pick(evaluations: dict[str, list[dict]], n: int) -> list[dict]:
    """`n` distinct fully scored schedules evenly spaced in fitness, each search's best among them."""
    seen, pool = set(), []
    for source, rows in evaluations.items():
        for row in rows:
            key = tuple(row["levels"])
            if not row.get("raced_out") and key not in seen:
                seen.add(key)
                pool.append({**row, "source": source})
    if len(pool) < 3:
        raise RuntimeError(f"only {len(pool)} fully scored schedules in the archives: run paper_tables.py first")
    pool.sort(key=lambda r: r["fitness"])
    chosen = {int(round(i)) for i in np.linspace(0, len(pool) - 1, min(n, len(pool)))}
    for source in evaluations:  # each search's final pick
        best = max((i for i, r in enumerate(pool) if r["source"] == source), key=lambda i: pool[i]["fitness"])
        chosen.add(best)
    return [pool[i] for i in sorted(chosen)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="wanda-50")
    parser.add_argument("--seed", type=int, default=0, help="search seed whose archives are read (and probe block)")
    parser.add_argument("--metric", choices=METRICS, default="ssim", help="whose Diff-ES archive is read")
    parser.add_argument("--schedules", type=int, default=24)
    parser.add_argument("--n-boot", type=int, default=1000)
    add_probe_arguments(parser, probes=200)
    parser.add_argument("--runs", default=str(ROOT / "runs/paper_tables"), help="paper_tables' runs")
    parser.add_argument("--tiny", action="store_true", help="paper_tables --tiny's runs, 12 probes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.eval_probes, args.n_boot, args.schedules = 12, 100, 6
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))
    metric = get_metric(args.metric)
    suffix = ("" if args.metric == "ssim" else f"_{args.metric}") + ("_tiny" if args.tiny else "")
    out = Path(args.out or Path(__file__).parent / "results" / f"fitness_proxy_{args.setting}{suffix}.json")
    folder = runs / args.setting
    # random search optimised SSIM: its archive's fitness is another metric's
    sources = {"evolution": run_folder(folder, args.metric, args.seed),
               **({"random": folder / f"random-{args.seed}"} if args.metric == "ssim" else {})}
    evaluations = {s: [{**r, "fitness": metric.score(r["fitness"])} for r in read_evaluations(f / "evaluations.jsonl")]
                   for s, f in sources.items()}  # oriented: higher is better
    chosen = pick(evaluations, args.schedules)
    first = [*setting_arguments(args.setting, runs, TINY if args.tiny else []),
             "--trainer.default_root_dir", str(folder / f"evolution-{args.seed}")]
    module, context, _ = load_run(first)

    target = int(module.hparams.target_level)
    schedules = {f"{r['source']} {' '.join(map(str, r['levels']))}": schedule_of(context, target, r["levels"])
                 for r in chosen}
    real = heldout_features()
    probe_seed = block_seed(args.probe_set, args.seed)
    metrics = tuple(dict.fromkeys(("ssim", "psnr", args.metric)))
    scored = score_block(context, schedules, args.eval_probes, probe_seed, real, metrics=metrics)
    dense_kid = row_statistics(scored["dense"]["features"], real, args.n_boot)
    fitness = np.array([r["fitness"] for r in chosen])
    retest = np.array([metric.score(scored[name][args.metric]) for name in schedules])
    best = max((i for i, r in enumerate(chosen) if r["source"] == "evolution"), key=lambda i: fitness[i])  # its pick
    drop = fitness - retest
    held = {"ssim": np.array([scored[name]["ssim"] for name in schedules]),
            "-kid": -np.array([scored[name]["kid"] for name in schedules]),
            "-fid": -np.array([scored[name]["fid"] for name in schedules])}
    correlations = {k: rho_interval(fitness, v, args.n_boot) for k, v in held.items()}
    correlations["retest"] = rho_interval(fitness, retest, args.n_boot)
    curse = {"pick_levels": chosen[best]["levels"], "pick_search_fitness": float(fitness[best]),
             "pick_retest": float(retest[best]), "pick_drop": float(drop[best]),
             "others_mean_drop": float(np.delete(drop, best).mean()),
             "retest_rank_of_pick": int((retest > retest[best]).sum()) + 1}
    report = {"tiny": args.tiny, "setting": args.setting, "metric": args.metric, "search_seed": args.seed,
              "probe_set": args.probe_set,
              "probe_seed": probe_seed, "eval_probes": args.eval_probes, "n_boot": args.n_boot,
              "schedules": [{"source": r["source"], "levels": r["levels"], "search_fitness": r["fitness"],
                             "retest_fitness": float(t), **{k: scored[name][k] for k in ("ssim", "kid", "fid")}}
                            for r, name, t in zip(chosen, schedules, retest)],
              "winners_curse": curse,
              "dense": {"kid": dense_kid, "fid": scored["dense"]["fid"]},
              "spearman_fitness_vs": correlations,
              "spread": {k: {"min": float(v.min()), "max": float(v.max())} for k, v in held.items()}}
    print(f"\n{args.setting}: {len(chosen)} schedules from the seed-{args.seed} archives, scored on {args.probe_set} "
          f"block {probe_seed} ({args.eval_probes} probes){' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
    print(f"{'source':10s} {'levels':22s} {'fitness':>8s} {'retest':>8s} {'SSIM':>7s} {'KID×1e3':>8s} {'FID':>6s}")
    for row in report["schedules"]:
        print(f"{row['source']:10s} {' '.join(map(str, row['levels'])):22s} {row['search_fitness']:8.4f} "
              f"{row['retest_fitness']:8.4f} {row['ssim']:7.4f} {1e3 * row['kid']:8.2f} {row['fid']:6.2f}")
    print(f"dense: KID×1e3 {1e3 * dense_kid['kid']:.2f} [{1e3 * dense_kid['kid_low']:.2f}, "
          f"{1e3 * dense_kid['kid_high']:.2f}], FID {scored['dense']['fid']:.2f}")
    for k, c in correlations.items():
        print(f"Spearman ρ(search fitness, held-out {k:6s}) = {c['rho']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
    print(f"the pick {' '.join(map(str, curse['pick_levels']))}: {args.metric} {curse['pick_search_fitness']:.4f} on the "
          f"search's probes, {curse['pick_retest']:.4f} on the block (drop {curse['pick_drop']:+.4f}, the others' "
          f"mean {curse['others_mean_drop']:+.4f}); rank {curse['retest_rank_of_pick']} of {len(chosen)} on the block")
    write_report(out, report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
