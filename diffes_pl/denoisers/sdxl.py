"""SDXL adapter: diffusers `UNet2DConditionModel` (SDXL-base-1.0 and tiny configs of it).

Units: in every `BasicTransformerBlock` of the UNet (70 in SDXL: 10 of width 640 with 10 heads, 60
of width 1280 with 20 heads; head_dim 64), the heads of `attn1` (self-attention) and `attn2`
(cross-attention) — q/k/v rows, `to_out[0]` input columns, `heads` — and the GEGLU channels of `ff`
(`net[0].proj` rows c and inner + c, `net[2]` input columns). Depth units are the transformer
blocks (a skipped block returns its hidden states). Level L of H removes round(L/H · n) units of
EVERY group, so 10- and 20-head attentions lose the same fraction.

Conditioning is a `TextCondition`: prompt embeddings [B, 77, 2048], pooled text embeddings
[B, 1280] and time ids [B, 6] (SDXL's `text_embeds` / `time_ids` added conditions). The null
condition is zero embeddings (SDXL's `force_zeros_for_empty_prompt`) unless negative embeddings
are given; guidance is ε_u + g · (ε_c − ε_u) as in `StableDiffusionXLPipeline`. Prompts are encoded
by `encode_prompts` with the pipeline's two CLIP text encoders (`text.py`); their time ids are the
pipeline's defaults at `image_size` (original = target size, crop (0, 0)).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from torch import Tensor, nn

from .base import BlockSlots, DenoiserAdapter, TextCondition, UNetCachePoints
from .latents import VAELatents
from .loading import text_to_image_folder, text_to_image_hub
from .registry import Family, TextEncoderSpec, register
from .samplers import Sampler
from .text import TextConditioned, TextEncoders, encode_sdxl
from .transformer_blocks import SkippedTransformerBlock, TransformerBlockUnits, block_unit_groups

# SDXL's training noise schedule (the scheduler config of stabilityai/stable-diffusion-xl-base-1.0).
SDXL_NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "beta_end": 0.012}
SDXL_SPACING = {"timestep_spacing": "leading", "steps_offset": 1}
SDXL_SAMPLERS = (  # Euler ancestral first: the paper's (and the pipeline's) sampler
    Sampler("euler_a", EulerAncestralDiscreteScheduler, SDXL_SPACING, stochastic=True, aliases=("euler-ancestral",)),
    Sampler("ddim", DDIMScheduler, {**SDXL_SPACING, "clip_sample": False, "set_alpha_to_one": False}),
)


def transformer_block_slots(unet: UNet2DConditionModel) -> list[tuple[str, nn.ModuleList, int]]:
    """(path, holding list, index) of every `BasicTransformerBlock`, in forward order: down, mid, up."""
    parts = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        parts.append(("mid_block", unet.mid_block))
    parts += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    slots = []
    for prefix, part in parts:
        for a, transformer in enumerate(getattr(part, "attentions", None) or []):
            for j in range(len(transformer.transformer_blocks)):
                slots.append((f"{prefix}.attentions.{a}.transformer_blocks.{j}", transformer.transformer_blocks, j))
    return slots


class SDXLAdapter(VAELatents, TextConditioned, TransformerBlockUnits, DenoiserAdapter):
    """Adapter for diffusers `UNet2DConditionModel` with SDXL's text-time added conditions."""

    family = "sdxl"
    samplers = SDXL_SAMPLERS
    # the UNet's transformer blocks sit between resnets, resamplers and skip connections: a block's
    # input is not the previous block's output, so block-by-block calibration re-runs the forward
    carries_blocks = False

    def __init__(self, denoiser: UNet2DConditionModel, name: str, vae: nn.Module | None = None,
                 noise_schedule: dict | None = None, latent_scale: float | None = None,
                 image_size: int | None = None, text_encoders: TextEncoders | None = None) -> None:
        """`latent_scale` defaults to the VAE's `scaling_factor` (SDXL: 0.13025); `text_encoders`
        (optional) encode prompts; loaders attach them lazily with `set_text_encoders`."""
        cfg = denoiser.config
        if cfg.addition_embed_type != "text_time":
            raise ValueError(f"{name}: SDXLAdapter needs a UNet with addition_embed_type 'text_time' (SDXL); "
                             f"this one has {cfg.addition_embed_type!r}")
        self.init_latent_denoiser(denoiser, name, vae, noise_schedule or SDXL_NOISE_SCHEDULE, latent_scale)
        self.set_text_encoders(text_encoders)
        self.image_size = int(image_size or cfg.sample_size * self.vae_factor)  # for the default time ids
        self.pooled_dim = int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
        slots = transformer_block_slots(denoiser)
        if not slots:
            raise ValueError(f"{name}: the UNet has no transformer blocks (no cross-attention down/up blocks)")
        self._blocks = BlockSlots([(holder, j) for _, holder, j in slots])
        self._groups = [g for i, (path, holder, j) in enumerate(slots) for g in block_unit_groups(path, i, holder[j])]
        self.capture_dense()

    # structure (blocks, unit_groups, output_layer, sliced_module: TransformerBlockUnits)
    def skipped_block(self, index: int) -> nn.Module:
        return SkippedTransformerBlock()

    def cache_points(self) -> UNetCachePoints:
        """DeepCache: the UNet's skip branches (down block b and its mirror up block)."""
        return UNetCachePoints(self.denoiser)

    # calling (latent_shape, decode: VAELatents)
    def predict_noise(self, latents: Tensor, timesteps: Tensor, cond: TextCondition) -> Tensor:
        dtype = latents.dtype
        added = {"text_embeds": cond.pooled_embeds.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        return self.denoiser(latents, timesteps, encoder_hidden_states=cond.prompt_embeds.to(dtype),
                             added_cond_kwargs=added).sample  # ε [B, 4, H, W]

    def null_condition(self, cond: TextCondition) -> TextCondition:
        if cond.negative_prompt_embeds is not None:
            return TextCondition(cond.negative_prompt_embeds, cond.negative_pooled_embeds, cond.time_ids)
        return TextCondition(torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled_embeds), cond.time_ids)

    def concat_conditions(self, a: TextCondition, b: TextCondition) -> TextCondition:
        return TextCondition.concat(a, b)

    def default_time_ids(self, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        """[B, 6]: original size, crop (0, 0), target size — the pipeline's defaults at `image_size`."""
        s = float(self.image_size)
        return torch.tensor([[s, s, 0.0, 0.0, s, s]], device=device).expand(batch_size, 6).clone()

    def example_condition(self, batch_size: int, device: torch.device | str = "cpu") -> TextCondition:
        cfg = self.denoiser.config
        return TextCondition(torch.zeros(batch_size, 77, cfg.cross_attention_dim, device=device),
                             torch.zeros(batch_size, self.pooled_dim, device=device),
                             self.default_time_ids(batch_size, device))

    def validate_condition(self, cond: Any) -> None:
        if not isinstance(cond, TextCondition):
            raise TypeError(f"SDXL conditions are a TextCondition (prompt embeddings, pooled embeddings, time ids); "
                            f"got {type(cond).__name__}. Encode prompts with the SDXL pipeline's encode_prompt first")
        dim = self.denoiser.config.cross_attention_dim
        if cond.prompt_embeds.shape[-1] != dim or cond.pooled_embeds.shape[-1] != self.pooled_dim:
            raise ValueError(f"SDXL condition widths {cond.prompt_embeds.shape[-1]} / {cond.pooled_embeds.shape[-1]} "
                             f"do not match the UNet's cross_attention_dim {dim} / pooled dim {self.pooled_dim}")
        if cond.time_ids is None or tuple(cond.time_ids.shape[1:]) != (6,):
            raise ValueError("SDXL conditions need time_ids [B, 6] (original size, crop, target size); "
                             "use adapter.default_time_ids(batch_size)")

    def _encode_batch(self, encoders: TextEncoders, prompts: list[str]) -> TextCondition:
        embeds, pooled = encode_sdxl(encoders, prompts)  # [B, 77, 2048], [B, 1280]
        return TextCondition(embeds, pooled, self.default_time_ids(len(prompts)))


# Two CLIP encoders: penultimate hidden states of both, concatenated; the pooled embedding is the
# second's (projected) output (`StableDiffusionXLPipeline.encode_prompt`).
SDXL_TEXT_ENCODERS = (TextEncoderSpec("CLIPTextModel", "text_encoder", "tokenizer", pooled=False),
                      TextEncoderSpec("CLIPTextModelWithProjection", "text_encoder_2", "tokenizer_2", pooled=True))
register(Family("sdxl", SDXLAdapter, "UNet2DConditionModel", "StableDiffusionXLPipeline", "unet",
                {"stabilityai/stable-diffusion-xl-base-1.0": "sdxl_base_unet_config.json"},
                folder_classes=("StableDiffusionXLPipeline", "UNet2DConditionModel"),
                text_encoders=SDXL_TEXT_ENCODERS, load_hub=text_to_image_hub, load_folder=text_to_image_folder,
                title="SDXL"))
