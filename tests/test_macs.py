import diffes_pl as dp
from diffes_pl.macs import install_uniform_width as _uniform_level


def test_dit_xl_macs_match_facts():
    """FACTS.md: 118.62 G per forward at batch 1; 20 steps 2.372 T dense, uniform level L of 16 below."""
    adapter = dp.load_denoiser("facebook/DiT-XL-2-256", weights=False, device="meta")
    dense = dp.count_macs(adapter, batch_size=1)
    assert abs(dense / 118.62e9 - 1) < 0.005
    assert abs(20 * dense / 2.372e12 - 1) < 0.005
    assert dp.count_macs(adapter, batch_size=2) == 2 * dense
    for level, tera in [(2, 2.077), (3, 1.929), (5, 1.633), (7, 1.337), (8, 1.189)]:
        _uniform_level(adapter, level, 16)
        assert abs(20 * dp.count_macs(adapter) / (tera * 1e12) - 1) < 0.005, level
    adapter.restore_dense()


def test_tiny_macs_by_hand(tiny):
    """Hand count of the built-in model: per block q,k,v,out + 2 MLP matmuls on 16 tokens, QKᵀ and AV."""
    d, tokens, mlp, blocks = 128, 16, 512, 6
    per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d
    per_block += 6 * d * d + (256 * d + d * d)  # adaLN-zero modulation + timestep MLP (per block in diffusers)
    # patch embed, final adaLN (its conditioning recomputes block 0's timestep MLP), final projection
    head = tokens * 1 * 4 * d + (256 * d + d * d) + 2 * d * d + tokens * d * 4
    assert dp.count_macs(tiny) == blocks * per_block + head
