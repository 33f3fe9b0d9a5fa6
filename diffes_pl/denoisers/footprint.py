"""A denoiser's memory, known before it is built or loaded, and the dtype it is built or loaded in.

The architecture is built on the meta device (sizes only, no allocation, well under a second for
FLUX's 11.9 B parameters) from the same config the loader will use: the package's shipped configs,
a local folder's config.json, or a hub model's config in the local cache.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ..memory import check_fits, gib, module_bytes

HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def building_dtype(dtype: torch.dtype | None):
    """Random weights are created in `dtype` directly: building in float32 and casting afterwards
    would need the float32 size at its peak, whatever dtype was asked for."""
    if dtype is None or not dtype.is_floating_point or dtype == torch.get_default_dtype():
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def loading_kwargs(dtype: torch.dtype | None) -> dict:
    """diffusers' `from_pretrained` arguments: weights read straight into an empty model (accelerate),
    never after a first build with random weights, and in the target dtype."""
    return {"low_cpu_mem_usage": True, **({"torch_dtype": dtype} if dtype is not None else {})}


def _architecture(name: str, resolved) -> tuple[type, dict] | None:
    """(model class, config) that `load_denoiser(name)` builds (`resolved`: `registry.resolve(name)`),
    or None where no config is at hand (a hub model not in the local cache: loading will say why)."""
    import diffusers

    from .assets import asset_path

    family, folder = resolved.family, resolved.source == "folder"
    cls = getattr(diffusers, family.denoiser_class)
    if name in family.hub_names:
        return cls, json.loads(asset_path(family.hub_names[name]).read_text())
    sub = family.denoiser_subfolder
    root = Path(name) / sub if folder and (Path(name) / sub).is_dir() else Path(name)
    try:
        config = cls.load_config(str(root)) if folder else cls.load_config(name, subfolder=sub)
    except (OSError, ValueError):
        return None
    return cls, dict(config)


def meta_denoiser(name: str, resolved) -> nn.Module | None:
    """The denoiser's architecture on the meta device (no memory), or None (see `_architecture`)."""
    found = _architecture(name, resolved)
    if found is None:
        return None
    cls, config = found
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError):  # a config the class refuses: the loader will say why
        return None


def check_denoiser_memory(name: str, resolved, weights: bool, device, dtype: torch.dtype | None) -> None:
    """Refuses (InsufficientMemoryError) a denoiser that would not fit, before anything is allocated.
    With `weights`, diffusers reads the checkpoint on the CPU first: the CPU is checked as well."""
    if torch.device(device).type == "meta":
        return
    meta = meta_denoiser(name, resolved)
    if meta is None:
        return
    dtype = dtype or torch.float32
    nbytes = module_bytes(meta, dtype)
    params = sum(p.numel() for p in meta.parameters())
    how = "loading" if weights else "building (random weights)"
    count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"
    what = f"{how} {name}'s denoiser ({count} parameters in {str(dtype).removeprefix('torch.')})"
    ways = ['pass device="meta" to count MACs without allocating'] if not weights else []
    if dtype not in HALF:
        ways.append(f"dtype=torch.bfloat16 ({gib(module_bytes(meta, torch.bfloat16))})")
    ways.append("or use a machine with more memory")
    places = [torch.device(device)] + ([torch.device("cpu")] if weights and torch.device(device).type != "cpu" else [])
    for place in places:
        check_fits(nbytes, place, what, ", ".join(ways))
