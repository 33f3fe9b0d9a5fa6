"""Prompt encoding for the text-to-image adapters: tokenizers + text encoders → TextCondition.

The encoders are the pipeline's own (transformers `CLIPTextModel`, `CLIPTextModelWithProjection`,
`T5EncoderModel`), used exactly as diffusers' pipelines use them:
- SDXL: both CLIP encoders, penultimate hidden states concatenated → prompt_embeds [B, 77, 768 + 1280];
  the second encoder's projected pooled output → pooled_embeds [B, 1280] (`StableDiffusionXLPipeline`).
- FLUX: CLIP `pooler_output` → pooled_embeds [B, 768]; T5 last hidden state padded to `text_len`
  tokens → prompt_embeds [B, 256, 4096] (`FluxPipeline`, schnell's max_sequence_length 256).
- PixArt-Σ: T5 alone, called with the tokenizer's attention mask; its last hidden state padded to
  `text_len` tokens → prompt_embeds [B, 300, 4096] and the mask → attention_mask [B, 300]
  (`PixArtSigmaPipeline.encode_prompt`, max_sequence_length 300).

A tokenizer is either a Hugging Face tokenizer (called with padding="max_length", truncation) or
any object with `encode_batch(prompts: list[str], max_length: int) -> LongTensor [B, max_length]`.
Nothing is ever replaced by zeros: an adapter without encoders refuses to encode (`MissingTextEncodersError`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .base import TextCondition


class MissingTextEncodersError(ValueError):
    """Prompts were to be encoded but the adapter has no text encoders."""


@dataclass
class TextEncoders:
    """The pipeline's (tokenizer, encoder) pairs in pipeline order and the token length each is padded
    to: SDXL CLIP-L + CLIP-G, FLUX CLIP-L + T5, SD3 CLIP-L + CLIP-G + T5, PixArt T5 alone."""

    tokenizers: Sequence[Any]
    encoders: Sequence[nn.Module]
    max_lengths: Sequence[int]

    def __post_init__(self) -> None:
        if not len(self.tokenizers) == len(self.encoders) == len(self.max_lengths) >= 1:
            raise ValueError(f"TextEncoders needs as many tokenizers, encoders and max lengths, at least one each; "
                             f"got {len(self.tokenizers)}, {len(self.encoders)}, {len(self.max_lengths)}")
        for enc in self.encoders:
            enc.eval().requires_grad_(False)

    def identity(self) -> list:
        """What identifies the encoders in a cache key: classes, configs, tokenizer vocab and lengths."""
        out = []
        for tok, enc, n in zip(self.tokenizers, self.encoders, self.max_lengths):
            config = enc.config.to_dict() if hasattr(enc, "config") else {}
            config = {k: v for k, v in sorted(config.items()) if not k.startswith("_") and k != "transformers_version"}
            vocab = len(tok) if hasattr(tok, "__len__") else None
            out.append([type(tok).__name__, vocab, type(enc).__name__, config, int(n)])
        return out


def token_ids(tokenizer: Any, prompts: list[str], max_length: int) -> Tensor:
    """Token ids [B, max_length] int64, padded and truncated as the pipelines do."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase) and hasattr(tokenizer, "encode_batch"):
        ids = torch.as_tensor(tokenizer.encode_batch(prompts, max_length), dtype=torch.long)
    else:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
    if tuple(ids.shape) != (len(prompts), max_length):
        raise ValueError(f"the tokenizer returned ids of shape {tuple(ids.shape)}, expected {(len(prompts), max_length)}")
    return ids


