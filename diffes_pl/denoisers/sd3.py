"""SD3 adapter: diffusers `SD3Transformer2DModel` (MMDiT: SD3-Medium, SD3.5-Medium, SD3.5-Large and tiny
configs of it).

Units, per `JointTransformerBlock` i (24 in SD3-Medium):
- `attn`: the joint attention. The image and text streams share its heads (the text tokens are
  concatenated to the image tokens inside one attention), so ONE head group slices to_q/to_k/to_v
  AND add_q_proj/add_k_proj/add_v_proj rows, and to_out[0] AND to_add_out input columns (the
  per-head_dim qk RMSNorms of SD3.5 stay whole). Its output layer (statistics, OBS compensation) is
  the image stream's to_out[0]; to_add_out loses the same columns uncompensated. The LAST block is
  `context_pre_only`: its text stream only feeds keys and values to the image stream (no to_add_out,
  no ff_context), so there only add_q/k/v rows go with the heads.
- `attn2` (SD3.5-Medium's blocks 0–12, `use_dual_attention`): a second, image-only self-attention,
  sliced like any diffusers `Attention` (`TransformerBlockUnits`, as DiT's).
- `ff` and `ff_context` (absent in the last block): two channel groups (gelu-approximate MLPs).
Depth units: the joint blocks. A skipped block hands both streams back unchanged, in the block's
order (encoder_hidden_states, hidden_states) that `SD3Transformer2DModel.forward` unpacks.

Sampling is rectified flow with the shipped scheduler config (`FlowMatchEulerDiscreteScheduler`,
shift 3.0; `StableDiffusion3Pipeline` calls `set_timesteps(n)` with no sigmas of its own), CFG
ε_u + g · (ε_c − ε_u) (the pipeline's defaults: 28 steps, guidance 7.0). The transformer takes the
scheduler's timesteps t = σ · 1000 as they are (FLUX divides by 1000; SD3 does not) and returns the
velocity. Latents are 16 × H/8 × W/8; the VAE maps z = (x_vae − 0.0609) · 1.5305.

Conditioning (`encode_sd3`, exactly `StableDiffusion3Pipeline.encode_prompt` with clip_skip None):
CLIP-L and CLIP-G (`CLIPTextModelWithProjection`) penultimate hidden states concatenated (768 + 1280),
zero-padded to T5's width 4096, then T5's last hidden states (`text_len` = 256 tokens) appended along
the tokens: prompt_embeds [B, 77 + 256, 4096]; pooled_embeds [B, 768 + 1280] = both CLIP projections.
The null condition is what the pipeline uses when no negative prompt is given: the ENCODED EMPTY
PROMPT (encoded once per set of encoders and cached), unless the condition carries negative
embeddings (used as given). An adapter without text encoders (random-weight architectures, conditions
built by hand) has no empty prompt to encode and uses zero embeddings, as the SDXL and FLUX adapters do.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn

from .base import DenoiserAdapter, TextCondition, UnitGroup
from .joint_blocks import SkippedTwoStreamBlock, slice_joint_attention
from .latents import ShiftedVAELatents
from .loading import text_to_image_folder, text_to_image_hub
from .registry import Family, TextEncoderSpec, register
from .samplers import FLOW_MATCHING, Sampler
from .text import TextConditioned, TextEncoders, _device, token_ids
from .transformer_blocks import TransformerBlockUnits, feed_forward_linears

# The scheduler config shipped with SD3-Medium and SD3.5 (scheduler/scheduler_config.json): rectified
# flow, calibration noises as x_σ = (1 − σ) x0 + σ ε, timesteps σ · 1000 after the shift.
SD3_NOISE_SCHEDULE = {"_class_name": FLOW_MATCHING, "num_train_timesteps": 1000, "shift": 3.0}
SD3_LATENT_SCALE, SD3_LATENT_SHIFT = 1.5305, 0.0609  # the SD3 VAE's scaling_factor / shift_factor
SD3_STEPS, SD3_GUIDANCE = 28, 7.0  # StableDiffusion3Pipeline.__call__ defaults
SD3_TEXT_LEN = 256  # T5 tokens: the pipeline's default max_sequence_length
# Flow-match Euler carries nothing between steps but the latents, and draws no noise; the scheduler's
# own set_timesteps(n) is what the pipeline runs (no FLUX-style sigmas).
SD3_SAMPLERS = (Sampler("flow_euler", FlowMatchEulerDiscreteScheduler, aliases=("flow", "euler")),)


@torch.no_grad()
def encode_sd3(encoders: TextEncoders, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(prompt_embeds [B, L_clip + L_t5, D_t5], pooled_embeds [B, P_l + P_g]) float32 on the CPU, as
    `StableDiffusion3Pipeline.encode_prompt` (clip_skip None, the same prompt for all three encoders)."""
    (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5) = encoders.tokenizers, encoders.encoders
    hidden, pooled = [], []
    for tok, enc, n in ((tok_l, clip_l, encoders.max_lengths[0]), (tok_g, clip_g, encoders.max_lengths[1])):
        out = enc(token_ids(tok, prompts, n).to(_device(enc)), output_hidden_states=True)
        pooled.append(out[0].float().cpu())  # text_embeds [B, P]: CLIPTextModelWithProjection's projection
        hidden.append(out.hidden_states[-2].float().cpu())  # penultimate layer [B, L_clip, D]
    t5_embeds = t5(token_ids(tok_t5, prompts, encoders.max_lengths[2]).to(_device(t5)))[0].float().cpu()
    clip = torch.cat(hidden, dim=-1)  # [B, L_clip, D_l + D_g]
    clip = F.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))  # zero-padded to T5's width
    return torch.cat([clip, t5_embeds], dim=-2), torch.cat(pooled, dim=-1)


