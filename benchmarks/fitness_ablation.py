"""Which fitness should the search optimise? SSIM vs dense, a no-reference fitness and both, each
searched over seeds and scored on held-out SSIM, KID / FID and accuracy (issue 26 part 7; the shape of
the paper's Tables 4 and 8 on the built-in model).

    python benchmarks/fitness_ablation.py --jobs 2      # OBS 50 %, 3 seeds × 30 generations per fitness (~2 h on 2 cores)
    python benchmarks/fitness_ablation.py --tiny        # smoke run: numbers meaningless

Setting: paper_tables' obs-50 (configs/tiny_obs.yaml, level 4 of 8, 10 stages of 2 DDIM steps, racing
8 → 16 → 64 probes, 30 generations), on its trajectory store and, for the SSIM rows, its very Diff-ES
runs (same folders under `--runs`: nothing is searched twice). Fitnesses (`--metrics`):
- ssim: SSIM vs the dense model on the same probes (the default; reference-based);
- class_confidence: the digits classifier's probability of each probe's conditioning label — no
  reference, the built-in model's stand-in for CLIP-IQA / TOPIQ;
- ssim_confidence: per probe SSIM × that probability (both at once);
- digits_kid: KID of the probes' digits-classifier features (standardised) against the TRAINING
  digits — distribution-aware, and never the held-out digits the table reports on;
- ssim_minus_kid: mean SSIM − that KID (comparable units here: SSIM spans ≈ 0.03 between schedules,
  KID ≈ 0.01–0.07).
The first three are raced (per-probe values); the KID fitnesses are set statistics, so their
searches score every child on all 64 probes (same generations, more probe-steps: see `probe_steps`).
Scored on paper_tables' TEST probe blocks (block b for seed b; uniform on every block): SSIM vs dense,
class accuracy, KID [95 % CI] and FID against the 297 held-out real digits; decisions (paired, 95 %)
of every fitness against SSIM and against uniform. Writes benchmarks/results/fitness_ablation.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _evidence import (add_search_arguments, block_seed, compare, heldout_features, print_decisions, print_rows,
                       score_block, summarise, to_json, write_report)
from _runs import TINY, fit_many, load_run

from diffes_pl.fitness import get_metric

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("ssim", "class_confidence", "ssim_confidence", "digits_kid", "ssim_minus_kid")


def run_folder(root: Path, metric: str, seed: int) -> Path:
    """paper_tables' Diff-ES folder for SSIM (shared), its own folder for another fitness."""
    return root / (f"evolution-{seed}" if metric == "ssim" else f"evolution-{metric}-{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", nargs="+", default=list(METRICS))
    add_search_arguments(parser, probes=200)
    parser.add_argument("--tiny", action="store_true", help="smoke setting: 4 stages, 2 generations, 2 seeds")
    parser.add_argument("--runs", default=str(ROOT / "runs/paper_tables"), help="paper_tables' runs (shared)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.generations, args.eval_probes, args.seeds, args.n_boot, args.race = 2, 12, args.seeds[:2], 100, "[2,4]"
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))
    out = Path(args.out or Path(__file__).parent / "results" / f"fitness_ablation{'_tiny' if args.tiny else ''}.json")
    folder = runs / "obs-50"
    base = ["--config", str(ROOT / "configs/tiny_obs.yaml"), *(TINY if args.tiny else []),
            "--model.store", str(runs / "obs-store"), "--model.target_level", "4", "--trainer.callbacks", "[]",
            "--trainer.max_epochs", str(args.generations), "--model.proposal", "evolution"]

    def common(metric: str, seed: int) -> list[str]:
        race = args.race if get_metric(metric).per_probe is not None else "null"
        return [*base, "--trainer.default_root_dir", str(run_folder(folder, metric, seed)), "--model.race_probes", race,
                "--model.search_seed", str(seed), *([] if metric == "ssim" else ["--model.metric", metric])]

    jobs = [(common(m, s), run_folder(folder, m, s)) for s in args.seeds for m in args.metrics]
    fit_many(jobs[:1], 1)  # the store (if paper_tables has not built it), alone
    fit_many(jobs[1:], args.jobs)
    _, context, _ = load_run(common(args.metrics[0], args.seeds[0]))

    from diffes_pl.schedule import Schedule

    partition = context.partition
    uniform = Schedule([4] * partition.num_stages, context.levels_max, 4, partition.steps_per_stage,
                       partition=partition.to_dict())
    real = heldout_features()
    blocks: dict[str, list[dict]] = {}
    searched = {m: [Schedule.load(run_folder(folder, m, s) / "schedule.json") for s in args.seeds] for m in args.metrics}
    for b in range(len(args.seeds)):
        schedules = {"uniform": uniform, **{f"fitness {m}": searched[m][b] for m in args.metrics}}
        for row, result in score_block(context, schedules, args.eval_probes, block_seed(args.probe_set, b), real).items():
            blocks.setdefault(row, []).append(result)
    rows = {}
    for row, blks in blocks.items():
        rows[row] = {"levels": [blk["levels"] for blk in blks], **summarise(blks, real, args.n_boot)}
        if row.startswith("fitness "):
            found = searched[row.removeprefix("fitness ")]
            rows[row]["search_fitness"] = [s.fitness for s in found]
            rows[row]["probe_steps"] = [s.extra["cost"]["probe_steps"] for s in found]
    decisions = {}
    for m in args.metrics:
        against = [r for r in ("uniform", "fitness ssim") if r != f"fitness {m}" and r in rows]
        decisions[m] = {r: compare(rows[f"fitness {m}"], rows[r], real, n_boot=args.n_boot) for r in against}
    report = {"tiny": args.tiny, "setting": "obs-50", "generations": args.generations, "seeds": args.seeds,
              "race": args.race, "probe_set": args.probe_set, "eval_probes": args.eval_probes, "n_boot": args.n_boot,
              "probe_seeds": [block_seed(args.probe_set, b) for b in range(len(args.seeds))],
              "rows": to_json(rows), "decisions": decisions}
    print(f"\nFitness ablation, OBS 50 %, {len(args.seeds)} seeds × {args.generations} generations; {args.probe_set} "
          f"probes {len(args.seeds)} × {args.eval_probes}{' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
    print_rows(rows)
    for m, d in decisions.items():
        print_decisions(f"fitness {m}", d)
    write_report(out, report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
