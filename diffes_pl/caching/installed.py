"""A schedule installed on a denoiser: its router and, when a stage caches, its feature cache — one
context manager that installs both and removes both (the cache first) on exit or failure.

    with install_schedule(adapter, store, schedule) as installed:
        images = dp.sample(adapter, labels, router=installed.router, cache=installed.cache)
        # or rollout(..., listeners=installed.listeners)

A level-only schedule gets its router alone; `schedule=None` installs nothing (the dense model), so
one loop can evaluate dense and pruned rows alike.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..denoisers.base import DenoiserAdapter
from ..routing import Router
from ..schedule import Schedule
from ..trajectory import TrajectoryStore
from . import schedule_cache
from .cache import FeatureCache


@dataclass(frozen=True)
class Installed:
    """What `install_schedule` installed: the router (None: dense) and the feature cache (None: no stage caches)."""

    router: Router | None
    cache: FeatureCache | None

    @property
    def listeners(self) -> list:
        """The step listeners, router first (`sampling.rollout(listeners=…)`)."""
        return [x for x in (self.router, self.cache) if x is not None]


@contextmanager
def install_schedule(adapter: DenoiserAdapter, store: TrajectoryStore | None, schedule: Schedule | None, *,
           resident: bool = True, stages: Sequence[int] | None = None) -> Iterator[Installed]:
    """Installs `schedule` on `adapter`'s denoiser (`Router(adapter, store, schedule, resident=…,
    stages=…)`, then `caching.schedule_cache`) for the `with` block; removes both at its end, also
    when the block or the cache's construction fails. None: the dense model (nothing installed)."""
    if schedule is None:
        yield Installed(None, None)
        return
    router = Router(adapter, store, schedule, resident=resident, stages=stages)
    cache = None
    try:
        cache = schedule_cache(adapter, schedule)
        yield Installed(router, cache)
    finally:
        if cache is not None:
            cache.remove()
        router.remove()
