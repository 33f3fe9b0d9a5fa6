"""The built-in model: a class-conditional tiny DiT (diffusers `DiTTransformer2DModel`) trained by
`scripts/train_tiny.py` on scikit-learn's digits, pixel space 8×8×1, ε-prediction, linear betas.

6 blocks, 8 heads of 16 (hidden 128), MLP 512, patch 2 (16 tokens), 10 classes + the null class 10.
Weights are committed in fp16 (diffes_pl/assets/tiny_digits.safetensors) and loaded as fp32.
"""
from __future__ import annotations

import json

from diffusers import DiTTransformer2DModel

from .assets import asset_path
from .base import EvaluationReference
from .dit_adapter import DiTAdapter
from .registry import Family, register

NAME = "tiny-digits"
WEIGHTS = "tiny_digits.safetensors"
CONFIG = "tiny_digits_config.json"
# The noise schedule it was trained with (DiT's): linear betas over 1000 steps.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
# What its samples are evaluated against: the held-out real digits, through the committed digits
# classifier (which also scores class accuracy and digits-FID). No download.
REFERENCE = EvaluationReference("digits-test", feature_network="digits", metrics=("class_accuracy", "digits_fid"))


def build_tiny_dit(weights: bool = True) -> DiTTransformer2DModel:
    """The built-in denoiser, with its committed weights (or random ones for `weights=False`)."""
    config = json.loads(asset_path(CONFIG).read_text())
    config.pop("_class_name", None)
    model = DiTTransformer2DModel(**config)
    if weights:
        from safetensors.torch import load_file

        path = asset_path(WEIGHTS)
        if not path.exists():
            raise FileNotFoundError(
                f"built-in weights {path} are missing; regenerate them with `python scripts/train_tiny.py`"
            )
        state = {k: v.float() for k, v in load_file(path).items()}
        model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def load_builtin(family: Family, name: str, weights: bool, device, dtype=None) -> DiTAdapter:
    """The built-in model's adapter: a DiTAdapter (its `family` stays "dit", the key its stores were
    written under) over the built-in DiT with its own noise schedule."""
    adapter = DiTAdapter(build_tiny_dit(weights=weights), NAME, vae=None, noise_schedule=SCHEDULER_CONFIG)
    adapter.evaluation_reference = REFERENCE
    return adapter


register(Family("tiny", DiTAdapter, "DiTTransformer2DModel", "DiTPipeline", "transformer", {NAME: CONFIG},
                load_builtin=load_builtin, builtin=True, title=NAME))
