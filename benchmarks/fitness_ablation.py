"""Which fitness should the search optimise? SSIM vs dense, a no-reference fitness and both, each
searched over seeds and scored on held-out SSIM, KID / FID and accuracy (issue 26 part 7; the shape of
the paper's Tables 4 and 8 on the built-in model).

    python benchmarks/fitness_ablation.py --jobs 2      # OBS 50 %, 3 seeds × 30 generations per fitness (~2 h on 2 cores)
    python benchmarks/fitness_ablation.py --setting wanda-50 --metrics ssim digits_kid ssim_minus_kid
    python benchmarks/fitness_ablation.py --setting wanda-50 --rescore   # its report's schedules scored again, no search
    python benchmarks/fitness_ablation.py --tiny        # smoke run: numbers meaningless

Setting (`--setting`, one of paper_tables' settings; default obs-50: configs/tiny_obs.yaml, level 4
of 8, 10 stages of 2 DDIM steps, racing 8 → 16 → 64 probes, 30 generations), on its trajectory store
and, for the SSIM rows, its very Diff-ES runs (same folders under `--runs`: nothing is searched twice). Fitnesses (`--metrics`):
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
Scored on paper_tables' TEST probe blocks (block b for seed b; uniform and the MosaicDiff heuristic on
every block, paper_tables' random search of seed b — the same 484 evaluations, SSIM fitness — on
block b): SSIM vs dense, class accuracy, KID [95 % CI] and FID against the 297 held-out real digits;
decisions (paired, 95 %) of every fitness against uniform, the heuristic, random search and SSIM. Writes benchmarks/results/fitness_ablation.json
(another setting: fitness_ablation_<setting>.json).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _evidence import (add_search_arguments, block_seed, compare, earlier_report, heldout_features, print_decisions,
                       print_rows, same_images, score_block, summarise, to_json, write_report)
from _runs import TINY, fit_many, load_run
from paper_tables import SETTINGS, open_setting, schedule_of, setting_arguments

from diffes_pl.fitness import get_metric

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("ssim", "class_confidence", "ssim_confidence", "digits_kid", "ssim_minus_kid")
BASELINES = ("uniform", "mosaicdiff heuristic", "random search")


def run_folder(root: Path, metric: str, seed: int) -> Path:
    """paper_tables' Diff-ES folder for SSIM (shared), its own folder for another fitness."""
    return root / (f"evolution-{seed}" if metric == "ssim" else f"evolution-{metric}-{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="obs-50", help="a paper_tables setting")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS))
    add_search_arguments(parser, probes=200)
    parser.add_argument("--tiny", action="store_true", help="smoke setting: 4 stages, 2 generations, 2 seeds")
    parser.add_argument("--runs", default=str(ROOT / "runs/paper_tables"), help="paper_tables' runs (shared)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rescore", action="store_true",
                        help="score the schedules of the report (--out) again with the current statistics, no search")
    args = parser.parse_args()
    if args.tiny:
        args.generations, args.eval_probes, args.seeds, args.n_boot, args.race = 2, 12, args.seeds[:2], 100, "[2,4]"
    runs = Path(args.runs + ("_tiny" if args.tiny else ""))
    suffix = ("" if args.setting == "obs-50" else f"_{args.setting}") + ("_tiny" if args.tiny else "")
    out = Path(args.out or Path(__file__).parent / "results" / f"fitness_ablation{suffix}.json")
    earlier = earlier_report(out, args.rescore)
    if earlier is not None:  # the report's fitnesses, seeds and probes
        args.metrics = [m for m in METRICS if f"fitness {m}" in earlier["rows"]]
        args.seeds, args.eval_probes, args.generations = earlier["seeds"], earlier["eval_probes"], earlier["generations"]
    folder = runs / args.setting
    target = SETTINGS[args.setting][1]
    base = [*setting_arguments(args.setting, runs, TINY if args.tiny else []),
            "--trainer.max_epochs", str(args.generations)]

    def common(metric: str, seed: int, proposal: str = "evolution") -> list[str]:
        race = args.race if get_metric(metric).per_probe is not None else "null"
        run = run_folder(folder, metric, seed) if proposal == "evolution" else folder / f"{proposal}-{seed}"
        return [*base, "--trainer.default_root_dir", str(run), "--model.race_probes", race, "--model.proposal", proposal,
                "--model.search_seed", str(seed), *([] if metric == "ssim" else ["--model.metric", metric])]

    from diffes_pl.schedule import Schedule
    from diffes_pl.search import baselines

    if earlier is None:
        jobs = [(common(m, s), run_folder(folder, m, s)) for s in args.seeds for m in args.metrics]
        # paper_tables' random search (same folders): the baseline at equal evaluations
        jobs += [(common("ssim", s, "random"), folder / f"random-{s}") for s in args.seeds]
        fit_many(jobs[:1], 1)  # the store (if paper_tables has not built it), alone
        fit_many(jobs[1:], args.jobs)
        _, context, _ = load_run(common(args.metrics[0], args.seeds[0]))
        searched = {m: [Schedule.load(run_folder(folder, m, s) / "schedule.json") for s in args.seeds]
                    for m in args.metrics}
        spent = {m: {"search_fitness": [s.fitness for s in searched[m]],
                     "probe_steps": [s.extra["cost"]["probe_steps"] for s in searched[m]]} for m in args.metrics}
        random = [Schedule.load(folder / f"random-{s}" / "schedule.json") for s in args.seeds]
    else:  # the report's schedules on the setting's store (built by one generation if missing)
        _, context, _ = open_setting(args.setting, args, TINY if args.tiny else [], folder, runs)
        rows = earlier["rows"]
        searched = {m: [schedule_of(context, target, lv) for lv in rows[f"fitness {m}"]["levels"]] for m in args.metrics}
        spent = {m: {k: rows[f"fitness {m}"][k] for k in ("search_fitness", "probe_steps")} for m in args.metrics}
        random = [schedule_of(context, target, lv) for lv in rows["random search"]["levels"]]

    partition, H = context.partition, context.levels_max
    w, S = partition.steps_per_stage, partition.num_stages
    fixed = {"uniform": schedule_of(context, target, [target] * S),
             "mosaicdiff heuristic": schedule_of(context, target, baselines.mosaicdiff_schedule(S, H, target, w))}
    real = heldout_features()
    blocks: dict[str, list[dict]] = {}
    for b in range(len(args.seeds)):
        schedules = {**fixed, "random search": random[b], **{f"fitness {m}": searched[m][b] for m in args.metrics}}
        for row, result in score_block(context, schedules, args.eval_probes, block_seed(args.probe_set, b), real).items():
            blocks.setdefault(row, []).append(result)
    if earlier is not None:
        same_images(blocks, earlier["rows"], f"fitness_ablation {args.setting}")
    rows = {}
    for row, blks in blocks.items():
        rows[row] = {"levels": [blk["levels"] for blk in blks], **summarise(blks, real, args.n_boot)}
        if row.startswith("fitness "):
            rows[row].update(spent[row.removeprefix("fitness ")])
    decisions = {}
    for m in args.metrics:
        against = [r for r in (*BASELINES, "fitness ssim") if r != f"fitness {m}" and r in rows]
        decisions[m] = {r: compare(rows[f"fitness {m}"], rows[r], real, n_boot=args.n_boot) for r in against}
    report = {"tiny": args.tiny, "setting": args.setting, "generations": args.generations, "seeds": args.seeds,
              "race": args.race, "probe_set": args.probe_set, "eval_probes": args.eval_probes, "n_boot": args.n_boot,
              "probe_seeds": [block_seed(args.probe_set, b) for b in range(len(args.seeds))],
              "rows": to_json(rows), "decisions": decisions}
    print(f"\nFitness ablation, {args.setting}, {len(args.seeds)} seeds × {args.generations} generations; {args.probe_set} "
          f"probes {len(args.seeds)} × {args.eval_probes}{' (TINY SMOKE RUN: not a result)' if args.tiny else ''}")
    print_rows(rows)
    for m, d in decisions.items():
        print_decisions(f"fitness {m}", d)
    write_report(out, report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
