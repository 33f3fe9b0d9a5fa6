"""FLUX adapter on a tiny random FluxTransformer2DModel: slicing equals masking (shared heads of the
double-stream blocks, both MLPs, single-stream heads and channels sliced alone and together,
blocks), flow-matching routed sampling equals masked sampling, level 0 is dense, the shipped config
builds the real FLUX.1-schnell transformer on the meta device."""
import pytest
import torch

import diffes_pl as dp
from diffes_pl.data.calibration import is_flow
from diffes_pl.denoisers import TextCondition
from diffes_pl.denoisers.flux import FluxAdapter, JointProjOut, pack_latents, unpack_latents
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from helpers.routing_reference import mask_block, dense_masked_routed, random_store, sliced_vs_masked

STEPS, STAGES = 4, 2


@pytest.fixture
def flux():
    """2 double + 2 single blocks, 4 heads of 8 (dim 32, MLP 128); latent 4×8×8 = 16 tokens of 16."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    with torch.no_grad():  # zero-initialised gates would hide slicing bugs
        for p in model.parameters():
            p.normal_(0, 0.2)
    return FluxAdapter(model, "tiny-flux", image_size=64, text_len=5)


def _cond(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 8, generator=g))


def _inputs(adapter, batch=3):
    x = torch.randn((batch, *adapter.latent_shape), generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([1000.0, 500.0, 250.0])[:batch], _cond(batch)


def _sliced_vs_masked(adapter, keeps):
    return sliced_vs_masked(adapter, keeps, *_inputs(adapter))


def test_structure_and_packing(flux):
    groups = flux.unit_groups()
    assert len(flux.blocks()) == 4 and len(groups) == 2 * 3 + 2 * 2
    assert [(g.attr, g.size, g.unit_width) for g in groups if g.block == 0] == [
        ("attn", 4, 8), ("ff", 128, 1), ("ff_context", 128, 1)]
    assert [(g.attr, g.size, g.unit_width) for g in groups if g.block == 3] == [("attn", 4, 8), ("proj_mlp", 128, 1)]
    assert flux.default_levels() == 4 and flux.latent_shape == (4, 8, 8)
    x = torch.randn(2, 4, 8, 8)
    assert pack_latents(x).shape == (2, 16, 16) and torch.equal(unpack_latents(pack_latents(x), 8, 8), x)


def test_all_groups_sliced_equal_masked(flux):
    g = torch.Generator().manual_seed(0)
    keeps = {grp.name: torch.sort(torch.randperm(grp.size, generator=g)[:[grp.size // 2, 1, 0, grp.size][i % 4]]).values
             for i, grp in enumerate(flux.unit_groups())}
    n_dense = sum(p.numel() for p in flux.denoiser.parameters())
    dense, masked, sliced = _sliced_vs_masked(flux, keeps)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert (sliced - dense).abs().max() > 1e-3
    for grp in flux.unit_groups():
        flux.install(grp, flux.sliced_module(grp, keeps[grp.name]))
    assert sum(p.numel() for p in flux.denoiser.parameters()) < n_dense  # physically smaller
    flux.restore_dense()


@pytest.mark.parametrize("which", ["heads", "channels", "both", "none-left"])
def test_single_block_heads_and_channels_compose(flux, which):
    heads, mlp = (g for g in flux.unit_groups() if g.block == 2)
    keeps = {"heads": {heads.name: torch.tensor([0, 3])},
             "channels": {mlp.name: torch.arange(0, 128, 3)},
             "both": {heads.name: torch.tensor([2]), mlp.name: torch.arange(5, 100)},
             "none-left": {heads.name: torch.tensor([], dtype=torch.long), mlp.name: torch.tensor([], dtype=torch.long)}}[which]
    dense, masked, sliced = _sliced_vs_masked(flux, keeps)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert (sliced - dense).abs().max() > 1e-3


def test_single_block_parts_and_taps(flux):
    heads, mlp = (g for g in flux.unit_groups() if g.block == 3)
    block = flux.dense_block(3)
    dense_out = block.proj_out
    part = flux.sliced_module(heads, torch.tensor([1, 2]))
    flux.install(heads, part)
    assert flux.module(heads) is part and block.attn.heads == 2 and block.attn.to_q.weight.shape == (16, 32)
    assert isinstance(block.proj_out, JointProjOut) and block.proj_out.bias is dense_out.bias
    torch.testing.assert_close(block.proj_out.attn_out.weight, dense_out.weight[:, 8:24])
    assert block.proj_out.mlp_out.weight.data_ptr() == dense_out.weight[:, 32:].data_ptr()  # a view, not a copy
    flux.install(heads, flux.dense_module(heads))
    assert block.proj_out is dense_out and flux.is_dense()
    # pruner statistics see each group's own columns of the shared proj_out
    seen = {}
    for g in (heads, mlp):
        tap = flux.output_layer(g)
        assert tap.weight.shape == (32, g.size * g.unit_width)
        tap.register_forward_pre_hook(lambda m, args, name=g.name: seen.update({name: args[0].shape[-1]}))
    flux.predict_noise(*_inputs(flux, 1))
    assert seen == {heads.name: 32, mlp.name: 128}
    w = torch.randn(32, 64)
    assert torch.equal(flux.sliced_module(mlp, torch.arange(64), out_weight=w).out.weight, w)  # compensated weight


def test_double_block_heads_slice_both_streams(flux):
    group = flux.unit_groups()[0]
    attn, dense = flux.sliced_module(group, torch.tensor([1, 3])), flux.dense_module(group)
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        torch.testing.assert_close(getattr(attn, name).weight, getattr(dense, name).weight[list(range(8, 16)) + list(range(24, 32))])
    assert attn.to_out[0].weight.shape == (32, 16) and attn.to_add_out.weight.shape == (32, 16)
    assert attn.norm_q is dense.norm_q and dense.to_q.weight.shape == (32, 32)


def test_skipped_blocks_equal_masked(flux):
    x, t, c = _inputs(flux)
    skip = [0, 3]  # one double-stream, one single-stream block
    handles = [mask_block(flux, i) for i in skip]
    masked = flux.predict_noise(x, t, c)
    for h in handles:
        h.remove()
    for i in skip:
        flux.install_block(i, flux.skipped_block(i))
    sliced = flux.predict_noise(x, t, c)
    flux.restore_dense()
    torch.testing.assert_close(sliced, masked, rtol=1e-6, atol=1e-6)


def _store(adapter, path, levels_max, depth=False):
    partition = StagePartition.from_scheduler(adapter.make_scheduler(), STEPS, STAGES)
    return random_store(adapter, path, levels_max, partition, depth=depth), partition


@pytest.mark.parametrize("depth", [False, True])
def test_flow_matching_routed_sampling_equals_masked(flux, tmp_path, depth):
    H = len(flux.blocks()) if depth else 4
    store, partition = _store(flux, tmp_path / "store", H, depth=depth)
    assert partition.timesteps == (1000.0, 750.0, 500.0, 250.0) and is_flow(flux.noise_schedule)
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    cond = _cond(2)
    dense, masked, routed = dense_masked_routed(flux, store, schedule, cond, steps=STEPS, guidance=1.0, seed=0,
                                                sampler="flow_euler")
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    assert (routed - dense).abs().max() > 1e-3
    assert flux.is_dense()


def test_level_zero_is_dense_and_sampling_is_deterministic(flux, tmp_path):
    store, partition = _store(flux, tmp_path / "store", 4)
    cond = _cond(3)
    kw = dict(steps=STEPS, guidance=1.0, sampler="flow_euler", output="latents")
    dense = dp.sample(flux, cond, seed=0, **kw)
    zero = Schedule([0, 0], 4, 0, partition.steps_per_stage, partition=partition.to_dict())
    torch.testing.assert_close(dp.sample(flux, cond, seed=0, router=Router(flux, store, zero), **kw), dense,
                               rtol=0, atol=0)
    torch.testing.assert_close(dp.sample(flux, cond, seed=0, **kw), dense, rtol=0, atol=0)
    torch.testing.assert_close(dp.sample(flux, cond, seed=0, batch_size=2, **kw), dense, rtol=1e-5, atol=1e-5)
    assert (dp.sample(flux, cond, seed=1, **kw) - dense).abs().max() > 1e-2
    # one flow-matching Euler step from pure noise: x ← x + (σ_next − σ) · v
    x = torch.randn(1, *flux.latent_shape, generator=torch.Generator().manual_seed(5))
    v = flux.predict_noise(x, torch.tensor([1000.0]), cond[:1])
    one = dp.sample(flux, cond[:1], steps=1, sampler="flow_euler", guidance=1.0, noise=x, output="latents")
    torch.testing.assert_close(one, x - v, rtol=1e-5, atol=1e-5)


def test_errors(flux):
    with pytest.raises(TypeError, match="TextCondition"):
        dp.sample(flux, [1], steps=2, sampler="flow_euler")
    with pytest.raises(ValueError, match="joint_attention_dim"):
        dp.sample(flux, TextCondition(torch.zeros(1, 5, 12), torch.zeros(1, 8)), steps=2, sampler="flow_euler")
    with pytest.raises(ValueError, match="flow_euler"):
        flux.make_scheduler("ddim")
    with pytest.raises(ValueError, match="even height and width"):
        flux.predict_noise(torch.zeros(1, 4, 7, 8), torch.tensor([500.0]), _cond(1))


def test_flux_schnell_architecture_without_download():
    adapter = dp.load_denoiser("black-forest-labs/FLUX.1-schnell", weights=False, device="meta")
    cfg = adapter.denoiser.config
    assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (19, 38, 24, 128)
    assert adapter.num_double == 19 and len(adapter.blocks()) == 57
    heads = [g for g in adapter.unit_groups() if g.kind == "heads"]
    assert len(heads) == 57 and {(g.size, g.unit_width) for g in heads} == {(24, 128)}
    assert {g.size for g in adapter.unit_groups() if g.kind == "channels"} == {12288}
    assert len(adapter.unit_groups()) == 19 * 3 + 38 * 2 and adapter.default_levels() == 24
    assert adapter.latent_shape == (16, 128, 128) and not cfg.guidance_embeds
    assert 11.8e9 < sum(p.numel() for p in adapter.denoiser.parameters()) < 12.0e9


def test_check_name_knows_the_new_names():
    from diffes_pl.denoisers import check_name

    assert str(check_name("stabilityai/stable-diffusion-xl-base-1.0")) == "sdxl-hub"
    assert str(check_name("black-forest-labs/FLUX.1-schnell")) == "flux-hub"
    with pytest.raises(dp.denoisers.UnknownDenoiserError, match="FLUX.1-schnell"):  # the message lists it
        check_name("flux-schnell")
