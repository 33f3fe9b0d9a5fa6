"""Denoiser adapters and `load_denoiser`: a name (built-in, hub id or local folder) → adapter."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .base import ConstantOutput, DenoiserAdapter, TextCondition, UnitGroup, keep_from_order
from .dit import DiTAdapter

DIT_HUB_NAMES = {"facebook/DiT-XL-2-256": "dit_xl_2_256_config.json"}
SDXL_HUB_NAMES = {"stabilityai/stable-diffusion-xl-base-1.0": "sdxl_base_unet_config.json"}
FLUX_HUB_NAMES = {"black-forest-labs/FLUX.1-schnell": "flux_schnell_transformer_config.json"}
KNOWN = ["tiny-digits", *DIT_HUB_NAMES, *SDXL_HUB_NAMES, *FLUX_HUB_NAMES]


class UnknownDenoiserError(ValueError):
    """The name is neither built in, nor a known hub id, nor an existing local folder."""


def check_name(name: str) -> str:
    """Which loader serves `name` ("tiny", "dit-folder", "dit-hub", "sdxl-hub", "flux-hub"), without
    loading anything; unknown names and missing folders are refused here, before any long work."""
    from .tiny import NAME as TINY

    if name == TINY:
        return "tiny"
    if name in DIT_HUB_NAMES:
        return "dit-hub"
    if name in SDXL_HUB_NAMES:
        return "sdxl-hub"
    if name in FLUX_HUB_NAMES:
        return "flux-hub"
    if os.path.sep in name or name.startswith("."):
        if not Path(name).exists():
            raise FileNotFoundError(f"local checkpoint {name} does not exist; pass an existing folder or a hub id")
        return "dit-folder"
    if name.count("/") == 1 and "dit" in name.lower():
        return "dit-hub"
    raise UnknownDenoiserError(
        f"unknown denoiser {name!r}: use one of {KNOWN}, a DiT hub id, or a local folder "
        f"(e.g. ./models/DiT-XL-2-256)")


def load_denoiser(name: str, weights: bool = True, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> DenoiserAdapter:
    """The adapter for `name`.

    Args:
        name: `tiny-digits` (built in), a hub id such as `facebook/DiT-XL-2-256`,
            `stabilityai/stable-diffusion-xl-base-1.0` or `black-forest-labs/FLUX.1-schnell`, or a
            local folder holding a diffusers DiT pipeline (`transformer/`, optional `vae/`) or a
            bare transformer.
        weights: False builds the real architecture from a config shipped in the package with
            random weights (no network); `device="meta"` then allocates nothing.
        device: where the denoiser lives.
        dtype: the inference dtype (default float32).
    """
    from .tiny import NAME as TINY, SCHEDULER_CONFIG, build_tiny_dit

    kind = check_name(name)
    if kind == "tiny":
        denoiser = build_tiny_dit(weights=weights)
        adapter = DiTAdapter(denoiser, TINY, vae=None, noise_schedule=SCHEDULER_CONFIG)
    elif kind == "dit-hub" and not weights and name in DIT_HUB_NAMES:
        adapter = _dit_from_shipped_config(name, device)
    elif kind in ("sdxl-hub", "flux-hub"):
        adapter = _text_to_image(name, kind, weights, device)
    elif kind == "dit-folder":
        adapter = _dit_from_folder(Path(name))
    else:
        adapter = _dit_from_hub(name)
    if str(device) != "meta":
        kw = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        adapter.denoiser.to(**kw)
        if adapter.vae is not None:
            adapter.vae.to(**kw)
    return adapter


def _dit_from_shipped_config(name: str, device) -> DiTAdapter:
    from diffusers import DiTTransformer2DModel

    from .tiny import asset_path

    config = json.loads(asset_path(DIT_HUB_NAMES[name]).read_text())
    config.pop("_class_name", None)
    with torch.device(device):
        denoiser = DiTTransformer2DModel(**config)
    return DiTAdapter(denoiser, name)


def _text_to_image(name: str, kind: str, weights: bool, device) -> DenoiserAdapter:
    """SDXL's UNet or FLUX's transformer: from the shipped config (random weights, no network) or,
    with `weights`, diffusers' own `from_pretrained` (denoiser and VAE) from the hub or its cache."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel

    from .flux import FluxAdapter
    from .sdxl import SDXLAdapter
    from .tiny import asset_path

    cls, subfolder, adapter_cls, configs = ((UNet2DConditionModel, "unet", SDXLAdapter, SDXL_HUB_NAMES)
                                            if kind == "sdxl-hub" else
                                            (FluxTransformer2DModel, "transformer", FluxAdapter, FLUX_HUB_NAMES))
    if not weights:
        config = json.loads(asset_path(configs[name]).read_text())
        with torch.device(device):
            denoiser = cls.from_config(config)
        return adapter_cls(denoiser, name)
    try:
        denoiser = cls.from_pretrained(name, subfolder=subfolder)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
    except OSError as err:
        raise OSError(f"could not load {name!r} from the Hugging Face hub or its cache ({err}); "
                      f"download it first (`huggingface-cli download {name}`), or pass weights=False for "
                      "the architecture with random weights") from err
    return adapter_cls(denoiser, name, vae=vae)


def _dit_from_folder(path: Path) -> DiTAdapter:
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    if not path.exists():
        raise FileNotFoundError(f"local checkpoint {path} does not exist; pass an existing folder or a hub id")
    sub = path / "transformer"
    root = sub if sub.is_dir() else path
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"{root} has no config.json: expected a diffusers DiT folder (transformer/ and vae/)")
    denoiser = DiTTransformer2DModel.from_pretrained(root)
    vae = AutoencoderKL.from_pretrained(path / "vae") if (path / "vae").is_dir() else None
    return DiTAdapter(denoiser, str(path), vae=vae)


def _dit_from_hub(name: str) -> DiTAdapter:
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    try:
        denoiser = DiTTransformer2DModel.from_pretrained(name, subfolder="transformer")
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
    except OSError as err:
        raise OSError(f"could not load {name!r} from the Hugging Face hub or its cache ({err}); "
                      f"download it first (`huggingface-cli download {name}`) or pass a local folder") from err
    return DiTAdapter(denoiser, name, vae=vae)


__all__ = ["check_name", "ConstantOutput", "DenoiserAdapter", "DiTAdapter", "TextCondition", "UnitGroup",
           "UnknownDenoiserError", "keep_from_order", "load_denoiser"]
