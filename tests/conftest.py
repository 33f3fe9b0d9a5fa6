import os
import socket

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


def build_random_dit(num_classes: int = 5, vae=None):
    """DiTAdapter on a tiny random DiTTransformer2DModel built from config: latent 4×8×8, learned
    sigma, 4 heads, `num_classes` labels (+ the null class)."""
    from diffusers import DiTTransformer2DModel

    from diffes_pl.denoisers import DiTAdapter

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes,
                                  norm_num_groups=1)
    # ada_norm_zero starts at zero gates: randomize so that every unit matters.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return DiTAdapter(model, "random-dit", vae=vae)


@pytest.fixture
def random_dit():
    return build_random_dit()


# --- tiny text-to-image models (SDXL UNet, FLUX transformer) with tiny VAEs and text encoders --------
WORDS = "a an the of on in with cat dog bird man woman red blue green photo sits stands runs table street".split()


def tiny_tokenizer(max_length: int):
    """A word-level tokenizer built offline ([PAD] 0, [UNK] 1, [EOS] 2 appended, then the words)."""
    from diffes_pl.denoisers.text import word_tokenizer

    return word_tokenizer(WORDS, max_length)


def _clip(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, projection_dim=projection or hidden,
                         pad_token_id=0, bos_token_id=0, eos_token_id=2)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_vae(scaling_factor: float, shift_factor: float | None = None, force_upcast: bool = True):
    """3 → 4 channels, downsampling 2, sample_size 16 (so a latent 4×8×8 is a 16×16 image)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         sample_size=16, norm_num_groups=2, layers_per_block=1, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, force_upcast=force_upcast).eval()


def build_tiny_sdxl(vae: bool = True, text: bool = True, std: float = 0.1):
    """SDXLAdapter on a tiny random UNet2DConditionModel (latent 4×8×8, 11 transformer blocks, attention
    of 2 and 4 heads of 16, cross-attention 32, pooled 16), a tiny VAE (16×16 images, scaling 0.13025)
    and two tiny CLIP text encoders (hidden 16 + 16 = 32, projected pooled 16, 8 tokens)."""
    from diffusers import UNet2DConditionModel

    from diffes_pl.denoisers.sdxl import SDXLAdapter
    from diffes_pl.denoisers.text import TextEncoders

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), cross_attention_dim=32, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16, use_linear_projection=True,
        norm_num_groups=8)
    with torch.no_grad():  # zero-initialised output layers would hide pruning differences
        for p in unet.parameters():
            p.normal_(0, std)
    encoders = None
    if text:
        encoders = TextEncoders([tiny_tokenizer(8), tiny_tokenizer(8)], [_clip(16), _clip(16, projection=16)], [8, 8])
    return SDXLAdapter(unet, "tiny-sdxl", vae=tiny_vae(0.13025) if vae else None, text_encoders=encoders,
                       image_size=None if vae else 64)


def build_tiny_flux(vae: bool = True, text: bool = True):
    """FluxAdapter on a tiny random FluxTransformer2DModel (2 double + 2 single blocks, 4 heads of 8,
    latent 4×8×8), a tiny VAE (shift 0.1159, scale 0.3611) and tiny CLIP (pooled 8) + T5 (16) encoders
    with 6 T5 tokens."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from diffes_pl.denoisers.flux import FluxAdapter
    from diffes_pl.denoisers.text import TextEncoders

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    encoders = None
    if text:
        t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                     num_heads=2, pad_token_id=0, eos_token_id=2)).eval()
        encoders = TextEncoders([tiny_tokenizer(8), tiny_tokenizer(6)], [_clip(8), t5], [8, 6])
    return FluxAdapter(model, "tiny-flux", vae=tiny_vae(0.3611, 0.1159, force_upcast=False) if vae else None,
                       image_size=None if vae else 64, text_len=6, text_encoders=encoders)


def save_pipeline_folder(adapter, root, pipeline: str):
    """Writes `adapter` as a local diffusers pipeline folder (denoiser, vae, text encoders, tokenizers)."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    sub = "unet" if pipeline == "StableDiffusionXLPipeline" else "transformer"
    adapter.denoiser.save_pretrained(root / sub)
    adapter.vae.save_pretrained(root / "vae")
    enc = adapter.text_encoders()
    for (tok_dir, enc_dir), tok, model in zip((("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
                                              enc.tokenizers, enc.encoders):
        tok.save_pretrained(root / tok_dir)
        model.save_pretrained(root / enc_dir)
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return root


def write_caption_folder(root, captions, size=(20, 24), column="text"):
    """An imagefolder of random PNGs with metadata.jsonl giving each image's caption(s) in `column`."""
    import json

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(captions):
        w, h = size if i % 2 == 0 else size[::-1]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", column: caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


CAPTIONS = ["a red cat sits on the table", "a dog runs in the street", "a photo of a blue bird",
            "a man with a green dog", "the woman stands on the street", "a cat on a blue table"]


@pytest.fixture
def tiny_sdxl():
    return build_tiny_sdxl()


@pytest.fixture
def tiny_flux():
    return build_tiny_flux()


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory):
    return write_caption_folder(tmp_path_factory.mktemp("coco") / "images", CAPTIONS)


@pytest.fixture(scope="session")
def text_models():
    """The builders above, for tests that need several models or folders (conftest is not importable
    under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(build_tiny_sdxl=build_tiny_sdxl, build_tiny_flux=build_tiny_flux, tiny_vae=tiny_vae,
                           build_random_dit=build_random_dit,
                           tiny_tokenizer=tiny_tokenizer, tiny_clip=_clip, save_pipeline_folder=save_pipeline_folder,
                           write_caption_folder=write_caption_folder, CAPTIONS=CAPTIONS)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models on a shared, busy 2-core machine run far faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache in the test's own folder: nothing is read from or left in the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: what runs under it must work offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def log_handlers_on_this_tests_stderr():
    """Logging handlers made during an earlier test (Lightning's, when the CLI first ran in-process)
    hold that test's captured stderr, closed since: every in-process CLI call would print a
    'Logging error' traceback. Point them at this test's stderr."""
    import logging
    import sys

    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for handler in (h for logger in loggers for h in logger.handlers):
        if type(handler) is logging.StreamHandler and handler.stream is not sys.stdout:
            handler.stream = sys.stderr  # (setStream would flush the closed one)
