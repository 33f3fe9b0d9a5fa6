"""Tiny SD3 (diffusers `SD3Transformer2DModel`) models for the SD3 tests, built offline from config with the
real classes: the transformer, a 16-channel VAE, CLIP-L + CLIP-G (`CLIPTextModelWithProjection`) and T5
encoders with conftest's word-level tokenizers, diffusers' own pipeline around them, and a local
`StableDiffusion3Pipeline` folder writer.

(conftest.py is not importable under --import-mode=importlib; tests/ is on the path, so the tests
import this as `helpers.tiny_sd3`.)"""
import json

import torch

CLIP_TOKENS, T5_TOKENS = 8, 6  # prompt embeddings: 8 CLIP + 6 T5 tokens


def tiny_t5(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=2, pad_token_id=0, eos_token_id=2)).eval()


def tiny_sd3_vae():
    """16 latent channels (SD3's), downsampling 2, sample_size 16 (a latent 16×8×8 is a 16×16 image),
    SD3's scaling 1.5305 and shift 0.0609."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=16,
                         sample_size=16, norm_num_groups=2, layers_per_block=1, scaling_factor=1.5305,
                         shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()


def tiny_sd3_encoders(text_models):
    """CLIP-L (hidden 8, projection 8) + CLIP-G (16, 16) — conftest's tiny CLIPTextModelWithProjection, 8
    positions — + T5 (32), with conftest's word-level tokenizers: prompt embeddings [B, 8 + 6, 32] (CLIP
    8 + 16 = 24 zero-padded to 32), pooled [B, 8 + 16]."""
    from diffes_pl.denoisers.text import TextEncoders

    tokenizers = [text_models.tiny_tokenizer(n) for n in (CLIP_TOKENS, CLIP_TOKENS, T5_TOKENS)]
    encoders = [text_models.tiny_clip(8, 8), text_models.tiny_clip(16, 16), tiny_t5(len(tokenizers[2]), 32)]
    return TextEncoders(tokenizers, encoders, [CLIP_TOKENS, CLIP_TOKENS, T5_TOKENS])


def build_tiny_sd3(text_models, dual: bool = False, vae: bool = True, text: bool = True, std: float = 0.1,
                   layers: int = 3):
    """SD3Adapter on a tiny random SD3Transformer2DModel: `layers` joint blocks (the last one
    context_pre_only), 4 heads of 8 (dim 32, MLP 128), latent 16×8×8 (16 tokens of 2×2 patches),
    joint_attention_dim 32, pooled 24. `dual`: SD3.5-Medium's kind — attn2 in blocks 0 and 1 and qk
    RMSNorm. `text_models`: conftest's fixture of tiny builders."""
    from diffusers import SD3Transformer2DModel

    from diffes_pl.denoisers.sd3 import SD3Adapter

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=24, out_channels=16, pos_embed_max_size=8,
                                  dual_attention_layers=(0, 1) if dual else (), qk_norm="rms_norm" if dual else None)
    with torch.no_grad():  # zero-initialised adaLN gates would hide slicing bugs
        for p in model.parameters():
            p.normal_(0, std)
    return SD3Adapter(model, "tiny-sd3-dual" if dual else "tiny-sd3", vae=tiny_sd3_vae() if vae else None,
                      image_size=None if vae else 64, text_len=T5_TOKENS,
                      text_encoders=tiny_sd3_encoders(text_models) if text else None)


def pipeline(adapter):
    """diffusers' own StableDiffusion3Pipeline around the adapter's transformer, VAE and encoders."""
    from diffusers import StableDiffusion3Pipeline

    enc = adapter.text_encoders()
    pipe = StableDiffusion3Pipeline(transformer=adapter.denoiser, scheduler=adapter.make_scheduler(), vae=adapter.vae,
                                    text_encoder=enc.encoders[0], tokenizer=enc.tokenizers[0],
                                    text_encoder_2=enc.encoders[1], tokenizer_2=enc.tokenizers[1],
                                    text_encoder_3=enc.encoders[2], tokenizer_3=enc.tokenizers[2])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sd3_folder(adapter, root):
    """`adapter` as a local diffusers StableDiffusion3Pipeline folder (written by the pipeline itself)."""
    pipeline(adapter).save_pretrained(root, safe_serialization=True)
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    return root
