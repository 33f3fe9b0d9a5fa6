"""Searched schedule vs the baselines at the same budget, on probes the search never saw.

    python benchmarks/compare_baselines.py            # built-in model, OBS, 50 % (level 4 of 8)

Runs `diffes-pl fit --config configs/tiny_obs.yaml` (unless the run exists), then, on the same
store, probes and fitness (SSIM vs dense), random search and greedy search with the SAME number of
evaluations as the evolutionary search, plus the uniform schedule and the MosaicDiff-style
heuristic. Every final schedule is then scored on fresh probes (another seed, more probes): SSIM and
PSNR vs dense, class accuracy, digits-FID. Prints a table; writes benchmarks/results/compare_baselines.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _runs import fit, load_run, same_budget_schedules

from diffes_pl.search.holdout import evaluate_schedules

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny_obs.yaml"))
    parser.add_argument("--run", default=str(ROOT / "runs/compare_tiny_obs"))
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--eval-probes", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=99991)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare_baselines.json"))
    args = parser.parse_args()
    run = Path(args.run)
    common = ["--config", args.config, "--trainer.default_root_dir", str(run),
              "--trainer.max_epochs", str(args.generations)]
    fit(common, run)
    module, context, _ = load_run(common)
    hp, H, S = module.hparams, context.levels_max, context.partition.num_stages
    found, info = same_budget_schedules(module, run)
    n_evals = info["evaluations"]
    used = {"random search": info["random"]["evals_used"], "greedy search": info["greedy"]["evals_used"],
            "Diff-ES": n_evals}
    label = lambda name: f"{name} ({used[name]} evals)" if name in used else name
    schedules = {label(name): s for name, s in found.items()}
    search_fitness = {label(name): v for name, v in info["search_fitness"].items()}
    results = evaluate_schedules(context, schedules, num_probes=args.eval_probes, probe_seed=args.eval_seed)
    print(f"\nBuilt-in model, {module.pruner.name}, target level {hp.target_level} of {H} "
          f"({100 * hp.target_level / H:.1f} % sparsity), {S} stages; evaluation on {args.eval_probes} unseen probes")
    print(f"{'schedule':32s} {'levels':32s} {'search SSIM':>11s} {'SSIM':>7s} {'PSNR':>6s} {'acc %':>6s} "
          f"{'dFID':>7s} {'MACs x':>7s}")
    for name, row in results.items():
        levels = "dense" if row["levels"] is None else " ".join(map(str, row["levels"]))
        value = search_fitness.get(name)
        print(f"{name:32s} {levels:32s} {'' if value is None else f'{value:11.4f}':>11s} {row['ssim']:7.4f} "
              f"{row['psnr']:6.2f} {100 * row['class_accuracy']:6.1f} {row['digits_fid']:7.3f} {row['mac_ratio']:7.3f}")
    out = {"config": args.config, "generations": args.generations, "evaluations": n_evals,
           "eval_probes": args.eval_probes, "eval_seed": args.eval_seed,
           "search_fitness": search_fitness, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
