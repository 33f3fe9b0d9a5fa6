"""Dense vs uniform vs MosaicDiff heuristic vs the searched schedule, at the same budget: a table
shaped like the paper's Table 1 (sparsity, MACs, latency, speedup, IS, FID, precision, recall).

    diffes-pl fit --config configs/tiny_obs.yaml          # the searched schedule: runs/tiny_obs
    python benchmarks/compare.py                          # → benchmarks/results/compare_tiny_obs.json
    python benchmarks/compare.py --run runs/x --num-images 5000 --latency-batch-size 64

The run's own config.yaml (written by fit) fixes the denoiser, sampler, steps, partition and store.
Every row samples the same seeds and labels (`diffes_pl.evaluation.report.evaluate`); images are kept
under <run>/eval/ and reused on a rerun. Built-in model: digits-classifier features and the
held-out real digits; ~2 minutes on 2 CPU cores at the defaults.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_module(run: Path):
    """The run's DiffES module, from the config.yaml its fit saved (trainer/model/data only)."""
    from diffes_pl.cli import DiffESCLI

    config = run / "config.yaml"
    if not (run / "schedule.json").is_file() or not config.is_file():
        sys.exit(f"compare.py: {run} holds no schedule.json/config.yaml: run "
                 f"`diffes-pl fit --config configs/tiny_obs.yaml` first (or pass --run)")
    raw = yaml.safe_load(config.read_text())
    raw = {k: v for k, v in raw.items() if k in ("seed_everything", "trainer", "model", "data")}
    raw["trainer"] = {k: v for k, v in raw["trainer"].items() if k not in ("callbacks", "logger")}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(raw, tmp)
    cli = DiffESCLI(args=["--config", tmp.name, "--trainer.default_root_dir", str(run)], run=False)
    Path(tmp.name).unlink()
    return cli.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "runs/tiny_obs"), help="a fit run folder (schedule.json, store)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--latency-batch-size", type=int, default=16)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--reference", default=None, help="real images (default: digits-test for the built-in model)")
    parser.add_argument("--out", default=None, help="JSON (default: benchmarks/results/compare_<run name>.json)")
    args = parser.parse_args()

    from diffes_pl.evaluation.report import EvalConfig, evaluate, print_table
    from diffes_pl.schedule import Schedule
    from diffes_pl.search.baselines import mosaicdiff_schedule

    run = Path(args.run)
    module = load_module(run)
    searched = Schedule.load(run / "schedule.json")
    context = module.prepare(run)
    H, w, target = searched.levels_max, searched.steps_per_stage, searched.target_level
    mk = lambda levels: Schedule(list(levels), H, target, w, partition=searched.partition)
    schedules = {"mosaicdiff": mk(mosaicdiff_schedule(len(w), H, target, w)), "diff-es": searched}
    if float(target).is_integer():
        schedules = {"uniform": mk([int(target)] * len(w)), **schedules}
    config = EvalConfig(num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
                        latency_batch_size=args.latency_batch_size, latency_repeats=args.latency_repeats,
                        reference=args.reference)
    start = time.monotonic()
    rows = evaluate(context, None, schedules, config, run)
    hp = module.hparams
    title = (f"{hp.denoiser}, {searched.pruner or module.pruner.name}, level {target} of {H} "
             f"({100 * searched.sparsity:.2f} % sparsity), {len(w)} stages, {hp.steps} {hp.sampler} steps, "
             f"{args.num_images} images per row")
    print_table(rows, title=title)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"compare_{run.name}.json"
    from diffes_pl.io import write_json

    write_json(out, {"run": str(run), "title": title, "generations": searched.extra.get("generations"),
                     "finished": searched.extra.get("finished"), "config": vars(args),
                     "seconds": round(time.monotonic() - start, 1), "results": rows})
    print("wrote", out)


if __name__ == "__main__":
    main()
