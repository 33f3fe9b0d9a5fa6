"""Diff-ES end to end (and stopped + resumed) on a tiny PixArt-Σ saved as a local PixArtSigmaPipeline
folder (transformer, VAE, T5 text encoder and tokenizer): `diffes-pl fit` calibrates OBS on captions
(T5 embeddings with their attention masks), then searches with DPM-Solver++ (multistep: no rollout
resumes mid-trajectory) at CFG 4.5 on prompt probes; a run stopped after 2 generations and resumed
from its checkpoint ends exactly like the uninterrupted one."""
import json

import pytest

from diffes_pl.schedule import budget_met
from diffes_pl.trajectory import TrajectoryStore
from helpers.tiny_pixart import build_tiny_pixart
from helpers.search_runs import text_family_search

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

    schedule, records = text_family_search(
        tmp_path, text_models, folder, {"target_level": TARGET, "levels": 4, "num_stages": STAGES, "steps": 4,
                                        "sampler": "dpm", "guidance": 4.5}, generations=3, stop_after=2, timeout=300)
    assert schedule["extra"]["finished"] is True and schedule["pruner"] == "obs"
    assert schedule["partition"]["timesteps"] == [999.0, 749.0, 500.0, 250.0]  # DPM-Solver++'s linspace, 4 steps
    assert len(records) > 4 and all(budget_met(r["levels"], [2] * STAGES, TARGET) for r in records)
    assert all(0 < r["fitness"] <= 1 for r in records) and any(r["fitness"] < 1 for r in records)
    manifest = json.loads((tmp_path / "run" / "store" / "manifest.json").read_text())
    assert manifest["compensated"] and manifest["key_fields"]["denoiser"]["family"] == "pixart"
    store = TrajectoryStore.open(tmp_path / "run" / "store")  # cross-attention heads are pruned (and compensated) too
    assert store.weight(0, "blocks.0.attn2", 2).shape == (32, 16) and store.order(1, "blocks.2.attn2").shape == (4,)

