"""Resumable, rank-split sampling of evaluation images, and per-image latency.

An `ImageSet` is N images sampled in fixed batches from seeded noise; batch b is saved as
`<folder>/batch_<b>.safetensors` (images [B, C, H, W] uint8) the moment it is done, so a run that
is interrupted, or asked for more images later, regenerates nothing already on disk. The folder
name carries a hash of everything that decides the pixels (denoiser, store, levels, sampler, steps,
guidance, seed, batch size): images made under other settings are never reused silently. Each batch
file records the sha256 of its pixels in its metadata, verified whenever it is read: a damaged batch
is refused naming it (delete it: it is sampled again). The key also holds `BATCH_FORMAT`, so that
folders of older versions (batches without checksums) are not reused but sampled anew.

For people and for other FID tools, `write_pngs` also writes every image as `<folder>/png/000000.png`,
… (exactly the first N images, the pixels of the batch files) and a `<folder>/grid.png` overview,
from the batch files, skipping what exists: e.g. `fidelity --fid --input1 <folder>/png --input2 …`.

Batch b draws its noise from seed·1_000_003 + b and conditions from a fixed rule (class labels
b·B … b·B+B−1 mod K, or prompts cycled), so it is the same whichever rank or run makes it. Under
DDP, `trainer.predict` over the batch indices hands rank r the batches r, r + W, r + 2W, …
(Lightning's DistributedSampler, no shuffle).
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ..caching.installed import install_schedule
from ..integrity import DamagedFileError, sha256_hex
from ..sampling import sample, seeded_noise
from .grids import image_grid

# 2: every batch file records its pixels' sha256 (`PIXELS_SHA256` in its metadata)
BATCH_FORMAT = 2
PIXELS_SHA256 = "pixels_sha256"


def pixels_digest(pixels: Tensor) -> str:
    """sha256 of a uint8 image batch: its shape, then its bytes (a changed shape changes it too)."""
    pixels = pixels.contiguous()
    return sha256_hex(f"{pixels.dtype}{list(pixels.shape)}".encode() + pixels.numpy().tobytes())


@dataclass
class ImageSet:
    """Where and how one schedule's (or the dense model's) evaluation images are sampled."""

    root: Path  # <run>/eval
    name: str  # dense, searched, uniform, …
    levels: list[int] | None  # None: the dense denoiser
    settings: dict  # sampler, steps, guidance, seed, batch_size, denoiser, store key, partition
    num_images: int
    prompts: Sequence[str] | None = None

    @property
    def folder(self) -> Path:
        key = json.dumps({"levels": self.levels, **self.settings, "batch_format": BATCH_FORMAT}, sort_keys=True,
                         default=str)
        return self.root / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"

    @property
    def batch_size(self) -> int:
        return int(self.settings["batch_size"])

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    def batch_path(self, b: int) -> Path:
        return self.folder / f"batch_{b:05d}.safetensors"

    def missing(self) -> list[int]:
        return [b for b in range(self.num_batches) if not self.batch_path(b).is_file()]

    def conditions(self, b: int, num_classes: int | None) -> Any:
        idx = range(b * self.batch_size, (b + 1) * self.batch_size)
        if self.prompts is not None:
            return [self.prompts[i % len(self.prompts)] for i in idx]
        return torch.tensor(list(idx)) % num_classes

    def noise(self, b: int, latent_shape: Sequence[int]) -> Tensor:
        return seeded_noise((self.batch_size, *latent_shape), int(self.settings["seed"]) * 1_000_003 + b)

    def read_batch(self, b: int) -> Tensor:
        """Batch b's pixels [B, C, H, W] uint8, after checking them against the sha256 saved with them."""
        from safetensors import SafetensorError, safe_open

        path = self.batch_path(b)

        def damaged(what: str) -> DamagedFileError:
            return DamagedFileError(f"evaluation batch {path} is damaged ({what}); delete it (it is sampled again) "
                                    "and rerun")

        try:
            with safe_open(str(path), framework="pt") as f:
                expected = (f.metadata() or {}).get(PIXELS_SHA256)
                pixels = f.get_tensor("images")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # a damaged header or size
            raise damaged(f"unreadable: {type(err).__name__}") from None
        if expected is None:
            raise damaged("its checksum is missing")
        if pixels.dtype != torch.uint8 or pixels_digest(pixels) != expected:
            raise damaged("checksum mismatch: its pixels changed after they were written")
        return pixels

    def load(self) -> Tensor:
        """The first num_images images [N, C, H, W] float in [0, 1]."""
        missing = self.missing()
        if missing:
            raise FileNotFoundError(f"{len(missing)} batches of {self.folder} are missing (first: {missing[0]}); "
                                    "sample them first")
        batches = [self.read_batch(b) for b in range(self.num_batches)]
        return torch.cat(batches)[:self.num_images].float() / 255

    @property
    def png_folder(self) -> Path:
        return self.folder / "png"

    def png_path(self, i: int) -> Path:
        return self.png_folder / f"{i:06d}.png"

    def write_pngs(self, grid_size: int = 64) -> int:
        """PNGs of the first num_images images (from the batch files, lossless), the missing ones
        only, and grid.png of the first `grid_size`; PNGs past num_images are removed so that the
        folder holds exactly the evaluated images. Returns how many PNGs were written."""
        from ..io import atomic_path

        written = 0
        for b in range(self.num_batches):
            first = b * self.batch_size
            rows = range(first, min(first + self.batch_size, self.num_images))
            todo = [i for i in rows if not self.png_path(i).is_file()]
            if todo:
                pixels = self.read_batch(b)
                for i in todo:
                    with atomic_path(self.png_path(i)) as tmp:
                        to_pil(pixels[i - first]).save(tmp, format="PNG")
                written += len(todo)
        for extra in self.png_folder.glob("*.png"):
            if extra.stem.isdigit() and int(extra.stem) >= self.num_images:
                extra.unlink()
        grid = self.folder / "grid.png"
        if written or not grid.is_file():
            with atomic_path(grid) as tmp:
                to_pil(image_grid(self.load()[:grid_size])).save(tmp, format="PNG")
        return written

    def save(self, b: int, images: Tensor) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_path

        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
        with atomic_path(self.batch_path(b)) as tmp:
            save_file({"images": pixels}, str(tmp), metadata={PIXELS_SHA256: pixels_digest(pixels)})


