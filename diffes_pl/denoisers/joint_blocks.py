"""Two-stream blocks, whose image and text streams share the heads of one attention (FLUX's
double-stream `FluxTransformerBlock`, SD3's `JointTransformerBlock`), as their adapters share them:
the attention's physical slicing and the block skipped by depth pruning.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import ConstantOutput, UnitGroup, sliced_linear, with_children


class SkippedTwoStreamBlock(nn.Module):
    """A block removed by depth pruning (FLUX's double- or single-stream block, SD3's joint block):
    both streams pass through."""

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, *args: Any, **kwargs: Any):
        return encoder_hidden_states, hidden_states


class ConstantJointOutput(nn.Module):
    """A two-stream attention (FLUX double-stream, SD3 joint) with every head removed: each stream gets
    its output bias. An attention without `to_add_out` (SD3's last, context_pre_only block) returns
    the text stream's per-head outputs unprojected, which with no heads left are [B, L, 0] (the block
    discards them)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.image = ConstantOutput(attn.to_out[0].bias, attn.to_out[0].out_features)
        add_out = getattr(attn, "to_add_out", None)
        self.text = None if add_out is None else ConstantOutput(add_out.bias, add_out.out_features)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, *args: Any, **kwargs: Any):
        if self.text is None:
            return self.image(hidden_states), encoder_hidden_states.new_zeros((*encoder_hidden_states.shape[:-1], 0))
        return self.image(hidden_states), self.text(encoder_hidden_states)


def slice_joint_attention(attn: nn.Module, group: UnitGroup, keep: Tensor, out_weight: Tensor | None) -> nn.Module:
    """A two-stream attention (`FluxAttention`, SD3's joint `Attention`) keeping heads `keep`: q/k/v
    rows of both streams, both output layers' columns. SD3's last block is context_pre_only: it has
    no `to_add_out`, so only the text stream's q/k/v projections lose rows there."""
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"{group.name}: fused q/k/v projections cannot be sliced; call unfuse_qkv_projections() first")
    if len(keep) == 0:
        return ConstantJointOutput(attn)
    rows = group.columns(keep)
    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    children = {n: sliced_linear(getattr(attn, n), rows=rows) for n in names}
    children["to_out.0"] = sliced_linear(attn.to_out[0], cols=rows, weight=out_weight)
    if getattr(attn, "to_add_out", None) is not None:
        children["to_add_out"] = sliced_linear(attn.to_add_out, cols=rows)
    return with_children(attn, children, heads=len(keep), inner_dim=len(rows))
