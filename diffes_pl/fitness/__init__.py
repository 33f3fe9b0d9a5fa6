"""Fitness metrics: a schedule's score from the images (or latents) it generates on fixed probes.

Reference metrics compare with the dense model's output on the same probes (SSIM, PSNR, latent
MSE: no downloads). No-reference metrics score the images alone (TOPIQ-NR, CLIP-IQA via pyiqa; their
weights must be in pyiqa's cache, see fitness/iqa.py). For the built-in model: class accuracy, the
classifier's confidence in the label (alone and times SSIM), digits-FID and digits-KID (alone and
subtracted from SSIM). A user callable is named as
`package.module:function` and receives a `FitnessInputs`.
"""
from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from .metric import FitnessInputs, Metric


def _ssim(x: FitnessInputs, reduction: str = "elementwise_mean") -> Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    kernel = min(11, x.images.shape[-1] - (1 - x.images.shape[-1] % 2))  # odd, ≤ image side
    return structural_similarity_index_measure(x.images.float(), x.reference_images.float(), data_range=1.0,
                                               kernel_size=kernel, reduction=reduction)


def _ssim_per_probe(x: FitnessInputs) -> Tensor:
    return _ssim(x, reduction="none")  # [P]; their mean is the SSIM


def _psnr(x: FitnessInputs) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(x.images.float(), x.reference_images.float(), data_range=1.0)


def _per_probe_mse(a: Tensor, b: Tensor) -> Tensor:
    return ((a.float() - b.float()) ** 2).flatten(1).mean(dim=1)  # [P]


def _negative_image_mse(x: FitnessInputs) -> Tensor:
    # PSNR = 10 log10(1 / mean MSE) over all pixels: the mean of −MSE per probe orders schedules as PSNR does
    return -_per_probe_mse(x.images, x.reference_images)


def _latent_mse(x: FitnessInputs) -> float:
    return torch.mean((x.latents.float() - x.reference_latents.float()) ** 2)


def _negative_latent_mse(x: FitnessInputs) -> Tensor:
    return -_per_probe_mse(x.latents, x.reference_latents)


def _class_accuracy(x: FitnessInputs) -> float:
    from ..evaluation.digits_features import class_accuracy

    return class_accuracy(x.images, x.conditions)


def _class_hits(x: FitnessInputs) -> Tensor:
    from ..evaluation.digits_features import class_hits

    return class_hits(x.images, x.conditions)


def _label_probability(x: FitnessInputs) -> Tensor:
    from ..evaluation.digits_features import label_probability

    return label_probability(x.images, x.conditions)  # [P]


def _ssim_times_label_probability(x: FitnessInputs) -> Tensor:
    return _ssim_per_probe(x).double() * _label_probability(x).double().to(x.images.device)  # [P]


@functools.lru_cache(maxsize=None)
def _against_training_digits(statistic: str):
    """digits-FID ("fid") or digits-KID ("kid") against the training digits — never the held-out ones
    the benchmarks report on — built once per process (the real features extracted once)."""
    from ..data.digits import load_digits_split
    from ..evaluation.digits_features import DigitsFID, DigitsKID

    real, _ = load_digits_split("train")
    return {"fid": DigitsFID, "kid": DigitsKID}[statistic]((real + 1) / 2)


def _digits_fid(x: FitnessInputs) -> float:
    return _against_training_digits("fid")(x.images)


def _digits_kid(x: FitnessInputs) -> float:
    return _against_training_digits("kid")(x.images)


def _ssim_minus_kid(x: FitnessInputs) -> float:
    # both in comparable units on the built-in model: SSIM spans ≈ 0.03 between pruned schedules,
    # KID (standardised features) ≈ 0.01–0.07
    return float(_ssim(x)) - _digits_kid(x)


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("ssim", _ssim, True, _ssim_per_probe),
    Metric("psnr", _psnr, True, _negative_image_mse),
    Metric("latent_mse", _latent_mse, False, _negative_latent_mse),
    Metric("class_accuracy", _class_accuracy, True, _class_hits),
    Metric("digits_fid", _digits_fid, False),
    # distribution-aware: KID of the probes' digits against the training digits, alone and subtracted
    # from SSIM (set-level, so not raceable)
    Metric("digits_kid", _digits_kid, False),
    Metric("ssim_minus_kid", _ssim_minus_kid, True),
    # no-reference (a stand-in for CLIP-IQA / TOPIQ on the built-in model): the digits classifier's
    # probability of each probe's conditioning label, and that times the probe's SSIM vs dense
    Metric("class_confidence", lambda x: _label_probability(x).mean(), True, _label_probability),
    Metric("ssim_confidence", lambda x: _ssim_times_label_probability(x).mean(), True, _ssim_times_label_probability),
]}
IQA = {"topiq": ("topiq_nr", True), "clipiqa": ("clipiqa", True)}


def get_metric(name: str) -> Metric:
    """A metric by name, or a user callable `module:function` (higher is better unless the name is
    prefixed with `-`, e.g. `-mypkg.metrics:distortion`)."""
    if name in METRICS:
        return METRICS[name]
    if name in IQA:
        from .iqa import iqa_metric

        return iqa_metric(name, *IQA[name])
    if ":" in name:
        lower = name.startswith("-")
        module, _, attr = name.lstrip("-").partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"fitness metric {name!r}: cannot import {module}:{attr} ({err})") from None
        return Metric(name, fn, not lower)
    raise ValueError(f"unknown fitness metric {name!r}; choose one of {sorted(METRICS) + sorted(IQA)} "
                     "or give a callable as `package.module:function`")