class SkippedJointBlock(SkippedTwoStreamBlock):
    """A joint block removed by depth pruning: both streams pass through. It keeps the dense block's
    `context_pre_only`, which `SD3Transformer2DModel.forward` reads when ControlNet residuals are given."""

    def __init__(self, context_pre_only: bool) -> None:
        super().__init__()
        self.context_pre_only = context_pre_only


class SD3Adapter(ShiftedVAELatents, TextConditioned, TransformerBlockUnits, DenoiserAdapter):
    """Adapter for diffusers `SD3Transformer2DModel` (rectified flow, CLIP-L + CLIP-G + T5, CFG)."""

    family = "sd3"
    samplers = SD3_SAMPLERS
    # the pipeline's sampling defaults, for callers (dp.sample and the configs state their own)
    pipeline_steps, pipeline_guidance = SD3_STEPS, SD3_GUIDANCE
    # joint blocks take (hidden_states, encoder_hidden_states) and return (text, image); the last,
    # context_pre_only block returns None for the text stream (feature caching keeps it None)
    block_io = (("hidden_states", 0, 1), ("encoder_hidden_states", 1, 0))

    def __init__(self, denoiser: SD3Transformer2DModel, name: str, vae: nn.Module | None = None,
                 image_size: int | None = None, text_len: int = SD3_TEXT_LEN, noise_schedule: dict | None = None,
                 text_encoders: TextEncoders | None = None) -> None:
        """`image_size` defaults to the VAE's sample_size (SD3: 1024) or 1024; the latent side is
        image_size / the VAE's downsampling (8 for SD3's VAE) and must be a multiple of the patch size."""
        self.init_shifted_latents(denoiser, name, vae, noise_schedule or SD3_NOISE_SCHEDULE, SD3_LATENT_SCALE,
                                  SD3_LATENT_SHIFT, image_size, multiple=int(denoiser.config.patch_size))
        self.text_len = text_len
        self.set_text_encoders(text_encoders)  # also empties the cache of the encoded empty prompt
        self._blocks = denoiser.transformer_blocks
        self._groups: list[UnitGroup] = []
        for i, block in enumerate(self._blocks):
            for attr in ("attn", "attn2"):
                attn = getattr(block, attr)
                if attn is not None:  # attn2 only in dual-attention blocks
                    head_dim = attn.to_q.out_features // attn.heads
                    name = f"transformer_blocks.{i}.{attr}"
                    self._groups.append(UnitGroup(name, "heads", i, attr, attn.heads, head_dim))
            for attr in ("ff", "ff_context"):
                ff = getattr(block, attr)
                if ff is not None:  # no ff_context in the context_pre_only last block
                    size = feed_forward_linears(ff)[1].in_features
                    self._groups.append(UnitGroup(f"transformer_blocks.{i}.{attr}", "channels", i, attr, size, 1))
        self.capture_dense()

    def set_text_encoders(self, encoders: TextEncoders | None = None, loader: Any = None) -> None:
        super().set_text_encoders(encoders, loader)
        self._empty: TextCondition | None = None  # the encoded empty prompt belongs to the encoders

    # structure (blocks, unit_groups, output_layer — to_out[0] / the MLP's last layer: TransformerBlockUnits)
    def sliced_module(self, group: UnitGroup, keep: Tensor, out_weight: Tensor | None = None) -> nn.Module:
        if group.attr == "attn":  # both streams share the heads
            keep = torch.as_tensor(keep, dtype=torch.long)
            return slice_joint_attention(self.dense_module(group), group, keep, out_weight)
        return super().sliced_module(group, keep, out_weight)  # attn2 (image-only), ff, ff_context

    def skipped_block(self, index: int) -> nn.Module:
        return SkippedJointBlock(self.dense_block(index).context_pre_only)

    # calling
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.denoiser.config.in_channels), self.latent_size, self.latent_size)

    def predict_noise(self, latents: Tensor, timesteps: Tensor, cond: TextCondition) -> Tensor:
        """Flow velocity [B, 16, H, W] for latents [B, 16, H, W] at the scheduler's timesteps t = σ · 1000 [B]."""
        dtype = latents.dtype
        return self.denoiser(latents, encoder_hidden_states=cond.prompt_embeds.to(dtype),
                             pooled_projections=cond.pooled_embeds.to(dtype),
                             timestep=timesteps.to(latents.device)).sample  # [B, 16, H, W]

    def null_condition(self, cond: TextCondition) -> TextCondition:
        """The given negative embeddings; else the encoded empty prompt (the pipeline's negative prompt
        ""), or zero embeddings when the adapter has no text encoders (see the module docstring)."""
        if cond.negative_prompt_embeds is not None:
            return TextCondition(cond.negative_prompt_embeds, cond.negative_pooled_embeds)
        if not self.has_text_encoders:
            return TextCondition(torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled_embeds))
        if self._empty is None:
            self._empty = TextCondition(*encode_sd3(self.text_encoders(), [""]))  # [1, L, D], [1, P]
        empty = self._empty.to(cond.prompt_embeds.device, cond.prompt_embeds.dtype)
        if empty.prompt_embeds.shape[1:] != cond.prompt_embeds.shape[1:]:
            raise ValueError(f"the empty prompt encodes to {tuple(empty.prompt_embeds.shape[1:])} tokens × width but "
                             f"this condition is {tuple(cond.prompt_embeds.shape[1:])}: encode the prompts with this "
                             f"adapter's text encoders, or pass negative_prompt_embeds of the same shape")
        n = len(cond)
        return TextCondition(empty.prompt_embeds.expand(n, -1, -1), empty.pooled_embeds.expand(n, -1))

    def concat_conditions(self, a: TextCondition, b: TextCondition) -> TextCondition:
        return TextCondition.concat(a, b)

    def example_condition(self, batch_size: int, device: torch.device | str = "cpu") -> TextCondition:
        """Zero embeddings of the pipeline's shapes: [B, 77 + text_len, 4096] (77 CLIP tokens, then
        T5's: 333 for SD3), pooled [B, 2048]."""
        cfg = self.denoiser.config
        tokens = 77 + self.text_len  # the pipeline's CLIP tokenizer_max_length, then T5's
        if self._text_encoders is not None:  # attached encoders say their own lengths (CLIP-L, CLIP-G, T5)
            tokens = self._text_encoders.max_lengths[0] + self._text_encoders.max_lengths[2]
        return TextCondition(torch.zeros(batch_size, tokens, cfg.joint_attention_dim, device=device),
                             torch.zeros(batch_size, cfg.pooled_projection_dim, device=device))

    def validate_condition(self, cond: Any) -> None:
        if not isinstance(cond, TextCondition):
            raise TypeError(f"SD3 conditions are a TextCondition (CLIP + T5 prompt embeddings, pooled CLIP-L + CLIP-G "
                            f"embeddings); got {type(cond).__name__}. Encode prompts with adapter.encode_prompts "
                            f"(or StableDiffusion3Pipeline.encode_prompt) first")
        cfg = self.denoiser.config
        pooled = None if cond.pooled_embeds is None else cond.pooled_embeds.shape[-1]
        if cond.prompt_embeds.shape[-1] != cfg.joint_attention_dim or pooled != cfg.pooled_projection_dim:
            raise ValueError(f"SD3 condition widths {cond.prompt_embeds.shape[-1]} / {pooled} do not match "
                             f"joint_attention_dim {cfg.joint_attention_dim} / pooled_projection_dim "
                             f"{cfg.pooled_projection_dim} (prompt embeddings: CLIP-L + CLIP-G padded to T5's width, "
                             f"then T5; pooled: both CLIP projections)")

    def _encode_batch(self, encoders: TextEncoders, prompts: list[str]) -> TextCondition:
        embeds, pooled = encode_sd3(encoders, prompts)  # [B, 77 + text_len, 4096], [B, 2048]
        return TextCondition(embeds, pooled)


