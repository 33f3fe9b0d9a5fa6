"""Denoiser adapters and `load_denoiser`: a name (built-in, hub id or local folder) → adapter."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .base import ConstantOutput, DenoiserAdapter, TextCondition, UnitGroup, keep_from_order
from .dit import DiTAdapter
from .footprint import building_dtype as _building_dtype, check_denoiser_memory, loading_kwargs as _loading_kwargs

DIT_HUB_NAMES = {"facebook/DiT-XL-2-256": "dit_xl_2_256_config.json"}
SDXL_HUB_NAMES = {"stabilityai/stable-diffusion-xl-base-1.0": "sdxl_base_unet_config.json"}
FLUX_HUB_NAMES = {"black-forest-labs/FLUX.1-schnell": "flux_schnell_transformer_config.json"}
KNOWN = ["tiny-digits", *DIT_HUB_NAMES, *SDXL_HUB_NAMES, *FLUX_HUB_NAMES]


class UnknownDenoiserError(ValueError):
    """The name is neither built in, nor a known hub id, nor an existing local folder."""


def check_name(name: str) -> str:
    """Which loader serves `name` ("tiny", "dit-folder", "dit-hub", "sdxl-hub", "flux-hub",
    "sdxl-folder", "flux-folder"), without loading anything (a local folder's JSON configs are read); unknown names and missing folders are refused here, before any long work."""
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
        return folder_kind(Path(name))
    if name.count("/") == 1 and "dit" in name.lower():
        return "dit-hub"
    raise UnknownDenoiserError(
        f"unknown denoiser {name!r}: use one of {KNOWN}, a DiT hub id, or a local folder "
        f"(e.g. ./models/DiT-XL-2-256)")


FOLDER_CLASSES = {"StableDiffusionXLPipeline": "sdxl-folder", "UNet2DConditionModel": "sdxl-folder",
                  "FluxPipeline": "flux-folder", "FluxTransformer2DModel": "flux-folder"}


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    except (OSError, ValueError):
        return None


def folder_kind(path: Path) -> str:
    """"sdxl-folder" / "flux-folder" for a local diffusers SDXL / FLUX pipeline folder (model_index.json)
    or bare UNet / transformer folder (config.json), recognised by `_class_name`; else "dit-folder"."""
    for config in (path / "model_index.json", path / "config.json", path / "unet" / "config.json",
                   path / "transformer" / "config.json"):
        kind = FOLDER_CLASSES.get(_class_name(config) or "")
        if kind is not None:
            return kind
    return "dit-folder"


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
    from .tiny import NAME as TINY, SCHEDULER_CONFIG, build_tiny_dit

    kind = check_name(name)
    check_denoiser_memory(name, kind, weights, device, dtype)  # before anything is allocated
    if kind == "tiny":
        denoiser = build_tiny_dit(weights=weights)
        adapter = DiTAdapter(denoiser, TINY, vae=None, noise_schedule=SCHEDULER_CONFIG)
    elif kind == "dit-hub" and not weights and name in DIT_HUB_NAMES:
        adapter = _dit_from_shipped_config(name, device, dtype)
    elif kind in ("sdxl-hub", "flux-hub"):
        adapter = _text_to_image(name, kind, weights, device, dtype)
    elif kind in ("sdxl-folder", "flux-folder"):
        adapter = _text_to_image_folder(Path(name), kind, device, dtype)
    elif kind == "dit-folder":
        adapter = _dit_from_folder(Path(name), dtype)
    else:
        adapter = _dit_from_hub(name, dtype)
    if str(device) != "meta":
        kw = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        adapter.denoiser.to(**kw)
        if adapter.vae is not None:  # a VAE marked force_upcast (SDXL's) overflows in float16: kept float32
            upcast = getattr(adapter.vae.config, "force_upcast", False) and dtype == torch.float16
            adapter.vae.to(**({"device": device} if upcast else kw))
    return adapter


def _dit_from_shipped_config(name: str, device, dtype=None) -> DiTAdapter:
    from diffusers import DiTTransformer2DModel

    from .tiny import asset_path

    config = json.loads(asset_path(DIT_HUB_NAMES[name]).read_text())
    config.pop("_class_name", None)
    with torch.device(device), _building_dtype(dtype):
        denoiser = DiTTransformer2DModel(**config)
    return DiTAdapter(denoiser, name)


def _text_to_image(name: str, kind: str, weights: bool, device, dtype=None) -> DenoiserAdapter:
    """SDXL's UNet or FLUX's transformer: from the shipped config (random weights, no network, no
    text encoders) or, with `weights`, diffusers' own `from_pretrained` (denoiser and VAE) from the hub
    or its cache; the text encoders are loaded on first use (`encode_prompts`)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel

    from .flux import FluxAdapter
    from .sdxl import SDXLAdapter
    from .tiny import asset_path

    cls, subfolder, adapter_cls, configs = ((UNet2DConditionModel, "unet", SDXLAdapter, SDXL_HUB_NAMES)
                                            if kind == "sdxl-hub" else
                                            (FluxTransformer2DModel, "transformer", FluxAdapter, FLUX_HUB_NAMES))
    if not weights:
        config = json.loads(asset_path(configs[name]).read_text())
        with torch.device(device), _building_dtype(dtype):
            denoiser = cls.from_config(config)
        return adapter_cls(denoiser, name)
    try:
        denoiser = cls.from_pretrained(name, subfolder=subfolder, **_loading_kwargs(dtype))
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
    except OSError as err:
        raise OSError(f"could not load {name!r} from the Hugging Face hub or its cache ({err}); "
                      f"download it first (`hf download {name}`), or pass weights=False for "
                      "the architecture with random weights") from err
    adapter = adapter_cls(denoiser, name, vae=vae)
    _attach_text_loader(adapter, name, "sdxl" if kind == "sdxl-hub" else "flux", dtype)
    return adapter


def _attach_text_loader(adapter: DenoiserAdapter, source: str, family: str, dtype) -> None:
    from .text import load_text_encoders

    adapter.set_text_encoders(loader=lambda: load_text_encoders(
        source, family, adapter.device, dtype, text_len=getattr(adapter, "text_len", 256)))


def _text_to_image_folder(path: Path, kind: str, device, dtype) -> DenoiserAdapter:
    """A local SDXL / FLUX folder: a diffusers pipeline folder (unet/ or transformer/, optional vae/,
    text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) or a bare UNet / transformer folder."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel

    from .flux import FluxAdapter
    from .sdxl import SDXLAdapter

    sdxl = kind == "sdxl-folder"
    cls, sub, adapter_cls = ((UNet2DConditionModel, "unet", SDXLAdapter) if sdxl else
                             (FluxTransformer2DModel, "transformer", FluxAdapter))
    root = path / sub if (path / sub).is_dir() else path
    denoiser = cls.from_pretrained(root, **_loading_kwargs(dtype))
    vae = AutoencoderKL.from_pretrained(path / "vae") if (path / "vae").is_dir() else None
    adapter = adapter_cls(denoiser, str(path), vae=vae)
    if (path / "text_encoder").is_dir() or (path / "text_encoder_2").is_dir():
        _attach_text_loader(adapter, str(path), "sdxl" if sdxl else "flux", dtype)
    return adapter


def _dit_from_folder(path: Path, dtype=None) -> DiTAdapter:
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    if not path.exists():
        raise FileNotFoundError(f"local checkpoint {path} does not exist; pass an existing folder or a hub id")
    sub = path / "transformer"
    root = sub if sub.is_dir() else path
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"{root} has no config.json: expected a diffusers DiT folder (transformer/ and vae/)")
    denoiser = DiTTransformer2DModel.from_pretrained(root, **_loading_kwargs(dtype))
    vae = AutoencoderKL.from_pretrained(path / "vae") if (path / "vae").is_dir() else None
    return DiTAdapter(denoiser, str(path), vae=vae)


def _dit_from_hub(name: str, dtype=None) -> DiTAdapter:
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    try:
        denoiser = DiTTransformer2DModel.from_pretrained(name, subfolder="transformer", **_loading_kwargs(dtype))
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
    except OSError as err:
        raise OSError(f"could not load {name!r} from the Hugging Face hub or its cache ({err}); "
                      f"download it first (`hf download {name}`) or pass a local folder") from err
    return DiTAdapter(denoiser, name, vae=vae)


__all__ = ["check_name", "ConstantOutput", "DenoiserAdapter", "DiTAdapter", "TextCondition", "UnitGroup",
           "UnknownDenoiserError", "keep_from_order", "load_denoiser"]
