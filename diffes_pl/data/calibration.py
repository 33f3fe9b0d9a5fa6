"""Calibration data: clean images noised per stage at the stage's own noise levels (SNR-matched).

`CalibrationDataModule` serves, for the current stage s, `nsamples` noisy latents

    x_t = sqrt(ᾱ_t) · x0 + sqrt(1 − ᾱ_t) · ε,   ᾱ_t = Π_{u ≤ t} (1 − β_u)   (t = 0 is already noisy)

with t drawn uniformly from the integer native timesteps of the stage's interval
(`StagePartition.stage_interval(s)`: low exclusive, high inclusive) and β the denoiser's own training
schedule (`adapter.noise_schedule`, a diffusers scheduler config). The noising is diffusers' own
`DDPMScheduler.add_noise` on a DDPMScheduler built from that TRAINING schedule — the forward process
diffusers' training scripts noise with — indexed by the native timestep itself. A sampler's
`add_noise` is not used: it indexes the sampler's own (possibly resampled) sigma table, which is
wrong off its trajectory for DPM-Solver and Euler; the training DDPMScheduler has one entry per
training timestep, so it has no such table. Flow-matching denoisers (those declaring
`FlowMatchEulerDiscreteScheduler`) use x_σ = (1 − σ) · x0 + σ · ε with σ = t / num_train_timesteps
drawn from the same interval, written out by hand (`noise_flow` says why).

x0 are the clean latents of `nsamples` images chosen once, by `seed`, from the source: preprocessed
to [-1, 1] and, for latent denoisers, encoded by the VAE (posterior mean) and scaled by
`adapter.latent_scale` exactly once. The same clean images serve every stage (only the noise level
differs, which is what makes stages comparable); timesteps and ε of stage s come from a generator
seeded by (seed, s), so each stage is reproducible on its own.

Text-conditioned denoisers (`adapter.conditioning == "text"`) calibrate on captions: `caption_column` names a column of
strings (or lists of strings: the first is used, as COCO-captions rows hold five); the captions of
the chosen rows are encoded ONCE by `adapter.encode_prompts` into a `TextCondition` and cached with
the clean latents (in memory, and on disk with `cache_dir`).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from ..denoisers.base import TextCondition
from ..denoisers.registry import family_titles
from ..denoisers.samplers import is_flow_matching, schedule_settings, scheduler_config

from .sources import (DIGITS_COLUMNS, SourceError, SourceSpec, caption_texts, check_columns, labels_tensor,
                      open_source, preprocess_image, resolve_source, select_indices)

# Bump when the noising or preprocessing changes: it is part of `settings()` (the store key).
# 2: DDPM noising by `DDPMScheduler.add_noise` (float32 ᾱ, as diffusers trains) instead of a float64
#    ᾱ by hand — samples differ from version 1 in the last float32 bits, so stores are rebuilt.
CALIBRATION_VERSION = 2
CACHE_VERSION = 2  # caches of caption runs also hold the encoded captions


# --- noise schedules ---------------------------------------------------------------------------

def is_flow(noise_schedule: dict) -> bool:
    """True for rectified-flow denoisers (FLUX, SD3): `_class_name` FlowMatchEulerDiscreteScheduler."""
    return is_flow_matching(noise_schedule)


def training_scheduler(noise_schedule: dict) -> Any:
    """diffusers' `DDPMScheduler` of the denoiser's training schedule: its `alphas_cumprod`
    ᾱ_t = Π_{u ≤ t} (1 − β_u), t = 0 … T−1, come from diffusers' own betas (linear, scaled_linear,
    squaredcos_cap_v2, trained_betas, zero-SNR rescaling), so ᾱ_0 = 1 − β_0 < 1: t = 0 is noisy.
    Keys that are not DDPM schedule settings are refused (a typo would silently fall back to defaults)."""
    from diffusers import DDPMScheduler

    if is_flow(noise_schedule):
        raise ValueError("a flow-matching schedule has no alphas_cumprod; use noise_flow")
    noise_schedule = schedule_settings(scheduler_config(noise_schedule))  # `_class_name` is metadata
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    unknown = set(noise_schedule) - accepted
    if unknown:
        raise ValueError(f"noise_schedule keys {sorted(unknown)} are not DDPM schedule settings; "
                         f"use {sorted(k for k in accepted if 'beta' in k or 'timesteps' in k)}")
    return DDPMScheduler(**noise_schedule)


def num_train_timesteps(noise_schedule: dict) -> int:
    return int(noise_schedule.get("num_train_timesteps", 1000))


def stage_seed(seed: int, stage: int) -> int:
    """A 63-bit seed for (seed, stage), unrelated across stages and seeds."""
    digest = hashlib.sha256(f"diffes-calibration:{int(seed)}:{int(stage)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stage_generator(seed: int, stage: int) -> torch.Generator:
    return torch.Generator().manual_seed(stage_seed(seed, stage))


def draw_timesteps(interval: tuple[float, float], n: int, generator: torch.Generator, num_train: int) -> Tensor:
    """n integer timesteps [n] int64, uniform over the integers t with low < t ≤ high (clipped to
    [0, num_train − 1])."""
    low, high = interval
    first = max(math.floor(low) + 1, 0)
    last = min(math.floor(high), num_train - 1)
    if first > last:
        raise ValueError(f"the stage interval ({low}, {high}] holds no integer training timestep; "
                         "use fewer sampling steps or fewer stages")
    return torch.randint(first, last + 1, (n,), generator=generator, dtype=torch.int64)


def noise_ddpm(x0: Tensor, noise: Tensor, timesteps: Tensor, scheduler: Any) -> Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε by `scheduler.add_noise` (a `training_scheduler`), ᾱ
    indexed by the native timestep itself (no shift). diffusers keeps ᾱ in float32: x_t differs from
    a float64 ᾱ by at most 4e-6 · (|x0| + |ε|) (tests/test_library_equivalence.py)."""
    return scheduler.add_noise(x0, noise.to(x0.dtype), timesteps.long())


