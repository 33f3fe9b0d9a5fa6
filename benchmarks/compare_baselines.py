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
import subprocess
import sys
from pathlib import Path

import torch

from diffes_pl.cli import DiffESCLI
from diffes_pl.partition import Schedule
from diffes_pl.search import baselines
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
    if not (run / "schedule.json").exists() or not json.loads((run / "schedule.json").read_text())["extra"]["finished"]:
        resume = ["--ckpt_path", "last"] if (run / "checkpoints" / "last.ckpt").exists() else []
        subprocess.run([sys.executable, "-m", "diffes_pl.cli", "fit", *common, *resume], check=True)
    cli = DiffESCLI(args=common, run=False)  # run=False: no subcommand
    module, trainer = cli.model, cli.trainer
    module.ensure_store(trainer, cli.datamodule, log=lambda *_: None)
    module.trainer = trainer
    module.setup("fit")
    search, context = module.search, module.context
    searched = Schedule.load(run / "schedule.json")
    archive = [json.loads(l) for l in (run / "evaluations.jsonl").read_text().splitlines()]
    n_evals = len(archive)
    hp = module.hparams
    H, w, S = context.levels_max, context.partition.steps_per_stage, context.partition.num_stages

    def evaluate(levels) -> float:
        value, _ = search.evaluate(tuple(levels), None)
        return search.metric.score(value)

    gen = torch.Generator().manual_seed(hp.search_seed + 1)
    rand = baselines.random_search(evaluate, n_evals, S, H, hp.target_level, w, gen)
    greedy = baselines.greedy_search(evaluate, n_evals, S, H, hp.target_level, w, hp.max_move)
    mk = lambda levels: Schedule(list(levels), H, hp.target_level, w, partition=context.partition.to_dict())  # noqa: E731
    schedules = {
        "uniform": mk([int(hp.target_level)] * S),
        "mosaicdiff heuristic": mk(baselines.mosaicdiff_schedule(S, H, hp.target_level, w)),
        f"random search ({rand.evals_used} evals)": mk(rand[0]),
        f"greedy search ({greedy.evals_used} evals)": mk(greedy[0]),
        f"Diff-ES ({n_evals} evals)": searched,
    }
    search_fitness = {name: search.fitness.get(tuple(s.levels)) or evaluate(s.levels) for name, s in schedules.items()}
    results = evaluate_schedules(context, schedules, num_probes=args.eval_probes, probe_seed=args.eval_seed)
    print(f"\nBuilt-in model, {module.pruner.name}, target level {hp.target_level} of {H} "
          f"({100 * hp.target_level / H:.1f} % sparsity), {S} stages; evaluation on {args.eval_probes} unseen probes")
    print(f"{'schedule':32s} {'levels':32s} {'search SSIM':>11s} {'SSIM':>7s} {'PSNR':>6s} {'acc %':>6s} "
          f"{'dFID':>7s} {'MACs x':>7s}")
    for name, row in results.items():
        levels = "dense" if row["levels"] is None else " ".join(map(str, row["levels"]))
        fit = search_fitness.get(name)
        print(f"{name:32s} {levels:32s} {'' if fit is None else f'{fit:11.4f}':>11s} {row['ssim']:7.4f} "
              f"{row['psnr']:6.2f} {100 * row['class_accuracy']:6.1f} {row['digits_fid']:7.3f} {row['mac_ratio']:7.3f}")
    out = {"config": args.config, "generations": args.generations, "evaluations": n_evals,
           "eval_probes": args.eval_probes, "eval_seed": args.eval_seed,
           "search_fitness": search_fitness, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
