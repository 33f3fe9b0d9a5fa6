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
from .registry import Family, register
from .schedules import Sampler, scheduler_config

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


def block_unit_groups(prefix: str, index: int, block: nn.Module) -> list[UnitGroup]:
    """The unit groups of depth unit `index`, a diffusers `BasicTransformerBlock` named `prefix`: the
    heads of `attn1` and, where the block has one, of the cross-attention `attn2` (SDXL, PixArt), then
    the channels of `ff`."""
    groups = []
    for attr in ("attn1", "attn2"):
        attn = getattr(block, attr)
        if attn is None:
            continue
        head_dim = attn.to_q.out_features // attn.heads
        groups.append(UnitGroup(f"{prefix}.{attr}", "heads", index, attr, attn.heads, head_dim))
    _, last, _, _ = feed_forward_linears(block.ff)
    groups.append(UnitGroup(f"{prefix}.ff", "channels", index, "ff", last.in_features, 1))
    return groups


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


# --- loading (the family record's loaders) ----------------------------------------------------------
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
    from .tiny import asset_path

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
                load_hub=load_hub, load_folder=load_folder, claims_hub_id=_is_dit_hub_id,
                default_folder=True))  # a folder no family recognises by `_class_name` is read as DiT
