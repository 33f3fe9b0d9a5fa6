"""DiT adapter: diffusers `DiTTransformer2DModel` (DiT-XL/2 and the built-in tiny DiT).

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

from .base import ConstantOutput, DenoiserAdapter, UnitGroup, sliced_linear, with_children

# DiT's training noise schedule (and the built-in model's): linear betas over 1000 steps.
DIT_NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


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


def feed_forward_linears(ff: nn.Module) -> tuple[nn.Linear, nn.Linear, str, str]:
    """(first projection, second projection, their paths) of a diffusers `FeedForward`."""
    first = ff.net[0].proj
    last_index = max(i for i, m in enumerate(ff.net) if isinstance(m, nn.Linear))
    return first, ff.net[last_index], "net.0.proj", f"net.{last_index}"


def slice_attention(attn: nn.Module, group: UnitGroup, keep: Tensor, out_weight: Tensor | None) -> nn.Module:
    """A diffusers `Attention` keeping heads `keep`: q/k/v rows and output-projection columns."""
    out = attn.to_out[0]
    if len(keep) == 0:
        return ConstantOutput(out.bias, out.out_features)
    rows = group.columns(keep)
    children = {name: sliced_linear(getattr(attn, name), rows=rows) for name in ("to_q", "to_k", "to_v")}
    children["to_out.0"] = sliced_linear(out, cols=rows, weight=out_weight)
    return with_children(attn, children, heads=len(keep), inner_dim=len(rows))


def slice_feed_forward(ff: nn.Module, keep: Tensor, out_weight: Tensor | None) -> nn.Module:
    """A diffusers `FeedForward` keeping channels `keep`; for GEGLU both halves of the first
    projection (value rows c and gate rows inner + c) are kept."""
    first, last, first_path, last_path = feed_forward_linears(ff)
    if len(keep) == 0:
        return ConstantOutput(last.bias, last.out_features)
    inner = last.in_features
    rows = keep if first.out_features == inner else torch.cat([keep, keep + inner])  # GEGLU: 2·inner rows
    return with_children(ff, {first_path: sliced_linear(first, rows=rows),
                              last_path: sliced_linear(last, cols=keep, weight=out_weight)})


class TransformerBlockUnits:
    """Units of denoisers built from diffusers `BasicTransformerBlock`s (DiT, the SDXL UNet): the
    heads of each `Attention` (`to_out[0]` input columns) and the channels of each `FeedForward`
    (last projection's input columns). Subclasses fill `_blocks` and `_groups`."""

    _blocks: Any
    _groups: list[UnitGroup]

    def blocks(self) -> Any:
        return self._blocks

    def unit_groups(self) -> list[UnitGroup]:
        return list(self._groups)

    def output_layer(self, group: UnitGroup, module: nn.Module | None = None) -> nn.Linear:
        module = self.dense_module(group) if module is None else module
        return module.to_out[0] if group.kind == "heads" else feed_forward_linears(module)[1]

    def sliced_module(self, group: UnitGroup, keep: Tensor, out_weight: Tensor | None = None) -> nn.Module:
        dense = self.dense_module(group)
        keep = torch.as_tensor(keep, dtype=torch.long)
        if group.kind == "heads":
            return slice_attention(dense, group, keep, out_weight)
        return slice_feed_forward(dense, keep, out_weight)


class DiTAdapter(TransformerBlockUnits, DenoiserAdapter):
    """Adapter for diffusers `DiTTransformer2DModel` (class-conditional, CFG with a null class)."""

    family = "dit"
    # the diffusers pipeline an export folder is written as, and the denoiser's subfolder in it
    pipeline_class, denoiser_subfolder = "DiTPipeline", "transformer"

    def __init__(self, denoiser: DiTTransformer2DModel, name: str, vae: nn.Module | None = None,
                 noise_schedule: dict | None = None, latent_scale: float = 0.18215) -> None:
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.name = name
        self.vae = None if vae is None else vae.eval().requires_grad_(False)  # inference only: no autograd graphs
        self.noise_schedule = dict(noise_schedule or DIT_NOISE_SCHEDULE)
        self.latent_scale = latent_scale
        cfg = denoiser.config
        self.num_classes = int(cfg.num_embeds_ada_norm)
        self.null_class = self.num_classes  # DiT's label table has one extra row: the null class
        self._blocks = denoiser.transformer_blocks
        self._groups = []
        for i, block in enumerate(self._blocks):
            attn = block.attn1
            head_dim = attn.to_q.out_features // attn.heads
            self._groups.append(UnitGroup(f"blocks.{i}.attn1", "heads", i, "attn1", attn.heads, head_dim))
            _, last, _, _ = feed_forward_linears(block.ff)
            self._groups.append(UnitGroup(f"blocks.{i}.ff", "channels", i, "ff", last.in_features, 1))
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

    def make_scheduler(self, kind: str = "ddim") -> Any:
        if kind == "ddim":
            # linspace spacing gives DiT's 20-step trajectory 999, 946, …, 53, 0.
            return DDIMScheduler(**self.noise_schedule, clip_sample=False, set_alpha_to_one=True,
                                 timestep_spacing="linspace", prediction_type="epsilon")
        if kind in ("dpm", "dpmsolver", "dpm-solver"):
            return DPMSolverMultistepScheduler(**self.noise_schedule, algorithm_type="dpmsolver++",
                                               solver_order=2, timestep_spacing="linspace")
        if kind in ("euler_a", "euler-ancestral"):
            return EulerAncestralDiscreteScheduler(**self.noise_schedule, timestep_spacing="linspace")
        raise ValueError(f"unknown sampler {kind!r}; choose one of: ddim, dpm, euler_a")

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
