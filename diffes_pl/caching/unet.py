"""DeepCache for diffusers UNets (SDXL), after Ma et al., "DeepCache" (CVPR 2024), written as slot
swaps in the style of diffusers' hooks (the `DeepCache` package patches the UNet's forward and
counts calls instead of reading a step source, so it cannot compose with routing).

With n down blocks and skip branch b, the shallow part is conv_in, the time embedding, down blocks
[0, b], the mirror up blocks [n−1−b, n) and the output layers; the deep part is down blocks
(b, n), the mid block and up blocks [0, n−1−b).
- a full step runs everything and stores the hidden states the deep part hands to up block
  n−1−b [B, C, h, w];
- a cached step runs the shallow part with the current stage's weights: the deep down blocks, the
  mid block and the deep up blocks return their input without running (a deep down block returns
  as many skip tensors as it produced at the full step; only deep up blocks would read them), and
  up block n−1−b takes the stored hidden states with the skip connections computed now.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..denoisers.base import DenoiserAdapter, UNetCachePoints
from .cache import CacheError, FeatureCache
from .slots import ModuleSlot


def hidden_states(args: tuple, kwargs: dict) -> Any:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class UNetDeepCache(FeatureCache):
    """DeepCache (module docstring) as a step listener; `with UNetDeepCache(...) as cache:` removes it."""

    points_type = UNetCachePoints

    def __init__(self, adapter: DenoiserAdapter, intervals: int | Sequence[int] = 3, branch: int = 0,
                 levels: Sequence[int] | None = None) -> None:
        """`branch` b in [0, n): the deepest down block that still runs at a cached step."""
        self._skips: dict[int, int] = {}  # deep down block → how many skip tensors it returns
        super().__init__(adapter, intervals, branch, levels)

    def _plan(self) -> list[tuple[ModuleSlot, Any]]:
        unet, b = self.points.unet, self.branch
        n = len(unet.down_blocks)
        if not 0 <= b < n or len(unet.up_blocks) != n:
            raise ValueError(f"branch must lie in [0, {n}) for a UNet with {n} down and {len(unet.up_blocks)} up "
                             f"blocks; got {b}")
        self.unet = unet
        plan = [(ModuleSlot(unet.down_blocks, d), ("down", d)) for d in range(b + 1, n)]
        if unet.mid_block is not None:
            plan.append((ModuleSlot(unet, "mid_block"), ("deep", None)))
        plan += [(ModuleSlot(unet.up_blocks, u), ("deep", None)) for u in range(n - 1 - b)]
        plan.append((ModuleSlot(unet.up_blocks, n - 1 - b), ("entry", None)))
        return plan

    def _full(self, role: tuple[str, Any], inner: Any, args: tuple, kwargs: dict) -> Any:
        kind, index = role
        if kind == "entry":
            self.calls += 1
            self.stored.append(hidden_states(args, kwargs))  # the deep part's output [B, C, h, w]
        output = inner(*args, **kwargs)
        if kind == "down":
            self._skips[index] = len(output[1])
        return output

    def _cached(self, role: tuple[str, Any], inner: Any, args: tuple, kwargs: dict) -> Any:
        kind, index = role
        h = hidden_states(args, kwargs)
        if kind == "down":
            if index not in self._skips:
                raise CacheError(f"down block {index} is skipped before any full step ran it")
            return h, (h,) * self._skips[index]  # placeholders: only skipped up blocks read them
        if kind == "deep":
            return h
        self.calls += 1
        stored = self.stored_for_call()
        if h.shape[0] != stored.shape[0]:  # h: the deep part's input passed through, same batch
            raise CacheError(f"a cached step runs a batch of {h.shape[0]} where the last full step stored "
                             f"{stored.shape[0]}; keep the batch fixed within a sampling run")
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": stored}
        else:
            args = (stored, *args[1:])
        return inner(*args, **kwargs)
