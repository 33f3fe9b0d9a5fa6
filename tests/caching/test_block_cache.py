"""Block caching on transformer denoisers (the built-in DiT, a random DiT, a tiny FLUX): k = 1 is
the uncached model bit for bit; a cached step runs only blocks [0, b) and the output layers; routed
+ cached sampling equals the schedule applied by masking the dense model with a hook-based cache;
removing the cache restores the dense model (and leaves the router's blocks in place)."""
import pytest
import torch

import diffes_pl as dp
from helpers.caching_reference import BlockCacheReference, masked_cached
from diffes_pl.caching import BlockCache, CacheError, feature_cache, step_macs
from diffes_pl.denoisers.base import TextCondition
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from helpers.routing_reference import random_store

H, STEPS, STAGES = 4, 6, 2
LABELS = [0, 3, 7]


def _flux_condition(n=2):
    g = torch.Generator().manual_seed(1)
    return TextCondition(torch.randn(n, 6, 16, generator=g), torch.randn(n, 8, generator=g))


@pytest.mark.parametrize("branch", [0, 3, 5])
def test_interval_one_is_the_uncached_model_bit_for_bit(tiny, branch):
    dense = dp.sample(tiny, LABELS, steps=4, guidance=2.0, output="latents")
    with BlockCache(tiny, intervals=1, branch=branch) as cache:
        cached = dp.sample(tiny, LABELS, steps=4, guidance=2.0, output="latents", cache=cache)
    torch.testing.assert_close(cached, dense, rtol=0, atol=0)


def test_flux_interval_one_is_bit_for_bit_and_two_is_not(text_models, one_thread):

    flux = text_models.build_tiny_flux(vae=False, text=False)
    kw = dict(steps=4, guidance=2.0, sampler="flow_euler", output="latents")
    dense = dp.sample(flux, _flux_condition(), **kw)
    with feature_cache(flux, intervals=1, branch=1) as cache:
        torch.testing.assert_close(dp.sample(flux, _flux_condition(), cache=cache, **kw), dense, rtol=0, atol=0)
    with feature_cache(flux, intervals=2, branch=1) as cache:
        assert (dp.sample(flux, _flux_condition(), cache=cache, **kw) - dense).abs().max() > 1e-4
    assert flux.is_dense()


def test_a_cached_step_calls_only_the_shallow_part(tiny):
    """6 blocks, b = 2, k = 2 over 4 steps: steps 0 and 2 full, 1 and 3 cached."""
    counts = {i: 0 for i in range(6)}
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, block in enumerate(tiny.blocks())]
    out_calls = []
    handles.append(tiny.denoiser.proj_out_2.register_forward_hook(lambda *a: out_calls.append(1)))
    try:
        with BlockCache(tiny, intervals=2, branch=2) as cache:
            dp.sample(tiny, LABELS, steps=4, guidance=2.0, output="latents", cache=cache)
    finally:
        for h in handles:
            h.remove()
    assert counts == {0: 4, 1: 4, 2: 2, 3: 2, 4: 2, 5: 2}  # CFG halves in one batched call per step
    assert len(out_calls) == 4  # the output layers run at every step
    assert tiny.is_dense()


def _routing_case(adapter, tmp_path, kind, sampler):
    partition = StagePartition.from_scheduler(adapter.make_scheduler(sampler), STEPS, STAGES)
    depth = kind == "depth"
    levels_max = len(adapter.blocks()) if depth else H
    store = random_store(adapter, tmp_path / "store", levels_max, partition, compensated=kind == "compensated",
                         depth=depth)
    levels = {"orders": [3, 1], "compensated": [1, 1], "depth": [2, 1]}[kind]
    schedule = Schedule(levels, levels_max, sum(levels) / 2, partition.steps_per_stage, partition=partition.to_dict())
    return store, schedule, partition


@pytest.mark.parametrize("kind,intervals,branch", [("orders", 2, 2), ("compensated", [2, 3], 1), ("depth", 2, 3),
                                                   ("orders", [1, 2], 0)])
def test_routed_cached_equals_masked_cached(tiny, tmp_path, kind, intervals, branch):
    """Every stage refreshes at its first step, also when both stages have the same level
    ("compensated": each stage has its own compensated weights)."""
    store, schedule, partition = _routing_case(tiny, tmp_path, kind, "ddim")
    kw = dict(steps=STEPS, guidance=2.0, seed=0)
    reference = BlockCacheReference(tiny, partition, intervals, branch, schedule.levels)
    masked = masked_cached(tiny, store, schedule, reference, LABELS, **kw)
    with Router(tiny, store, schedule) as router, \
            BlockCache(tiny, intervals, branch, levels=schedule.levels) as cache:
        routed = dp.sample(tiny, LABELS, router=router, cache=cache, output="latents", **kw)
        uncached = dp.sample(tiny, LABELS, router=router, output="latents", **kw)
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-5)
    assert (routed - uncached).abs().max() > 1e-4  # the cache did reuse features
    assert tiny.is_dense()


