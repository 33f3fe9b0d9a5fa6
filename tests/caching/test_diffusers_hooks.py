"""diffusers' First Block Cache as a routed baseline on the built-in DiT: threshold 0 is the dense
model bit for bit; removal leaves no hook behind; every new stage resets it (even at the same level); width routing + FBC
equals masking + FBC; depth routing (which replaces hooked blocks) is refused."""
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig

import diffes_pl as dp
from diffes_pl.caching import CacheError
from diffes_pl.caching.diffusers_hooks import DiffusersCache
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from helpers.routing_reference import MaskingListener, random_store

LABELS = [1, 5]
KW = dict(steps=4, guidance=2.0, seed=0, output="latents")
NEVER = 1e9  # a threshold that reuses every step it may


def test_threshold_zero_is_dense_and_removal_leaves_nothing(tiny):
    dense = dp.sample(tiny, LABELS, **KW)
    with DiffusersCache(tiny, FirstBlockCacheConfig(threshold=0.0)) as cache:
        torch.testing.assert_close(dp.sample(tiny, LABELS, cache=cache, **KW), dense, rtol=0, atol=0)
    assert not any("forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for m in tiny.denoiser.modules())
    torch.testing.assert_close(dp.sample(tiny, LABELS, **KW), dense, rtol=0, atol=0)


@pytest.mark.parametrize("levels", [[3, 1], [1, 1]])
def test_every_stage_resets_the_hooks(tiny, levels):
    counts = [0] * 6
    handles = [b.ff.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(tiny.blocks())]  # a block's MLP: runs only when the block computes
    try:
        with DiffusersCache(tiny, FirstBlockCacheConfig(threshold=NEVER), levels=levels) as cache:
            dp.sample(tiny, LABELS, num_stages=2, cache=cache, **KW)  # stages 0 0 1 1
    finally:
        for h in handles:
            h.remove()
    assert counts == [4, 2, 2, 2, 2, 2]  # the head block every step; the rest at steps 0 and 2


def _case(tiny, path, depth):
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 2)
    levels_max = 6 if depth else 4
    store = random_store(tiny, path, levels_max, partition, depth=depth)
    schedule = Schedule([2, 1], levels_max, 1.5, partition.steps_per_stage, partition=partition.to_dict())
    return store, schedule


def test_width_routed_fbc_equals_masked_fbc(tiny, tmp_path):
    store, schedule = _case(tiny, tmp_path / "store", depth=False)
    masker = MaskingListener(tiny, store, schedule)
    with Router(tiny, store, schedule) as router:
        uncached = dp.sample(tiny, LABELS, router=router, **KW)
    with DiffusersCache(tiny, FirstBlockCacheConfig(threshold=NEVER), levels=schedule.levels) as cache:
        masked = dp.sample(tiny, LABELS, num_stages=2, listeners=[masker], cache=cache, **KW)
        masker.clear()
        with Router(tiny, store, schedule) as router:
            routed = dp.sample(tiny, LABELS, router=router, cache=cache, **KW)
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-5)
    assert (routed - uncached).abs().max() > 1e-4
    assert tiny.is_dense()


def test_depth_routing_replacing_hooked_blocks_is_refused(tiny, tmp_path):
    store, schedule = _case(tiny, tmp_path / "store", depth=True)
    with Router(tiny, store, schedule) as router, \
            DiffusersCache(tiny, FirstBlockCacheConfig(threshold=0.1), levels=schedule.levels) as cache:
        with pytest.raises(CacheError, match="BlockCache"):
            dp.sample(tiny, LABELS, router=router, cache=cache, **KW)
    assert tiny.is_dense()


def test_a_denoiser_diffusers_cannot_hook_is_refused(text_models):
    with pytest.raises(ValueError, match="found nothing to hook"):
        DiffusersCache(text_models.build_tiny_sdxl(vae=False, text=False), FirstBlockCacheConfig())
