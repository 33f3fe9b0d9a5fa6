"""Diff-ES end to end (and stopped + resumed) on a tiny FLUX saved as a local pipeline folder (transformer, VAE, CLIP + T5
text encoders and tokenizers): `diffes-pl fit` with depth pruning (two-stream blocks), calibration
on captions with flow-matching noise, and a search with flow-match Euler (4 steps, 4 stages, no
CFG) on prompt probes."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from diffes_pl.schedule import budget_met
from diffes_pl.search.archive_file import read_evaluations

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def test_flux_depth_search_end_to_end(tmp_path, text_models):
    from diffes_pl.denoisers import check_name, load_denoiser

    folder = text_models.save_pipeline_folder(text_models.build_tiny_flux(), tmp_path / "tiny-flux", "FluxPipeline")
    assert str(check_name(str(folder))) == "flux-folder"
    adapter = load_denoiser(str(folder))
    assert adapter.family == "flux" and adapter.latent_shape == (4, 8, 8) and adapter.vae is not None
    assert adapter.has_text_encoders and adapter.latent_shift == 0.1159

    images = text_models.write_caption_folder(tmp_path / "coco", text_models.CAPTIONS)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "enable_progress_bar": False},
        "model": {"denoiser": str(folder), "pruner": {"class_path": "diffes_pl.pruners.DepthPruner"},
                  "target_level": 1, "levels": 4, "num_stages": 4, "steps": 4, "sampler": "flow_euler",
                  "guidance": 1.0, "offspring": 4, "survivors": 2, "max_move": 2, "metric": "ssim", "num_probes": 2,
                  "prompts": ["a red cat sits on the table", "a dog runs in the street"]},
        "data": {"source": str(images), "label_column": None, "caption_column": "text", "nsamples": 4,
                 "batch_size": 4, "seed": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffes_pl.cli", "fit", "--config", str(tmp_path / "config.yaml"),
           "--trainer.default_root_dir", str(run)]
    out = subprocess.run(cmd, env={**ENV, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    schedule = json.loads((run / "schedule.json").read_text())
    assert schedule["extra"]["finished"] is True and schedule["pruner"] == "depth"
    assert schedule["partition"]["timesteps"] == [1000.0, 750.0, 500.0, 250.0]
    records = read_evaluations(run / "evaluations.jsonl")
    assert len(records) > 4 and all(budget_met(r["levels"], [1] * 4, 1) for r in records)
    assert all(0 < r["fitness"] <= 1 for r in records)
    assert any(r["fitness"] < 1 for r in records)  # skipping blocks changes the samples
    manifest = json.loads((run / "store" / "manifest.json").read_text())
    assert manifest["depth"] and manifest["key_fields"]["denoiser"]["family"] == "flux"

    # stopped after 2 generations and resumed from its checkpoint: the uninterrupted run's result
    resumed = tmp_path / "resumed"
    for extra in (["--trainer.max_epochs", "2"], ["--ckpt_path", "last"]):
        out = subprocess.run(cmd[:-1] + [str(resumed), *extra], env={**ENV, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")},
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((resumed / "schedule.json").read_text()) | {"store": None} == schedule | {"store": None}
    again = read_evaluations(resumed / "evaluations.jsonl")
    assert [(r["levels"], r["fitness"], r["nfe"]) for r in again] == [(r["levels"], r["fitness"], r["nfe"]) for r in records]
