"""Denoiser adapters and `load_denoiser`: a name (built-in, hub id or local folder) → adapter.

Which family serves a name is the registry's business (`registry.py`); each family module registers
its record (names, folder classes, pipeline, loaders, text encoders) on import.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import ConstantOutput, DenoiserAdapter, TextCondition, UnitGroup, keep_from_order
from .dit_adapter import DiTAdapter
from .footprint import check_denoiser_memory
from .registry import (
    DenoiserUnavailableError,
    Family,
    Resolved,
    UnknownDenoiserError,
    check_cached,
    families,
    family_of,
    resolve,
)
from .samplers import Sampler


def check_name(name: str) -> Resolved:
    """Which family and source (`builtin`, `hub`, `folder`) serve `name`, without loading anything (a
    local folder's JSON configs are read); unknown names and missing folders are refused here,
    before any long work. `str()` of the result is the family name for a built-in name, else
    "<family>-<source>" ("dit-hub", "sdxl-folder", …)."""
    return resolve(name)


def check_available(name: str, weights: bool = True) -> Resolved:
    """`check_name`, and for a hub id whose weights would load (`weights`, or no shipped config) while
    the hub is offline: that the local Hugging Face cache holds it (`DenoiserUnavailableError`
    otherwise, naming the cache, `hf download` and the local-folder way). Loads nothing: what the CLI
    checks before any work, and what `load_denoiser` checks first."""
    resolved = resolve(name)
    if weights or name not in resolved.family.hub_names:
        check_cached(name, resolved)
    return resolved


def load_denoiser(name: str, weights: bool = True, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> DenoiserAdapter:
    """The adapter for `name`.

    Args:
        name: a built-in name (`tiny-digits`) or a hub id with a config shipped in the package (every
            name of `registry.known_names()`: `facebook/DiT-XL-2-256`,
            `stabilityai/stable-diffusion-xl-base-1.0`, `black-forest-labs/FLUX.1-schnell`, …), another
            hub id a family claims (any `owner/…DiT…`), or a local folder (an existing path, or one that
            starts with "/", "./", "../" or "~"; `org/name` alone is a hub id): a diffusers pipeline
            folder of any registered family (the denoiser's subfolder, optional `vae/` and text
            encoders) or a bare denoiser folder, recognised by `_class_name` (an unrecognised folder
            is read as DiT). Hub ids load with
            diffusers' `from_pretrained` from the hub or its local cache; offline, a hub id not in the
            cache is refused before any loading (`check_available`).
        weights: False builds the real architecture from the config shipped for `name` with random
            weights (no network; `device="meta"` then allocates nothing). Built-in names and hub ids
            with a shipped config only: a local folder, or a hub id without one, is loaded with its weights.
        device: where the denoiser (and its VAE) lives.
        dtype: the inference dtype (None: float32); a VAE marked `force_upcast` stays float32 in float16.
    """
    resolved = check_available(name, weights)
    if resolved.source == "folder":
        name = str(Path(name).expanduser())
    check_denoiser_memory(name, resolved, weights, device, dtype)  # before anything is allocated
    family = resolved.family
    if resolved.source == "builtin":
        adapter = family.load_builtin(family, name, weights, device, dtype)
    elif resolved.source == "hub":
        adapter = family.load_hub(family, name, weights, device, dtype)
    else:
        adapter = family.load_folder(family, name, device, dtype)
    if str(device) != "meta":
        def moved(module: torch.nn.Module, keep_dtype: bool = False) -> None:
            # dtype only when it changes: diffusers' `to(dtype=…)` warns about float32 modules even when it has none
            same = dtype is None or keep_dtype or next(module.parameters()).dtype == dtype
            module.to(**({"device": device} if same else {"device": device, "dtype": dtype}))

        moved(adapter.denoiser)
        if adapter.vae is not None:  # a VAE marked force_upcast (SDXL's) overflows in float16: kept float32
            moved(adapter.vae, getattr(adapter.vae.config, "force_upcast", False) and dtype == torch.float16)
    return adapter


def architecture(name: str, dtype: torch.dtype | None = None) -> DenoiserAdapter | None:
    """The adapter of `name` over its architecture on the meta device (no weights read, no memory):
    what a run's settings are checked against before the denoiser loads (H, partition, cache
    points, store key). None where no config is at hand without loading (a hub model not in the
    local cache: loading says why)."""
    from .footprint import building_dtype, meta_denoiser

    resolved = check_name(name)
    family = resolved.family
    if resolved.source == "builtin" or name in family.hub_names:  # a shipped config
        adapter = load_denoiser(name, weights=False, device="meta", dtype=dtype)
    else:
        with building_dtype(dtype):
            denoiser = meta_denoiser(name, resolved)
        if denoiser is None:
            return None
        adapter = family.adapter(denoiser, name)
    if dtype is not None and adapter.dtype != dtype:  # the built-in model is built in float32, whatever was asked
        adapter.denoiser.to(dtype)
    return adapter


__all__ = ["architecture", "check_available", "check_name", "ConstantOutput", "DenoiserAdapter",
           "DenoiserUnavailableError", "DiTAdapter", "Family", "Resolved", "Sampler",
           "TextCondition", "UnitGroup", "UnknownDenoiserError", "families", "family_of", "keep_from_order",
           "load_denoiser"]