# Flow matching (rectified flow) — kept apart: FLUX / SD3 adapters declare FlowMatchEulerDiscreteScheduler.
def draw_flow_timesteps(interval: tuple[float, float], n: int, generator: torch.Generator, num_train: int) -> Tensor:
    """n float timesteps t = σ · num_train [n] float32, uniform on (max(low, 0), min(high, num_train)]."""
    low, high = max(float(interval[0]), 0.0), min(float(interval[1]), float(num_train))
    if high <= low:
        raise ValueError(f"empty flow-matching stage interval ({interval[0]}, {interval[1]}]")
    u = torch.rand(n, generator=generator, dtype=torch.float64)  # [0, 1)
    return (high - u * (high - low)).to(torch.float32)


def noise_flow(x0: Tensor, noise: Tensor, timesteps: Tensor, num_train: int) -> Tensor:
    """x_σ = (1 − σ) x0 + σ ε with σ = t / num_train.

    Hand-written on purpose: `FlowMatchEulerDiscreteScheduler.scale_noise` finds σ by looking each
    timestep up in its own table (`index_for_timestep`: exact equality with one of its
    num_train_timesteps entries) and raises IndexError for the continuous timesteps drawn here
    (tests/test_library_equivalence.py shows it). On the table's own timesteps it equals this bit for bit."""
    sigma = (timesteps.to(torch.float64) / num_train).reshape((-1,) + (1,) * (x0.ndim - 1)).to(x0.dtype)
    return (1.0 - sigma) * x0 + sigma * noise.to(x0.dtype)


# --- sharding ------------------------------------------------------------------------------------

