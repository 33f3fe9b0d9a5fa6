"""Caption calibration for text-to-image denoisers (tiny SDXL and FLUX built from config): captions
encoded once into TextCondition rows that match them, determinism under a seed, the VAE path in
[-1, 1] scaled once (SDXL 0.13025; FLUX shift then scale), flow-matching noise equal to the FLUX
sampler's own σ, the on-disk cache, and the errors a user can fix. Offline, CPU."""
from __future__ import annotations


import datasets
import pytest
import torch

from diffes_pl.data.calibration import CalibrationDataModule, noise_flow
from diffes_pl.data.sources import SourceError, preprocess_image, select_indices
from diffes_pl.denoisers.base import TextCondition
from diffes_pl.denoisers.text import MissingTextEncodersError
from diffes_pl.partition import StagePartition

pytestmark = pytest.mark.usefixtures("one_thread", "hf_cache")


def attached(adapter, partition, **kw) -> CalibrationDataModule:
    kw = {"label_column": None, "caption_column": "text", **kw}
    dm = CalibrationDataModule(**kw)
    dm.attach(adapter, partition)
    return dm


def sdxl_partition(adapter, steps=4, stages=2):
    return StagePartition.from_scheduler(adapter.make_scheduler("euler_a"), steps, stages)


def all_batches(dm, stage):
    dm.set_stage(stage)
    return list(dm.predict_dataloader())


def test_batches_carry_the_captions_rows(tiny_sdxl, caption_folder):
    dm = attached(tiny_sdxl, sdxl_partition(tiny_sdxl), source=str(caption_folder), nsamples=5, batch_size=2, seed=3)
    rows = datasets.load_dataset("imagefolder", data_dir=str(caption_folder))["train"]
    idx, _ = select_indices(len(rows), 5, 3)
    assert dm.captions() == [rows[int(i)]["text"] for i in idx]
    batches = all_batches(dm, 1)
    assert [len(b["latents"]) for b in batches] == [2, 2, 1]
    for batch in batches:
        cond = batch["cond"]
        assert isinstance(cond, TextCondition) and cond.prompt_embeds.shape[1:] == (8, 32)
        assert cond.pooled_embeds.shape[1:] == (16,) and cond.time_ids.shape[1:] == (6,)
        for row, index in enumerate(batch["index"].tolist()):
            alone = tiny_sdxl.encode_prompts([dm.captions()[index]])  # the row is its own caption's embedding
            torch.testing.assert_close(cond[row].prompt_embeds, alone.prompt_embeds, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cond[row].pooled_embeds, alone.pooled_embeds, rtol=1e-5, atol=1e-6)
    prompts = torch.cat([b["cond"].prompt_embeds for b in batches])
    assert not torch.allclose(prompts[0], prompts[1])  # different captions, different rows
    # the same captions serve every stage
    assert torch.equal(prompts, torch.cat([b["cond"].prompt_embeds for b in all_batches(dm, 0)]))


def test_captions_encoded_once_and_cached(tiny_sdxl, caption_folder, tmp_path, monkeypatch):
    calls = []
    encode = tiny_sdxl.encode_prompts
    monkeypatch.setattr(tiny_sdxl, "encode_prompts", lambda p, **kw: calls.append(list(p)) or encode(p, **kw))
    kw = dict(source=str(caption_folder), nsamples=4, batch_size=4, seed=0, cache_dir=str(tmp_path / "cache"))
    dm = attached(tiny_sdxl, sdxl_partition(tiny_sdxl), **kw)
    for stage in (0, 1, 0):
        all_batches(dm, stage)
    assert calls == [dm.captions()]  # one encoding of the 4 captions for all stages
    again = attached(tiny_sdxl, sdxl_partition(tiny_sdxl), **kw)  # a later run reads the disk cache
    cond = again.clean().cond
    assert len(calls) == 1
    for field in ("prompt_embeds", "pooled_embeds", "time_ids"):
        assert torch.equal(getattr(cond, field), getattr(dm.clean().cond, field))
    assert torch.equal(again.clean().latents, dm.clean().latents)


def test_deterministic_under_a_seed(caption_folder, text_models):
    def batches(seed, adapter=None):
        adapter = adapter or text_models.build_tiny_sdxl()  # a fresh model each time: nothing shared
        dm = attached(adapter, sdxl_partition(adapter), source=str(caption_folder), nsamples=6, batch_size=4, seed=seed)
        return all_batches(dm, 1)

    a, b, c = batches(0), batches(0), batches(1)
    for x, y in zip(a, b):
        for key in ("latents", "timesteps", "index"):
            assert torch.equal(x[key], y[key]), key
        assert torch.equal(x["cond"].prompt_embeds, y["cond"].prompt_embeds)
    assert not torch.equal(a[0]["latents"], c[0]["latents"])
    assert not torch.equal(a[0]["cond"].prompt_embeds, c[0]["cond"].prompt_embeds)  # other rows chosen


def test_vae_path_sdxl(tiny_sdxl, caption_folder):
    """Images in [-1, 1] (never [0, 1]), VAE posterior mode, × 0.13025 exactly once; DDPM noise on top."""
    assert tiny_sdxl.latent_scale == 0.13025
    dm = attached(tiny_sdxl, sdxl_partition(tiny_sdxl), source=str(caption_folder), nsamples=3, seed=1)
    rows = datasets.load_dataset("imagefolder", data_dir=str(caption_folder))["train"]
    idx, _ = select_indices(len(rows), 3, 1)
    images = torch.stack([preprocess_image(rows[int(i)]["image"], 16, 3) for i in idx])
    assert images.min() >= -1 and images.min() < -0.9 and images.max() <= 1
    with torch.no_grad():
        z = tiny_sdxl.vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(dm.clean().latents, z * 0.13025, rtol=1e-5, atol=1e-6)


