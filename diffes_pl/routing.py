"""Router: installs a schedule on ONE denoiser.

For every stage the physically sliced modules (kept heads' q/k/v rows and output columns, kept MLP
channels, compensated OBS weights from the store, skipped blocks) are built ONCE and kept resident
on the device. At a stage boundary the router swaps them in by reference — a handful of attribute
assignments, no copy, gather or host sync per step. The stage comes from the sampling loop's step
source (`on_step(step, stage)`), never from a tensor. `remove()` (or leaving the `with` block)
reinstalls the dense modules, bit for bit.

`resident=False` trades a gather per stage BOUNDARY (never per step) for memory: the weights that
are plain slices of dense layers (q/k/v rows, first-projection rows, uncompensated output columns)
of all stages become views of ONE buffer per dense layer, refilled in place when a stage starts;
compensated OBS weights stay resident per stage. Memory is then about one pruned copy on top of the
dense model instead of S. Sparse (unstructured / N:M) stores: one full-size buffer per routed linear,
refilled at a stage boundary from the stage's mask (kept packed, 8 weights to a byte) and, compensated,
its kept values.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .denoisers.base import DenoiserAdapter, keep_from_order
from .partition import StagePartition
from .schedule import Schedule
from .sparsity import masked_weight, pack_mask, unpack_mask
from .trajectory import TrajectoryStore


class RoutingError(ValueError):
    """A schedule the store cannot serve on this denoiser."""


def check_store(schedule: Schedule, store: TrajectoryStore) -> None:
    """Refuses a store other than the one the schedule was searched on: levels index a pruner's
    removal orders, so the same levels on another pruner's (or calibration's) store route other
    units, silently. Schedules without `store_key` (older or hand-made) are checked on the pruner only."""
    recorded = f"the store it was searched on ({schedule.store or 'not recorded'})"
    if schedule.pruner is not None and schedule.pruner != store.pruner:
        raise RoutingError(f"the schedule was searched with the {schedule.pruner!r} pruner but the trajectory store at "
                           f"{store.path} was built by {store.pruner!r}; route it with {recorded}, or search a "
                           f"schedule on this store")
    if schedule.store_key is not None and schedule.store_key != store.key:
        raise RoutingError(f"the schedule was searched on the trajectory store with key {schedule.store_key[:12]}… "
                           f"but the store at {store.path} has key {store.key[:12]}… (other calibration or pruner "
                           f"settings); route it with {recorded}, or search a schedule on this store")


def check_routable(schedule: Schedule, store: TrajectoryStore, identity: dict | None = None) -> None:
    """Refuses a schedule the store cannot route, from the store's manifest alone (no shard read):
    another store (`check_store`), other stages, H or stage boundaries, no partition, or (with the
    denoiser's `identity()`, which its config gives before it loads) another denoiser."""
    schedule.validate()
    check_store(schedule, store)
    if schedule.num_stages != store.num_stages:
        raise RoutingError(f"the schedule has {schedule.num_stages} stages but the store at {store.path} has "
                           f"{store.num_stages}; search a schedule on this store or build a store for this partition")
    if schedule.levels_max != store.levels_max:
        raise RoutingError(f"the schedule's H = {schedule.levels_max} differs from the store's H = {store.levels_max}")
    if schedule.partition is None:
        raise RoutingError("the schedule carries no partition (timesteps and stages); it cannot be routed")
    stored = store.manifest.get("key_fields", {}).get("denoiser")
    if identity is not None and stored is not None and stored.get("config") != identity["config"]:
        raise RoutingError(f"the store at {store.path} was built for another denoiser "
                           f"({stored.get('name')}); this one is {identity['name']}")
    stored_partition = store.manifest.get("key_fields", {}).get("partition")
    if stored_partition is not None and stored_partition.get("steps_per_stage") != list(schedule.steps_per_stage):
        raise RoutingError("the schedule's stage boundaries differ from the store's")


def estimate_prepared_bytes(adapter: DenoiserAdapter, store: TrajectoryStore, schedule: Schedule,
                            resident: bool = True) -> int:
    """Bytes a Router prepares for `schedule`: per stage, the sliced modules (the kept share of each
    dense module). resident=False keeps one buffer per dense layer (the largest stage's share) plus
    the compensated output weights of every stage. Skipped blocks hold no weights."""
    if store.depth:
        return 0
    H = store.levels_max
    total = 0
    if store.sparse:
        # resident: a full-size weight per pruned layer and stage; shared: one buffer per layer, and per
        # stage its mask packed 8 to a byte plus (compensated) the kept values
        routed = [level for level in schedule.levels if level > 0]
        linears = adapter.sparse_linears().values()
        dense = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
        if resident or not routed:
            return dense * len(routed)
        granularity = store.granularity
        per_stage = sum(-(-lin.weight.shape[1] // 8) * lin.weight.shape[0] + store.compensated * lin.weight.element_size()
                        * granularity.kept(level, H, tuple(lin.weight.shape)) for lin in linears for level in routed)
        return dense + per_stage
    for group in adapter.unit_groups():
        dense = sum(t.numel() * t.element_size() for t in adapter.dense_module(group).parameters())
        kept = [group.size - group.removed_at(level, H) for level in schedule.levels
                if group.removed_at(level, H) > 0]
        if resident or not kept:
            total += sum(dense * k // group.size for k in kept)
            continue
        if store.compensated:  # the output layer's columns: each stage's own compensated copy
            out = adapter.output_layer(group).weight
            dense -= out.numel() * out.element_size()
            total += sum(out.shape[0] * k * group.unit_width for k in kept) * out.element_size()
        total += dense * max(kept) // group.size
    return total


class Router:
    """Stage-conditioned weights on one denoiser (see module docstring)."""

    def __init__(self, adapter: DenoiserAdapter, store: TrajectoryStore, schedule: Schedule,
                 device: str | torch.device | None = None, resident: bool = True,
                 stages: Sequence[int] | None = None) -> None:
        """
        Args:
            adapter: the denoiser to route (one instance; its dense modules are never modified).
            store: the trajectory store the schedule was searched on.
            schedule: per-stage levels (checked against the store before anything is built).
            device: where the prepared weights live (default: the denoiser's device).
            resident: True keeps every stage's sliced weights resident (swap by reference);
                False shares one buffer per dense layer across stages, refilled at stage boundaries.
            stages: prepare only these stages (default: all); installing another one is an error.
                The search's batched rollouts run one stage at a time and need one stage's weights.
        """
        self.adapter = adapter
        self.store = store
        self.schedule = schedule
        self.device = torch.device(device) if device is not None else adapter.device
        self.resident = resident
        check_routable(schedule, store, adapter.identity())
        self._check_memory()  # before any stage is prepared
        self.partition = StagePartition.from_dict(schedule.partition)
        self._stages: list[dict] = []
        self._refills: list[list[tuple]] = []
        for stage, level in enumerate(schedule.levels):
            prepared = self._prepare(stage, level) if stages is None or stage in stages else None
            self._stages.append(prepared)
            if not resident:
                share = self._share_sparse if store.sparse else self._share
                self._refills.append(share(prepared) if prepared is not None else [])
        self._current: int | None = None

    # --- validation ----------------------------------------------------------------------------
    def _check_memory(self) -> None:
        from .memory import check_fits, gib

        needed = estimate_prepared_bytes(self.adapter, self.store, self.schedule, self.resident)
        ways = ([f"pass resident=False (one shared buffer per layer: "
                 f"{gib(estimate_prepared_bytes(self.adapter, self.store, self.schedule, False))})"]
                if self.resident else [])
        ways += ["search with fewer stages"]
        if self.adapter.dtype not in (torch.float16, torch.bfloat16):
            ways += ["load the denoiser in a lower dtype (dtype=torch.bfloat16)"]
        ways[-1] = "or " + ways[-1]
        check_fits(needed, self.device, f"routing {self.schedule.num_stages} stages "
                   f"({'resident' if self.resident else 'shared buffers'}, {str(self.adapter.dtype).removeprefix('torch.')})",
                   ", ".join(ways))

    # --- preparation (once) -------------------------------------------------------------------
    def _prepare(self, stage: int, level: int) -> dict:
        adapter, store = self.adapter, self.store
        H = store.levels_max
        if store.depth:
            skipped = store.block_order(stage)[:level].tolist()
            return {"blocks": {i: self._skipped(i) for i in skipped}, "groups": {}}
        if store.sparse:
            groups, sources = self._prepare_sparse(stage, level)
            return {"blocks": {}, "groups": groups, "sources": sources}
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

    def _prepare_sparse(self, stage: int, level: int) -> tuple[dict[str, nn.Module], list[tuple]]:
        """Per unit group, its module with each linear layer's weight at `level` (zeros where removed,
        the stored compensated values where kept): full-size weights, installed by reference. Shared
        buffers: also what a refill needs, per routed linear (linear, dense weight, packed mask, values)."""
        adapter, store = self.adapter, self.store
        sources: list[tuple] = []
        if level == 0:
            return {}, sources
        layers: dict[str, list[str]] = {}
        for layer in adapter.sparse_layers():
            layers.setdefault(layer.group, []).extend(layer.paths)
        groups: dict[str, nn.Module] = {}
        for group in adapter.unit_groups():
            dense = adapter.dense_module(group)
            weights, refill = {}, {}
            for path in layers.get(group.name, []):
                name = f"{group.name}.{path}"
                weight = dense.get_submodule(path).weight.detach().to(self.device)
                removed, values = store.removed(stage, name, level), store.values(stage, name, level)
                weights[path] = masked_weight(weight, removed, values)
                if not self.resident:  # what a refill of the shared buffer needs (`_share_sparse`)
                    packed = pack_mask(removed).to(self.device)
                    refill[path] = (dense.get_submodule(path).weight, packed,  # the dense parameter: one buffer each
                                    None if values is None else values.to(self.device, weight.dtype))
            module = adapter.sparse_module(group, weights).to(self.device)
            sources += [(module.get_submodule(path), *source) for path, source in refill.items()]
            groups[group.name] = module
        return groups, sources

    def _share_sparse(self, prepared: dict) -> list[tuple]:
        """Sparse stores: rebinds every routed linear's weight to ONE buffer per dense layer (shared by
        the stages) and returns what `install` refills: (buffer, dense weight, packed mask, values)."""
        buffers = self.__dict__.setdefault("_buffers", {})
        refills = []
        for linear, dense, packed, values in prepared.pop("sources"):
            buf = buffers.setdefault(id(dense), torch.empty_like(dense, device=self.device))
            linear.weight = nn.Parameter(buf, requires_grad=False)  # the stage's own copy is freed
            refills.append((buf, dense, packed, values))
        return refills

    def _share(self, prepared: dict) -> list[tuple]:
        """Rebinds the stage's gathered weights to views of one buffer per dense layer and axis
        (grown as needed) and returns what `install` refills: (dense weight, axis, index, linear)."""
        buffers = self.__dict__.setdefault("_buffers", {})  # (layer id, axis) → (buffer, its users)
        refills = []
        for module in prepared["groups"].values():
            for linear in module.modules():
                source = getattr(linear, "_gathered_from", None)
                if source is None:
                    continue
                layer, axis, index = source
                key = (id(layer), axis)
                buf, users = buffers.get(key, (None, []))
                if buf is None or buf.shape[0] < len(index):
                    # rows [k, in]; columns stored transposed [k, out] so that every view is contiguous
                    buf = torch.empty(len(index), layer.weight.shape[1 - axis], device=self.device,
                                      dtype=layer.weight.dtype)
                    for user in users:  # earlier stages' views move to the larger buffer
                        _bind(user, buf, axis)
                users.append(linear)
                buffers[key] = (buf, users)
                _bind(linear, buf, axis)  # the private copy is freed
                refills.append((layer.weight, axis, index.to(self.device), linear))
        return refills

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
        if prepared is None:
            raise RoutingError(f"stage {stage} was not prepared by this router (built with stages=…): build it "
                               "with that stage")
        groups, blocks = prepared["groups"], prepared["blocks"]
        if not self.resident and self.store.sparse:
            with torch.no_grad():
                for buf, dense, packed, values in self._refills[stage]:
                    kept = ~unpack_mask(packed, dense.shape[1])
                    if values is None:
                        buf.copy_(dense.to(self.device)).masked_fill_(~kept, 0)
                    else:
                        buf.zero_().masked_scatter_(kept, values)
        elif not self.resident:
            with torch.no_grad():
                for weight, axis, index, linear in self._refills[stage]:
                    out = linear.weight if axis == 0 else linear.weight.T  # a contiguous view of the buffer
                    torch.index_select(weight if axis == 0 else weight.T, 0, index, out=out)
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

    def attach(self, cache: Any = None):
        """Routing inside any diffusers pipeline that runs this denoiser (`DiTPipeline`,
        `StableDiffusionXLPipeline`, …): a diffusers hook on the denoiser switches stages by the
        timestep each call receives (`step_hook.py`); `cache`, the schedule's feature cache
        (`caching.schedule_cache`), follows the router. The pipeline must run the partition's
        timesteps (the adapter's scheduler and the searched step count); the first call off them
        raises `RoutingError`. Returns the step source: `remove()` it (or use `with`), then the router."""
        from .step_hook import apply_step_source

        return apply_step_source(self.adapter, self.partition, [self, cache], error=RoutingError)

    def restore_dense(self) -> None:
        self.adapter.restore_dense()
        self._current = None

    def remove(self) -> None:
        """Restores the dense denoiser and frees the prepared modules."""
        self.restore_dense()
        self._stages, self._refills = [], []
        self.__dict__.pop("_buffers", None)

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def resident_bytes(self) -> int:
        """Bytes of the prepared per-stage parameters not shared with the dense denoiser (counted
        by storage, so views of one shared buffer count once)."""
        dense = {p.untyped_storage().data_ptr() for p in self.adapter.denoiser.parameters()}
        seen: set[int] = set()
        total = 0
        for prepared in self._stages:
            for module in (prepared or {"groups": {}})["groups"].values():
                for p in module.parameters():
                    storage = p.untyped_storage()
                    if storage.data_ptr() not in dense and storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
        return total


def _bind(linear: nn.Linear, buf: torch.Tensor, axis: int) -> None:
    """Makes `linear.weight` a view of the first k rows of `buf` (k = its kept rows or columns)."""
    k = linear.weight.shape[axis]
    linear.weight = nn.Parameter(buf[:k] if axis == 0 else buf[:k].T, requires_grad=False)