def to_pil(pixels: Tensor) -> Any:
    """One uint8 image [C, H, W] (C = 1 or 3) → a PIL image (mode L or RGB), pixels unchanged."""
    from PIL import Image

    array = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def sample_batch(image_set: ImageSet, b: int, adapter, router, *, sampler: str, steps: int, guidance: float,
                 cache=None) -> Tensor:
    """Images [B, C, H, W] in [0, 1] of batch b (module-level so that tests can count calls); `cache`:
    the schedule's feature cache (`caching.installed.install_schedule`), None when no stage caches."""
    cond = image_set.conditions(b, adapter.num_classes)
    return sample(adapter, cond, steps=steps, guidance=guidance, router=router, sampler=sampler, cache=cache,
                  noise=image_set.noise(b, adapter.latent_shape))


class SamplingModule(L.LightningModule):
    """`trainer.predict` over batch indices: samples and saves every batch not yet on disk."""

    def __init__(self, image_set: ImageSet, adapter, store=None, schedule=None, *, sampler: str, steps: int,
                 guidance: float) -> None:
        super().__init__()
        self.image_set, self.store, self.schedule = image_set, store, schedule
        object.__setattr__(self, "adapter", adapter)  # the denoiser is not this module's state
        self.kw = dict(sampler=sampler, steps=steps, guidance=guidance)
        self.installed = None  # the schedule's router (+ feature cache) while predicting
        self._exit = ExitStack()
        self.sampled = 0

    def on_predict_start(self) -> None:
        try:
            self.trainer
        except RuntimeError:  # used alone, no Trainer attached: the denoiser stays where it is
            pass
        else:  # under trainer.predict: this rank's device
            self.adapter.denoiser.to(self.device)
        # weights prepared once for all batches, removed in on_predict_end
        self.installed = self._exit.enter_context(install_schedule(self.adapter, self.store, self.schedule))

    def on_predict_end(self) -> None:
        self._exit.close()
        self.installed = None

    def predict_step(self, batch: Tensor, batch_idx: int) -> None:
        for b in batch.tolist():
            if not self.image_set.batch_path(b).is_file():  # a padded duplicate may already exist
                self.image_set.save(b, sample_batch(self.image_set, b, self.adapter, self.installed.router,
                                                    cache=self.installed.cache, **self.kw))
                self.sampled += 1

    def predict_dataloader(self):
        return torch.utils.data.DataLoader(self.image_set.missing(), batch_size=1)


