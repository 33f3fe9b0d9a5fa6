"""Diff-ES end to end on a tiny SDXL saved as a local pipeline folder (UNet, VAE, two CLIP text
encoders and tokenizers): `diffes-pl fit` calibrates on captions, searches with Euler ancestral +
CFG on prompt probes, and a run stopped after 2 generations and resumed from its checkpoint ends
exactly like an uninterrupted one; a child's rollout reused from its parent's stage-entry latents
equals a full rollout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import diffes_pl as dp
from diffes_pl.schedule import budget_met

from helpers.search_runs import evaluation_rows

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
PROMPTS = ["a red cat sits on the table", "a dog runs in the street"]
STEPS, STAGES, H, TARGET = 8, 4, 4, 2
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_models):
    tmp = tmp_path_factory.mktemp("sdxl-search")
    folder = text_models.save_pipeline_folder(text_models.build_tiny_sdxl(), tmp / "tiny-sdxl", "StableDiffusionXLPipeline")
    images = text_models.write_caption_folder(tmp / "coco", text_models.CAPTIONS)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 4, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "diffes_pl.callbacks.SampleGrid", "init_args": {"num": 2}}]},
        "model": {"denoiser": str(folder), "pruner": {"class_path": "diffes_pl.pruners.WandaPruner"},
                  "target_level": TARGET, "levels": H, "num_stages": STAGES, "steps": STEPS, "sampler": "euler_a",
                  "guidance": 3.0, "offspring": 4, "survivors": 2, "max_move": 2, "metric": "ssim", "num_probes": 3,
                  "probe_seed": 7, "prompts": PROMPTS, "store": str(tmp / "store")},
        "data": {"source": str(images), "label_column": None, "caption_column": "text", "nsamples": 4,
                 "batch_size": 4, "seed": 0},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return tmp, path, config


def fit(config: Path, run: Path, *extra: str):
    cmd = [sys.executable, "-m", "diffes_pl.cli", "fit", "--config", str(config),
           "--trainer.default_root_dir", str(run), *extra]
    out = subprocess.run(cmd, env={**ENV, "HF_DATASETS_CACHE": str(run.parent / "hf-cache")}, capture_output=True,
                         text=True, timeout=300, cwd=run.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def straight(setup):
    tmp, config, _ = setup
    out = fit(config, tmp / "straight")
    assert "calibration:" in out.stdout and "trajectory store written" in out.stdout
    return tmp / "straight"


def test_search_runs_on_captions_and_prompts(straight):
    assert (straight / "plots" / "samples.png").stat().st_size > 200  # dense vs pruned, on the probe prompts
    schedule = json.loads((straight / "schedule.json").read_text())
    assert schedule["extra"]["finished"] is True and schedule["pruner"] == "wanda"
    assert schedule["levels_max"] == H and schedule["partition"]["steps_per_stage"] == [2] * STAGES
    records = evaluation_rows(straight)
    assert len({tuple(r["levels"]) for r in records}) == len(records) > 6
    assert all(budget_met(r["levels"], [2] * STAGES, TARGET) for r in records)
    assert all(0 < r["fitness"] <= 1 for r in records)  # SSIM vs the dense samples, finite
    best = max(records, key=lambda r: r["fitness"])
    assert schedule["levels"] == best["levels"]
    children = [r for r in records if r["parent"] is not None]
    assert children and sum(r["nfe"] for r in children) < STEPS * len(children)  # parents' rollouts reused
    manifest = json.loads((Path(schedule["store"]) / "manifest.json").read_text())
    assert manifest["key_fields"]["calibration"]["caption_column"] == "text"


def test_stop_and_resume_matches_uninterrupted(setup, straight):
    tmp, config, _ = setup
    run = tmp / "resumed"
    out = fit(config, run, "--trainer.max_epochs", "2")
    assert "matches this run: reusing it" in out.stdout  # the store of the straight run serves this one
    assert json.loads((run / "schedule.json").read_text())["extra"]["generations"] == 2
    fit(config, run, "--ckpt_path", "last")
    assert json.loads((run / "schedule.json").read_text()) == json.loads((straight / "schedule.json").read_text())
    assert [(r["levels"], r["fitness"], r["nfe"], r["parent"]) for r in evaluation_rows(run)] == \
        [(r["levels"], r["fitness"], r["nfe"], r["parent"]) for r in evaluation_rows(straight)]


def test_reuse_equals_full_rollout_with_ancestral_noise(setup, straight, tmp_path):
    """Euler ancestral adds noise at every step: the child's reused rollout still equals a full one."""
    import lightning as L

    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.denoisers.base import TextCondition
    from diffes_pl.fitness import FitnessInputs
    from diffes_pl.pruners import WandaPruner
    from diffes_pl.search.lightning_module import DiffES

    _, _, config = setup
    hp = {k: v for k, v in config["model"].items() if k != "pruner"}
    module = DiffES(pruner=WandaPruner(), **hp)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    module.ensure_store(trainer, CalibrationDataModule(**config["data"]), log=lambda *_: None)  # reuses the store
    module.trainer = trainer
    module.setup("fit")
    search = module.search
    probes = search.engine.probes
    assert isinstance(probes.conditions, TextCondition) and probes.prompts == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    torch.testing.assert_close(probes.conditions[2].prompt_embeds, probes.conditions[0].prompt_embeds)
    parent, child = (2, 2, 2, 2), (2, 2, 3, 1)
    search.evaluate(parent, None)
    cached, nfe = search.evaluate(child, parent)
    assert nfe == 4  # stages 2 and 3 only
    latents, _ = search.engine.run(search.schedule(child))
    full = search.metric(FitnessInputs(module.context.adapter.decode(latents), latents, search.reference_images,
                                       search.reference_latents, probes.conditions))
    assert cached == full


