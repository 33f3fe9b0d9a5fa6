"""Image-set metrics on feature tensors: FID and Inception Score through torchmetrics, improved
precision/recall (Kynkäänniemi et al. 2019) through torch-fidelity, SSIM against the dense model's samples.

Features are extracted ONCE per image set (`features.FeatureNetwork`) and shared by FID, IS and
precision/recall; real-image features are cached on disk. torchmetrics' FID / IS take a custom
`feature` nn.Module: `Precomputed` is the identity on already-extracted features, so the statistics
and the Fréchet distance / KL computation stay torchmetrics' own. `fid_images` runs torchmetrics on
images with any feature module (e.g. `DigitsFeatures`) directly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Precomputed(nn.Module):
    """torchmetrics feature module for features extracted beforehand: [N, D] → [N, D] (float64).

    `num_features` spares torchmetrics its dummy forward at construction."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features [N, {self.num_features}], got {list(features.shape)}")
        return features.double()


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to real [N, D] and fake [M, D] features (N, M ≥ 2)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def fid_images(fake: Tensor, real: Tensor, feature: nn.Module) -> float:
    """FID of image sets [N, C, H, W] in [0, 1] through torchmetrics with a custom feature module
    (it must take [N, C, H, W] in [0, 1] and have `num_features`, like `DigitsFeatures`)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def inception_score(logits: Tensor, splits: int = 1, seed: int = 0) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) ‖ p(y))) of class logits [N, K]: (mean, std over splits).

    torchmetrics shuffles the set before splitting with the global RNG; the shuffle is seeded here
    (and the global RNG left untouched) so that the score is reproducible."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        # "will save all extracted features" (they are in memory already); std of a single split
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits)
        metric.update(logits)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake [M, D] vs real [N, D] features.

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour. Precision: share of fake points inside the real manifold;
    recall: share of real points inside the fake manifold. Both sets need more than k points.

    Computed by torch-fidelity's `prc` on the features (its memory-saving variant: distance blocks of
    `chunk` rows, never the whole [M, N] matrix), in float64."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} real and fake samples "
                         f"(got {len(real)} and {len(fake)}); sample more images")
    # torch-fidelity's convention: input 1 is generated, input 2 real
    out = prc_features_to_metric(fake.double(), real.double(), prc_neighborhood=int(k), prc_batch_size=int(chunk),
                                 save_cpu_ram=True, verbose=False)
    # torch-fidelity averages the 0/1 memberships in float32: the share is recovered exactly as
    # count / size (a float32 mean of fewer than 2^24 flags is within 1e-7 of it, far below 1 / (2 size))
    return (round(out["precision"] * len(fake)) / len(fake), round(out["recall"] * len(real)) / len(real))


def ssim(images: Tensor, reference: Tensor) -> float:
    """Mean SSIM of images [N, C, H, W] in [0, 1] against the reference images from the same seeds
    (the dense model's); the Gaussian window shrinks to fit small images (odd, ≤ side)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if images.shape != reference.shape:
        raise ValueError(f"SSIM needs images from the same seeds: shapes {list(images.shape)} vs {list(reference.shape)}")
    side = min(images.shape[-2:])
    kernel = min(11, side - (1 - side % 2))
    return float(structural_similarity_index_measure(images.float(), reference.float(), data_range=1.0,
                                                     kernel_size=kernel))
