"""Slicing equals masking: a physically sliced forward equals the masked dense forward."""
import pytest
import torch

import diffes_pl as dp
from diffes_pl.denoisers import ConstantOutput, UnknownDenoiserError
from helpers.routing_reference import mask_units, mask_block


def _inputs(adapter, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *adapter.latent_shape), generator=g)
    t = torch.tensor([999, 500, 3])[:batch]
    y = torch.randint(0, adapter.num_classes, (batch,), generator=g)
    return x, t, y


def _random_keeps(adapter, seed=0):
    """For every unit group, a random kept set (sometimes empty, sometimes full)."""
    g = torch.Generator().manual_seed(seed)
    keeps = {}
    for i, group in enumerate(adapter.unit_groups()):
        k = [group.size // 2, 0, group.size, 1][i % 4]
        keeps[group.name] = torch.sort(torch.randperm(group.size, generator=g)[:k]).values
    return keeps


@pytest.mark.parametrize("which", ["random_dit", "tiny"])
def test_sliced_heads_and_channels_equal_masked(which, request):
    adapter = request.getfixturevalue(which)
    x, t, y = _inputs(adapter)
    keeps = _random_keeps(adapter)
    dense = adapter.predict_noise(x, t, y)
    handles = [mask_units(adapter, g, keeps[g.name]) for g in adapter.unit_groups()]
    masked = adapter.predict_noise(x, t, y)
    for h in handles:
        h.remove()
    for g in adapter.unit_groups():
        adapter.install(g, adapter.sliced_module(g, keeps[g.name]))
    sliced = adapter.predict_noise(x, t, y)
    n_params = sum(p.numel() for p in adapter.denoiser.parameters())
    adapter.restore_dense()
    assert adapter.is_dense()
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert (sliced - dense).abs().max() > 1e-3  # pruning changed the output
    torch.testing.assert_close(adapter.predict_noise(x, t, y), dense, rtol=0, atol=0)  # restored bit for bit
    assert n_params < sum(p.numel() for p in adapter.denoiser.parameters())  # physically smaller


@pytest.mark.parametrize("which", ["random_dit", "tiny"])
def test_skipped_blocks_equal_masked(which, request):
    adapter = request.getfixturevalue(which)
    x, t, y = _inputs(adapter)
    skip = [0, 2]  # block 0 too: the final layer reads block 0's conditioning embedding
    handles = [mask_block(adapter, i) for i in skip]
    masked = adapter.predict_noise(x, t, y)
    for h in handles:
        h.remove()
    for i in skip:
        adapter.install_block(i, adapter.skipped_block(i))
    sliced = adapter.predict_noise(x, t, y)
    adapter.restore_dense()
    torch.testing.assert_close(sliced, masked, rtol=1e-6, atol=1e-6)


def test_sliced_shapes_and_heads(random_dit):
    group = random_dit.unit_groups()[0]
    assert (group.kind, group.size, group.unit_width) == ("heads", 4, 8)
    attn = random_dit.sliced_module(group, torch.tensor([1, 3]))
    assert attn.heads == 2 and attn.to_q.weight.shape == (16, 32) and attn.to_out[0].weight.shape == (32, 16)
    dense = random_dit.dense_module(group)
    assert dense.heads == 4 and dense.to_q.weight.shape == (32, 32)  # the dense module is untouched
    assert attn.to_out[0].bias is dense.to_out[0].bias  # shared, not copied
    torch.testing.assert_close(attn.to_q.weight, torch.cat([dense.to_q.weight[8:16], dense.to_q.weight[24:32]]))
    ff = random_dit.unit_groups()[1]
    assert (ff.kind, ff.size) == ("channels", 128)
    assert isinstance(random_dit.sliced_module(ff, torch.tensor([], dtype=torch.long)), ConstantOutput)


def test_compensated_out_weight_is_used(random_dit):
    group = random_dit.unit_groups()[1]
    keep = torch.arange(0, 128, 2)
    w = torch.randn(32, 64)
    ff = random_dit.sliced_module(group, keep, out_weight=w)
    torch.testing.assert_close(ff.net[2].weight, w)
    with pytest.raises(ValueError, match="replacement weight has shape"):
        random_dit.sliced_module(group, keep, out_weight=torch.randn(32, 63))


def test_unit_groups_and_default_levels(tiny):
    groups = tiny.unit_groups()
    assert len(groups) == 12 and len(tiny.blocks()) == 6
    assert {g.size for g in groups if g.kind == "heads"} == {8}
    assert {g.size for g in groups if g.kind == "channels"} == {512}
    assert tiny.default_levels("width") == 8 and tiny.default_levels("depth") == 6


def test_dit_xl_architecture_without_download():
    adapter = dp.load_denoiser("facebook/DiT-XL-2-256", weights=False, device="meta")
    cfg = adapter.denoiser.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.out_channels) == (28, 16, 72, 8)
    assert adapter.latent_shape == (4, 32, 32)
    assert adapter.default_levels() == 16
    heads = [g for g in adapter.unit_groups() if g.kind == "heads"]
    mlps = [g for g in adapter.unit_groups() if g.kind == "channels"]
    assert len(heads) == 28 and heads[0].size == 16 and heads[0].unit_width == 72 and mlps[0].size == 4608
    n = sum(p.numel() for p in adapter.denoiser.parameters())
    # ~675 M parameters as DiT counts them: diffusers keeps a copy of the shared conditioning
    # embedding in every block; count it once
    emb = sum(p.numel() for p in adapter.denoiser.transformer_blocks[0].norm1.emb.parameters())
    assert 670e6 < n - 27 * emb < 680e6


def test_load_errors(tmp_path):
    with pytest.raises(UnknownDenoiserError, match="unknown denoiser 'nope'"):
        dp.load_denoiser("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dp.load_denoiser(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dp.load_denoiser(str(tmp_path))


def test_local_folder_loads_with_diffusers_code(tmp_path, random_dit):
    """The real loading code (from_pretrained) on a folder laid out like the hub's DiT repo."""
    random_dit.denoiser.save_pretrained(tmp_path / "transformer")
    adapter = dp.load_denoiser(str(tmp_path))
    x, t, y = _inputs(random_dit)
    torch.testing.assert_close(adapter.predict_noise(x, t, y), random_dit.predict_noise(x, t, y))