def clip_length(tokenizer: Any, encoder: nn.Module) -> int:
    """CLIP's padded length: the tokenizer's model_max_length (77), at most the encoder's positions."""
    positions = int(getattr(encoder.config, "max_position_embeddings", 77))
    return min(int(getattr(tokenizer, "model_max_length", positions)), positions)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_sdxl(encoders: TextEncoders, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(prompt_embeds [B, L, D1 + D2], pooled_embeds [B, P]) as `StableDiffusionXLPipeline.encode_prompt`
    (clip_skip None): penultimate hidden states of both encoders, the pooled output of the last one
    whose first output is 2-D (CLIPTextModelWithProjection's text_embeds)."""
    hidden, pooled = [], None
    for tok, enc, n in zip(encoders.tokenizers, encoders.encoders, encoders.max_lengths):
        out = enc(token_ids(tok, prompts, n).to(_device(enc)), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("SDXL's second text encoder must return pooled text embeddings first "
                         "(CLIPTextModelWithProjection); got only hidden states")
    return torch.cat([h.float().cpu() for h in hidden], dim=-1), pooled.float().cpu()


@torch.no_grad()
def encode_flux(encoders: TextEncoders, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(prompt_embeds [B, text_len, D_t5], pooled_embeds [B, D_clip]) as `FluxPipeline.encode_prompt`."""
    (clip_tok, t5_tok), (clip, t5) = encoders.tokenizers, encoders.encoders
    pooled = clip(token_ids(clip_tok, prompts, encoders.max_lengths[0]).to(_device(clip)),
                  output_hidden_states=False).pooler_output
    embeds = t5(token_ids(t5_tok, prompts, encoders.max_lengths[1]).to(_device(t5)), output_hidden_states=False)[0]
    return embeds.float().cpu(), pooled.float().cpu()


@torch.no_grad()
def encode_pixart(encoders: TextEncoders, prompts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """(prompt_embeds [B, L, D_t5] float32, attention_mask [B, L] int64, 1 = token, 0 = padding) as
    `PixArtSigmaPipeline.encode_prompt` with clean_caption=False: prompts lower-cased and stripped,
    padded to L = `max_length` (default `max_lengths[0]`: `text_len`, 300), T5 called WITH the mask
    (padding is masked in T5's own self-attention too). The pipeline's default clean_caption=True also
    runs its bs4/ftfy caption cleaner (URLs, HTML, odd punctuation); without those it does this."""
    from transformers import PreTrainedTokenizerBase

    (tok,), (t5,) = encoders.tokenizers, encoders.encoders
    length = encoders.max_lengths[0] if max_length is None else max_length
    if not isinstance(tok, PreTrainedTokenizerBase):
        raise TypeError(f"PixArt needs a Hugging Face tokenizer (it returns the attention mask); got {type(tok).__name__}")
    tokens = tok([p.lower().strip() for p in prompts], padding="max_length", max_length=length, truncation=True,
                 add_special_tokens=True, return_tensors="pt")
    mask = tokens.attention_mask.long()  # [B, L]
    embeds = t5(tokens.input_ids.to(_device(t5)), attention_mask=mask.to(_device(t5)))[0]  # [B, L, D_t5]
    return embeds.float().cpu(), mask


def load_text_encoders(source: str, family: str, device: Any, dtype: torch.dtype | None,
                       text_len: int = 256) -> TextEncoders:
    """Family `family`'s tokenizers and encoders (its record's `text_encoders`) from a hub id or a
    local pipeline folder (diffusers layout), via transformers' from_pretrained."""
    import transformers
    from transformers import AutoTokenizer

    from .registry import family_of

    specs = family_of(family).text_encoders
    tokenizers, encoders = [], []
    try:
        for spec in specs:
            tokenizers.append(AutoTokenizer.from_pretrained(source, subfolder=spec.tokenizer))
            enc_dtype = dtype
            if spec.encoder == "T5EncoderModel" and dtype == torch.float16:
                enc_dtype = torch.bfloat16  # T5 overflows in float16 (the FLUX pipeline runs it in bfloat16)
            kwargs = {} if enc_dtype is None else {"dtype": enc_dtype}
            cls = getattr(transformers, spec.encoder)
            encoders.append(cls.from_pretrained(source, subfolder=spec.subfolder, **kwargs).to(device))
    except (OSError, ValueError) as err:
        folders = ", ".join(f"{a}/" for spec in specs for a in (spec.tokenizer, spec.subfolder))
        raise MissingTextEncodersError(
            f"could not load the text encoders of {source!r} ({err}); a {family.upper()} pipeline needs "
            f"{folders} (diffusers layout): download the full "
            f"pipeline (`hf download {source}`) or put those subfolders in the local folder") from err
    lengths = [text_len if spec.max_length == "text_len" else clip_length(tok, enc)
               for spec, tok, enc in zip(specs, tokenizers, encoders)]
    return TextEncoders(tokenizers, encoders, lengths)


class TextConditioned:
    """Mixin of the SDXL and FLUX adapters: `encode_prompts(list[str]) -> TextCondition` with the
    text encoders the adapter was loaded with (loaded lazily, on first use), or given by
    `set_text_encoders`."""

    conditioning = "text"
    _text_encoders: TextEncoders | None = None
    _text_loader: Callable[[], TextEncoders] | None = None

    def set_text_encoders(self, encoders: TextEncoders | None = None,
                          loader: Callable[[], TextEncoders] | None = None) -> None:
        """Attaches encoders now, or a loader called on first use (hub / folder loading)."""
        self._text_encoders, self._text_loader = encoders, loader

    @property
    def has_text_encoders(self) -> bool:
        return self._text_encoders is not None or self._text_loader is not None

    def text_encoders(self) -> TextEncoders:
        """The encoders, loading them on first use; refuses clearly when there are none."""
        if self._text_encoders is None and self._text_loader is not None:
            self._text_encoders = self._text_loader()
        if self._text_encoders is None:
            from .registry import family_of

            folders = ", ".join(f"{a}/" for spec in family_of(self.family).text_encoders
                                for a in (spec.tokenizer, spec.subfolder))
            raise MissingTextEncodersError(
                f"{self.name} has no text encoders, so prompts/captions cannot be encoded: load the model with "
                "weights=True from the hub (diffes_pl.load_denoiser), point `denoiser:` at a local diffusers "
                f"pipeline folder holding {folders}, or call adapter.set_text_encoders(TextEncoders(...))")
        return self._text_encoders

    def text_identity(self) -> list | None:
        return self.text_encoders().identity() if self.has_text_encoders else None

    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 16) -> TextCondition:
        """Prompts → TextCondition (float32, CPU), `batch_size` prompts per encoder call."""
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"encode_prompts needs a non-empty list of strings; got {prompts!r:.200}")
        encoders = self.text_encoders()
        parts = [self._encode_batch(encoders, prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        cond = parts[0]
        for part in parts[1:]:
            cond = TextCondition.concat(cond, part)
        self.validate_condition(cond)  # encoders that do not fit the denoiser are refused here
        return cond

    def _encode_batch(self, encoders: TextEncoders, prompts: list[str]) -> TextCondition:
        raise NotImplementedError


def word_tokenizer(words: Sequence[str], max_length: int) -> Any:
    """A word-level fast tokenizer built offline: [PAD] 0, [UNK] 1, then `words`, with [EOS] 2 appended
    to every text. For pipelines whose real tokenizer cannot be downloaded (the tests' tiny text models,
    the rehearsal's random encoders); `save_pretrained` writes it and `AutoTokenizer` loads it back."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                   model_max_length=max_length)
