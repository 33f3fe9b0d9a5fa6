"""Assembling a run from its settings, in plain functions (no Lightning): the run context (the
denoiser loaded, the partition and H fixed), and the search — probes, rollout engine, search space
and racing, handed to `EvolutionarySearch`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..caching.budget import step_cost_table
from ..denoisers import architecture, check_available, load_denoiser
from ..denoisers.base import DenoiserAdapter
from ..errors import ScheduleError
from ..partition import StagePartition
from ..run import RunContext
from ..sampling import probe_rows_that_fit
from ..step_costs import StepCosts
from ..trajectory import TrajectoryStore
from .evolution import EvolutionarySearch
from .joint_space import joint_space
from .level_space import LevelSpace
from .racing import Racing
from .rollouts import Probes, RolloutEngine
from .settings import SearchSettings, resolve_cache_branch
from .space import SearchSpace


@dataclass(frozen=True)
class RunPlan:
    """What a run is, fixed before its denoiser loads: the adapter over the architecture on the meta
    device (no weights), the partition, H and the budget as a level of H (`model.sparsity` converted)."""

    adapter: DenoiserAdapter
    partition: StagePartition
    levels_max: int
    target_level: float


def plan_run(settings: SearchSettings, *, depth: bool = False, weights: bool = True, pruner: Any = None) -> RunPlan | None:
    """The run's plan, from the denoiser's config alone (`denoisers.architecture`, well under a second
    even for FLUX), refusing what the settings cannot do on this denoiser — a partition the sampler
    cannot cut, a target above H, a cache branch it lacks — before anything is loaded or written.
    None where the config is not at hand without loading (a hub model outside the local cache).
    `weights=False` (`--dry_run`): a hub id with a shipped config is planned without being in the cache.
    `pruner`: its default H (`Pruner.default_levels`) and its check of the denoiser (sparse pruners)."""
    dtype = getattr(torch, settings.dtype)
    check_available(settings.denoiser, weights)  # a hub id outside the local cache, offline: refused now
    adapter = architecture(settings.denoiser, dtype=dtype)
    if adapter is None:
        return None
    return _plan(settings, adapter, depth, pruner)


def _plan(settings: SearchSettings, adapter: DenoiserAdapter, depth: bool, pruner: Any = None) -> RunPlan:
    partition = StagePartition.from_scheduler(adapter.make_scheduler(settings.sampler), settings.steps,
                                              settings.num_stages)
    default = pruner.default_levels(adapter) if pruner is not None else adapter.default_levels("depth" if depth else "width")
    levels_max = int(settings.levels or default)
    target_level = settings.check_budget(levels_max, partition.steps_per_stage)  # sparsity → level: H known now
    settings.check_denoiser(adapter)
    if pruner is not None and pruner.granularity is not None:
        pruner.check_denoiser(adapter, levels_max)
        if settings.cache_intervals is not None:
            raise ValueError("cache_intervals budgets MACs, and unstructured / N:M levels do not change the MACs "
                             "a dense kernel runs: search caching with a structured pruner, or drop cache_intervals")
    return RunPlan(adapter, partition, levels_max, target_level)


def check_existing_store(path: Path, plan: RunPlan, key_fields: dict | None = None) -> None:
    """Refuses, from its manifest alone (no shard read), a store already at `path` that this run
    cannot use: other stages or H, or (with `key_fields`) another key. No store there: nothing to check."""
    if not TrajectoryStore.exists(path):
        return
    store = TrajectoryStore.open(path)
    if store.levels_max != plan.levels_max or store.num_stages != plan.partition.num_stages:
        raise ScheduleError(f"the store at {path} has H = {store.levels_max} and {store.num_stages} stages; this "
                            f"run needs H = {plan.levels_max} and {plan.partition.num_stages} stages: point "
                            "--model.store elsewhere (a new store is built there), or restore the settings")
    if key_fields is not None:
        store.check_key(key_fields)


def build_context(settings: SearchSettings, root_dir: Path, device: torch.device | str = "cpu", *,
                  depth: bool = False, pruner: Any = None) -> RunContext:
    """The run context of a run in `root_dir`: refuses what the settings cannot do on this denoiser
    (`plan_run`: from its config, before loading), then loads the denoiser on `device` and fixes the
    partition and H (default: the adapter's, for width or `depth` pruning)."""
    plan_run(settings, depth=depth, pruner=pruner)
    adapter = load_denoiser(settings.denoiser, device=device, dtype=getattr(torch, settings.dtype))
    plan = _plan(settings, adapter, depth, pruner)  # the same, from the loaded denoiser (no config at hand before)
    partition, levels_max = plan.partition, plan.levels_max
    return RunContext(root_dir, store_path(settings, root_dir), adapter, partition, levels_max, plan.target_level,
                      settings.sampler, settings.steps, settings.guidance, settings.dtype, settings.fitness,
                      settings.prompts, settings.probe_batch_size)


def rebind_context(context: RunContext, settings: SearchSettings, root_dir: Path) -> RunContext:
    """`context` moved to another run folder (the denoiser, partition and H kept)."""
    return dataclasses.replace(context, root_dir=root_dir, store_path=store_path(settings, root_dir))


def store_path(settings: SearchSettings, root_dir: Path) -> Path:
    """`model.store`, or the run folder's store/."""
    return Path(settings.store) if settings.store else root_dir / "store"


def build_space(settings: SearchSettings, context: RunContext) -> SearchSpace:
    """The run's search space, the one place that chooses it: the joint (level, cache interval) space
    when `cache_intervals` is set, else the level space. Either carries the MACs of one step per
    stage and level (`caching.budget.step_cost_table`, counted once here; the joint one with its
    cached steps at the cache branch, and recorded in every schedule it makes)."""
    adapter, store, partition, H = context.adapter, context.store, context.partition, context.levels_max
    if settings.cache_intervals is None:
        return level_space(adapter, store, partition, context.target_level)
    branch = resolve_cache_branch(adapter, settings.cache_branch)
    table = step_cost_table(adapter, store, partition, branch=branch)
    return joint_space(H, partition.steps_per_stage, table, context.target_level, intervals=settings.cache_intervals,
                       branch=branch, mac_budget=settings.mac_budget, interval_rate=settings.interval_rate)


def level_space(adapter: DenoiserAdapter, store: TrajectoryStore, partition: StagePartition,
                target_level: float) -> LevelSpace:
    """The level space of `store` (its H) on `partition`, with the MACs of one step per level counted
    on the routed denoiser (`caching.budget.step_cost_table`)."""
    H = store.levels_max
    costs = StepCosts.parse(step_cost_table(adapter, store, partition), partition.num_stages, H)
    return LevelSpace(H, tuple(partition.steps_per_stage), target_level, costs)


def build_search(settings: SearchSettings, context: RunContext) -> EvolutionarySearch:
    """The search of a run whose store exists: probes (`num_probes` seeded latents with labels or the
    prompts), the rollout engine (probe batches that divide racing's rungs; `batch_candidates`:
    rows per call from free GPU memory unless `probe_batch_size` is given), the space and racing.
    Building it rolls the dense reference out (`EvolutionarySearch`)."""
    adapter, store, partition = context.adapter, context.store, context.partition
    if store.levels_max != context.levels_max or store.num_stages != partition.num_stages:
        raise ScheduleError(f"the store at {context.store_path} has H = {store.levels_max} and {store.num_stages} "
                            f"stages; this run needs H = {context.levels_max} and {partition.num_stages} stages")
    probes = Probes.make(adapter, settings.num_probes, settings.probe_seed, prompts=settings.prompts)
    racing = None if settings.race_probes is None else Racing(settings.race_probes, settings.race_confidence)
    batch_size = settings.probe_batch_size or settings.num_probes
    if racing is not None:
        batch_size = racing.batch_divisor(batch_size)
    rows = None
    if settings.batch_candidates:
        rows = settings.probe_batch_size or probe_rows_that_fit(adapter, settings.guidance)
    engine = RolloutEngine(adapter, store, partition, probes, sampler=settings.sampler, guidance=settings.guidance,
                           batch_size=batch_size, resident=settings.resident_routing, batch_rows=rows)
    return EvolutionarySearch(engine, settings.fitness, space=build_space(settings, context),
                              offspring=settings.offspring, survivors=settings.survivors, max_move=settings.max_move,
                              moves_per_child=settings.moves_per_child, init=settings.init, seeds=settings.seeds or [],
                              seed=settings.search_seed, racing=racing, batch_candidates=settings.batch_candidates,
                              proposal=settings.proposal)
