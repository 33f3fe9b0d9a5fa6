"""SDXL adapter on a tiny random UNet2DConditionModel: slicing equals masking (heads of attn1 and
attn2, GEGLU channels, blocks), routed sampling equals masked sampling, level 0 is dense, the
shipped config builds the real SDXL UNet on the meta device."""
import pytest
import torch

import diffes_pl as dp
from diffes_pl.denoisers import ConstantOutput, TextCondition, keep_from_order
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from helpers.routing_reference import mask_units, mask_block, dense_masked_routed, random_store

STEPS, STAGES = 4, 2


@pytest.fixture
def sdxl(text_models):
    """Latent 4×8×8; attention of width 32 (2 heads of 16) and 64 (4 heads of 16); 11 blocks; no
    VAE or text encoders (conditions are given as embeddings)."""
    return text_models.build_tiny_sdxl(vae=False, text=False, std=0.2)


def _cond(adapter, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, 5, 32, generator=g), torch.randn(batch, 16, generator=g),
                         adapter.default_time_ids(batch))


def _inputs(adapter, batch=3):
    x = torch.randn((batch, *adapter.latent_shape), generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([999, 500, 3])[:batch], _cond(adapter, batch)


def _masked(adapter, x, t, c, keeps):
    handles = [mask_units(adapter, g, keeps[g.name]) for g in adapter.unit_groups() if g.name in keeps]
    out = adapter.predict_noise(x, t, c)
    for h in handles:
        h.remove()
    return out


def test_structure(sdxl):
    groups = sdxl.unit_groups()
    assert len(sdxl.blocks()) == 11 and len(groups) == 33
    assert {(g.kind, g.size) for g in groups if g.block == 0} == {("heads", 2), ("channels", 128)}
    assert [g.attr for g in groups if g.block == 0] == ["attn1", "attn2", "ff"]
    assert sdxl.default_levels() == 2 and sdxl.default_levels("depth") == 11


def test_sliced_heads_and_channels_equal_masked(sdxl):
    """Every group sliced at once (all of one block's attn1, attn2 and ff together), kept sets of
    every size from empty to full."""
    x, t, c = _inputs(sdxl)
    g = torch.Generator().manual_seed(0)
    keeps = {grp.name: torch.sort(torch.randperm(grp.size, generator=g)[:[grp.size // 2, 1, 0, grp.size][i % 4]]).values
             for i, grp in enumerate(sdxl.unit_groups())}
    dense = sdxl.predict_noise(x, t, c)
    masked = _masked(sdxl, x, t, c, keeps)
    n_dense = sum(p.numel() for p in sdxl.denoiser.parameters())
    for grp in sdxl.unit_groups():
        sdxl.install(grp, sdxl.sliced_module(grp, keeps[grp.name]))
    sliced = sdxl.predict_noise(x, t, c)
    assert sum(p.numel() for p in sdxl.denoiser.parameters()) < n_dense  # physically smaller
    sdxl.restore_dense()
    assert sdxl.is_dense()
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert (sliced - dense).abs().max() > 1e-3
    torch.testing.assert_close(sdxl.predict_noise(x, t, c), dense, rtol=0, atol=0)


def test_cross_attention_slices_key_value_rows(sdxl):
    group = next(g for g in sdxl.unit_groups() if g.attr == "attn2" and g.size == 4)
    dense = sdxl.dense_module(group)
    attn = sdxl.sliced_module(group, torch.tensor([0, 3]))
    assert attn.heads == 2 and dense.heads == 4
    assert attn.to_k.weight.shape == (32, 32) and attn.to_v.weight.shape == (32, 32)  # 2 heads of 16 from the text dim
    torch.testing.assert_close(attn.to_v.weight, torch.cat([dense.to_v.weight[:16], dense.to_v.weight[48:]]))
    assert attn.to_out[0].weight.shape == (64, 32) and attn.to_out[0].bias is dense.to_out[0].bias
    ff = next(g for g in sdxl.unit_groups() if g.kind == "channels" and g.size == 256)
    proj = sdxl.sliced_module(ff, torch.tensor([1, 5])).net[0].proj
    torch.testing.assert_close(proj.weight, sdxl.dense_module(ff).net[0].proj.weight[[1, 5, 257, 261]])  # GEGLU halves
    assert isinstance(sdxl.sliced_module(group, torch.tensor([], dtype=torch.long)), ConstantOutput)


def test_skipped_blocks_equal_masked(sdxl):
    x, t, c = _inputs(sdxl)
    skip = [0, 4, 10]
    handles = [mask_block(sdxl, i) for i in skip]
    masked = sdxl.predict_noise(x, t, c)
    for h in handles:
        h.remove()
    for i in skip:
        sdxl.install_block(i, sdxl.skipped_block(i))
    sliced = sdxl.predict_noise(x, t, c)
    sdxl.restore_dense()
    torch.testing.assert_close(sliced, masked, rtol=1e-6, atol=1e-6)


def _store(adapter, path, levels_max, compensated=False, depth=False):
    partition = StagePartition.from_scheduler(adapter.make_scheduler("euler_a"), STEPS, STAGES)
    return random_store(adapter, path, levels_max, partition, compensated=compensated, depth=depth), partition


@pytest.mark.parametrize("kind", ["orders", "compensated", "depth"])
def test_routed_sampling_equals_masked(sdxl, tmp_path, kind):
    """Euler ancestral (the paper's SDXL sampler), CFG, H = 4: level 3 removes 2 of 2 heads (round
    1.5) and 3 of 4, level 1 removes 1 of 2 (round 0.5 up) and 1 of 4."""
    H = 4 if kind != "depth" else len(sdxl.blocks())
    store, partition = _store(sdxl, tmp_path / "store", H, compensated=kind == "compensated", depth=kind == "depth")
    levels = [3, 1]
    schedule = Schedule(levels, H, 2, partition.steps_per_stage, partition=partition.to_dict())
    cond = _cond(sdxl, 2)
    dense, masked, routed = dense_masked_routed(sdxl, store, schedule, cond, steps=STEPS, guidance=3.0, seed=0,
                                                sampler="euler_a")
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    assert (routed - dense).abs().max() > 1e-3
    assert sdxl.is_dense()


def test_level_zero_is_dense_and_sampling_is_deterministic(sdxl, tmp_path):
    store, partition = _store(sdxl, tmp_path / "store", 2)
    cond = _cond(sdxl, 3)
    kw = dict(steps=STEPS, guidance=3.0, sampler="euler_a", output="latents")
    dense = dp.sample(sdxl, cond, seed=0, **kw)
    zero = Schedule([0, 0], 2, 0, partition.steps_per_stage, partition=partition.to_dict())
    torch.testing.assert_close(dp.sample(sdxl, cond, seed=0, router=Router(sdxl, store, zero), **kw), dense,
                               rtol=0, atol=0)
    torch.testing.assert_close(dp.sample(sdxl, cond, seed=0, **kw), dense, rtol=0, atol=0)
    assert (dp.sample(sdxl, cond, seed=1, **kw) - dense).abs().max() > 1e-2
    images = dp.sample(sdxl, cond[:1], steps=2, sampler="ddim", guidance=1.0)
    assert images.shape == (1, 4, 8, 8) and 0 <= images.min() and images.max() <= 1


def test_null_condition_and_errors(sdxl):
    cond = _cond(sdxl, 2)
    null = sdxl.null_condition(cond)
    assert null.prompt_embeds.abs().max() == 0 and torch.equal(null.time_ids, cond.time_ids)
    neg = TextCondition(cond.prompt_embeds, cond.pooled_embeds, cond.time_ids,
                        cond.prompt_embeds + 1, cond.pooled_embeds + 1)
    assert torch.equal(sdxl.null_condition(neg).prompt_embeds, cond.prompt_embeds + 1)
    with pytest.raises(TypeError, match="TextCondition"):
        dp.sample(sdxl, [1, 2], steps=2)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        dp.sample(sdxl, TextCondition(torch.zeros(1, 5, 31), torch.zeros(1, 16), sdxl.default_time_ids(1)), steps=2)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        TextCondition(torch.zeros(2, 5, 32), torch.zeros(1, 16))
    with pytest.raises(ValueError, match="unknown sampler"):
        sdxl.make_scheduler("plms")


def test_macs_follow_slicing(sdxl):
    dense = dp.count_macs(sdxl)
    for g in sdxl.unit_groups():
        sdxl.install(g, sdxl.sliced_module(g, keep_from_order(torch.arange(g.size), g.removed_at(1, 2))))
    assert dp.count_macs(sdxl) < dense
    sdxl.restore_dense()
    assert dp.count_macs(sdxl) == dense


def test_sdxl_architecture_without_download():
    adapter = dp.load_denoiser("stabilityai/stable-diffusion-xl-base-1.0", weights=False, device="meta")
    heads = [g for g in adapter.unit_groups() if g.kind == "heads"]
    mlps = [g for g in adapter.unit_groups() if g.kind == "channels"]
    assert len(adapter.blocks()) == 70 and len(heads) == 140 and len(mlps) == 70
    assert sorted({g.size for g in heads}) == [10, 20] and {g.unit_width for g in heads} == {64}
    assert sum(g.size == 10 for g in heads) == 20 and sorted({g.size for g in mlps}) == [2560, 5120]
    assert adapter.default_levels() == 10 and adapter.default_levels("depth") == 70
    assert {g.removed_at(1, 10) for g in heads if g.size == 20} == {2}  # the same fraction in every attention
    assert adapter.latent_shape == (4, 128, 128) and adapter.denoiser.config.cross_attention_dim == 2048
    assert 2.56e9 < sum(p.numel() for p in adapter.denoiser.parameters()) < 2.58e9
    assert adapter.make_scheduler().__class__.__name__ == "EulerAncestralDiscreteScheduler"
