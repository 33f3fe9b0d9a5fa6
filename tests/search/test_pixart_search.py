"""Diff-ES end to end (and stopped + resumed) on a tiny PixArt-Σ saved as a local PixArtSigmaPipeline
folder (transformer, VAE, T5 text encoder and tokenizer): `diffes-pl fit` calibrates OBS on captions
(T5 embeddings with their attention masks), then searches with DPM-Solver++ (multistep: no rollout
resumes mid-trajectory) at CFG 4.5 on prompt probes; a run stopped after 2 generations and resumed
from its checkpoint ends exactly like the uninterrupted one."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from diffes_pl.partition import budget_met
from diffes_pl.trajectory import TrajectoryStore
from pixart_models import build_tiny_pixart

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
STAGES, TARGET = 2, 2
pytestmark = pytest.mark.usefixtures("one_thread")


def test_pixart_obs_search_end_to_end_and_resumed(tmp_path, text_models):
    from diffes_pl.denoisers import check_name, load_denoiser

    folder = text_models.save_pipeline_folder(build_tiny_pixart(text_models), tmp_path / "tiny-pixart",
                                              "PixArtSigmaPipeline")
    assert str(check_name(str(folder))) == "pixart-folder"
    adapter = load_denoiser(str(folder))
    assert adapter.family == "pixart" and adapter.latent_shape == (4, 8, 8) and adapter.vae is not None
    assert adapter.has_text_encoders and adapter.text_len == 300  # a pipeline folder does not say: Σ's 300

    images = text_models.write_caption_folder(tmp_path / "coco", text_models.CAPTIONS)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "enable_progress_bar": False},
        "model": {"denoiser": str(folder), "pruner": {"class_path": "diffes_pl.pruners.OBSPruner"},
                  "target_level": TARGET, "levels": 4, "num_stages": STAGES, "steps": 4, "sampler": "dpm",
                  "guidance": 4.5, "offspring": 4, "survivors": 2, "max_move": 2, "metric": "ssim", "num_probes": 2,
                  "prompts": ["a red cat sits on the table", "a dog runs in the street"]},
        "data": {"source": str(images), "label_column": None, "caption_column": "text", "nsamples": 4,
                 "batch_size": 4, "seed": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**ENV, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}

    def fit(run, *extra):
        cmd = [sys.executable, "-m", "diffes_pl.cli", "fit", "--config", str(tmp_path / "config.yaml"),
               "--trainer.default_root_dir", str(run), *extra]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    run = tmp_path / "run"
    fit(run)
    schedule = json.loads((run / "schedule.json").read_text())
    assert schedule["extra"]["finished"] is True and schedule["pruner"] == "obs"
    assert schedule["partition"]["timesteps"] == [999.0, 749.0, 500.0, 250.0]  # DPM-Solver++'s linspace, 4 steps
    records = [json.loads(l) for l in (run / "evaluations.jsonl").read_text().splitlines()]
    assert len(records) > 4 and all(budget_met(r["levels"], [2] * STAGES, TARGET) for r in records)
    assert all(0 < r["fitness"] <= 1 for r in records) and any(r["fitness"] < 1 for r in records)
    manifest = json.loads((run / "store" / "manifest.json").read_text())
    assert manifest["compensated"] and manifest["key_fields"]["denoiser"]["family"] == "pixart"
    store = TrajectoryStore.open(run / "store")  # cross-attention heads are pruned (and compensated) too
    assert store.weight(0, "blocks.0.attn2", 2).shape == (32, 16) and store.order(1, "blocks.2.attn2").shape == (4,)

    # stopped after 2 generations and resumed from its checkpoint: the uninterrupted run's result
    resumed = tmp_path / "resumed"
    fit(resumed, "--trainer.max_epochs", "2")
    fit(resumed, "--ckpt_path", "last")
    assert json.loads((resumed / "schedule.json").read_text()) | {"store": None} == schedule | {"store": None}
    again = [json.loads(l) for l in (resumed / "evaluations.jsonl").read_text().splitlines()]
    assert [(r["levels"], r["fitness"], r["nfe"]) for r in again] == [(r["levels"], r["fitness"], r["nfe"]) for r in records]
