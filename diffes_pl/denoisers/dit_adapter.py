"""DiT adapter: diffusers `DiTTransformer2DModel` (DiT-XL/2 and the built-in tiny DiT), the adapter
of two families: `dit` (hub ids, local folders: dit.py) and `tiny` (the built-in model: tiny.py).

Units: the heads of every block's `attn1` (q/k/v output rows, `to_out[0]` input columns, `heads`)
and the channels of every block's `ff` (`net[0].proj` rows, `net[2]` input columns). Depth units
are the blocks. Learned sigma (8 output channels for 4 latent channels) and classifier-free
guidance follow diffusers' `DiTPipeline`: guidance acts on the ε half, the σ half is dropped, and
DDIM (η = 0) ignores the variance.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import (DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler)
from torch import Tensor, nn

from .base import DenoiserAdapter
from .samplers import Sampler, scheduler_config
from .transformer_blocks import TransformerBlockUnits, block_unit_groups

# DiT's training noise schedule (and the built-in model's): linear betas over 1000 steps.
DIT_NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
# linspace spacing gives DiT's 20-step trajectory 999, 946, …, 53, 0 (DiTPipeline's)
DIT_SAMPLERS = (
    Sampler("ddim", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "linspace"}),
    Sampler("dpm", DPMSolverMultistepScheduler,  # DPM-Solver++ 2M: carries the last model output
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "linspace"},
            multistep=True, aliases=("dpmsolver", "dpm-solver")),
    Sampler("euler_a", EulerAncestralDiscreteScheduler, {"timestep_spacing": "linspace"}, stochastic=True,
            aliases=("euler-ancestral",)),
)


class SkippedBlock(nn.Module):
    """A DiT block removed by depth pruning: the residual stream passes through unchanged.

    It keeps a reference to the dense block's `norm1` because `DiTTransformer2DModel.forward`
    reads `transformer_blocks[0].norm1.emb` for the final layer's conditioning.
    """

    def __init__(self, norm1: nn.Module) -> None:
        super().__init__()
        self.norm1 = norm1

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class DiTAdapter(TransformerBlockUnits, DenoiserAdapter):
    """Adapter for diffusers `DiTTransformer2DModel` (class-conditional, CFG with a null class)."""

    family = "dit"
    conditioning = "class"
    samplers = DIT_SAMPLERS

    def __init__(self, denoiser: DiTTransformer2DModel, name: str, vae: nn.Module | None = None,
                 noise_schedule: dict | None = None, latent_scale: float = 0.18215) -> None:
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.name = name
        self.vae = None if vae is None else vae.eval().requires_grad_(False)  # inference only: no autograd graphs
        self.noise_schedule = scheduler_config(noise_schedule or DIT_NOISE_SCHEDULE)
        self.latent_scale = latent_scale
        cfg = denoiser.config
        self.num_classes = int(cfg.num_embeds_ada_norm)
        self.null_class = self.num_classes  # DiT's label table has one extra row: the null class
        self._blocks = denoiser.transformer_blocks
        self._groups = [g for i, block in enumerate(self._blocks) for g in block_unit_groups(f"blocks.{i}", i, block)]
        self.capture_dense()

    # structure (blocks, unit_groups, output_layer, sliced_module: TransformerBlockUnits)
    def skipped_block(self, index: int) -> nn.Module:
        return SkippedBlock(self.dense_block(index).norm1)

    # calling
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.denoiser.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    def predict_noise(self, latents: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        out = self.denoiser(latents, timestep=timesteps, class_labels=cond).sample  # [B, C or 2C, H, W]
        return out[:, : latents.shape[1]]  # learned sigma: keep the ε half, as DiTPipeline does

    def null_condition(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, self.null_class)

    def concat_conditions(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b])

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return super().decode(latents)
        images = self.vae.decode(latents / self.latent_scale).sample  # [N, 3, 8H, 8W] in [-1, 1]
        return ((images.float() + 1) / 2).clamp(0, 1)

    def example_condition(self, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def validate_condition(self, cond: Tensor) -> None:
        if cond.dtype not in (torch.int32, torch.int64) or cond.ndim != 1:
            raise ValueError(f"DiT conditions are class labels, a 1-D integer tensor; got {cond.dtype} {tuple(cond.shape)}")
        if len(cond) and (cond.min() < 0 or cond.max() > self.null_class):
            raise ValueError(f"class labels must lie in [0, {self.num_classes - 1}] (or {self.null_class} for the null class)")
