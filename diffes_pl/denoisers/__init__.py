"""Denoiser adapters and `load_denoiser`: a name (built-in, hub id or local folder) → adapter.

Which family serves a name is the registry's business (`registry.py`); each family module registers
its record (names, folder classes, pipeline, loaders, text encoders) on import.
"""
from __future__ import annotations

import torch

from .base import ConstantOutput, DenoiserAdapter, TextCondition, UnitGroup, keep_from_order
from .dit import DiTAdapter
from .footprint import check_denoiser_memory
from .registry import Family, Resolved, UnknownDenoiserError, families, family_of, resolve
from .schedules import Sampler


def check_name(name: str) -> Resolved:
    """Which family and source (`builtin`, `hub`, `folder`) serve `name`, without loading anything (a
    local folder's JSON configs are read); unknown names and missing folders are refused here,
    before any long work. The result also equals the old kind strings ("dit-hub", "sdxl-folder", …)."""
    return resolve(name)


def load_denoiser(name: str, weights: bool = True, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> DenoiserAdapter:
    """The adapter for `name`.

    Args:
        name: `tiny-digits` (built in), a hub id such as `facebook/DiT-XL-2-256`,
            `stabilityai/stable-diffusion-xl-base-1.0` or `black-forest-labs/FLUX.1-schnell`, or a
            local folder holding a diffusers DiT, SDXL or FLUX pipeline (`transformer/` or `unet/`,
            optional `vae/` and text encoders) or a bare denoiser (recognised by `_class_name`).
        weights: False builds the real architecture from a config shipped in the package with
            random weights (no network); `device="meta"` then allocates nothing.
        device: where the denoiser lives.
        dtype: the inference dtype (default float32).
    """
    resolved = check_name(name)
    check_denoiser_memory(name, resolved, weights, device, dtype)  # before anything is allocated
    family = resolved.family
    if resolved.source == "builtin":
        adapter = family.load_builtin(family, name, weights, device, dtype)
    elif resolved.source == "hub":
        adapter = family.load_hub(family, name, weights, device, dtype)
    else:
        adapter = family.load_folder(family, name, device, dtype)
    if str(device) != "meta":
        kw = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        adapter.denoiser.to(**kw)
        if adapter.vae is not None:  # a VAE marked force_upcast (SDXL's) overflows in float16: kept float32
            upcast = getattr(adapter.vae.config, "force_upcast", False) and dtype == torch.float16
            adapter.vae.to(**({"device": device} if upcast else kw))
    return adapter


__all__ = ["check_name", "ConstantOutput", "DenoiserAdapter", "DiTAdapter", "Family", "Resolved", "Sampler",
           "TextCondition", "UnitGroup", "UnknownDenoiserError", "families", "family_of", "keep_from_order",
           "load_denoiser"]
