"""Denoiser adapters and `load_denoiser`: a name (built-in, hub id or local folder) → adapter.

Which family serves a name is the registry's business (`registry.py`); each family module registers
its record (names, folder classes, pipeline, loaders, text encoders) on import.
"""
from __future__ import annotations

import torch

from .base import ConstantOutput, DenoiserAdapter, TextCondition, UnitGroup, keep_from_order
from .dit_adapter import DiTAdapter
from .footprint import check_denoiser_memory
from .registry import Family, Resolved, UnknownDenoiserError, families, family_of, resolve
from .samplers import Sampler


def check_name(name: str) -> Resolved:
    """Which family and source (`builtin`, `hub`, `folder`) serve `name`, without loading anything (a
    local folder's JSON configs are read); unknown names and missing folders are refused here,
    before any long work. `str()` of the result is the family name for a built-in name, else
    "<family>-<source>" ("dit-hub", "sdxl-folder", …)."""
    return resolve(name)


def load_denoiser(name: str, weights: bool = True, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> DenoiserAdapter:
    """The adapter for `name`.

    Args:
        name: a built-in name (`tiny-digits`) or a hub id with a config shipped in the package (every
            name of `registry.known_names()`: `facebook/DiT-XL-2-256`,
            `stabilityai/stable-diffusion-xl-base-1.0`, `black-forest-labs/FLUX.1-schnell`, …), another
            hub id a family claims (any `owner/…DiT…`), or a local folder (a path: it holds a path
            separator or starts with "."): a diffusers pipeline folder of any registered family (the
            denoiser's subfolder, optional `vae/` and text encoders) or a bare denoiser folder,
            recognised by `_class_name` (an unrecognised folder is read as DiT). Hub ids load with
            diffusers' `from_pretrained` from the hub or its local cache.
        weights: False builds the real architecture from the config shipped for `name` with random
            weights (no network; `device="meta"` then allocates nothing). Built-in names and hub ids
            with a shipped config only: a local folder, or a hub id without one, is loaded with its weights.
        device: where the denoiser (and its VAE) lives.
        dtype: the inference dtype (None: float32); a VAE marked `force_upcast` stays float32 in float16.
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
