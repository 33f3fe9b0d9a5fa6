"""The latent spaces of SD-style VAEs, as the adapters of denoisers working in them share them: the
denoiser set up for inference, the declared noise schedule, the VAE's latent scale (and shift) and
downsampling, the latent shape, and decoding as the diffusers pipelines do.

- `VAELatents`: latents scaled, z = x · scale (SDXL, and PixArt-Σ, which ships SDXL's VAE);
- `ShiftedVAELatents`: latents shifted then scaled, z = (x − shift) · scale (FLUX, SD3).
"""
from __future__ import annotations

from torch import Tensor, nn

from .samplers import scheduler_config

# SDXL's VAE scaling_factor: the latent scale of `VAELatents` without a VAE.
SDXL_LATENT_SCALE = 0.13025


class VAELatents:
    """What the adapters of denoisers working in the latent space of an SD-style VAE share (SDXL, and
    PixArt-Σ, which ships SDXL's VAE): the denoiser set up for inference, the declared noise
    schedule, the VAE with its latent scale (`scaling_factor`; 0.13025 without a VAE) and downsampling
    factor (8 without a VAE), the latent shape from the denoiser's config, and decoding."""

    def init_latent_denoiser(self, denoiser: nn.Module, name: str, vae: nn.Module | None, noise_schedule: dict,
                             latent_scale: float | None) -> None:
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.name = name
        self.vae = None if vae is None else vae.eval().requires_grad_(False)  # inference only: no autograd graphs
        self.noise_schedule = scheduler_config(noise_schedule)
        if latent_scale is None:
            latent_scale = float(vae.config.scaling_factor) if vae is not None else SDXL_LATENT_SCALE
        self.latent_scale = latent_scale
        self.vae_factor = 8 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.denoiser.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return super().decode(latents)
        param = next(self.vae.parameters())
        images = self.vae.decode(latents.to(param.dtype) / self.latent_scale).sample  # [N, 3, 8H, 8W] in [-1, 1]
        return ((images.float() + 1) / 2).clamp(0, 1)


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