def test_prompts_are_required_and_checked(setup):
    from diffes_pl.search.lightning_module import DiffES

    _, _, config = setup
    hp = {k: v for k, v in config["model"].items() if k not in ("pruner", "prompts")}
    with pytest.raises(ValueError, match="text-conditioned: set model.prompts"):
        DiffES(**hp)
    with pytest.raises(ValueError, match="class-conditional: model.prompts"):
        DiffES(denoiser="tiny-digits", prompts=["a cat"])


def test_local_folders_are_recognised(setup, text_models, tmp_path):
    from diffes_pl.denoisers import check_name, load_denoiser
    from diffes_pl.denoisers.text import MissingTextEncodersError, load_text_encoders

    tmp, _, config = setup
    assert str(check_name(config["model"]["denoiser"])) == "sdxl-folder"
    adapter = load_denoiser(config["model"]["denoiser"])
    assert adapter.family == "sdxl" and adapter.latent_scale == 0.13025 and adapter.image_size == 16
    cond = adapter.encode_prompts(PROMPTS)
    original = text_models.build_tiny_sdxl().encode_prompts(PROMPTS)  # the saved encoders, reloaded
    torch.testing.assert_close(cond.prompt_embeds, original.prompt_embeds)
    # a bare UNet folder (config.json only) is an SDXL folder too, without text encoders
    bare = tmp_path / "unet-only"
    adapter.denoiser.save_pretrained(bare)
    assert str(check_name(str(bare))) == "sdxl-folder"
    with pytest.raises(MissingTextEncodersError, match="no text encoders.*tokenizer/, text_encoder/"):
        load_denoiser(str(bare)).encode_prompts(["a cat"])
    # the hub loader, offline and without a cached pipeline, names what is missing and how to get it
    with pytest.raises(MissingTextEncodersError, match="`hf download nobody/no-sdxl`"):
        load_text_encoders("nobody/no-sdxl", "sdxl", "cpu", None)


def test_cli_test_evaluates_with_the_search_prompts(setup, straight):
    """`diffes-pl test` on the SDXL run: prompts come from model.prompts; SSIM vs dense only (the
    Inception and CLIP weights are not on this machine)."""
    tmp, config, _ = setup
    cmd = [sys.executable, "-m", "diffes_pl.cli", "test", "--config", str(config), "--trainer.default_root_dir",
           str(straight), "--eval.metrics", "[ssim]", "--eval.num_images", "4", "--eval.batch_size", "2",
           "--eval.latency_batch_size", "0"]
    out = subprocess.run(cmd, env={**ENV, "HF_DATASETS_CACHE": str(tmp / "hf-cache")}, capture_output=True, text=True,
                         timeout=300, cwd=tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((straight / "evaluation.json").read_text())
    rows = result.get("results", result)
    assert set(rows) >= {"dense", "searched", "uniform"}, rows
    assert rows["dense"]["ssim"] == pytest.approx(1.0)
    assert 0 < rows["searched"]["ssim"] < 1 and 0 < rows["uniform"]["ssim"] < 1


def test_sample_accepts_prompt_strings(text_models):
    adapter = text_models.build_tiny_sdxl()
    kw = dict(steps=2, guidance=3.0, seed=0, sampler="euler_a", output="latents")
    torch.testing.assert_close(dp.sample(adapter, PROMPTS, **kw), dp.sample(adapter, adapter.encode_prompts(PROMPTS), **kw),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="class-conditional"):
        dp.sample(dp.load_denoiser("tiny-digits"), ["a cat"], steps=2)
