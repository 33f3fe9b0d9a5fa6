"""CLIP score (text-to-image) through torchmetrics' `CLIPScore`, working with transformers 5.

torchmetrics 1.9 normalises what `CLIPModel.get_image_features` / `get_text_features` return as if
they were tensors; transformers 5 returns a `BaseModelOutputWithPooling` whose `pooler_output` holds
the projected embedding. `TensorFeatures` wraps the model so that both return the tensor again; the
score itself (100 · cosine, clipped at 0, averaged) stays torchmetrics'.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .features import WeightsMissingError, offline

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def _tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot read CLIP features from {type(out).__name__}")
    return pooled


class TensorFeatures(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return tensors [N, projection_dim]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(name_or_path: str = DEFAULT_CLIP) -> tuple[nn.Module, Any]:
    """CLIPModel and CLIPProcessor from a local folder or the HF cache; offline and not cached →
    `WeightsMissingError` naming the cache folder and the pre-fetch command (no retries)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(name_or_path).eval(), CLIPProcessor.from_pretrained(name_or_path)
    except OSError as err:
        from huggingface_hub import constants

        where = "offline (HF_HUB_OFFLINE set)" if offline() else "and could not be downloaded"
        raise WeightsMissingError(
            f"CLIP score needs {name_or_path!r}, which is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"{where}; pre-fetch it on a machine with network: hf download {name_or_path} "
            f"(or point the metric at a local folder). Cause: {err}") from None


class CLIPScoreAdapter:
    """torchmetrics `CLIPScore` on a (model, processor) pair, the model given to it through
    `TensorFeatures`. `images` [N, C, H, W] in [0, 1] are handed to the processor as uint8 (the
    processor rescales by 1/255 itself)."""

    def __init__(self, model: nn.Module | None = None, processor: Any = None, name_or_path: str = DEFAULT_CLIP) -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        if model is None:
            model, processor = load_clip(name_or_path)
        wrapped = TensorFeatures(model)
        self.metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor))

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], batch_size: int = 64) -> float:
        """Mean CLIP score (100 · cosine of image and text embeddings, floored at 0)."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score needs one prompt per image (got {len(images)} images, {len(prompts)} prompts)")
        self.metric.reset()
        for start in range(0, len(images), batch_size):
            x = (images[start:start + batch_size].float().clamp(0, 1) * 255).round().to(torch.uint8)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            self.metric.update(x, list(prompts[start:start + batch_size]))
        return float(self.metric.compute())