def test_flux_routed_cached_equals_masked_cached(text_models, tmp_path, one_thread):

    flux = text_models.build_tiny_flux(vae=False, text=False)
    store, schedule, partition = _routing_case(flux, tmp_path, "orders", "flow_euler")
    kw = dict(steps=STEPS, guidance=2.0, seed=0, sampler="flow_euler")
    reference = BlockCacheReference(flux, partition, 2, 1, schedule.levels)
    masked = masked_cached(flux, store, schedule, reference, _flux_condition(), **kw)
    with Router(flux, store, schedule) as router, BlockCache(flux, 2, 1, levels=schedule.levels) as cache:
        routed = dp.sample(flux, _flux_condition(), router=router, cache=cache, output="latents", **kw)
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-5)
    assert flux.is_dense()


def test_removal_leaves_the_routers_blocks_and_then_the_dense_model(tiny, tmp_path):
    store, schedule, partition = _routing_case(tiny, tmp_path, "depth", "ddim")
    dense = dp.sample(tiny, LABELS, steps=STEPS, guidance=2.0, output="latents")
    with Router(tiny, store, schedule) as router:
        cache = BlockCache(tiny, 2, 0, levels=schedule.levels)
        router.on_step(0, 0)
        cache.on_step(0, 0)
        installed = [router._stages[0]["blocks"].get(i, tiny.dense_block(i)) for i in range(6)]
        assert all(tiny.blocks()[i] is not installed[i] for i in range(6))  # wrapped
        router.on_step(3, 1)  # the router replaces the wrappers at a stage boundary ...
        cache.on_step(3, 1)  # ... and the cache wraps the new blocks
        installed = [router._stages[1]["blocks"].get(i, tiny.dense_block(i)) for i in range(6)]
        assert all(tiny.blocks()[i].inner is installed[i] for i in range(6))
        cache.remove()
        assert all(tiny.blocks()[i] is installed[i] for i in range(6))  # nothing the router installed is lost
    assert tiny.is_dense()
    torch.testing.assert_close(dp.sample(tiny, LABELS, steps=STEPS, guidance=2.0, output="latents"), dense,
                               rtol=0, atol=0)


def test_cfg_halves_called_apart_keep_their_own_features(tiny):
    """A loop that calls the denoiser once per CFG half gets each half's own stored residual: the
    same latents as the batched call; a cached step with more calls than the full step is refused."""
    scheduler = tiny.make_scheduler("ddim")
    scheduler.set_timesteps(4)
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 1)
    labels = torch.tensor(LABELS)
    null = tiny.null_condition(labels)
    x0 = dp.sampling.seeded_noise((3, *tiny.latent_shape), 0)
    with BlockCache(tiny, 2, 2) as cache:
        batched = dp.sampling.rollout(tiny, scheduler, x0, labels, guidance=2.0, partition=partition, listeners=[cache])
        x = x0
        scheduler.set_timesteps(4)
        for step, t in enumerate(scheduler.timesteps):
            cache.on_step(step, 0)
            eps_c = tiny.predict_noise(x, t.expand(3), labels)
            eps_u = tiny.predict_noise(x, t.expand(3), null)
            x = scheduler.step(eps_u + 2.0 * (eps_c - eps_u), t, x).prev_sample
        torch.testing.assert_close(x, batched, rtol=1e-4, atol=1e-5)
        cache.on_step(0, 0)
        tiny.predict_noise(x0, t.expand(3), labels)
        cache.on_step(1, 0)
        tiny.predict_noise(x0, t.expand(3), labels)
        with pytest.raises(CacheError, match="nothing stored"):
            tiny.predict_noise(x0, t.expand(3), labels)
        with pytest.raises(CacheError, match="shape"):
            cache.on_step(0, 0)
            tiny.predict_noise(x0, t.expand(3), labels)
            cache.on_step(1, 0)
            tiny.predict_noise(x0[:2], t.expand(2), labels[:2])


def test_count_macs_sees_a_cached_step_as_the_shallow_part(random_dit):
    """MACs of a cached step = MACs of the model whose blocks [b, N) are skipped (depth pruning)."""
    b = 1
    with BlockCache(random_dit, intervals=2, branch=b) as cache:
        full, cached = step_macs(random_dit, cache, batch_size=2)
    assert full == dp.count_macs(random_dit, batch_size=2)
    for i in range(b, 3):
        random_dit.install_block(i, random_dit.skipped_block(i))
    try:
        assert cached == dp.count_macs(random_dit, batch_size=2) < full
    finally:
        random_dit.restore_dense()


def test_sample_refuses_a_cache_built_for_other_levels(tiny, tmp_path):
    store, schedule, _ = _routing_case(tiny, tmp_path, "orders", "ddim")
    with Router(tiny, store, schedule) as router, BlockCache(tiny, 2, 1) as cache:
        with pytest.raises(ValueError, match="levels=router.schedule.levels"):
            dp.sample(tiny, LABELS, steps=STEPS, router=router, cache=cache)
    with pytest.raises(ValueError, match="branch"):
        BlockCache(tiny, 2, 6)
