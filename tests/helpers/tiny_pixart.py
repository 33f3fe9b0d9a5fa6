"""A tiny PixArt-Σ for the tests: a random diffusers `PixArtTransformer2DModel` (ada_norm_single,
learned sigma, self- and cross-attention), a tiny T5 encoder + word-level tokenizer and a tiny VAE
(the conftest builders, passed in as the `text_models` fixture: conftest is not importable)."""
import torch

# 3 blocks, 4 heads of 8 (width 32, MLP 128), latent 4×8×8 (16 tokens of patch 2), out_channels 8
# (ε and σ), T5 width 16 projected to 32 by caption_projection, no micro-conditions (as PixArt-Σ).
TINY_PIXART = {"num_attention_heads": 4, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
               "num_layers": 3, "sample_size": 8, "patch_size": 2, "cross_attention_dim": 32, "caption_channels": 16,
               "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
               "norm_eps": 1e-6, "activation_fn": "gelu-approximate", "attention_bias": True,
               "use_additional_conditions": False}
TEXT_LEN = 10  # T5 tokens (PixArt-Σ: 300); the test prompts have 4–8, so every prompt has padding


def tiny_t5_encoders(text_models, text_len: int = TEXT_LEN):
    """TextEncoders of one tiny T5 (width 16) and its tokenizer, padded to `text_len` tokens."""
    from transformers import T5Config, T5EncoderModel

    from diffes_pl.denoisers.text import TextEncoders

    tok = text_models.tiny_tokenizer(text_len)
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                 pad_token_id=0, eos_token_id=2)).eval()
    return TextEncoders([tok], [t5], [text_len])


def build_tiny_pixart(text_models, vae: bool = True, text: bool = True, std: float = 0.2, **config):
    """PixArtAdapter on a tiny random PixArtTransformer2DModel (`TINY_PIXART`, overridden by `config`),
    a tiny VAE (16×16 images, scaling 0.13025 as PixArt-Σ's SDXL VAE) and the tiny T5."""
    from diffusers import PixArtTransformer2DModel

    from diffes_pl.denoisers.pixart import PixArtAdapter

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**{**TINY_PIXART, **config})
    with torch.no_grad():  # random gates and projections everywhere: every unit matters
        for p in model.parameters():
            p.normal_(0, std)
    return PixArtAdapter(model, "tiny-pixart", vae=text_models.tiny_vae(0.13025) if vae else None, text_len=TEXT_LEN,
                         text_encoders=tiny_t5_encoders(text_models) if text else None)
