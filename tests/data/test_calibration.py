"""CalibrationDataModule: SNR-matched noising, stage intervals, determinism, the VAE path, sources,
DDP sharding and the errors a user can fix. Offline, CPU, tiny models built from config."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler
from PIL import Image

from diffes_pl.data.calibration import (CalibrationDataModule, ShardSampler, draw_timesteps, noise_ddpm,
                                        stage_generator, training_scheduler)
from diffes_pl.data.sources import SourceError, preprocess_image, select_indices
from diffes_pl.partition import StagePartition

DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


@pytest.fixture(scope="module")
def pixel_adapter():
    """The built-in architecture (pixel space 1×8×8, 10 classes), random weights: nothing here runs it."""
    import diffes_pl as dp

    return dp.load_denoiser("tiny-digits", weights=False)


@pytest.fixture(scope="module")
def ddim_partition():
    """DiT's 20-step DDIM trajectory (999, 946, …, 53, 0) cut into 10 stages of 2 steps."""
    sched = DDIMScheduler(**DIT_SCHEDULE, timestep_spacing="linspace")
    return StagePartition.from_scheduler(sched, 20, 10)


def hand_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def attached(adapter, partition, **kw) -> CalibrationDataModule:
    dm = CalibrationDataModule(**kw)
    dm.attach(adapter, partition)
    return dm


# 1 ----------------------------------------------------------------------------------------------
def test_alphas_cumprod_first_step_is_noisy():
    ddpm = training_scheduler(DIT_SCHEDULE)
    abar, hand = ddpm.alphas_cumprod, hand_alphas_cumprod()
    assert abar.dtype == torch.float32 and abar.shape == (1000,)  # diffusers keeps ᾱ in float32
    assert abar[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)  # not 1 (float32 spacing 6e-8): t = 0 is noisy
    torch.testing.assert_close(abar.double(), hand, rtol=2e-6, atol=1e-9)
    # at t = 0 a zero image with ε = 1 becomes sqrt(1 − ᾱ_0) = 0.01 (1 − ᾱ_0 carries float32's 6e-8
    # absolute error of ᾱ_0: 3e-4 relative at most)
    x = noise_ddpm(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.tensor([0]), ddpm)
    torch.testing.assert_close(x, torch.full((1, 1, 2, 2), 0.01), rtol=3e-4, atol=0)


def test_noising_matches_hand_computation(pixel_adapter, ddim_partition):
    dm = attached(pixel_adapter, ddim_partition, nsamples=16, batch_size=8, seed=3)
    abar = hand_alphas_cumprod()
    x0 = dm.clean().latents
    for stage in (0, 4, 9):
        ds = dm.stage_dataset(stage)
        # the stage's generator draws the timesteps, then ε
        g = stage_generator(3, stage)
        t = draw_timesteps(ddim_partition.stage_interval(stage), 16, g, 1000)
        eps = torch.randn(x0.shape, generator=g)
        assert torch.equal(ds.timesteps, t)
        a = abar[t].view(-1, 1, 1, 1)
        expected = (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).float()
        # float32 ᾱ (diffusers'): off the float64 formula by ≤ 3e-6 · |ε| near t = 0
        torch.testing.assert_close(ds.latents, expected, rtol=0, atol=1e-5)
        # it is diffusers' DDPM add_noise on the training schedule, bit for bit
        assert torch.equal(ds.latents, DDPMScheduler(**DIT_SCHEDULE).add_noise(x0, eps, t))


# 2 ----------------------------------------------------------------------------------------------
def test_stage_timesteps_lie_in_their_intervals(pixel_adapter, ddim_partition):
    dm = attached(pixel_adapter, ddim_partition, nsamples=256, batch_size=64)
    seen = []
    for stage in range(10):
        low, high = ddim_partition.stage_interval(stage)
        t = dm.stage_dataset(stage).timesteps
        assert t.dtype == torch.int64
        assert bool(((t > low) & (t <= high)).all()), (stage, low, high, t.min(), t.max())
        seen.append(t)
    assert ddim_partition.stage_interval(0) == (894.0, 999.0)
    assert seen[0].max() >= 990 and seen[0].min() <= 905  # stage 0 spans (894, 999]
    assert seen[9].max() <= 53 and seen[9].min() <= 5
    # the last stage's interval (−1, 53] includes t = 0 itself
    many = draw_timesteps(ddim_partition.stage_interval(9), 4000, torch.Generator().manual_seed(0), 1000)
    assert many.min() == 0 and many.max() == 53
    assert set(many.tolist()) == set(range(54))


