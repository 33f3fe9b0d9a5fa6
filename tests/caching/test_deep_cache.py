"""DeepCache on a tiny random SDXL UNet (2 down blocks, a mid block, 2 up blocks): k = 1 is the
uncached UNet bit for bit; a cached step runs only the shallow branch; routed + cached sampling
(Euler ancestral, CFG) equals masking the dense UNet with a hook-based DeepCache; removal restores
the UNet; inside diffusers' StableDiffusionXLPipeline the callback drives router and cache."""
import pytest
import torch

import diffes_pl as dp
from helpers.caching_reference import DeepCacheReference, masked_cached
from diffes_pl.caching import UNetDeepCache, feature_cache, step_macs
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from helpers.routing_reference import random_store

H, STEPS, STAGES = 4, 6, 2


@pytest.fixture(scope="module")
def sdxl(text_models):
    return text_models.build_tiny_sdxl(vae=False, text=False)


def _condition(adapter, n=2):
    g = torch.Generator().manual_seed(1)
    cfg = adapter.denoiser.config
    return dp.denoisers.TextCondition(torch.randn(n, 8, cfg.cross_attention_dim, generator=g),
                                      torch.randn(n, adapter.pooled_dim, generator=g), adapter.default_time_ids(n))


KW = dict(steps=4, guidance=3.0, sampler="euler_a", seed=0, output="latents")


@pytest.mark.parametrize("branch", [0, 1])
def test_interval_one_is_the_uncached_unet_bit_for_bit(sdxl, branch, one_thread):
    dense = dp.sample(sdxl, _condition(sdxl), **KW)
    with feature_cache(sdxl, intervals=1, branch=branch) as cache:
        assert isinstance(cache, UNetDeepCache)
        torch.testing.assert_close(dp.sample(sdxl, _condition(sdxl), cache=cache, **KW), dense, rtol=0, atol=0)
    unet = sdxl.denoiser
    assert all(type(m).__name__ != "CachedSlot" for m in [*unet.down_blocks, unet.mid_block, *unet.up_blocks])
    torch.testing.assert_close(dp.sample(sdxl, _condition(sdxl), **KW), dense, rtol=0, atol=0)


def test_a_cached_step_runs_only_the_shallow_branch(sdxl, one_thread):
    unet = sdxl.denoiser
    modules = {"down0": unet.down_blocks[0], "down1": unet.down_blocks[1], "mid": unet.mid_block,
               "up0": unet.up_blocks[0], "up1": unet.up_blocks[1], "conv_out": unet.conv_out}
    counts = dict.fromkeys(modules, 0)
    handles = [m.register_forward_pre_hook(lambda *a, k=k: counts.__setitem__(k, counts[k] + 1))
               for k, m in modules.items()]
    try:
        with UNetDeepCache(sdxl, intervals=2, branch=0) as cache:  # steps 0, 2 full; 1, 3 cached
            dp.sample(sdxl, _condition(sdxl), cache=cache, **KW)
    finally:
        for h in handles:
            h.remove()
    assert counts == {"down0": 4, "down1": 2, "mid": 2, "up0": 2, "up1": 4, "conv_out": 4}


def test_count_macs_sees_a_cached_step_as_the_shallow_branch(sdxl):
    with UNetDeepCache(sdxl, intervals=3, branch=0) as cache:
        full, cached = step_macs(sdxl, cache, batch_size=2)
    assert full == dp.count_macs(sdxl, batch_size=2)
    assert 0 < cached < 0.8 * full, (cached, full)


@pytest.mark.parametrize("kind,intervals,branch", [("orders", 2, 0), ("depth", [3, 2], 1)])
def test_routed_cached_equals_masked_cached(sdxl, tmp_path, kind, intervals, branch, one_thread):
    partition = StagePartition.from_scheduler(sdxl.make_scheduler("euler_a"), STEPS, STAGES)
    depth = kind == "depth"
    levels_max = len(sdxl.blocks()) if depth else H
    store = random_store(sdxl, tmp_path / "store", levels_max, partition, compensated=not depth, depth=depth)
    levels = [3, 1] if not depth else [4, 4]
    schedule = Schedule(levels, levels_max, sum(levels) / 2, partition.steps_per_stage, partition=partition.to_dict())
    kw = {**KW, "steps": STEPS}
    reference = DeepCacheReference(sdxl, partition, intervals, branch, schedule.levels)
    masked = masked_cached(sdxl, store, schedule, reference, _condition(sdxl), **{k: v for k, v in kw.items()
                                                                                 if k != "output"})
    with Router(sdxl, store, schedule) as router, \
            UNetDeepCache(sdxl, intervals, branch, levels=schedule.levels) as cache:
        routed = dp.sample(sdxl, _condition(sdxl), router=router, cache=cache, **kw)
        uncached = dp.sample(sdxl, _condition(sdxl), router=router, **kw)
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    assert (routed - uncached).abs().max() > 1e-4
    assert sdxl.is_dense()


def test_router_and_cache_inside_the_sdxl_pipeline(text_models, tmp_path, one_thread):
    """The pipeline driven by the timestep hook `router.attach(cache)` gives the latents of the masked
    dense UNet and the hook-based reference driven by the pipeline's step callback."""
    from diffusers import StableDiffusionXLPipeline

    from helpers.routing_reference import MaskingListener, masking_callback

    adapter = text_models.build_tiny_sdxl()
    enc = adapter.text_encoders()
    text = {**dict(zip(("text_encoder", "text_encoder_2"), enc.encoders)),
            **dict(zip(("tokenizer", "tokenizer_2"), enc.tokenizers))}
    pipe = StableDiffusionXLPipeline(vae=adapter.vae, unet=adapter.denoiser, scheduler=adapter.make_scheduler("euler_a"),
                                     **text)
    pipe.set_progress_bar_config(disable=True)
    steps = 4
    partition = StagePartition.from_scheduler(adapter.make_scheduler("euler_a"), steps, STAGES)
    store = random_store(adapter, tmp_path / "store", H, partition)
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())

    def run(callback):
        return pipe(prompt=["a red cat", "a dog"], num_inference_steps=steps, guidance_scale=3.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=callback).images

    masker = MaskingListener(adapter, store, schedule)
    reference = DeepCacheReference(adapter, partition, 2, 0, schedule.levels)
    masked = run(masking_callback([masker, reference], partition))
    masker.clear()
    reference.clear()
    with Router(adapter, store, schedule) as router, UNetDeepCache(adapter, 2, 0, levels=schedule.levels) as cache, \
            router.attach(cache):
        routed = run(None)
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    assert adapter.is_dense()


def test_each_cache_serves_its_declaration_only(sdxl, tiny):
    from diffes_pl.caching import BlockCache

    with pytest.raises(ValueError, match="UNetCachePoints, which BlockCache does not serve"):
        BlockCache(sdxl, 2, 0)
    with pytest.raises(ValueError, match="BlockCachePoints, which UNetDeepCache does not serve"):
        UNetDeepCache(tiny, 2, 0)
    with pytest.raises(ValueError, match="branch must lie in"):
        UNetDeepCache(sdxl, 2, 2)
