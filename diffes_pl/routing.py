"""Router: installs a schedule on ONE denoiser.

For every stage the physically sliced modules (kept heads' q/k/v rows and output columns, kept MLP
channels, compensated OBS weights from the store, skipped blocks) are built ONCE and kept resident
on the device. At a stage boundary the router swaps them in by reference — a handful of attribute
assignments, no copy, gather or host sync per step. The stage comes from the sampling loop's step
source (`on_step(step, stage)`), never from a tensor. `remove()` (or leaving the `with` block)
reinstalls the dense modules, bit for bit.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .denoisers.base import DenoiserAdapter, UnitGroup, keep_from_order
from .partition import Schedule, ScheduleError, StagePartition
from .trajectory import TrajectoryStore


class RoutingError(ValueError):
    """A schedule the store cannot serve on this denoiser."""


class Router:
    """Stage-conditioned weights on one denoiser (see module docstring)."""

    def __init__(self, adapter: DenoiserAdapter, store: TrajectoryStore, schedule: Schedule,
                 device: str | torch.device | None = None) -> None:
        self.adapter = adapter
        self.store = store
        self.schedule = schedule
        self.device = torch.device(device) if device is not None else adapter.device
        self._check()
        self.partition = StagePartition.from_dict(schedule.partition)
        self._stages: list[dict] = [self._prepare(s, level) for s, level in enumerate(schedule.levels)]
        self._current: int | None = None

    # --- validation ----------------------------------------------------------------------------
    def _check(self) -> None:
        store, schedule = self.store, self.schedule
        schedule.validate()
        if schedule.num_stages != store.num_stages:
            raise RoutingError(f"the schedule has {schedule.num_stages} stages but the store at {store.path} has "
                               f"{store.num_stages}; search a schedule on this store or build a store for this partition")
        if schedule.levels_max != store.levels_max:
            raise RoutingError(f"the schedule's H = {schedule.levels_max} differs from the store's H = {store.levels_max}")
        if schedule.partition is None:
            raise RoutingError("the schedule carries no partition (timesteps and stages); it cannot be routed")
        stored = store.manifest.get("key_fields", {}).get("denoiser")
        identity = self.adapter.identity()
        if stored is not None and stored.get("config") != identity["config"]:
            raise RoutingError(f"the store at {store.path} was built for another denoiser "
                               f"({stored.get('name')}); this one is {identity['name']}")
        stored_partition = store.manifest.get("key_fields", {}).get("partition")
        if stored_partition is not None and stored_partition.get("steps_per_stage") != list(schedule.steps_per_stage):
            raise RoutingError("the schedule's stage boundaries differ from the store's")

    # --- preparation (once) -------------------------------------------------------------------
    def _prepare(self, stage: int, level: int) -> dict:
        adapter, store = self.adapter, self.store
        H = store.levels_max
        if store.depth:
            skipped = store.block_order(stage)[:level].tolist()
            return {"blocks": {i: self._skipped(i) for i in skipped}, "groups": {}}
        groups: dict[str, nn.Module] = {}
        for group in adapter.unit_groups():
            removed = group.removed_at(level, H)
            if removed == 0:
                continue
            keep = keep_from_order(store.order(stage, group.name), removed)
            weight = store.weight(stage, group.name, level)
            if weight is not None:
                weight = weight.to(self.device, adapter.dtype)
            module = adapter.sliced_module(group, keep, weight)
            groups[group.name] = module.to(self.device)
        return {"blocks": {}, "groups": groups}

    def _skipped(self, index: int) -> nn.Module:
        cache = self.__dict__.setdefault("_skip_cache", {})
        if index not in cache:
            cache[index] = self.adapter.skipped_block(index)
        return cache[index]

    # --- switching -----------------------------------------------------------------------------
    def install(self, stage: int) -> None:
        """Swaps in stage `stage`'s modules (by reference)."""
        adapter = self.adapter
        prepared = self._stages[stage]
        groups, blocks = prepared["groups"], prepared["blocks"]
        for group in adapter.unit_groups():
            module = groups.get(group.name)
            adapter.install(group, adapter.dense_module(group) if module is None else module)
        for i in range(len(adapter.blocks())):
            block = blocks.get(i)
            adapter.install_block(i, adapter.dense_block(i) if block is None else block)
        self._current = stage

    def on_step(self, step: int, stage: int) -> None:
        if stage != self._current:
            self.install(stage)

    def restore_dense(self) -> None:
        self.adapter.restore_dense()
        self._current = None

    def remove(self) -> None:
        """Restores the dense denoiser and frees the prepared modules."""
        self.restore_dense()
        self._stages = []

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def resident_bytes(self) -> int:
        """Bytes of the prepared per-stage parameters not shared with the dense denoiser."""
        dense = {p.data_ptr() for p in self.adapter.denoiser.parameters()}
        seen: set[int] = set()
        total = 0
        for prepared in self._stages:
            for module in prepared["groups"].values():
                for p in module.parameters():
                    if p.data_ptr() not in dense and p.data_ptr() not in seen:
                        seen.add(p.data_ptr())
                        total += p.numel() * p.element_size()
        return total
