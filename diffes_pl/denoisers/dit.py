"""The DiT family: diffusers `DiTTransformer2DModel` checkpoints from the hub (DiT-XL/2-256 with a
shipped config; any `owner/…DiT…` id) and local DiT folders, served by `DiTAdapter` (dit_adapter.py).
A local folder no family recognises by its `_class_name` is read as DiT.
"""
from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel

from .dit_adapter import DiTAdapter
from .registry import Family, register

DIT_HUB_NAMES = {"facebook/DiT-XL-2-256": "dit_xl_2_256_config.json"}


def load_hub(family, name: str, weights: bool, device, dtype=None) -> DiTAdapter:
    """A hub DiT: diffusers' `from_pretrained` (transformer and VAE), or with `weights=False` and a
    shipped config the architecture with random weights (no network)."""
    from diffusers import AutoencoderKL

    from .footprint import loading_kwargs

    if not weights and name in family.hub_names:
        return _from_shipped_config(family, name, device, dtype)
    try:
        denoiser = DiTTransformer2DModel.from_pretrained(name, subfolder="transformer", **loading_kwargs(dtype))
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
    except OSError as err:
        raise OSError(f"could not load {name!r} from the Hugging Face hub or its cache ({err}); "
                      f"download it first (`hf download {name}`) or pass a local folder") from err
    return DiTAdapter(denoiser, name, vae=vae)


def _from_shipped_config(family, name: str, device, dtype=None) -> DiTAdapter:
    import json

    from .footprint import building_dtype
    from .assets import asset_path

    config = json.loads(asset_path(family.hub_names[name]).read_text())
    config.pop("_class_name", None)
    with torch.device(device), building_dtype(dtype):
        denoiser = DiTTransformer2DModel(**config)
    return DiTAdapter(denoiser, name)


def load_folder(family, path, device, dtype=None) -> DiTAdapter:
    """A local diffusers DiT folder (transformer/ and optional vae/) or a bare transformer folder."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    from .footprint import loading_kwargs

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"local checkpoint {path} does not exist; pass an existing folder or a hub id")
    sub = path / "transformer"
    root = sub if sub.is_dir() else path
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"{root} has no config.json: expected a diffusers DiT folder (transformer/ and vae/)")
    denoiser = DiTTransformer2DModel.from_pretrained(root, **loading_kwargs(dtype))
    vae = AutoencoderKL.from_pretrained(path / "vae") if (path / "vae").is_dir() else None
    return DiTAdapter(denoiser, str(path), vae=vae)


def _is_dit_hub_id(name: str) -> bool:
    """Any `owner/…DiT…` hub id: DiT checkpoints beyond the shipped config load from the hub."""
    return name.count("/") == 1 and "dit" in name.lower()


register(Family("dit", DiTAdapter, "DiTTransformer2DModel", "DiTPipeline", "transformer", DIT_HUB_NAMES,
                load_hub=load_hub, load_folder=load_folder, claims_hub_id=_is_dit_hub_id, title="DiT",
                default_folder=True))  # a folder no family recognises by `_class_name` is read as DiT