def ensure_images(image_set: ImageSet, adapter, store=None, schedule=None, *, sampler: str, steps: int,
                  guidance: float, trainer: L.Trainer | None = None, launched: bool = False) -> int:
    """Samples the batches not yet on disk; returns how many this rank sampled.

    - no trainer: this process samples them all;
    - `launched=False`: `trainer.predict` launches the trainer's ranks (e.g. `diffes-pl test` under
      DDP) and its DistributedSampler gives rank r the missing batches r, r + W, …;
    - `launched=True`: the ranks already run (a callback inside fit): rank r takes missing[r::W]
      itself, then all ranks meet at a barrier.
    """
    kw = dict(sampler=sampler, steps=steps, guidance=guidance)
    world = trainer.world_size if trainer is not None else 1
    # every rank must judge "missing" on the same files: none may still be writing
    if trainer is not None and world > 1:
        trainer.strategy.barrier("diffes-eval-start")  # a no-op before the ranks are launched
    missing = image_set.missing()
    if not missing:
        return 0
    module = SamplingModule(image_set, adapter, store, schedule, **kw)
    if trainer is None or launched:
        mine = missing[trainer.global_rank::world] if trainer is not None else missing
        module.on_predict_start()
        try:
            for b in mine:
                module.predict_step(torch.tensor([b]), b)
        finally:
            module.on_predict_end()
    else:
        import warnings

        warnings.filterwarnings("ignore", message=".*predict returned None.*")  # the files are the product
        trainer.predict(module, return_predictions=False)
    if trainer is not None and trainer.world_size > 1:
        trainer.strategy.barrier("diffes-eval-sampled")
    return module.sampled


def latency_per_image(adapter, router, *, batch_size: int, sampler: str, steps: int, guidance: float,
                      repeats: int = 3, warmup: int = 1, cache=None) -> float:
    """Median seconds per image of a full sampling run (all steps + decode) at `batch_size` (`cache`:
    a joint schedule's feature cache, after the router)."""
    return statistics.median(latency_times(adapter, router, batch_size=batch_size, sampler=sampler, steps=steps,
                                           guidance=guidance, repeats=repeats, warmup=warmup, cache=cache))


@torch.no_grad()
def latency_times(adapter, router, *, batch_size: int, sampler: str, steps: int, guidance: float,
                  repeats: int = 3, warmup: int = 1, cache=None) -> list[float]:
    """Seconds per image of each of `repeats` timed sampling runs (all steps + decode) at `batch_size`,
    after `warmup` untimed ones (`cache`: a joint schedule's feature cache, after the router)."""
    cond = (torch.arange(batch_size) % adapter.num_classes) if adapter.conditioning == "class" else \
        [""] * batch_size
    noise = seeded_noise((batch_size, *adapter.latent_shape), 0)
    cuda = adapter.device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(adapter.device)
        start = time.perf_counter()
        sample(adapter, cond, steps=steps, guidance=guidance, router=router, sampler=sampler, noise=noise,
               **({} if cache is None else {"cache": cache}))
        if cuda:
            torch.cuda.synchronize(adapter.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) / batch_size)
    return times
