"""Routing: routed sampling equals sampling with the same schedule applied by masking the dense
denoiser, for heads, channels (with compensated weights) and depth; removal restores dense."""
import pytest
import torch

import diffes_pl as dp
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router, RoutingError
from helpers.routing_reference import dense_masked_routed, random_store_and_partition

H, STEPS, STAGES = 4, 4, 2


def _store(adapter, path, compensated=False, depth=False, sampler="ddim"):
    return random_store_and_partition(adapter, path, STEPS, STAGES, H, compensated, depth, sampler)


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
    dense, masked, routed = dense_masked_routed(tiny, store, schedule, labels, steps=STEPS, guidance=2.0, seed=0,
                                                sampler=sampler)
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-5)
    assert (routed - dense).abs().max() > 1e-3
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