def test_flux_vae_and_flow_noise(tiny_flux, caption_folder):
    """FLUX: (z − shift) · scale once; x_σ = (1 − σ) x0 + σ ε with σ = t / 1000 drawn inside the stage,
    equal to the sampler's own forward process at its timesteps."""
    scheduler = tiny_flux.make_scheduler()
    partition = StagePartition.from_scheduler(scheduler, 4, 4)
    assert partition.timesteps == (1000.0, 750.0, 500.0, 250.0)
    dm = attached(tiny_flux, partition, source=str(caption_folder), nsamples=4, batch_size=4, seed=2)
    rows = datasets.load_dataset("imagefolder", data_dir=str(caption_folder))["train"]
    idx, _ = select_indices(len(rows), 4, 2)
    images = torch.stack([preprocess_image(rows[int(i)]["image"], 16, 3) for i in idx])
    with torch.no_grad():
        z = tiny_flux.vae.encode(images).latent_dist.mode()
    x0 = dm.clean().latents
    torch.testing.assert_close(x0, (z - 0.1159) * 0.3611, rtol=1e-5, atol=1e-6)
    assert dm.clean().cond.prompt_embeds.shape == (4, 6, 16) and dm.clean().cond.time_ids is None
    for stage in range(4):
        low, high = partition.stage_interval(stage)
        ds = dm.stage_dataset(stage)
        sigma = ds.timesteps.double() / 1000
        assert bool(((ds.timesteps > max(low, 0)) & (ds.timesteps <= high)).all())
        eps = (ds.latents.double() - (1 - sigma.view(-1, 1, 1, 1)) * x0.double()) / sigma.view(-1, 1, 1, 1)
        assert 0.5 < eps.std() < 1.5
    # the noising formula at the sampler's timesteps is the scheduler's own forward process (schnell
    # shift 1; with a static shift the timesteps are the shifted σ · 1000, so it still holds)
    for shift in (1.0, 3.0):
        sched = type(scheduler)(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
        sched.set_timesteps(4)
        x, e = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
        t = sched.timesteps[:4].float()
        torch.testing.assert_close(noise_flow(x, e, t, 1000), sched.scale_noise(x, t, e), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t / 1000, sched.sigmas[:4].float(), rtol=1e-6, atol=1e-6)


def test_list_captions_take_the_first(tiny_sdxl, tmp_path, text_models):
    captions = text_models.CAPTIONS[:3]
    folder = text_models.write_caption_folder(tmp_path / "coco", [[c, "ignored " + c] for c in captions], column="captions")
    dm = attached(tiny_sdxl, sdxl_partition(tiny_sdxl), source=str(folder), caption_column="captions", nsamples=3)
    assert sorted(dm.captions()) == sorted(captions)


def test_lightning_predict_moves_text_batches(tiny_sdxl, caption_folder):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conds = []

        def predict_step(self, batch, batch_idx):
            self.conds.append(batch["cond"])

    dm = attached(tiny_sdxl, sdxl_partition(tiny_sdxl), source=str(caption_folder), nsamples=5, batch_size=2)
    model = Recorder()
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False).predict(model, datamodule=dm, return_predictions=False)
    assert [len(c) for c in model.conds] == [2, 2, 1] and all(isinstance(c, TextCondition) for c in model.conds)


def test_unconditional_text_calibration_uses_the_null_condition(tiny_sdxl, caption_folder):
    dm = attached(tiny_sdxl, sdxl_partition(tiny_sdxl), source=str(caption_folder), caption_column=None, nsamples=2)
    cond = dm.clean().cond
    assert isinstance(cond, TextCondition) and cond.prompt_embeds.abs().max() == 0 and len(cond) == 2


def test_errors_name_cause_and_fix(tiny_sdxl, random_dit, caption_folder, text_models):
    partition = sdxl_partition(tiny_sdxl)
    with pytest.raises(SourceError, match="text-conditioned: set caption_column.*label_column to null"):
        CalibrationDataModule(source=str(caption_folder), label_column="label").attach(tiny_sdxl, partition)
    with pytest.raises(SourceError, match="needs a text-conditioned denoiser.*set caption_column to null"):
        attached(random_dit, StagePartition.from_scheduler(random_dit.make_scheduler("ddim"), 4, 2),
                 source=str(caption_folder))
    with pytest.raises(SourceError, match=r"no column 'caption' \(caption_column\); its columns are \['image', 'text'\]"):
        attached(tiny_sdxl, partition, source=str(caption_folder), caption_column="caption")
    bare = text_models.build_tiny_sdxl(text=False)
    dm = attached(bare, partition, source=str(caption_folder), nsamples=2)
    with pytest.raises(MissingTextEncodersError, match="no text encoders.*text_encoder_2/.*set_text_encoders"):
        dm.clean()
    with pytest.raises(ValueError, match="not both"):
        CalibrationDataModule(source=str(caption_folder), label_column="label", caption_column="text")


def test_bad_captions_refused(tiny_sdxl, tmp_path, text_models):
    folder = text_models.write_caption_folder(tmp_path / "bad", ["a cat", ""], column="text")
    with pytest.raises(SourceError, match="captions must be non-empty strings"):
        attached(tiny_sdxl, sdxl_partition(tiny_sdxl), source=str(folder), nsamples=2)