class ShardSampler(DistributedSampler):
    """Rank r of W takes indices r, r + W, r + 2W, … of the stage's samples: disjoint, complete, no
    padding (shards differ in length by at most one; nothing is duplicated to even them out).

    Being a `DistributedSampler`, Lightning keeps it as is instead of injecting its own."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


# --- datasets ------------------------------------------------------------------------------------

class StageDataset(Dataset):
    """One stage's samples, in memory. Item i: `latents` [C, H, W] float32 (noisy x_t), `timesteps`
    [] int64 (float32 for flow matching), `stage` [] int64, `cond` [] int64 class label (or a
    one-row `TextCondition` for text-conditioned denoisers), `index` [] int64 (i, for checking
    shards). `collate_samples` batches items (TextCondition rows are concatenated)."""

    def __init__(self, latents: Tensor, timesteps: Tensor, stage: int, cond: Tensor | TextCondition) -> None:
        self.latents, self.timesteps, self.cond = latents, timesteps, cond
        self.stage = int(stage)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"latents": self.latents[i], "timesteps": self.timesteps[i],
                "stage": torch.tensor(self.stage, dtype=torch.int64), "cond": self.cond[i],
                "index": torch.tensor(int(i), dtype=torch.int64)}


def cat_conditions(conds: list[TextCondition]) -> TextCondition:
    """TextConditions stacked along the batch axis (one concatenation per field)."""
    from dataclasses import fields

    values = {f.name: [getattr(c, f.name) for c in conds] for f in fields(TextCondition)}
    return TextCondition(**{k: None if any(v is None for v in vs) else torch.cat(vs) for k, vs in values.items()})


def collate_samples(items: list[dict]) -> dict:
    """A batch of `StageDataset` items: tensors stacked, TextCondition rows concatenated."""
    if not isinstance(items[0]["cond"], TextCondition):
        return default_collate(items)
    batch = default_collate([{k: v for k, v in item.items() if k != "cond"} for item in items])
    batch["cond"] = cat_conditions([item["cond"] for item in items])
    return batch


@dataclass
class CleanSet:
    """The cached clean latents x0 [N, C, H, W] float32 (cpu) and their conditions: class labels [N]
    int64, or a TextCondition of N rows (text-conditioned denoisers)."""

    latents: Tensor
    cond: Tensor | TextCondition


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent pixel of a diffusers AutoencoderKL: 2^(len(block_out_channels) − 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(adapter: Any, images: Tensor) -> Tensor:
    """[-1, 1] images → latents: VAE posterior mean (deterministic), (z − shift) · latent_scale once.
    Identity for pixel denoisers (`adapter.vae is None`)."""
    vae = adapter.vae
    if vae is None:
        return images.float()
    param = next(vae.parameters())
    z = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist.mode()
    shift = float(adapter.latent_shift or 0.0)
    return ((z.float() - shift) * float(adapter.latent_scale)).cpu()


# --- the datamodule --------------------------------------------------------------------------------

class CalibrationDataModule(L.LightningDataModule):
    """SNR-matched calibration batches, one stage at a time, for the pruners' predict epochs.

    Call `attach(adapter, partition)` first, then `set_stage(s)`; `predict_dataloader()` serves the
    `nsamples` samples of stage s in batches of dicts: `latents` [B, C, H, W] float (noisy x_t),
    `timesteps` [B] int64 native training timesteps (float σ·1000 for flow matching), `stage` [B]
    int64 (all s), `cond` [B] int64 class labels (the null class when `label_column` is null) or,
    for text-conditioned denoisers, a TextCondition of B rows (the captions' embeddings, or the null
    condition), and `index` [B] int64 (sample index within the stage).

    The clean images are the same for every stage (chosen once by `seed`, encoded once and cached);
    only the timesteps and the noise differ, drawn from a generator seeded by (seed, stage). Under
    DDP each process gets every W-th sample (`ShardSampler`): no sample is duplicated or dropped,
    whatever `nsamples` is; every process needs at least one sample (nsamples ≥ processes). Each
    process prepares (and VAE-encodes) the whole clean set once, so that all processes agree on it
    without communication; `cache_dir` lets later runs skip the encoding.
    """

    def __init__(self, source: str = "digits", nsamples: int = 64, batch_size: int = 32, seed: int = 0,
                 split: str = "train", image_column: str = "image", label_column: str | None = "label",
                 caption_column: str | None = None, resolution: int | None = None, num_workers: int = 0,
                 cache_dir: str | None = None) -> None:
        """
        Args:
            source: where the clean images come from: `digits` (built-in 8×8 digits, for the
                built-in model), a local folder of images (one subfolder per class gives the labels),
                a local .parquet file or folder, a folder saved by `datasets`' save_to_disk, or a
                Hugging Face dataset name (e.g. ILSVRC/imagenet-1k) loaded by `datasets`.
            nsamples: calibration samples per stage (≥ 1); the same clean images in every stage.
            batch_size: samples per calibration batch (≥ 1); also the VAE encoding batch size.
            seed: seeds the choice of clean images and, with the stage index, each stage's
                timesteps and noise.
            split: dataset split to draw the images from (`train`, `test`, … ; digits: train/test/all).
            image_column: column holding the images.
            label_column: column holding integer class labels; null calibrates unconditionally
                (the denoiser's null class).
            caption_column: column holding captions (text-conditioned denoisers): strings,
                or lists of strings (the first is used). Needs label_column null. The captions are
                encoded once with the adapter's text encoders. With both columns null a
                text-conditioned denoiser is calibrated unconditionally (its null condition).
            resolution: pixel size of the square center crop; default latent size × VAE
                downsampling factor for latent denoisers, the latent size for pixel denoisers.
            num_workers: DataLoader worker processes (samples are in memory: 0 is usually best).
            cache_dir: if set, the encoded clean latents are also cached on disk there (keyed by
                source, split, columns, resolution, nsamples, seed and the denoiser/VAE); delete the
                cache when a local source folder changes.
        """
        super().__init__()
        for name, value, least in (("nsamples", nsamples, 1), ("batch_size", batch_size, 1),
                                   ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer ≥ {least}; got {value!r}")
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"resolution must be a positive integer or null; got {resolution!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        if not image_column:
            raise ValueError("image_column must name the column holding the images")
        if caption_column is not None and label_column is not None:
            raise ValueError(f"give label_column (class-conditional denoisers: {family_titles(conditioning='class')}) "
                             f"or caption_column (text-conditioned: {family_titles(conditioning='text')}), not both "
                             f"(got {label_column!r} and {caption_column!r}): for captions set label_column to null")
        self.spec: SourceSpec = resolve_source(source)  # a missing local path is refused here
        if self.spec.kind == "digits":
            check_columns(DIGITS_COLUMNS, source, image_column, label_column, caption_column)
        self.source = source
        self.nsamples = nsamples
        self.batch_size = batch_size
        self.seed = seed
        self.split = split
        self.image_column = image_column
        self.label_column = label_column
        self.caption_column = caption_column
        self.resolution = resolution
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.adapter: Any = None
        self.partition: Any = None
        self.stage = 0
        self._rows: Any = None  # the selected rows of a datasets.Dataset (not decoded yet)
        self._labels: Tensor | None = None
        self._captions: list[str] | None = None
        self._clean: CleanSet | None = None
        self._stage_cache: tuple[int, StageDataset] | None = None

    # --- identity ------------------------------------------------------------------------------
    def settings(self) -> dict:
        """Everything that changes the calibration samples (part of the trajectory-store key)."""
        return {"source": self.source, "split": self.split, "nsamples": self.nsamples, "seed": self.seed,
                "image_column": self.image_column, "label_column": self.label_column,
                "caption_column": self.caption_column, "resolution": self.resolution,
                "version": CALIBRATION_VERSION}

    # --- binding --------------------------------------------------------------------------------
    def check_source(self, adapter: Any) -> None:
        """Opens the source and checks it (columns, labels or captions for this denoiser's
        conditioning) without the denoiser's weights — the adapter over its architecture is enough —
        so that a missing dataset is refused before the denoiser loads. The rows are kept for `attach`."""
        self._check_conditioning(adapter)
        self._prepare_rows()

    def attach(self, adapter: Any, partition: Any) -> None:
        """Binds the denoiser adapter and the stage partition, and checks the source against them
        (split, columns, labels, image size, schedule) before any image is decoded or encoded."""
        schedule = dict(adapter.noise_schedule)
        T = num_train_timesteps(schedule)
        if int(partition.num_train_timesteps) != T:
            raise ValueError(f"the partition counts {partition.num_train_timesteps} training timesteps but the "
                             f"denoiser was trained with {T}; build the partition from adapter.make_scheduler()")
        self._check_conditioning(adapter)
        self._ddpm = None if is_flow(schedule) else training_scheduler(schedule)
        self._schedule = schedule
        if self.adapter is not adapter:
            self._clean = None
        self.adapter, self.partition = adapter, partition
        self._stage_cache = None
        C, H, W = (int(x) for x in adapter.latent_shape)
        vae = adapter.vae
        self._channels = int(vae.config.in_channels) if vae is not None else C
        factor = vae_scale_factor(vae) if vae is not None else 1
        if self.spec.kind == "digits":
            if vae is not None or (C, H, W) != (1, 8, 8) or self.resolution not in (None, 8):
                raise SourceError(f"the digits source holds 1×8×8 pixel images, but {adapter.name} expects "
                                  f"{'latents of ' if vae is not None else ''}{C}×{H}×{W}"
                                  f"{'' if self.resolution in (None, 8) else f' at resolution {self.resolution}'}: "
                                  "use digits with the built-in model (tiny-digits), an image dataset otherwise")
        if H != W and self.resolution is None:
            raise SourceError(f"{adapter.name} has non-square latents {H}×{W}; square crops only")
        self._pixel_resolution = self.resolution or H * factor
        if self._channels not in (1, 3):
            raise SourceError(f"{adapter.name} expects {self._channels}-channel images; only 1 (L) or 3 (RGB)")
        self._prepare_rows()  # digits too: a datasets.Dataset like any other source
        if self._labels is not None:
            try:
                adapter.validate_condition(self._labels)
            except ValueError as err:
                raise SourceError(f"label column {self.label_column!r} of {self.source} does not fit "
                                  f"{adapter.name}: {err}") from err

    def _check_conditioning(self, adapter: Any) -> None:
        """Captions go with text-conditioned denoisers, labels with the rest (`adapter.conditioning`)."""
        text = adapter.conditioning == "text"
        if self.caption_column is not None and not text:
            raise SourceError(f"caption_column={self.caption_column!r} needs a text-conditioned denoiser "
                              f"({family_titles(conditioning='text')}); "
                              f"{adapter.name} is class-conditional: set caption_column to null and label_column "
                              "to the class-label column")
        if text and self.label_column is not None:
            raise SourceError(f"{adapter.name} is text-conditioned: set caption_column to the column holding the "
                              f"captions and label_column to null (got label_column={self.label_column!r}); both "
                              "null calibrates unconditionally")

    def _prepare_rows(self) -> None:
        if self._rows is not None:
            return
        ds = open_source(self.spec, self.split)
        check_columns(ds.column_names, self.source, self.image_column, self.label_column, self.caption_column)
        idx, repeated = select_indices(len(ds), self.nsamples, self.seed)
        self._warn_repeated(repeated, len(ds))
        rows = ds.select(idx.tolist())
        self._labels = (labels_tensor(rows[self.label_column], self.source, self.label_column)
                        if self.label_column is not None else None)
        self._captions = (caption_texts(rows[self.caption_column], self.source, self.caption_column)
                          if self.caption_column is not None else None)
        self._rows = rows
        self._num_source_rows = len(ds)

    def _warn_repeated(self, repeated: bool, total: int) -> None:
        if repeated:
            warnings.warn(f"calibration source {self.source} ({self.split}) has {total} images < nsamples = "
                          f"{self.nsamples}: images are reused (each copy gets its own noise and timestep)",
                          stacklevel=3)

    def _require_attached(self) -> None:
        if self.adapter is None:
            raise RuntimeError("CalibrationDataModule.attach(adapter, partition) must be called first "
                               "(DiffES.ensure_store / build_store do this)")

    # --- clean latents --------------------------------------------------------------------------
    def clean(self) -> CleanSet:
        """The clean latents x0 and conditions, computed once (and cached on disk with `cache_dir`)."""
        self._require_attached()
        if self._clean is not None:
            return self._clean
        adapter = self.adapter
        text: TextCondition | None = None
        path = self._cache_path()
        if path is not None and path.exists():
            from safetensors.torch import load_file

            cached = load_file(str(path))
            latents = cached.pop("latents")
            text = TextCondition(**{k.split(".", 1)[1]: v for k, v in cached.items()}) if cached else None
        else:
            latents = self._encode_rows()
            text = self._encode_captions()
            if path is not None:
                from safetensors.torch import save_file

                from ..io import atomic_path

                tensors = {"latents": latents}
                if text is not None:
                    tensors.update({f"cond.{k}": v for k, v in vars(text).items() if v is not None})
                with atomic_path(path) as tmp:
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        expected = tuple(int(x) for x in adapter.latent_shape)
        if self.resolution is None and tuple(latents.shape[1:]) != expected:
            raise SourceError(f"calibration latents have shape {tuple(latents.shape[1:])} but {adapter.name} expects "
                              f"{expected}; check the VAE and the resolution ({self._pixel_resolution})")
        if text is not None:
            cond = text
        elif self._labels is not None:
            cond = self._labels.clone()
        elif adapter.conditioning == "text":  # no captions: the null condition
            cond = adapter.null_condition(adapter.example_condition(self.nsamples)).to("cpu", torch.float32)
        else:
            cond = adapter.null_condition(torch.zeros(self.nsamples, dtype=torch.int64))
        self._clean = CleanSet(latents, cond)
        return self._clean

    def _encode_rows(self) -> Tensor:
        out = []
        for start in range(0, self.nsamples, self.batch_size):
            batch = self._rows.select(range(start, min(start + self.batch_size, self.nsamples)))
            images = torch.stack([preprocess_image(v, self._pixel_resolution, self._channels)
                                  for v in batch[self.image_column]])
            out.append(encode_images(self.adapter, images))
        return torch.cat(out)

    def _encode_captions(self) -> TextCondition | None:
        """The chosen rows' captions → one TextCondition [N rows] (float32, CPU), or None."""
        if self._captions is None:
            return None
        return self.adapter.encode_prompts(self._captions, batch_size=self.batch_size).to("cpu", torch.float32)

    def captions(self) -> list[str] | None:
        """The captions of the chosen rows, in sample order (None without caption_column)."""
        self._require_attached()
        return None if self._captions is None else list(self._captions)

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        adapter = self.adapter
        vae = adapter.vae
        key = {"settings": self.settings(), "source": [self.spec.kind, self.spec.location],
               "rows": self._num_source_rows, "pixel_resolution": self._pixel_resolution,
               "channels": self._channels, "denoiser": adapter.name,
               "vae": None if vae is None else [type(vae).__name__, dict(vae.config)],
               "latent_scale": adapter.latent_scale, "latent_shift": adapter.latent_shift}
        if self.caption_column is not None:  # the file also holds the encoded captions
            key.update({"cache_version": CACHE_VERSION, "text_encoders": adapter.text_identity()})
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return Path(self.cache_dir).expanduser() / f"calibration-{digest}.safetensors"

    # --- stages ---------------------------------------------------------------------------------
    def set_stage(self, stage: int) -> None:
        """Selects the stage that `predict_dataloader` serves."""
        if self.partition is not None and not 0 <= int(stage) < self.partition.num_stages:
            raise ValueError(f"stage {stage} outside [0, {self.partition.num_stages - 1}]")
        self.stage = int(stage)

    def stage_dataset(self, stage: int) -> StageDataset:
        """The `nsamples` deterministic samples of `stage` (the last one built is kept)."""
        self._require_attached()
        if not 0 <= int(stage) < self.partition.num_stages:
            raise ValueError(f"stage {stage} outside [0, {self.partition.num_stages - 1}]")
        if self._stage_cache is not None and self._stage_cache[0] == stage:
            return self._stage_cache[1]
        clean = self.clean()
        g = stage_generator(self.seed, stage)
        interval = self.partition.stage_interval(stage)
        T = num_train_timesteps(self._schedule)
        n = len(clean.latents)
        from diffusers.utils.torch_utils import randn_tensor

        # ε by diffusers' randn_tensor on the stage's CPU generator (the same numbers as torch.randn)
        if self._ddpm is None:
            t = draw_flow_timesteps(interval, n, g, T)
            noise = randn_tensor(tuple(clean.latents.shape), generator=g, device=torch.device("cpu"), dtype=torch.float32)
            xt = noise_flow(clean.latents, noise, t, T)
        else:
            t = draw_timesteps(interval, n, g, T)
            noise = randn_tensor(tuple(clean.latents.shape), generator=g, device=torch.device("cpu"), dtype=torch.float32)
            xt = noise_ddpm(clean.latents, noise, t, self._ddpm)
        dataset = StageDataset(xt, t, stage, clean.cond)
        self._stage_cache = (int(stage), dataset)
        return dataset

    def shard_sampler(self, dataset: Dataset) -> ShardSampler | None:
        """The non-padding `ShardSampler` of this process when the trainer runs several, else None."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or int(getattr(trainer, "world_size", 1)) <= 1:
            return None
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) or {
            "num_replicas": trainer.world_size, "rank": trainer.global_rank}
        replicas, rank = int(kwargs["num_replicas"]), int(kwargs["rank"])
        if len(dataset) < replicas:
            raise ValueError(f"nsamples = {len(dataset)} < {replicas} processes: every process needs at least one "
                             f"calibration sample; raise nsamples to ≥ {replicas}")
        return ShardSampler(dataset, num_replicas=replicas, rank=rank)

    def predict_dataloader(self) -> DataLoader:
        """The current stage's samples in order, `batch_size` per batch; this process's shard under DDP."""
        dataset = self.stage_dataset(self.stage)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=self.shard_sampler(dataset),
                          num_workers=self.num_workers, drop_last=False, collate_fn=collate_samples)
