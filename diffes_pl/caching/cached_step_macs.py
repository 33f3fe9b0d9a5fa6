"""MACs of a full and of a cached step with a cache installed, counted by `count_macs` on whatever
runs (the wrappers skip the deep part, so the counter sees only the shallow part's products)."""
from __future__ import annotations

from ..denoisers.base import DenoiserAdapter
from ..macs import count_macs
from .cache import FeatureCache


def step_macs(adapter: DenoiserAdapter, cache: FeatureCache, batch_size: int = 1, stage: int = 0) -> tuple[int, int]:
    """(MACs of a full step, MACs of a cached step) of one denoiser forward at `batch_size` in
    `stage`, whose cache interval must be > 1. The cache is cleared before and after."""
    if cache.rule.interval(stage) < 2:
        raise ValueError(f"stage {stage} has cache interval 1: it has no cached step")
    cache.clear()
    try:
        cache.on_step(0, stage)
        full = count_macs(adapter, batch_size)
        cache.on_step(1, stage)
        cached = count_macs(adapter, batch_size)
    finally:
        cache.clear()
    return full, cached
