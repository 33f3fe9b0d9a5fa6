"""Diff-ES end to end (and stopped + resumed) on a tiny SD3 saved as a local StableDiffusion3Pipeline folder
(transformer, 16-channel VAE, CLIP-L + CLIP-G + T5 encoders and tokenizers): `diffes-pl fit` calibrates on
captions with flow-matching noise, builds an OBS store (joint heads of both streams, the context_pre_only
last block, both MLPs) and searches with flow-match Euler + CFG (the encoded empty prompt as the null
condition) on prompt probes; a run stopped after one generation and resumed from its checkpoint ends
exactly like the uninterrupted one."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from diffes_pl.partition import budget_met
from sd3_models import build_tiny_sd3, save_sd3_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def test_sd3_obs_search_end_to_end_and_resumed(tmp_path, text_models):
    from diffes_pl.denoisers import check_name, load_denoiser

    folder = save_sd3_folder(build_tiny_sd3(text_models), tmp_path / "tiny-sd3")
    assert str(check_name(str(folder))) == "sd3-folder"
    adapter = load_denoiser(str(folder))
    assert adapter.family == "sd3" and adapter.latent_shape == (16, 8, 8) and adapter.has_text_encoders

    images = text_models.write_caption_folder(tmp_path / "coco", text_models.CAPTIONS)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "enable_progress_bar": False},
        "model": {"denoiser": str(folder), "pruner": {"class_path": "diffes_pl.pruners.OBSPruner"},
                  "target_level": 1, "levels": 4, "num_stages": 2, "steps": 4, "sampler": "flow_euler",
                  "guidance": 4.0, "offspring": 4, "survivors": 2, "max_move": 2, "metric": "ssim", "num_probes": 2,
                  "prompts": ["a red cat sits on the table", "a dog runs in the street"]},
        "data": {"source": str(images), "label_column": None, "caption_column": "text", "nsamples": 4,
                 "batch_size": 4, "seed": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**ENV, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}

    def fit(run, *extra):
        cmd = [sys.executable, "-m", "diffes_pl.cli", "fit", "--config", str(tmp_path / "config.yaml"),
               "--trainer.default_root_dir", str(run), *extra]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    run = tmp_path / "run"
    fit(run)
    schedule = json.loads((run / "schedule.json").read_text())
    assert schedule["extra"]["finished"] is True and schedule["pruner"] == "obs"
    assert schedule["partition"]["timesteps"][0] == 1000.0 and len(schedule["partition"]["timesteps"]) == 4
    records = [json.loads(l) for l in (run / "evaluations.jsonl").read_text().splitlines()]
    assert len(records) > 2 and all(budget_met(r["levels"], [2, 2], 1) for r in records)
    assert all(0 < r["fitness"] <= 1 for r in records) and any(r["fitness"] < 1 for r in records)
    manifest = json.loads((run / "store" / "manifest.json").read_text())
    assert manifest["compensated"] and manifest["key_fields"]["denoiser"]["family"] == "sd3"

    # stopped after 1 generation and resumed from its checkpoint: the uninterrupted run's result
    resumed = tmp_path / "resumed"
    fit(resumed, "--trainer.max_epochs", "1")
    fit(resumed, "--ckpt_path", "last")
    assert json.loads((resumed / "schedule.json").read_text()) | {"store": None} == schedule | {"store": None}
    again = [json.loads(l) for l in (resumed / "evaluations.jsonl").read_text().splitlines()]
    assert [(r["levels"], r["fitness"], r["nfe"]) for r in again] == [(r["levels"], r["fitness"], r["nfe"]) for r in records]
