"""The hand-written implementations that issue 23 replaced by library calls, kept verbatim as the
reference the replacements are checked against (tests/test_library_equivalence.py).

- `noise_ddpm`, `alphas_cumprod`: calibration noising x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε with ᾱ a
  float64 cumprod (now `DDPMScheduler.add_noise` of the training schedule, float32 ᾱ).
- `seeded_noise`: torch.randn on a seeded CPU generator (now diffusers' `randn_tensor`).
- `exclusive`, `holder_pid`: the flock-based store/run-folder lock (now `filelock.FileLock`).
- `precision_recall`: improved precision/recall on features (now torch-fidelity's `prc`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from diffes_pl.locks import LockedError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None


# --- calibration noising (diffes_pl/data/calibration.py, CALIBRATION_VERSION 1) -------------------
def alphas_cumprod(noise_schedule: dict) -> Tensor:
    """ᾱ_t = Π_{u ≤ t} (1 − β_u) in float64 from diffusers' DDPM betas (no validation here)."""
    from diffusers import DDPMScheduler

    from diffes_pl.denoisers.samplers import schedule_settings, scheduler_config

    betas = DDPMScheduler(**schedule_settings(scheduler_config(noise_schedule))).betas.to(torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def noise_ddpm(x0: Tensor, noise: Tensor, timesteps: Tensor, abar: Tensor) -> Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, ᾱ indexed by the native timestep itself (no shift)."""
    a = abar.to(torch.float64)[timesteps.long()]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    signal = a.sqrt().reshape(shape).to(x0.dtype)
    sigma = (1.0 - a).sqrt().reshape(shape).to(x0.dtype)
    return signal * x0 + sigma * noise.to(x0.dtype)


# --- seeded noise (diffes_pl/sampling.py) -----------------------------------------------------------
def seeded_noise(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)


# --- locks (diffes_pl/locks.py) -------------------------------------------------------------------
def holder_pid(lock_file: str | os.PathLike) -> str:
    try:
        return Path(lock_file).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, fix: str = "wait for it to finish") -> Iterator[Path]:
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_file, what, fix)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock_file
    finally:
        try:
            os.unlink(lock_file)
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire(lock_file: Path, what: str, fix: str) -> int:
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"another diffes-pl run (pid {holder_pid(lock_file)}) is {what} "
                              f"(lock {lock_file}); {fix}") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


# --- improved precision / recall (diffes_pl/evaluation/metrics.py) -------------------------------
def _kth_radii(features: Tensor, k: int, chunk: int) -> Tensor:
    radii = []
    for start in range(0, len(features), chunk):
        d = torch.cdist(features[start:start + chunk], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    out = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk], centres)
        out.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} real and fake samples")
    real, fake = real.double(), fake.double()
    precision = _inside(fake, real, _kth_radii(real, k, chunk), chunk).double().mean()
    recall = _inside(real, fake, _kth_radii(fake, k, chunk), chunk).double().mean()
    return float(precision), float(recall)
