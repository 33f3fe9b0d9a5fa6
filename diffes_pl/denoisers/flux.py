"""FLUX adapter: diffusers `FluxTransformer2DModel` (FLUX.1-schnell and tiny configs of it).

Units:
- double-stream blocks (`FluxTransformerBlock`): the image and text streams share heads, so one
  head group per block slices to_q/to_k/to_v AND add_q_proj/add_k_proj/add_v_proj rows, and
  to_out[0] AND to_add_out input columns (the per-head_dim RMSNorms stay). Its output layer (for
  statistics and OBS compensation) is the image stream's to_out[0]; to_add_out loses the same
  columns uncompensated. The MLPs `ff` and `ff_context` are two channel groups.
- single-stream blocks (`FluxSingleTransformerBlock`): heads (to_q/k/v rows) and MLP channels
  (proj_mlp rows) feed ONE `proj_out` over [attn_out | mlp_out]. Each group owns its part of
  proj_out's input columns: a sliced group is a `SinglePart` (the smaller attention or proj_mlp plus
  its proj_out columns), and the adapter installs a `JointProjOut` built from both parts, so heads
  and channels of one block slice independently and together. Pruner hooks and masks see each
  part through a `ColumnTap`: the adapter leaves one pre-hook on every dense single-stream
  proj_out that hands each tap its columns (a no-op while no tap has hooks).
Depth units: the 19 double then 38 single blocks (a skipped block passes both streams through).

Sampling is rectified flow: `FlowMatchEulerDiscreteScheduler` with the FLUX pipeline's sigmas
linspace(1, 1/n, n) (schnell: 4 steps, shift 1, no CFG). `predict_noise` takes and returns
unpacked latents [B, 16, H, W]; packing into 2×2 patches (tokens of 64) happens inside. Prompts are
encoded by `encode_prompts` with the pipeline's CLIP (pooled) and T5 (`text_len` tokens) encoders.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .base import BlockSlots, DenoiserAdapter, TextCondition, UnitGroup, sliced_linear, with_children
from .joint_blocks import SkippedTwoStreamBlock, slice_joint_attention
from .latents import ShiftedVAELatents
from .loading import text_to_image_folder, text_to_image_hub
from .registry import Family, TextEncoderSpec, register
from .samplers import FLOW_MATCHING, Sampler
from .text import TextConditioned, TextEncoders, encode_flux
from .transformer_blocks import feed_forward_linears, slice_feed_forward

# FLUX.1-schnell's scheduler config: rectified flow (calibration noises as x_σ = (1 − σ) x0 + σ ε).
FLUX_NOISE_SCHEDULE = {"_class_name": FLOW_MATCHING, "num_train_timesteps": 1000, "shift": 1.0}
FLUX_LATENT_SCALE, FLUX_LATENT_SHIFT = 0.3611, 0.1159


class FluxPipelineScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-match Euler whose `set_timesteps(n)` uses the FLUX pipeline's sigmas linspace(1, 1/n, n)
    (4 steps: timesteps 1000, 750, 500, 250)."""

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: float | None = None, timesteps: Any = None) -> None:
        if sigmas is None and timesteps is None and num_inference_steps:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


# Flow-match Euler carries nothing between steps but the latents, and draws no noise.
FLUX_SAMPLERS = (Sampler("flow_euler", FluxPipelineScheduler, {"use_dynamic_shifting": False},
                         aliases=("flow", "euler")),)


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] → [B, H/2 · W/2, 4C]: FLUX's 2×2 patch tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, H/2 · W/2, 4C] → [B, C, H, W] (inverse of `pack_latents`)."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: Any, dtype: torch.dtype) -> Tensor:
    """[H/2 · W/2, 3] rotary position ids (0, row, column) of the packed latent tokens."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class EmptyAttention(nn.Module):
    """A single-stream attention with every head removed: a zero-width output [B, N, 0]."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states.new_zeros((*hidden_states.shape[:-1], 0))


class SinglePart(nn.Module):
    """One group's share of a single-stream block: `inner` replaces the block's attention or
    proj_mlp; `out` [dim, k · unit_width] (no bias) is its slice of proj_out's input columns."""

    def __init__(self, inner: nn.Module, out: nn.Linear) -> None:
        super().__init__()
        self.inner, self.out = inner, out


