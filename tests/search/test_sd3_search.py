"""Diff-ES end to end (and stopped + resumed) on a tiny SD3 saved as a local StableDiffusion3Pipeline folder
(transformer, 16-channel VAE, CLIP-L + CLIP-G + T5 encoders and tokenizers): `diffes-pl fit` calibrates on
captions with flow-matching noise, builds an OBS store (joint heads of both streams, the context_pre_only
last block, both MLPs) and searches with flow-match Euler + CFG (the encoded empty prompt as the null
condition) on prompt probes; a run stopped after one generation and resumed from its checkpoint ends
exactly like the uninterrupted one."""
import json

import pytest

from diffes_pl.schedule import budget_met
from helpers.tiny_sd3 import build_tiny_sd3, save_sd3_folder
from helpers.search_runs import text_family_search

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sd3_obs_search_end_to_end_and_resumed(tmp_path, text_models):
    from diffes_pl.denoisers import check_name, load_denoiser

    folder = save_sd3_folder(build_tiny_sd3(text_models), tmp_path / "tiny-sd3")
    assert str(check_name(str(folder))) == "sd3-folder"
    adapter = load_denoiser(str(folder))
    assert adapter.family == "sd3" and adapter.latent_shape == (16, 8, 8) and adapter.has_text_encoders

    schedule, records = text_family_search(
        tmp_path, text_models, folder, {"target_level": 1, "levels": 4, "num_stages": 2, "steps": 4,
                                        "sampler": "flow_euler", "guidance": 4.0}, generations=2, stop_after=1)
    assert schedule["extra"]["finished"] is True and schedule["pruner"] == "obs"
    assert schedule["partition"]["timesteps"][0] == 1000.0 and len(schedule["partition"]["timesteps"]) == 4
    assert len(records) > 2 and all(budget_met(r["levels"], [2, 2], 1) for r in records)
    assert all(0 < r["fitness"] <= 1 for r in records) and any(r["fitness"] < 1 for r in records)
    manifest = json.loads((tmp_path / "run" / "store" / "manifest.json").read_text())
    assert manifest["compensated"] and manifest["key_fields"]["denoiser"]["family"] == "sd3"