def test_non_integer_sampler_timesteps(pixel_adapter):
    # Euler ancestral with linspace spacing has fractional native timesteps: integers inside the interval
    sched = EulerAncestralDiscreteScheduler(**DIT_SCHEDULE, timestep_spacing="linspace")
    partition = StagePartition.from_scheduler(sched, 20, 5)
    dm = attached(pixel_adapter, partition, nsamples=64, batch_size=64)
    for stage in range(5):
        low, high = partition.stage_interval(stage)
        t = dm.stage_dataset(stage).timesteps
        assert bool(((t > low) & (t <= high)).all())


# 3 ----------------------------------------------------------------------------------------------
def test_deterministic_under_a_seed(pixel_adapter, ddim_partition):
    def batches(seed, stages):
        dm = attached(pixel_adapter, ddim_partition, nsamples=12, batch_size=5, seed=seed)
        out = {}
        for s in stages:
            dm.set_stage(s)
            out[s] = list(dm.predict_dataloader())
        return out

    a, b = batches(0, [0, 5]), batches(0, [5])  # stage 5 alone equals stage 5 after stage 0
    c = batches(1, [5])
    for x, y in zip(a[5], b[5]):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert not torch.equal(a[5][0]["latents"], c[5][0]["latents"])
    assert not torch.equal(a[5][0]["timesteps"], c[5][0]["timesteps"])
    assert not torch.equal(a[0][0]["latents"], a[5][0]["latents"])
    # same clean images in every stage: the labels agree across stages
    assert torch.equal(torch.cat([x["cond"] for x in a[0]]), torch.cat([x["cond"] for x in a[5]]))


# 5 ----------------------------------------------------------------------------------------------
def test_digits_source(pixel_adapter, ddim_partition):
    dm = attached(pixel_adapter, ddim_partition, nsamples=10, batch_size=4, seed=0)
    dm.set_stage(2)
    got = list(dm.predict_dataloader())
    assert [len(b["latents"]) for b in got] == [4, 4, 2]
    for b in got:
        assert b["latents"].shape[1:] == (1, 8, 8) and b["latents"].dtype == torch.float32
        assert b["stage"].dtype == torch.int64 and bool((b["stage"] == 2).all())
        assert b["cond"].dtype == torch.int64 and bool(((b["cond"] >= 0) & (b["cond"] <= 9)).all())
    assert torch.cat([b["index"] for b in got]).tolist() == list(range(10))
    x0 = dm.clean().latents
    assert x0.min() >= -1 and x0.max() <= 1 and x0.min() == -1  # digits in [-1, 1]
    # the clean images are real digits rows, chosen by the seed
    from diffes_pl.data.digits import load_digits_split

    images, labels = load_digits_split("train")
    idx, _ = select_indices(len(labels), 10, 0)
    assert torch.equal(x0, images[idx]) and torch.equal(dm.clean().cond, labels[idx])
    # unconditional: the null class
    un = attached(pixel_adapter, ddim_partition, nsamples=3, label_column=None)
    assert un.stage_dataset(0).cond.tolist() == [10, 10, 10]
    assert dm.settings()["nsamples"] == 10 and dm.settings()["seed"] == 0


def test_digits_go_through_datasets_unchanged(pixel_adapter, ddim_partition):
    """The built-in digits are a datasets.Dataset (Image + ClassLabel columns) read by the same code as
    ImageNet/COCO, and every stage's samples equal the old tensor path's (load_digits_split, noised by
    hand) bit for bit — the demo's schedule depends on them."""
    import datasets

    dm = attached(pixel_adapter, ddim_partition, nsamples=64, batch_size=32, seed=0)
    assert isinstance(dm._rows, datasets.Dataset)
    assert isinstance(dm._rows.features["image"], datasets.Image)
    assert dm._rows.features["label"] == datasets.ClassLabel(names=[str(i) for i in range(10)])
    from diffes_pl.data.digits import load_digits_split

    images, labels = load_digits_split("train")
    idx, _ = select_indices(len(labels), 64, 0)
    x0, ddpm = images[idx], training_scheduler(pixel_adapter.noise_schedule)
    for stage in range(ddim_partition.num_stages):
        g = stage_generator(0, stage)
        t = draw_timesteps(ddim_partition.stage_interval(stage), 64, g, 1000)
        xt = noise_ddpm(x0, torch.randn(x0.shape, generator=g, dtype=torch.float32), t, ddpm)
        got = dm.stage_dataset(stage)
        assert torch.equal(got.latents, xt) and torch.equal(got.timesteps, t) and torch.equal(got.cond, labels[idx])
    test = attached(pixel_adapter, ddim_partition, nsamples=5, split="test")
    test_images, _ = load_digits_split("test")
    assert torch.equal(test.clean().latents, test_images[select_indices(297, 5, 0)[0]])