# Pipeline order: CLIP-L and CLIP-G give penultimate hidden states and projected pooled outputs, T5
# (padded to `text_len`) the rest of the prompt embeddings (`StableDiffusion3Pipeline.encode_prompt`).
SD3_TEXT_ENCODERS = (TextEncoderSpec("CLIPTextModelWithProjection", "text_encoder", "tokenizer", pooled=True),
                     TextEncoderSpec("CLIPTextModelWithProjection", "text_encoder_2", "tokenizer_2", pooled=True),
                     TextEncoderSpec("T5EncoderModel", "text_encoder_3", "tokenizer_3", pooled=False,
                                     max_length="text_len"))
# Transformer configs: the hub's transformer/config.json values (see the assets); SD3.5-Medium adds
# attn2 in blocks 0–12 and qk RMSNorm, SD3.5-Large is 38 blocks of 38 heads with qk RMSNorm.
register(Family("sd3", SD3Adapter, "SD3Transformer2DModel", "StableDiffusion3Pipeline", "transformer",
                {"stabilityai/stable-diffusion-3-medium-diffusers": "sd3_medium_transformer_config.json",
                 "stabilityai/stable-diffusion-3.5-medium": "sd35_medium_transformer_config.json",
                 "stabilityai/stable-diffusion-3.5-large": "sd35_large_transformer_config.json"},
                folder_classes=("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
                text_encoders=SD3_TEXT_ENCODERS, load_hub=text_to_image_hub, load_folder=text_to_image_folder,
                title="SD3"))