class JointProjOut(nn.Module):
    """proj_out of a single-stream block over [attn_out (a) | mlp_out (m)] with sliced parts."""

    def __init__(self, attn_out: nn.Linear, mlp_out: nn.Linear, bias: Tensor | None) -> None:
        super().__init__()
        self.attn_out, self.mlp_out, self.bias = attn_out, mlp_out, bias  # bias shared with the dense layer

    def forward(self, x: Tensor) -> Tensor:  # x [B, N, a + m] → [B, N, dim]
        a = self.attn_out.in_features
        return F.linear(x[..., :a], self.attn_out.weight) + F.linear(x[..., a:], self.mlp_out.weight, self.bias)


def column_view(layer: nn.Linear, start: int, stop: int) -> nn.Linear:
    """A bias-free Linear whose weight is a VIEW of `layer`'s input columns [start, stop) (no copy)."""
    new = nn.Linear(stop - start, layer.out_features, bias=False, device="meta")
    new.weight = nn.Parameter(layer.weight[:, start:stop], requires_grad=False)
    return new


class ColumnTap(nn.Module):
    """Input columns [start, stop) of a dense Linear seen as a layer of their own: forward pre-hooks
    registered on the tap receive x[..., start:stop] (and may return a replacement) whenever the
    dense layer runs. `weight`, `bias`, `in_features` and `out_features` read the dense layer."""

    def __init__(self, layer: nn.Linear, start: int, stop: int) -> None:
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: the tap owns no parameters
        self.start, self.stop = start, stop

    @property
    def weight(self) -> Tensor:
        return self.layer.weight[:, self.start:self.stop]

    @property
    def bias(self) -> Tensor | None:
        return self.layer.bias if self.start == 0 else None

    @property
    def in_features(self) -> int:
        return self.stop - self.start

    @property
    def out_features(self) -> int:
        return self.layer.out_features


def dispatch_to_taps(layer: nn.Linear, taps: list[ColumnTap]) -> RemovableHandle:
    """Registers on `layer` the pre-hook that runs each tap's pre-hooks on its columns."""

    def hook(_module: nn.Module, args: tuple) -> tuple | None:
        x, parts, changed = args[0], [], False  # x [B, N, in_features]
        for tap in taps:
            part = x[..., tap.start:tap.stop]
            for fn in list(tap._forward_pre_hooks.values()):
                result = fn(tap, (part,))
                if result is not None:
                    part, changed = (result[0] if isinstance(result, tuple) else result), True
            parts.append(part)
        return (torch.cat(parts, dim=-1), *args[1:]) if changed else None

    return layer.register_forward_pre_hook(hook)


