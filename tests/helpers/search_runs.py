"""The small search the CLI tests run: the built-in model, 4 stages of 2 steps, 6 probes, Wanda."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def text_family_search(tmp_path: Path, text_models, folder: Path, model: dict, generations: int,
                       stop_after: int, timeout: int = 400) -> tuple[dict, list[dict]]:
    """A small `diffes-pl fit` (OBS on captions, SSIM on two prompt probes) of a text-to-image family
    saved as a local pipeline `folder`, run straight through for `generations`; then stopped after
    `stop_after` generations (its checkpoint holds exactly that many), resumed with `--ckpt_path last`
    and checked equal to the straight run. `model`: the family's settings (target, levels, stages,
    steps, sampler, guidance). Returns the straight run's schedule.json and evaluations."""
    import json
    import subprocess

    import torch
    import yaml

    images = text_models.write_caption_folder(tmp_path / "coco", text_models.CAPTIONS)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": generations, "enable_progress_bar": False},
        "model": {"denoiser": str(folder), "pruner": {"class_path": "diffes_pl.pruners.OBSPruner"}, **model,
                  "offspring": 4, "survivors": 2, "max_move": 2, "metric": "ssim", "num_probes": 2,
                  "prompts": ["a red cat sits on the table", "a dog runs in the street"]},
        "data": {"source": str(images), "label_column": None, "caption_column": "text", "nsamples": 4,
                 "batch_size": 4, "seed": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**ENV, "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}

    def fit(run: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "diffes_pl.cli", "fit", "--config", str(tmp_path / "config.yaml"),
               "--trainer.default_root_dir", str(run), *extra]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def read(run: Path) -> tuple[dict, list[dict]]:
        return json.loads((run / "schedule.json").read_text()), evaluation_rows(run)

    run, resumed = tmp_path / "run", tmp_path / "resumed"
    fit(run)
    schedule, records = read(run)
    fit(resumed, "--trainer.max_epochs", str(stop_after))
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["diffes"]
    assert len(state["nfe_history"]) == stop_after < generations  # stopped part-way, as the checkpoint says
    fit(resumed, "--ckpt_path", "last")
    again_schedule, again = read(resumed)
    assert again_schedule | {"store": None} == schedule | {"store": None}
    assert [(r["levels"], r["fitness"], r["nfe"]) for r in again] == [(r["levels"], r["fitness"], r["nfe"]) for r in records]
    return schedule, records


def calibrated_search(root: Path, max_epochs: int, callbacks: list | None = None, **settings):
    """A small Wanda `DiffES` (module, Trainer) whose store is calibrated in `root` (4 calibration
    images), as `diffes-pl fit` has them before the search starts."""
    import lightning as L

    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.pruners import WandaPruner
    from diffes_pl.search.lightning_module import DiffES

    module = DiffES(pruner=WandaPruner(), **settings)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=callbacks or [])
    module.ensure_store(trainer, CalibrationDataModule(nsamples=4, batch_size=4), log=lambda *_: None)
    return module, trainer


def evaluation_rows(run: Path) -> list[dict]:
    """The rows of a run's evaluations.jsonl (one per evaluated schedule), each line's check verified."""
    from diffes_pl.search.archive_file import read_evaluations

    return read_evaluations(run / "evaluations.jsonl")
