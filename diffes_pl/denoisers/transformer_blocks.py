"""diffusers' `BasicTransformerBlock` (DiT, the SDXL UNet, PixArt; SD3's second attention) as the
adapters of denoisers built from it share it: its unit groups (the heads of each `Attention`, the
channels of each `FeedForward`), their physical slicing, and the block skipped by depth pruning.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import ConstantOutput, UnitGroup, sliced_linear, with_children


class SkippedTransformerBlock(nn.Module):
    """A transformer block removed by depth pruning: the hidden states pass through unchanged."""

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
