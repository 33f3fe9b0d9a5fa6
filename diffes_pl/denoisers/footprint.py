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


def _architecture(name: str, kind: str) -> tuple[type, dict] | None:
    """(model class, config) that `load_denoiser(name)` builds, or None where no config is at hand
    (a hub model not in the local cache: loading will say why)."""
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, UNet2DConditionModel

    from . import DIT_HUB_NAMES, FLUX_HUB_NAMES, SDXL_HUB_NAMES
    from .tiny import CONFIG, asset_path

    shipped = {**DIT_HUB_NAMES, **SDXL_HUB_NAMES, **FLUX_HUB_NAMES}
    cls = {"tiny": DiTTransformer2DModel, "dit-hub": DiTTransformer2DModel, "dit-folder": DiTTransformer2DModel,
           "sdxl-hub": UNet2DConditionModel, "sdxl-folder": UNet2DConditionModel,
           "flux-hub": FluxTransformer2DModel, "flux-folder": FluxTransformer2DModel}[kind]
    if kind == "tiny" or name in shipped:
        return cls, json.loads(asset_path(CONFIG if kind == "tiny" else shipped[name]).read_text())
    sub = {"dit-folder": "transformer", "dit-hub": "transformer", "sdxl-folder": "unet", "flux-folder": "transformer"}[kind]
    root = Path(name) / sub if kind.endswith("folder") and (Path(name) / sub).is_dir() else Path(name)
    try:
        config = cls.load_config(str(root)) if kind.endswith("folder") else cls.load_config(name, subfolder=sub)
    except (OSError, ValueError):
        return None
    return cls, dict(config)


def meta_denoiser(name: str, kind: str) -> nn.Module | None:
    """The denoiser's architecture on the meta device (no memory), or None (see `_architecture`)."""
    found = _architecture(name, kind)
    if found is None:
        return None
    cls, config = found
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError):  # a config the class refuses: the loader will say why
        return None


def check_denoiser_memory(name: str, kind: str, weights: bool, device, dtype: torch.dtype | None) -> None:
    """Refuses (InsufficientMemoryError) a denoiser that would not fit, before anything is allocated.
    With `weights`, diffusers reads the checkpoint on the CPU first: the CPU is checked as well."""
    if torch.device(device).type == "meta":
        return
    meta = meta_denoiser(name, kind)
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
