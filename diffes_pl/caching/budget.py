"""The MAC cost model of joint (level, cache interval) schedules: MACs of one full and one cached
denoiser step per stage and level, counted by `count_macs` on what routing and caching really run —
a uniform-level `Router` installed, and for the cached step the declared feature cache on top.

The table (`step_costs.StepCosts`, recorded in a joint schedule as `step_costs`, so that a
schedule file checks its own MAC budget):
- width pruning: every stage at level L removes round(L/H · n) units of every group, so all stages
  cost the same; one row of H+1 counts (stage 0 is counted);
- depth pruning: each stage skips its own blocks (`store.block_order(stage)[:L]`), and a cached
  step saves only the blocks of the deep part, so the cost depends on the stage: S rows.
"""
from __future__ import annotations

from ..denoisers.base import DenoiserAdapter
from ..macs import count_macs, install_uniform_width, schedule_macs
from ..partition import StagePartition
from ..schedule import Schedule
from ..step_costs import StepCosts
from ..routing import Router
from ..trajectory import TrajectoryStore
from . import feature_cache
from .cached_step_macs import step_macs


def step_cost_table(adapter: DenoiserAdapter, store: TrajectoryStore, partition: StagePartition,
                    branch: int | None = None, batch_size: int = 1) -> dict:
    """{"full": …, "cached": …}: MACs of one full and one cached step per level 0..H (width: one row;
    depth: one row per stage), at `batch_size` (1: the paper's convention, no CFG duplicate).

    branch: the cache branch b of `caching.feature_cache` (None: no cached table, level-only).

    Cost: H+1 routers are built (each prepares every stage, reading the store's compensated weights
    once in all) and 1–2 forwards are counted per (stage, level) — depth: per stage. Cheap on tiny
    models; on big ones build the denoiser on the meta device (`dp.load_denoiser(name,
    weights=False, device="meta")`): `count_macs` runs there without weights or memory, and the
    prepared weights go to the meta device too (the store is still read from disk).
    """
    H, S = store.levels_max, partition.num_stages
    stages = range(S) if store.depth else range(1)
    full = [[0] * (H + 1) for _ in stages]
    cached = None if branch is None else [[0] * (H + 1) for _ in stages]
    for level in range(H + 1):
        schedule = Schedule.uniform(level, H, partition.steps_per_stage, partition=partition.to_dict(),
                                    pruner=store.pruner, store_key=store.key)
        with Router(adapter, store, schedule) as router:
            for s in stages:
                router.install(s)
                full[s][level], cached_macs = _step_costs(adapter, branch, batch_size)
                if cached is not None:
                    cached[s][level] = cached_macs
    rows = (lambda t: t) if store.depth else (lambda t: t[0])
    table = {"full": rows(full), "cached": None if cached is None else rows(cached)}
    StepCosts.parse(table, S, H)  # the invariants every schedule checks (monotone, cached ≤ full)
    return table


def width_step_cost_table(adapter: DenoiserAdapter, levels_max: int, branch: int | None = None,
                          batch_size: int = 1) -> dict:
    """`step_cost_table` of width pruning without a store: every level counted with the first units
    of every group kept (`macs.install_uniform_width`) — width MACs depend only on how
    many units a group keeps, so the table equals the store's (tests/caching/test_budget.py). For
    MAC columns of architectures one cannot calibrate here, e.g. SDXL on the meta device
    (`dp.load_denoiser(name, weights=False, device="meta")`). One row of H+1 counts."""
    full, cached = [], None if branch is None else []
    try:
        for level in range(levels_max + 1):
            install_uniform_width(adapter, level, levels_max)
            f, c = _step_costs(adapter, branch, batch_size)
            full.append(f)
            if cached is not None:
                cached.append(c)
    finally:
        adapter.restore_dense()
    table = {"full": full, "cached": cached}
    StepCosts.parse(table, 1, levels_max)
    return table


def _step_costs(adapter: DenoiserAdapter, branch: int | None, batch_size: int) -> tuple[int, int | None]:
    """(MACs of a full step, of a cached step at `branch` — None without a branch) of what is installed."""
    full = count_macs(adapter, batch_size)
    if branch is None:
        return full, None
    with feature_cache(adapter, intervals=2, branch=branch) as cache:
        return full, step_macs(adapter, cache, batch_size)[1]


def trajectory_macs(adapter: DenoiserAdapter, schedule: Schedule | None, partition: StagePartition, *,
                    router: Router | None = None, store: TrajectoryStore | None = None) -> int:
    """MACs of a whole sampling run at batch 1 (one forward per step, the CFG duplicate not counted):
    the dense denoiser's for `schedule=None`; from the step costs a schedule records (a joint
    schedule: its cached steps included); else counted stage by stage on the schedule's routed
    denoiser — `router` when it is installed already, or one built on `store` for the count."""
    if schedule is None:
        return schedule_macs(adapter, None, partition)
    costs = schedule.costs
    if costs is not None:
        return costs.trajectory_macs(schedule.levels, schedule.intervals, schedule.steps_per_stage)
    if router is not None:
        return schedule_macs(adapter, router, partition)
    if store is None:
        raise ValueError(f"schedule {schedule.levels} records no step costs, so its MACs are counted on its routed "
                         "denoiser: pass its router or the trajectory store")
    with Router(adapter, store, schedule) as router:
        return schedule_macs(adapter, router, partition)
