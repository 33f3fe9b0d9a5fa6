"""Block caching for transformer denoisers (DiT, PixArt, SD3, FLUX and any family whose adapter
keeps the default `cache_points()`).

With N blocks (`adapter.blocks()`, in forward order) and branch b:
- a full step runs every block; where the next step may be cached it stores, per stream named by
  `adapter.block_io` (the hidden states; FLUX/SD3 also the text stream), the residual that blocks
  [b, N) added: R = h_N − h_b [B, L, D];
- a cached step runs blocks [0, b) — with the weights installed NOW, i.e. the current stage's
  pruned blocks — then returns h_b + R from block b's slot; blocks b+1..N−1 pass their input
  through without running, and the denoiser's output layers run as usual.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from ..denoisers.base import BlockCachePoints, DenoiserAdapter
from .cache import FeatureCache, check_shapes
from .slots import ModuleSlot


class BlockCache(FeatureCache):
    """Block caching (module docstring) as a step listener; `with BlockCache(...) as cache:` removes it."""

    points_type = BlockCachePoints

    def __init__(self, adapter: DenoiserAdapter, intervals: int | Sequence[int] = 2, branch: int = 1,
                 levels: Sequence[int] | None = None) -> None:
        """`branch` b: the first cached block (0 ≤ b < N); the shallow part is blocks [0, b)."""
        self.io = adapter.block_io
        self._pending: tuple[Tensor | None, ...] = ()
        super().__init__(adapter, intervals, branch, levels)

    def _plan(self) -> list[tuple[ModuleSlot, Any]]:
        self.num_blocks = self.points.num_blocks
        if not 0 <= self.branch < self.num_blocks:
            raise ValueError(f"branch (the first cached block) must lie in [0, {self.num_blocks}); got {self.branch}")
        blocks, last = self.adapter.blocks(), self.num_blocks - 1
        return [(ModuleSlot(blocks, i), (i == self.branch, i == last)) for i in range(self.branch, self.num_blocks)]

    # --- the streams through a block --------------------------------------------------------------
    def streams_in(self, args: tuple, kwargs: dict) -> tuple[Tensor | None, ...]:
        return tuple(kwargs[name] if name in kwargs else args[pos] for name, pos, _ in self.io)

    def streams_out(self, output: Any) -> tuple[Tensor | None, ...]:
        return tuple(output if index is None else output[index] for _, _, index in self.io)

    def block_output(self, streams: Sequence[Tensor | None]) -> Any:
        """What a block returns when its streams are `streams` (one tensor, or the block's tuple)."""
        if self.io[0][2] is None:
            return streams[0]
        out: list[Tensor | None] = [None] * (max(index for _, _, index in self.io) + 1)
        for (_, _, index), stream in zip(self.io, streams):
            out[index] = stream
        return tuple(out)

    # --- full and cached calls ---------------------------------------------------------------------
    def _full(self, role: tuple[bool, bool], inner: Any, args: tuple, kwargs: dict) -> Any:
        entry, exit_ = role
        if entry:
            self.calls += 1
            self._pending = self.streams_in(args, kwargs)  # h_b per stream
        output = inner(*args, **kwargs)
        if exit_:
            residual = tuple(None if out is None else out - h  # R = h_N − h_b [B, L, D]
                             for out, h in zip(self.streams_out(output), self._pending))
            self.stored.append(residual)
            self._pending = ()
        return output

    def _cached(self, role: tuple[bool, bool], inner: Any, args: tuple, kwargs: dict) -> Any:
        streams = self.streams_in(args, kwargs)
        if not role[0]:
            return self.block_output(streams)  # blocks b+1..N−1: not run
        self.calls += 1
        residual = self.stored_for_call()
        check_shapes(f"block {self.branch}", streams, residual)
        return self.block_output([None if r is None else h + r for h, r in zip(streams, residual)])
