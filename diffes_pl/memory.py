"""Memory is checked before it is allocated.

Building a large denoiser, loading its weights, gathering calibration statistics and preparing a
router's stages each know how many bytes they are about to allocate. Past the device's free memory
the kernel kills the process (a bare `Killed`) or CUDA fails half way; `check_fits` refuses first,
in one line naming the figure and the way out.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

GIB = 2**30


class InsufficientMemoryError(MemoryError):
    """What is about to be allocated does not fit in the device's available memory."""


def _cgroup_available() -> float:
    """Bytes left under this container's memory limit (cgroup v2), inf if there is none: the kernel
    kills at the cgroup's limit, which the host-wide figure does not show."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return math.inf
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        return math.inf


def _cpu_available() -> float:
    try:
        import psutil

        host = float(psutil.virtual_memory().available)
    except ImportError:  # psutil is a dependency; /proc/meminfo is the same figure on Linux
        try:
            line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable:"))
            host = float(line.split()[1]) * 1024
        except (OSError, StopIteration):
            return math.inf
    return min(host, _cgroup_available())


def available_bytes(device: str | torch.device) -> float:
    """Bytes that can still be allocated on `device`: CPU: available RAM (within the container's
    limit); CUDA: free device memory plus what PyTorch's cache holds unused; meta: infinite. Devices
    that report nothing (MPS, XLA, …) count as infinite: nothing is refused there."""
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_available()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return float(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    return math.inf


def gib(nbytes: float) -> str:
    """A size as people read it: GiB from 1 GiB up, MiB below."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def check_fits(nbytes: int, device: str | torch.device, what: str, ways_out: str) -> None:
    """Refuses (InsufficientMemoryError, one line) when `nbytes` exceed what `device` has available.

    Args:
        nbytes: what is about to be allocated.
        device: where.
        what: what it is, e.g. "building FLUX.1-schnell's denoiser (float32)".
        ways_out: what the user can do instead, e.g. 'pass device="meta" to count MACs'.
    """
    device = torch.device(device)
    if device.type == "meta":
        return
    available = available_bytes(device)
    if nbytes > available:
        raise InsufficientMemoryError(f"{what} needs {gib(nbytes)} but {device} has {gib(available)} available; "
                                      f"{ways_out}")


def module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of a module's parameters and buffers, floating ones counted in `dtype` if given (works
    on a meta module: sizes only)."""
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        itemsize = (dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype).itemsize
        total += tensor.numel() * itemsize
    return total


__all__ = ["InsufficientMemoryError", "available_bytes", "check_fits", "gib", "module_bytes"]

