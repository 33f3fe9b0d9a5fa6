"""`FeatureCache`: the step listener shared by every feature cache (block caching, DeepCache).

It is told the step and stage before every denoiser call (`on_step`, the router's step source; list
it AFTER the router), decides full or cached by the refresh rule (`refresh.py`), and keeps its
`CachedSlot`s around the modules installed NOW: a router that reinstalled blocks at a stage
boundary replaced the wrappers, so they are put back around the router's blocks (identity checks,
no copy). Subclasses say which slots they wrap (`_plan`) and what a full and a cached call do
(`_full`, `_cached`).

State is kept per denoiser call of a step (call i of a cached step reads what call i of the last
full step stored), so a pipeline that calls the denoiser once per CFG half keeps the halves apart;
the usual batched CFG call keeps them apart row by row. `clear()` drops every stored feature (the
end of a sampling run); `remove()` also unwraps, leaving in each slot what the router put there.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from ..denoisers.base import DenoiserAdapter
from .refresh import RefreshRule
from .slots import CachedSlot, ModuleSlot


class CacheError(RuntimeError):
    """A cached step that cannot reuse what the last full step stored."""


class FeatureCache:
    """Base of the feature caches (see module docstring)."""

    points_type: type = object  # the adapter declaration (`cache_points()`) this cache serves

    def __init__(self, adapter: DenoiserAdapter, intervals: int | Sequence[int], branch: int,
                 levels: Sequence[int] | None = None) -> None:
        """
        Args:
            adapter: the denoiser (one instance, routed or not).
            intervals: the cache interval k for every stage, or k_s per stage (1: no caching).
            branch: where the shallow part ends (block caching: the first cached block b;
                DeepCache: the skip branch).
            levels: the schedule's level per stage when routing (`router.schedule.levels`), checked
                by `sampling.sample` against the router's; every stage's first step refreshes the
                cache whatever its level (`refresh.py`).
        """
        self.adapter = adapter
        self.points = adapter.cache_points()
        if not isinstance(self.points, self.points_type):
            raise ValueError(f"{adapter.name} declares {type(self.points).__name__}, which {type(self).__name__} does "
                             f"not serve: use `caching.feature_cache(adapter, ...)`, which picks the declared cache")
        self.rule = RefreshRule(intervals, levels)
        self.branch = branch
        self._slots: list[tuple[ModuleSlot, Any]] = self._plan()
        self._wrappers: dict[tuple[int, int], CachedSlot] = {}  # (slot, id(inner)) → its wrapper
        self.mode = "idle"  # idle | plain (full, nothing to record) | record (full) | cached
        self.calls = 0  # denoiser calls made in the current step
        self.stored: list[Any] = []  # per call of the last full step
        self.wrap()

    # --- what subclasses define --------------------------------------------------------------------
    def _plan(self) -> list[tuple[ModuleSlot, Any]]:
        """(slot, role) of every module to wrap; refuses a branch outside the declaration."""
        raise NotImplementedError

    def _full(self, role: Any, inner: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _cached(self, role: Any, inner: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    # --- the step source ---------------------------------------------------------------------------
    @property
    def levels(self) -> tuple[int, ...] | None:
        return self.rule.levels

    def on_step(self, step: int, stage: int) -> None:
        if self.rule.new_run(step):
            self.clear()
        full = self.rule.step(step, stage)
        if full:
            self.stored = []
            self.mode = "record" if self.rule.interval(stage) > 1 else "plain"
        else:
            self.mode = "cached"
        self.calls = 0
        self.wrap()

    def call(self, role: Any, inner: Any, args: tuple, kwargs: dict) -> Any:
        """What a wrapped slot does with one call, by the current step's mode."""
        if self.mode in ("idle", "plain"):
            return inner(*args, **kwargs)
        if self.mode == "record":
            return self._full(role, inner, args, kwargs)
        return self._cached(role, inner, args, kwargs)

    def stored_for_call(self) -> Any:
        """What call `calls` (1-based, already counted) of the last full step stored."""
        if self.calls > len(self.stored):
            raise CacheError(f"call {self.calls} of a cached step has nothing stored: the last full step made "
                             f"{len(self.stored)} denoiser call(s); call the denoiser the same way at every step")
        return self.stored[self.calls - 1]

    # --- installing --------------------------------------------------------------------------------
    def wrap(self) -> None:
        """Puts a wrapper around the module each slot holds now (kept if already there)."""
        for index, (slot, role) in enumerate(self._slots):
            current = slot.get()
            if isinstance(current, CachedSlot) and current.cache is self:
                continue
            wrapper = self._wrappers.get((index, id(current)))
            if wrapper is None or wrapper.inner is not current:
                wrapper = self._wrappers[(index, id(current))] = CachedSlot(current, self, role)
            slot.set(wrapper)

    def clear(self) -> None:
        """Drops every stored feature; until the next `on_step` the denoiser runs uncached."""
        self.stored, self.mode, self.calls = [], "idle", 0
        self.rule.reset()

    def remove(self) -> None:
        """Unwraps every slot (leaving the module the router or the dense denoiser put there)."""
        self.clear()
        for slot, _ in self._slots:
            current = slot.get()
            if isinstance(current, CachedSlot) and current.cache is self:
                slot.set(current.inner)
        self._wrappers = {}

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def check_shapes(what: str, got: Sequence[Tensor | None], stored: Sequence[Tensor | None]) -> None:
    """Refuses a cached call whose tensors do not match the full step's (another batch size)."""
    for g, s in zip(got, stored):
        if g is not None and s is not None and g.shape != s.shape:
            raise CacheError(f"{what}: a cached step got shape {tuple(g.shape)} where the last full step stored "
                             f"{tuple(s.shape)}; keep the batch and size fixed within a sampling run")
