"""Denoiser steps saved by starting each rollout from the longest stage prefix it shares with a
cached schedule (the parent's, or any survivor's or this generation's).

    python benchmarks/nfe_savings.py          # 100-generation default search (16 + 4, 10 stages), ~3 min

Runs `diffes-pl fit` on the built-in model with the default population settings for 100 generations
(few probes: the saving does not depend on the probe count), then compares the denoiser steps
actually run (evaluations.jsonl `nfe`) with full rollouts of every evaluated schedule. Fitness
values equal full rollouts' (tests/search/test_search.py::test_reuse_equals_full_rollout).
Writes benchmarks/results/nfe_savings.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--run", default=str(ROOT / "runs/nfe_savings"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "nfe_savings.json"))
    args = parser.parse_args()
    run = Path(args.run)
    subprocess.run([sys.executable, "-m", "diffes_pl.cli", "fit", "--config", str(ROOT / "configs/tiny_wanda.yaml"),
                    "--trainer.default_root_dir", str(run), "--trainer.max_epochs", str(args.generations),
                    "--model.num_probes", "2", "--model.max_move", "5", "--trainer.callbacks", "[]",
                    "--overwrite", "true"], check=True)
    from diffes_pl.search.archive_file import read_evaluations

    records = read_evaluations(run / "evaluations.jsonl")
    schedule = json.loads((run / "schedule.json").read_text())
    steps = sum(schedule["partition"]["steps_per_stage"])
    used = sum(r["nfe"] for r in records)
    full = steps * len(records)
    result = {"generations": args.generations, "evaluations": len(records), "steps_per_rollout": steps,
              "nfe_used": used, "nfe_full_rollouts": full, "saving": 1 - used / full}
    print(f"{len(records)} schedules evaluated over {args.generations} generations: {used} denoiser steps instead "
          f"of {full} for full rollouts → {100 * result['saving']:.1f} % fewer")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
