"""Feature caching that composes with routing (docs/DESIGN.md: Vocabulary, cache interval).

A cache is a step listener driven by the same step source as the router: `sampling.rollout`'s
`on_step(step, stage)`, or inside a diffusers pipeline the timestep hook `router.attach(cache)`
(`step_hook.py`); it comes after the router. It wraps the deep part's slots reversibly (`slots.py`), runs
full or cached steps by the refresh rule (`refresh.py`) and is cleared at the end of a run:

    with Router(adapter, store, schedule) as router, \\
         feature_cache(adapter, intervals=2, branch=4, levels=schedule.levels) as cache:
        images = dp.sample(adapter, labels, router=router, cache=cache)

Which cache a denoiser gets is its adapter's declaration (`adapter.cache_points()`): block caching
for transformer families (`blocks.py`), DeepCache for UNets (`unet.py`). diffusers' own cache
hooks, routed, are baselines (`diffusers_hooks.DiffusersCache`).
"""
from __future__ import annotations

from typing import Sequence

from ..denoisers.base import BlockCachePoints, DenoiserAdapter, UNetCachePoints
from ..schedule import Schedule
from .blocks import BlockCache
from .cache import CacheError, FeatureCache
from .cached_step_macs import step_macs
from .refresh import RefreshRule, full_steps
from .unet import UNetDeepCache

__all__ = ["BlockCache", "CacheError", "FeatureCache", "RefreshRule", "UNetDeepCache", "feature_cache",
           "full_steps", "schedule_cache", "step_macs"]


def feature_cache(adapter: DenoiserAdapter, intervals: int | Sequence[int] = 2, branch: int = 1,
                  levels: Sequence[int] | None = None) -> FeatureCache:
    """The cache `adapter` declares (block caching or DeepCache) with interval(s) k and branch b."""
    points = adapter.cache_points()
    kinds = {BlockCachePoints: BlockCache, UNetCachePoints: UNetDeepCache}
    if type(points) not in kinds:
        raise ValueError(f"{adapter.name} declares cache points of type {type(points).__name__}, which no "
                         f"cache implements")
    return kinds[type(points)](adapter, intervals, branch, levels)


def schedule_cache(adapter: DenoiserAdapter, schedule: Schedule) -> FeatureCache | None:
    """The cache a joint schedule asks for (its `cache_intervals` and `cache_branch`, built with its
    levels, to pass with its router), or None when no stage caches (a level-only schedule)."""
    if not schedule.caches:
        return None
    return feature_cache(adapter, schedule.intervals, schedule.cache_branch, levels=schedule.levels)