# 4 ----------------------------------------------------------------------------------------------
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         sample_size=16, norm_num_groups=2, layers_per_block=1).eval()


def write_imagefolder(root, sizes=((24, 20), (20, 24), (16, 16))):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_preprocessing_range_and_center_crop():
    arr = np.zeros((16, 24, 3), dtype=np.uint8)  # h 16, w 24: crop keeps columns 4..19
    arr[:, 12:] = 255
    arr[:, 4, 0] = 100
    x = preprocess_image(Image.fromarray(arr), 16, 3)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x[:, :, 8:].eq(1).all() and x[1:, :, :8].eq(-1).all()  # 255 → 1, 0 → −1 exactly
    torch.testing.assert_close(x[0, :, 0], torch.full((16,), 100 / 127.5 - 1))  # column 4 is the first kept
    assert preprocess_image(Image.fromarray(arr), 8, 1).shape == (1, 8, 8)  # L for 1-channel denoisers
    big = preprocess_image(Image.fromarray(np.full((64, 96, 3), 255, np.uint8)), 16, 3)  # box-halving path
    assert big.shape == (3, 16, 16) and big.eq(1).all()


def test_vae_path_imagefolder(random_dit, tmp_path, hf_cache, monkeypatch):
    import datasets

    from diffes_pl.denoisers import DiTAdapter

    folder = write_imagefolder(tmp_path / "images")
    vae = tiny_vae()
    adapter = DiTAdapter(random_dit.denoiser, "random-dit-vae", vae=vae, latent_scale=0.5)
    partition = StagePartition.from_scheduler(adapter.make_scheduler("ddim"), 4, 2)
    dm = attached(adapter, partition, source=str(folder), nsamples=6, batch_size=4, seed=1,
                  cache_dir=str(tmp_path / "cache"))
    clean = dm.clean()
    assert clean.latents.shape == (6, 4, 8, 8)  # 16×16 pixels (latent 8 × VAE factor 2) → 4×8×8
    # manual: the same rows, preprocessed to [-1, 1], VAE posterior mean, × latent_scale exactly once
    rows = datasets.load_dataset("imagefolder", data_dir=str(folder))["train"]
    idx, _ = select_indices(len(rows), 6, 1)
    images = torch.stack([preprocess_image(rows[int(i)]["image"], 16, 3) for i in idx])
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.9
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    torch.testing.assert_close(clean.latents, mean * 0.5, rtol=1e-5, atol=1e-6)
    assert torch.equal(clean.cond, torch.tensor([rows[int(i)]["label"] for i in idx]))
    assert set(clean.cond.tolist()) == {0, 1}
    # the noised batches carry those latents through the DDPM formula
    ds = dm.stage_dataset(1)
    a = hand_alphas_cumprod()[ds.timesteps].view(-1, 1, 1, 1)
    eps = (ds.latents.double() - a.sqrt() * clean.latents.double()) / (1 - a).sqrt()
    assert 0.5 < eps.std() < 1.5  # unit-variance noise on top of the scaled latents
    # disk cache: a second datamodule reads the cached latents instead of encoding
    cached = list((tmp_path / "cache").glob("calibration-*.safetensors"))
    assert len(cached) == 1
    again = attached(adapter, partition, source=str(folder), nsamples=6, batch_size=4, seed=1,
                     cache_dir=str(tmp_path / "cache"))
    import diffes_pl.data.calibration as calibration

    def no_encoding(*_a, **_k):
        raise AssertionError("the cached latents should have been read")

    monkeypatch.setattr(calibration, "encode_images", no_encoding)
    assert torch.equal(again.clean().latents, clean.latents)
    monkeypatch.undo()
    # a parquet file of the same rows gives the same calibration latents
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    pq = attached(adapter, partition, source=str(tmp_path / "rows.parquet"), nsamples=6, batch_size=4, seed=1)
    torch.testing.assert_close(pq.clean().latents, clean.latents)


# 6 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nsamples", [7, 8, 1, 2])
def test_ddp_shards_disjoint_and_complete(pixel_adapter, ddim_partition, nsamples):
    from torch.utils.data import DistributedSampler

    seen = []
    for rank in range(2):
        dm = attached(pixel_adapter, ddim_partition, nsamples=nsamples, batch_size=3)
        dm.set_stage(4)
        if nsamples < 2:
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                         distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
            with pytest.raises(ValueError, match="every process needs at least one"):
                dm.predict_dataloader()
            return
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                     distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        loader = dm.predict_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps it, injects none
        indices = torch.cat([b["index"] for b in loader]).tolist()
        assert len(indices) == len(loader.sampler) == len(range(rank, nsamples, 2))
        seen.append(indices)
        full = dm.stage_dataset(4)
        got = torch.cat([b["latents"] for b in loader])
        assert torch.equal(got, full.latents[indices])  # shards are slices of the one deterministic stage
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(nsamples))


