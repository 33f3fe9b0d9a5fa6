"""The small search the CLI tests run: the built-in model, 4 stages of 2 steps, 6 probes, Wanda."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.pruner", "diffes_pl.pruners.WandaPruner", "--model.num_stages", "4", "--model.steps", "8",
         "--model.num_probes", "6", "--model.offspring", "6", "--model.survivors", "2", "--model.max_move", "2",
         "--data.nsamples", "4", "--data.batch_size", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def fit_command(run: Path, generations: int, *extra: str) -> list[str]:
    """`diffes-pl fit` of the small search on tiny_obs.yaml into `run`."""
    config = ROOT / "configs/tiny_obs.yaml"
    assert config.is_file() and generations >= 1, "the small search needs the demo config and ≥ 1 generation"
    return [sys.executable, "-m", "diffes_pl.cli", "fit", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL,
            "--trainer.max_epochs", str(generations), "--trainer.default_root_dir", str(run), *extra]
