"""TextCondition carries every family's text conditioning: pooled or not, masked or not."""
import pytest
import torch

from diffes_pl.data.calibration import cat_conditions
from diffes_pl.denoisers.base import TextCondition
from diffes_pl.denoisers.text import TextEncoders


def test_unpooled_masked_condition_batches_like_a_tensor():
    embeds, mask = torch.randn(3, 5, 4), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    cond = TextCondition(embeds, attention_mask=mask)
    assert cond.pooled_embeds is None and len(cond) == 3
    both = cat_conditions([cond[0:1], cond[1:3]])
    assert torch.equal(both.prompt_embeds, embeds) and torch.equal(both.attention_mask, mask)
    moved = cond.to(dtype=torch.float64)
    assert moved.prompt_embeds.dtype == torch.float64 and moved.attention_mask.dtype == torch.int64


def test_inconsistent_conditions_are_refused():
    embeds = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"attention mask must be \[B, L\]"):
        TextCondition(embeds, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="mirror the positive ones.*negative_attention_mask"):
        TextCondition(embeds, attention_mask=torch.ones(2, 5), negative_prompt_embeds=embeds)
    with pytest.raises(ValueError, match="mirror.*negative_pooled_embeds"):
        TextCondition(embeds, torch.randn(2, 3), negative_prompt_embeds=embeds)
    with pytest.raises(ValueError, match="need negative_prompt_embeds"):
        TextCondition(embeds, torch.randn(2, 3), negative_pooled_embeds=torch.randn(2, 3))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        TextCondition(embeds, torch.randn(3, 3))


def test_text_encoders_take_one_to_n_pairs():
    enc = torch.nn.Linear(2, 2)
    assert len(TextEncoders([object()], [enc], [300]).encoders) == 1
    with pytest.raises(ValueError, match="as many tokenizers, encoders and max lengths"):
        TextEncoders([object(), object()], [enc], [77])
