"""Loaders shared by the text-to-image families: everything they need comes from the family record
(denoiser class, subfolder, adapter class, shipped configs, text encoders)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .assets import asset_path
from .base import DenoiserAdapter
from .footprint import building_dtype, loading_kwargs
from .registry import Family


def _denoiser_class(family: Family) -> type:
    import diffusers

    return getattr(diffusers, family.denoiser_class)


def text_to_image_hub(family: Family, name: str, weights: bool, device, dtype=None) -> DenoiserAdapter:
    """The denoiser from the shipped config (random weights, no network, no text encoders) or, with
    `weights`, diffusers' own `from_pretrained` (denoiser and VAE) from the hub or its cache; the text
    encoders are loaded on first use (`encode_prompts`)."""
    from diffusers import AutoencoderKL

    cls = _denoiser_class(family)
    if not weights:
        config = json.loads(asset_path(family.hub_names[name]).read_text())
        with torch.device(device), building_dtype(dtype):
            denoiser = cls.from_config(config)
        return family.adapter(denoiser, name)
    try:
        denoiser = cls.from_pretrained(name, subfolder=family.denoiser_subfolder, **loading_kwargs(dtype))
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
    except OSError as err:
        raise OSError(f"could not load {name!r} from the Hugging Face hub or its cache ({err}); "
                      f"download it first (`hf download {name}`), or pass weights=False for "
                      "the architecture with random weights") from err
    adapter = family.adapter(denoiser, name, vae=vae)
    attach_text_loader(adapter, family, name, dtype)
    return adapter


def text_to_image_folder(family: Family, path, device, dtype=None) -> DenoiserAdapter:
    """A local diffusers pipeline folder (the denoiser's subfolder, optional vae/ and text encoders)
    or a bare denoiser folder."""
    from diffusers import AutoencoderKL

    path = Path(path)
    sub = family.denoiser_subfolder
    root = path / sub if (path / sub).is_dir() else path
    denoiser = _denoiser_class(family).from_pretrained(root, **loading_kwargs(dtype))
    vae = AutoencoderKL.from_pretrained(path / "vae") if (path / "vae").is_dir() else None
    adapter = family.adapter(denoiser, str(path), vae=vae)
    if any((path / spec.subfolder).is_dir() for spec in family.text_encoders):
        attach_text_loader(adapter, family, str(path), dtype)
    return adapter


def attach_text_loader(adapter: DenoiserAdapter, family: Family, source: str, dtype) -> None:
    """The family's text encoders, loaded from `source` on first use (they are large)."""
    from .text import load_text_encoders

    adapter.set_text_encoders(loader=lambda: load_text_encoders(
        source, family.name, adapter.device, dtype, text_len=adapter.text_len or 256))

