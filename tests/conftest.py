import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """The built-in digits model (trained weights)."""
    import diffes_pl as dp

    return dp.load_denoiser("tiny-digits")


@pytest.fixture
def random_dit():
    """A tiny random DiTTransformer2DModel built from config: latent 4×8×8, learned sigma, 4 heads."""
    from diffusers import DiTTransformer2DModel

    from diffes_pl.denoisers import DiTAdapter

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=5,
                                  norm_num_groups=1)
    # ada_norm_zero starts at zero gates: randomize so that every unit matters.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return DiTAdapter(model, "random-dit")
