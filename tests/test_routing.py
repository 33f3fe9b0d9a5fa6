"""Routing: routed sampling equals sampling with the same schedule applied by masking the dense
denoiser, for heads, channels (with compensated weights) and depth; removal restores dense."""
import pytest
import torch
import torch.nn.functional as F

import diffes_pl as dp
from diffes_pl.denoisers import keep_from_order
from diffes_pl.partition import Schedule, StagePartition
from diffes_pl.routing import Router, RoutingError
from diffes_pl.trajectory import TrajectoryStore, make_key

H, STEPS, STAGES = 4, 4, 2


def _partition(adapter, sampler="ddim"):
    return StagePartition.from_scheduler(adapter.make_scheduler(sampler), STEPS, STAGES)


def _store(adapter, path, compensated=False, depth=False, sampler="ddim"):
    g = torch.Generator().manual_seed(0)
    partition = _partition(adapter, sampler)
    fields = {"denoiser": adapter.identity(), "partition": partition.to_dict()}
    stages = []
    for _ in range(STAGES):
        tensors = {}
        if depth:
            tensors["blocks.order"] = torch.randperm(len(adapter.blocks()), generator=g)
        for group in ([] if depth else adapter.unit_groups()):
            tensors[f"{group.name}.order"] = torch.randperm(group.size, generator=g)
            if compensated:
                out = adapter.output_layer(group).out_features
                for level in range(1, H + 1):
                    kept = group.size - group.removed_at(level, H)
                    tensors[f"{group.name}.weight.{level}"] = 0.1 * torch.randn(out, kept * group.unit_width, generator=g)
        stages.append(tensors)
    manifest = {"key": make_key(fields), "key_fields": fields, "pruner": "test", "levels_max": H if not depth else len(adapter.blocks()),
                "num_stages": STAGES, "compensated": compensated, "depth": depth}
    return TrajectoryStore.write(path, manifest, stages), partition


class MaskingListener:
    """The reference: per stage, hooks on the DENSE modules that zero removed units (or skip blocks,
    or apply the stored compensated weight on the kept columns)."""

    def __init__(self, adapter, store, schedule):
        self.adapter, self.store, self.schedule = adapter, store, schedule
        self.handles, self.stage = [], None

    def on_step(self, step, stage):
        if stage == self.stage:
            return
        self.clear()
        self.stage = stage
        level = self.schedule.levels[stage]
        if self.store.depth:
            for i in self.store.block_order(stage)[:level].tolist():
                self.handles.append(self.adapter.mask_block(i))
            return
        for group in self.adapter.unit_groups():
            removed = group.removed_at(level, self.store.levels_max)
            if removed == 0:
                continue
            keep = keep_from_order(self.store.order(stage, group.name), removed)
            weight = self.store.weight(stage, group.name, level)
            if weight is None:
                self.handles.append(self.adapter.mask_units(group, keep))
            else:
                layer = self.adapter.output_layer(group)
                cols = group.columns(keep)
                self.handles.append(layer.register_forward_hook(
                    lambda m, args, out, c=cols, w=weight: F.linear(args[0][..., c], w.to(args[0].dtype), m.bias)))

    def clear(self):
        for h in self.handles:
            h.remove()
        self.handles = []


@pytest.mark.parametrize("kind,sampler", [("orders", "ddim"), ("compensated", "ddim"), ("depth", "ddim"),
                                          ("compensated", "dpm")])
def test_routed_sampling_equals_masked(tiny, tmp_path, kind, sampler):
    """DPM-Solver++ (multistep: its state spans stage boundaries) composes with routing as DDIM does."""
    store, partition = _store(tiny, tmp_path / "store", compensated=kind == "compensated", depth=kind == "depth",
                              sampler=sampler)
    levels = [3, 1] if kind != "depth" else [2, 0]
    target = sum(levels) / 2
    schedule = Schedule(levels, store.levels_max, target, partition.steps_per_stage, partition=partition.to_dict())
    labels = [0, 3, 7, 9]
    dense = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, sampler=sampler, output="latents")
    masker = MaskingListener(tiny, store, schedule)
    masked = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, sampler=sampler, num_stages=STAGES, listeners=[masker],
                       output="latents")
    masker.clear()
    router = Router(tiny, store, schedule)
    routed = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, sampler=sampler, router=router, output="latents")
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-5)
    assert (routed - dense).abs().max() > 1e-3
    router.remove()
    assert tiny.is_dense()
    torch.testing.assert_close(dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, sampler=sampler, output="latents"), dense,
                               rtol=0, atol=0)


def test_router_swaps_by_reference_without_rebuilding(tiny, tmp_path):
    store, partition = _store(tiny, tmp_path / "store")
    schedule = Schedule([2, 0], H, 1, partition.steps_per_stage, partition=partition.to_dict())
    with Router(tiny, store, schedule) as router:
        router.on_step(0, 0)
        first = tiny.module(tiny.unit_groups()[0])
        router.on_step(2, 1)
        assert tiny.module(tiny.unit_groups()[0]) is tiny.dense_module(tiny.unit_groups()[0])  # level 0: dense
        router.on_step(0, 0)
        assert tiny.module(tiny.unit_groups()[0]) is first  # the same prepared module, not a rebuilt one
        assert first.heads == 4
    assert tiny.is_dense()


def test_router_refuses_what_the_store_cannot_serve(tiny, random_dit, tmp_path):
    store, partition = _store(tiny, tmp_path / "store")
    three = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 6, 3)
    with pytest.raises(RoutingError, match="3 stages but the store"):
        Router(tiny, store, Schedule([2, 2, 2], H, 2, three.steps_per_stage, partition=three.to_dict()))
    with pytest.raises(RoutingError, match="H = 8 differs"):
        Router(tiny, store, Schedule([4, 4], 8, 4, partition.steps_per_stage, partition=partition.to_dict()))
    other, _ = _store(random_dit, tmp_path / "other")
    with pytest.raises(RoutingError, match="another denoiser"):
        Router(tiny, other, Schedule([2, 2], H, 2, partition.steps_per_stage, partition=partition.to_dict()))
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    with pytest.raises(ValueError, match="sample with the settings the schedule was searched with"):
        dp.sample(tiny, [1], steps=STEPS + 2, router=Router(tiny, store, schedule))
    assert tiny.is_dense()


@pytest.mark.parametrize("kind", ["orders", "compensated"])
def test_shared_buffers_route_like_resident_weights(tiny, tmp_path, kind):
    """resident=False (one buffer per dense layer, refilled at stage boundaries) samples what the
    fully resident router samples, twice in a row, and holds fewer bytes."""
    store, partition = _store(tiny, tmp_path / "store", compensated=kind == "compensated")
    schedule = Schedule([1, 3], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    labels = [1, 4, 8]
    with Router(tiny, store, schedule) as resident:
        expected = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, router=resident, output="latents")
        resident_bytes = resident.resident_bytes()
    with Router(tiny, store, schedule, resident=False) as shared:
        for _ in range(2):  # the second run refills buffers last filled by the other stage
            got = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, router=shared, output="latents")
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        shared_bytes = shared.resident_bytes()
    assert tiny.is_dense()
    # orders: resident holds 3/4 + 1/4 of the prunable weights, shared only the larger stage's 3/4
    # (plus per-stage biases); compensated output weights stay per stage
    assert shared_bytes < (0.76 if kind == "orders" else 0.9) * resident_bytes, (shared_bytes, resident_bytes)
