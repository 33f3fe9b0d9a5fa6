"""Loaders shared by the text-to-image families (SDXL, FLUX): everything they need comes from the
family record (denoiser class, subfolder, adapter class, shipped configs, text encoders)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import DenoiserAdapter
from .footprint import building_dtype, loading_kwargs
from .registry import Family
from .schedules import scheduler_config


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
        config = json.loads(_asset(family.hub_names[name]).read_text())
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


def _asset(name: str) -> Path:
    from .tiny import asset_path

    return asset_path(name)


class ShiftedVAELatents:
    """What the flow-matching text-to-image adapters share (FLUX, SD3): the denoiser set up for inference,
    the declared noise schedule, a VAE whose latents are shifted then scaled (z = (x − shift) · scale:
    its `shift_factor` / `scaling_factor`, the family's constants without a VAE), the latent side
    `image_size` / the VAE's downsampling (image_size defaults to the VAE's sample_size, else 1024;
    the downsampling is 8 without a VAE), and decoding as the pipelines do (x = z / scale + shift)."""

    def init_shifted_latents(self, denoiser: nn.Module, name: str, vae: nn.Module | None, noise_schedule: dict,
                             scale: float, shift: float, image_size: int | None, multiple: int) -> None:
        """`multiple`: the latent side must be a multiple of it (the denoiser's patch size)."""
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.name = name
        self.vae = None if vae is None else vae.eval().requires_grad_(False)  # inference only: no autograd graphs
        self.noise_schedule = scheduler_config(noise_schedule)
        self.latent_scale, self.latent_shift = scale, shift
        if vae is not None:
            self.latent_scale = float(vae.config.scaling_factor)
            self.latent_shift = float(vae.config.shift_factor or 0.0)
        factor = 8 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        image_size = int(image_size or (vae.config.sample_size if vae is not None else 1024))
        self.latent_size = image_size // factor
        if self.latent_size % multiple:
            raise ValueError(f"image_size {image_size} gives a latent side {self.latent_size}, not a multiple of the "
                             f"patch size {multiple}; use a multiple of {multiple * factor}")

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [N, C, H, W] → images [N, 3, 8H, 8W] in [0, 1]."""
        if self.vae is None:
            return super().decode(latents)
        param = next(self.vae.parameters())
        z = latents.to(param.dtype) / self.latent_scale + self.latent_shift
        images = self.vae.decode(z).sample  # [N, 3, 8H, 8W] in [-1, 1]
        return ((images.float() + 1) / 2).clamp(0, 1)