def test_shard_sampler_many_ranks():
    data = list(range(11))
    shards = [list(ShardSampler(data, num_replicas=4, rank=r)) for r in range(4)]
    assert sorted(sum(shards, [])) == data and [len(s) for s in shards] == [3, 3, 3, 2]


def test_lightning_predict_single_process(pixel_adapter, ddim_partition):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.batches = []

        def predict_step(self, batch, batch_idx):
            self.batches.append(batch)
            return batch["index"]

    dm = attached(pixel_adapter, ddim_partition, nsamples=9, batch_size=4)
    dm.set_stage(3)
    model = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(model, datamodule=dm, return_predictions=False)
    assert torch.cat([b["index"] for b in model.batches]).tolist() == list(range(9))
    assert all(bool((b["stage"] == 3).all()) for b in model.batches)


# flow matching --------------------------------------------------------------------------------------
def test_flow_matching_noising(random_dit):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffes_pl.denoisers import DiTAdapter

    adapter = DiTAdapter(random_dit.denoiser, "random-flow", noise_schedule={"flow": True, "num_train_timesteps": 1000})
    partition = StagePartition.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), 4, 4)
    # pixel-space adapter with latents 4×8×8 cannot take digits: feed clean latents directly
    dm = CalibrationDataModule(nsamples=32, seed=0)
    dm.adapter, dm.partition = adapter, partition
    dm._ddpm, dm._schedule = None, adapter.noise_schedule
    from diffes_pl.data.calibration import CleanSet

    x0 = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    dm._clean = CleanSet(x0, torch.zeros(32, dtype=torch.int64))
    for stage in range(4):
        low, high = partition.stage_interval(stage)
        ds = dm.stage_dataset(stage)
        t = ds.timesteps
        assert t.dtype == torch.float32 and bool(((t > max(low, 0)) & (t <= high)).all())
        g = stage_generator(0, stage)
        torch.rand(32, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g)
        sigma = (t.double() / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(ds.latents, ((1 - sigma) * x0 + sigma * eps).float(), rtol=0, atol=2e-6)


# 7 ----------------------------------------------------------------------------------------------
def test_errors_name_cause_and_fix(pixel_adapter, ddim_partition, random_dit, tmp_path, hf_cache):
    with pytest.raises(FileNotFoundError, match="does not exist.*pass an existing folder"):
        CalibrationDataModule(source=str(tmp_path / "no-such-folder"))
    with pytest.raises(ValueError, match="nsamples must be an integer ≥ 1"):
        CalibrationDataModule(nsamples=0)
    with pytest.raises(ValueError, match="batch_size must be an integer ≥ 1"):
        CalibrationDataModule(batch_size=0)
    with pytest.raises(ValueError, match="not both.*set label_column to null"):
        CalibrationDataModule(caption_column="text")  # label_column defaults to "label"
    with pytest.raises(SourceError, match="no column 'text' \\(caption_column\\)"):
        CalibrationDataModule(caption_column="text", label_column=None)  # digits hold no captions
    with pytest.raises(SourceError, match="no column 'digit'"):
        CalibrationDataModule(label_column="digit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        CalibrationDataModule(source=str(tmp_path / "empty"))
    from diffes_pl.denoisers import DiTAdapter

    vae_dit = DiTAdapter(random_dit.denoiser, "random-dit-vae", vae=tiny_vae())
    partition = StagePartition.from_scheduler(vae_dit.make_scheduler("ddim"), 4, 2)
    folder = write_imagefolder(tmp_path / "images", sizes=((16, 16),))
    dm = CalibrationDataModule(source=str(folder), label_column="class", nsamples=2)
    with pytest.raises(SourceError, match=r"no column 'class' \(label_column\); its columns are \['image', 'label'\]"):
        dm.attach(vae_dit, partition)
    dm = CalibrationDataModule(source=str(folder), split="validation", nsamples=2)
    with pytest.raises(SourceError, match=r"splits \['train'\], not 'validation'"):
        dm.attach(vae_dit, partition)
    with pytest.raises(SourceError, match="digits source holds 1×8×8 pixel images"):
        CalibrationDataModule().attach(vae_dit, partition)
    with pytest.raises(RuntimeError, match="attach"):
        CalibrationDataModule().predict_dataloader()
    with pytest.raises(SourceError, match="could not load the Hugging Face dataset 'nobody/nothing'"):
        CalibrationDataModule(source="nobody/nothing").attach(pixel_adapter, ddim_partition)