class FluxAdapter(ShiftedVAELatents, TextConditioned, DenoiserAdapter):
    """Adapter for diffusers `FluxTransformer2DModel` (rectified flow, T5 + CLIP conditioning)."""

    family = "flux"
    samplers = FLUX_SAMPLERS
    # both kinds of block take (hidden_states, encoder_hidden_states) and return (text, image)
    block_io = (("hidden_states", 0, 1), ("encoder_hidden_states", 1, 0))

    def __init__(self, denoiser: FluxTransformer2DModel, name: str, vae: nn.Module | None = None,
                 image_size: int | None = None, text_len: int = 256, guidance: float = 3.5,
                 noise_schedule: dict | None = None, text_encoders: TextEncoders | None = None) -> None:
        """`image_size` defaults to the VAE's sample_size (FLUX: 1024) or 1024; the latent side is
        image_size / the VAE's downsampling (8 for FLUX's VAE). `text_len`: T5 tokens (schnell 256)."""
        self.init_shifted_latents(denoiser, name, vae, noise_schedule or FLUX_NOISE_SCHEDULE, FLUX_LATENT_SCALE,
                                  FLUX_LATENT_SHIFT, image_size, multiple=2)  # 2×2 patches
        self.text_len = text_len
        self.set_text_encoders(text_encoders)
        self.guidance = guidance  # embedded guidance, read only by guidance-distilled models (FLUX.1-dev)
        doubles, singles = denoiser.transformer_blocks, denoiser.single_transformer_blocks
        self.num_double = len(doubles)
        self._blocks = BlockSlots([(doubles, i) for i in range(len(doubles))] + [(singles, j) for j in range(len(singles))])
        self._groups: list[UnitGroup] = []
        for i, block in enumerate(doubles):
            attn = block.attn
            self._groups.append(UnitGroup(f"transformer_blocks.{i}.attn", "heads", i, "attn", attn.heads, attn.head_dim))
            for attr in ("ff", "ff_context"):
                size = feed_forward_linears(getattr(block, attr))[1].in_features
                self._groups.append(UnitGroup(f"transformer_blocks.{i}.{attr}", "channels", i, attr, size, 1))
        self._taps: dict[str, ColumnTap] = {}
        self._proj_out: dict[int, nn.Linear] = {}
        self._installed: dict[str, nn.Module] = {}
        for j, block in enumerate(singles):
            k, attn, dim = self.num_double + j, block.attn, block.proj_out.in_features - block.mlp_hidden_dim
            heads = UnitGroup(f"single_transformer_blocks.{j}.attn", "heads", k, "attn", attn.heads, attn.head_dim)
            mlp = UnitGroup(f"single_transformer_blocks.{j}.proj_mlp", "channels", k, "proj_mlp", block.mlp_hidden_dim, 1)
            self._groups += [heads, mlp]
            self._proj_out[k] = block.proj_out
            self._taps[heads.name] = ColumnTap(block.proj_out, 0, dim)
            self._taps[mlp.name] = ColumnTap(block.proj_out, dim, block.proj_out.in_features)
            dispatch_to_taps(block.proj_out, [self._taps[heads.name], self._taps[mlp.name]])
        self.capture_dense()

    # structure
    def blocks(self) -> BlockSlots:
        return self._blocks

    def unit_groups(self) -> list[UnitGroup]:
        return list(self._groups)

    def is_single(self, group: UnitGroup) -> bool:
        return group.block >= self.num_double

    def output_layer(self, group: UnitGroup, module: nn.Module | None = None) -> nn.Module:
        dense = self.dense_module(group)
        module = dense if module is None else module
        if self.is_single(group):
            return self._taps[group.name] if module is dense else module.out
        return module.to_out[0] if group.kind == "heads" else feed_forward_linears(module)[1]

    def sliced_module(self, group: UnitGroup, keep: Tensor, out_weight: Tensor | None = None) -> nn.Module:
        dense = self.dense_module(group)
        keep = torch.as_tensor(keep, dtype=torch.long)
        if not self.is_single(group):
            if group.kind == "heads":
                return slice_joint_attention(dense, group, keep, out_weight)
            return slice_feed_forward(dense, keep, out_weight)
        cols = group.columns(keep)
        with warnings.catch_warnings():  # every unit removed: zero-width layers are intended
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            if len(keep) == 0 and group.kind == "heads":
                inner = EmptyAttention()
            elif group.kind == "heads":
                children = {n: sliced_linear(getattr(dense, n), rows=cols) for n in ("to_q", "to_k", "to_v")}
                inner = with_children(dense, children, heads=len(keep), inner_dim=len(cols))
            else:
                inner = sliced_linear(dense, rows=cols)  # proj_mlp rows
            tap = self._taps[group.name]
            out = sliced_linear(column_view(tap.layer, tap.start, tap.stop), cols=cols, weight=out_weight)
        return SinglePart(inner, out)

    def sparse_layers(self):
        raise ValueError("unstructured and N:M sparsity are not built for FLUX: its single-stream blocks share "
                         "one proj_out between the attention and MLP unit groups; prune FLUX structurally "
                         "(configs/flux_obs.yaml)")

    def skipped_block(self, index: int) -> nn.Module:
        return SkippedTwoStreamBlock()

    # installing: single-stream groups share proj_out, so their block is rebuilt from both parts
    def module(self, group: UnitGroup) -> nn.Module:
        if self.is_single(group):
            return self._installed.get(group.name, self.dense_module(group))
        return super().module(group)

    def install(self, group: UnitGroup, module: nn.Module) -> None:
        if not self.is_single(group):
            setattr(self.dense_block(group.block), group.attr, module)
            return
        self._installed[group.name] = module
        block, k = self.dense_block(group.block), group.block
        heads, mlp = (g for g in self._groups if g.block == k)
        parts = {}
        for g in (heads, mlp):
            installed = self._installed.get(g.name, self.dense_module(g))
            parts[g.name] = None if installed is self.dense_module(g) else installed
            setattr(block, g.attr, self.dense_module(g) if parts[g.name] is None else installed.inner)
        dense_out = self._proj_out[k]
        if all(p is None for p in parts.values()):
            block.proj_out = dense_out
            return
        outs = [column_view(dense_out, self._taps[g.name].start, self._taps[g.name].stop) if parts[g.name] is None
                else parts[g.name].out for g in (heads, mlp)]
        block.proj_out = JointProjOut(outs[0], outs[1], dense_out.bias)

    def restore_dense(self) -> None:
        super().restore_dense()
        for k, layer in self._proj_out.items():
            self.dense_block(k).proj_out = layer
        self._installed = {}

    def is_dense(self) -> bool:
        return super().is_dense() and all(self.dense_block(k).proj_out is l for k, l in self._proj_out.items())

    # calling
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.denoiser.config.in_channels) // 4, self.latent_size, self.latent_size)

    def denoiser_timestep(self, t: float) -> float:
        """σ = t / 1000: FluxPipeline and `predict_noise` pass the transformer the sigma."""
        return float(t) / float(self.noise_schedule["num_train_timesteps"])

    def predict_noise(self, latents: Tensor, timesteps: Tensor, cond: TextCondition) -> Tensor:
        """Flow velocity [B, C, H, W] for unpacked latents [B, C, H, W] at timesteps t = σ · 1000 [B]."""
        b, _, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need even height and width (2×2 patches); got {h}×{w}")
        dtype, device = latents.dtype, latents.device
        sigma = timesteps.to(device=device, dtype=dtype) / float(self.noise_schedule["num_train_timesteps"])
        guidance = torch.full((b,), self.guidance, device=device, dtype=dtype) if self.denoiser.config.guidance_embeds else None
        out = self.denoiser(pack_latents(latents), encoder_hidden_states=cond.prompt_embeds.to(dtype),
                            pooled_projections=cond.pooled_embeds.to(dtype), timestep=sigma,
                            img_ids=image_ids(h, w, device, dtype),
                            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=device, dtype=dtype),
                            guidance=guidance).sample  # [B, H/2 · W/2, 4C]
        return unpack_latents(out, h, w)

    def null_condition(self, cond: TextCondition) -> TextCondition:
        """Zero (or the given negative) embeddings; FLUX.1-schnell itself samples without CFG (guidance 1)."""
        if cond.negative_prompt_embeds is not None:
            return TextCondition(cond.negative_prompt_embeds, cond.negative_pooled_embeds)
        return TextCondition(torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled_embeds))

    def concat_conditions(self, a: TextCondition, b: TextCondition) -> TextCondition:
        return TextCondition.concat(a, b)

    def example_condition(self, batch_size: int, device: torch.device | str = "cpu") -> TextCondition:
        cfg = self.denoiser.config
        return TextCondition(torch.zeros(batch_size, self.text_len, cfg.joint_attention_dim, device=device),
                             torch.zeros(batch_size, cfg.pooled_projection_dim, device=device))

    def validate_condition(self, cond: Any) -> None:
        if not isinstance(cond, TextCondition):
            raise TypeError(f"FLUX conditions are a TextCondition (T5 prompt embeddings, pooled CLIP embeddings); "
                            f"got {type(cond).__name__}. Encode prompts with the FLUX pipeline's encode_prompt first")
        cfg = self.denoiser.config
        if cond.prompt_embeds.shape[-1] != cfg.joint_attention_dim or cond.pooled_embeds.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(f"FLUX condition widths {cond.prompt_embeds.shape[-1]} / {cond.pooled_embeds.shape[-1]} "
                             f"do not match joint_attention_dim {cfg.joint_attention_dim} / pooled_projection_dim "
                             f"{cfg.pooled_projection_dim}")

    def _encode_batch(self, encoders: TextEncoders, prompts: list[str]) -> TextCondition:
        embeds, pooled = encode_flux(encoders, prompts)  # [B, text_len, 4096], [B, 768]
        return TextCondition(embeds, pooled)


# CLIP gives the pooled embedding only; T5's last hidden states, padded to `text_len`, are the prompt
# embeddings (`FluxPipeline.encode_prompt`).
FLUX_TEXT_ENCODERS = (TextEncoderSpec("CLIPTextModel", "text_encoder", "tokenizer", pooled=True, hidden_states=False),
                      TextEncoderSpec("T5EncoderModel", "text_encoder_2", "tokenizer_2", pooled=False,
                                      max_length="text_len"))
register(Family("flux", FluxAdapter, "FluxTransformer2DModel", "FluxPipeline", "transformer",
                {"black-forest-labs/FLUX.1-schnell": "flux_schnell_transformer_config.json"},
                folder_classes=("FluxPipeline", "FluxTransformer2DModel"),
                text_encoders=FLUX_TEXT_ENCODERS, load_hub=text_to_image_hub, load_folder=text_to_image_folder,
                title="FLUX"))
