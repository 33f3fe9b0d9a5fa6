"""PixArt-Σ adapter: diffusers `PixArtTransformer2DModel` (PixArt-Σ XL/2 1024-MS and tiny configs of it).

Units: in every block (diffusers `BasicTransformerBlock`, norm_type ada_norm_single; 28 in PixArt-Σ,
16 heads of 72, MLP 4608) the heads of `attn1` (self-attention over the image tokens) and `attn2`
(cross-attention over the T5 tokens) — q/k/v rows, `to_out[0]` input columns, `heads` — and the
channels of `ff` (gelu-approximate: `net[0].proj` rows, `net[2]` input columns). Depth units are
the blocks: `PixArtTransformer2DModel.forward` reads nothing from a block but its output (the
final layer's modulation comes from `adaln_single` and the model's own `scale_shift_table`), so a
skipped block only passes the hidden states through.

Conditioning is a `TextCondition` of T5 hidden states [B, L, caption_channels] (Σ: [B, 300, 4096])
with their `attention_mask` [B, L] (the denoiser's `encoder_attention_mask`: padding tokens are
masked out of every cross-attention) and no pooled embedding. As in `PixArtSigmaPipeline`:
- prompts are encoded by T5 alone (`text.encode_pixart`, max_sequence_length 300 = `text_len`);
- the unconditional input is the negative prompt "" encoded the same way, with its own mask
  (padded to the prompt embeddings' length), unless the condition carries negative embeddings;
- the denoiser predicts ε and a learned σ (out_channels = 2 × in_channels): guidance acts on ε,
  the σ half is dropped;
- `added_cond_kwargs` is {resolution: None, aspect_ratio: None}: Σ has no micro-conditions
  (use_additional_conditions false). A transformer that does take them (PixArt-α 1024) gets the
  image height/width and aspect ratio, as `PixArtAlphaPipeline` gives them.
Samplers: DPM-Solver++ 2M (the pipeline's scheduler, first = default) and DDIM, on the training
noise schedule: linear betas 1e-4 → 0.02 over 1000 steps, ε-prediction (the scheduler config the
diffusers conversion script writes: `DPMSolverMultistepScheduler()` defaults). The pipeline's own
defaults are 20 steps at guidance 4.5 (`PixArtSigmaPipeline.__call__`); the configs use them.

The shipped architecture (`assets/pixart_sigma_xl_2_1024_ms_transformer_config.json`) is the one
diffusers' `scripts/convert_pixart_sigma_to_diffusers.py` builds for the 1024 checkpoint
(28 layers, 16 × 72, caption_channels 4096, cross_attention_dim 1152, out_channels 8,
interpolation_scale 2, use_additional_conditions false = no --micro_condition), the rest the class
defaults.

Routing inside diffusers' own `PixArtSigmaPipeline` (which has only the legacy
`callback(step, timestep, latents)`): `with router.attach(): pipe(...)` — the hook keys on the
timestep the transformer receives, so no callback is needed.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtTransformer2DModel
from torch import Tensor, nn

from .base import DenoiserAdapter, TextCondition
from .dit_adapter import DIT_NOISE_SCHEDULE, DIT_SAMPLERS
from .latents import VAELatents
from .loading import text_to_image_folder, text_to_image_hub
from .registry import Family, TextEncoderSpec, register
from .samplers import find_sampler
from .text import MissingTextEncodersError, TextConditioned, TextEncoders, encode_pixart
from .transformer_blocks import SkippedTransformerBlock, TransformerBlockUnits, block_unit_groups

# PixArt-Σ's training noise is DiT's: linear betas 1e-4 → 0.02 over 1000 steps, ε-prediction (the
# conversion script's DPMSolverMultistepScheduler() defaults, which the hub pipeline ships).
PIXART_NOISE_SCHEDULE = DIT_NOISE_SCHEDULE
# DPM-Solver++ 2M first: PixArtSigmaPipeline's scheduler (dpmsolver++, order 2, linspace spacing —
# DPMSolverMultistepScheduler's defaults, the same settings as DiT's "dpm"); DDIM (η = 0) second.
PIXART_SAMPLERS = tuple(find_sampler(DIT_SAMPLERS, name, "pixart") for name in ("dpm", "ddim"))
PIXART_TEXT_LEN = 300  # PixArtSigmaPipeline's max_sequence_length (T5 tokens)


class PixArtAdapter(VAELatents, TextConditioned, TransformerBlockUnits, DenoiserAdapter):
    """Adapter for diffusers `PixArtTransformer2DModel` (T5 text with an attention mask, learned sigma)."""

    family = "pixart"
    samplers = PIXART_SAMPLERS

    def __init__(self, denoiser: PixArtTransformer2DModel, name: str, vae: nn.Module | None = None,
                 noise_schedule: dict | None = None, latent_scale: float | None = None,
                 text_len: int = PIXART_TEXT_LEN, text_encoders: TextEncoders | None = None) -> None:
        """`latent_scale` defaults to the VAE's `scaling_factor` (Σ ships SDXL's VAE: 0.13025);
        `text_len`: T5 tokens prompts are padded to (300); `text_encoders` (optional) encode prompts
        and the empty negative prompt; loaders attach them lazily with `set_text_encoders`."""
        cfg = denoiser.config
        if cfg.caption_channels is None:
            raise ValueError(f"{name}: PixArtAdapter needs a transformer with caption_channels (the T5 width its "
                             "caption_projection takes); this one has none")
        self.init_latent_denoiser(denoiser, name, vae, noise_schedule or PIXART_NOISE_SCHEDULE, latent_scale)
        self.text_len = text_len
        self.set_text_encoders(text_encoders)
        self._blocks = denoiser.transformer_blocks
        self._groups = [g for i, block in enumerate(self._blocks) for g in block_unit_groups(f"blocks.{i}", i, block)]
        self.capture_dense()

    def set_text_encoders(self, encoders: TextEncoders | None = None, loader: Any = None) -> None:
        super().set_text_encoders(encoders, loader)
        self._empty_prompt: dict[int, tuple[Tensor, Tensor]] = {}  # token length → encoded "" (new encoders: new cache)

    # structure (blocks, unit_groups, output_layer, sliced_module: TransformerBlockUnits)
    def skipped_block(self, index: int) -> nn.Module:
        return SkippedTransformerBlock()

    # calling (latent_shape, decode: VAELatents)
    def added_conditions(self, latents: Tensor) -> dict[str, Tensor | None]:
        """The denoiser's `added_cond_kwargs` for latents [B, C, H, W]: None values where the
        transformer takes no micro-conditions (Σ, as PixArtSigmaPipeline passes them); else the image
        (height, width) [B, 2] and aspect ratio height / width [B, 1], as PixArtAlphaPipeline gives them."""
        if not self.denoiser.use_additional_conditions:  # resolved by the model (config None → sample_size 128)
            return {"resolution": None, "aspect_ratio": None}
        b, _, h, w = latents.shape
        height, width = h * self.vae_factor, w * self.vae_factor
        kw = {"dtype": latents.dtype, "device": latents.device}
        return {"resolution": torch.tensor([[height, width]], **kw).expand(b, 2),
                "aspect_ratio": torch.full((b, 1), height / width, **kw)}

    def predict_noise(self, latents: Tensor, timesteps: Tensor, cond: TextCondition) -> Tensor:
        dtype = latents.dtype
        out = self.denoiser(latents, encoder_hidden_states=cond.prompt_embeds.to(dtype), timestep=timesteps,
                            encoder_attention_mask=cond.attention_mask, added_cond_kwargs=self.added_conditions(latents),
                            ).sample  # [B, 2C, H, W]: ε and the learned σ
        channels = latents.shape[1]
        # learned sigma: keep the ε half, as PixArtSigmaPipeline does (out_channels // 2 == latent channels)
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def empty_prompt(self, length: int) -> tuple[Tensor, Tensor]:
        """The negative prompt "" encoded as PixArtSigmaPipeline does: ([1, length, D] float32,
        [1, length] int64 mask), padded to `length` (the prompt embeddings' length); cached."""
        if length not in self._empty_prompt:
            if not self.has_text_encoders:
                raise MissingTextEncodersError(
                    f"{self.name}: PixArt's unconditional input is the empty prompt \"\" encoded by its T5 with its "
                    "attention mask (PixArtSigmaPipeline's negative prompt), and this adapter has no text encoders: "
                    "give the TextCondition negative_prompt_embeds and negative_attention_mask, or attach the "
                    "encoders (load the full pipeline, or adapter.set_text_encoders(TextEncoders(...)))")
            self._empty_prompt[length] = encode_pixart(self.text_encoders(), [""], max_length=length)
        return self._empty_prompt[length]

    def null_condition(self, cond: TextCondition) -> TextCondition:
        if cond.negative_prompt_embeds is not None:
            return TextCondition(cond.negative_prompt_embeds, attention_mask=cond.negative_attention_mask)
        batch, length, _ = cond.prompt_embeds.shape
        embeds, mask = self.empty_prompt(length)  # [1, L, D], [1, L]
        embeds = embeds.to(device=cond.prompt_embeds.device, dtype=cond.prompt_embeds.dtype)
        return TextCondition(embeds.expand(batch, -1, -1), attention_mask=mask.to(cond.prompt_embeds.device).expand(batch, -1))

    def concat_conditions(self, a: TextCondition, b: TextCondition) -> TextCondition:
        return TextCondition.concat(a, b)

    def example_condition(self, batch_size: int, device: torch.device | str = "cpu") -> TextCondition:
        """`text_len` (300) T5 tokens, all of them real (mask 1): the MACs of a full-length prompt."""
        width = self.denoiser.config.caption_channels
        return TextCondition(torch.zeros(batch_size, self.text_len, width, device=device),
                             attention_mask=torch.ones(batch_size, self.text_len, dtype=torch.long, device=device))

    def validate_condition(self, cond: Any) -> None:
        if not isinstance(cond, TextCondition):
            raise TypeError(f"PixArt conditions are a TextCondition (T5 prompt embeddings and their attention mask); "
                            f"got {type(cond).__name__}. Encode prompts with adapter.encode_prompts (or the "
                            "PixArtSigmaPipeline's encode_prompt) first")
        width = self.denoiser.config.caption_channels
        if cond.prompt_embeds.shape[-1] != width:
            raise ValueError(f"PixArt prompt embeddings have width {cond.prompt_embeds.shape[-1]} but the transformer's "
                             f"caption_channels is {width} (T5 hidden size)")
        if cond.attention_mask is None:
            raise ValueError("PixArt conditions need attention_mask [B, L] (1 = token, 0 = padding): the transformer "
                             "masks T5's padding tokens out of its cross-attention; give the tokenizer's mask "
                             "(PixArtSigmaPipeline.encode_prompt returns it)")
        extra = [n for n in ("pooled_embeds", "time_ids") if getattr(cond, n) is not None]
        if extra:
            raise ValueError(f"PixArt takes T5 embeddings and their mask only; this condition also carries {extra}")

    def _encode_batch(self, encoders: TextEncoders, prompts: list[str]) -> TextCondition:
        embeds, mask = encode_pixart(encoders, prompts)  # [B, text_len, 4096], [B, text_len]
        return TextCondition(embeds, attention_mask=mask)


# One T5 encoder: its last hidden states (padded to `text_len`) are the prompt embeddings and its
# attention mask is the denoiser's encoder_attention_mask (`PixArtSigmaPipeline.encode_prompt`).
PIXART_TEXT_ENCODERS = (TextEncoderSpec("T5EncoderModel", "text_encoder", "tokenizer", pooled=False,
                                        attention_mask=True, max_length="text_len"),)
register(Family("pixart", PixArtAdapter, "PixArtTransformer2DModel", "PixArtSigmaPipeline", "transformer",
                {"PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": "pixart_sigma_xl_2_1024_ms_transformer_config.json"},
                folder_classes=("PixArtSigmaPipeline", "PixArtTransformer2DModel"),
                text_encoders=PIXART_TEXT_ENCODERS, load_hub=text_to_image_hub, load_folder=text_to_image_folder,
                title="PixArt-Σ"))
