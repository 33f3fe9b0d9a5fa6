"""digits-FID / IS: torchmetrics' FID and Inception Score with the digits classifier as feature network."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .digits_classifier import FEATURE_DIM, load_digits_classifier


class DigitsFeatures(nn.Module):
    """torchmetrics feature module: images [N, 1, 8, 8] in [0, 1] (FID/IS `normalize=True`) → features.

    `logits=True` returns class logits (for the Inception Score) instead of the 128-d features."""

    def __init__(self, logits: bool = False) -> None:
        super().__init__()
        self.classifier = load_digits_classifier()
        self.logits = logits
        self.num_features = 10 if logits else FEATURE_DIM

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.dtype == torch.uint8 or x.max() > 1.5:  # uint8 in [0, 255]
            x = x / 255.0
        x = x * 2 - 1  # the classifier sees [-1, 1]
        return (self.classifier(x) if self.logits else self.classifier.features(x)).double()


def digits_fid(fake: Tensor, real: Tensor) -> float:
    """FID between two image sets [N, 1, 8, 8] in [0, 1] in digits-classifier feature space."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=DigitsFeatures(), normalize=True, input_img_size=(1, 8, 8))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


class DigitsFID:
    """digits-FID of many fake sets against ONE real set, as a fitness needs it: the real digits are
    featurised once (torchmetrics' `reset_real_features=False` keeps their statistics through
    `reset()`), each call resets and accumulates the fake set only. Same value as `digits_fid`."""

    def __init__(self, real: Tensor) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=DigitsFeatures(), normalize=True, input_img_size=(1, 8, 8),
                                               reset_real_features=False)
        self.metric.update(real, real=True)

    def __call__(self, fake: Tensor) -> float:
        self.metric.reset()  # fake statistics only
        self.metric.to(fake.device)
        self.metric.update(fake, real=False)
        return float(self.metric.compute())


class DigitsKID:
    """KID of many fake sets against ONE real set, as a fitness needs it: `kid_unbiased` (torchmetrics'
    kernel, all rows) of the digits classifier's features standardised by the real set's
    per-dimension mean and std (`intervals.standardise`: why). The real features are extracted once."""

    def __init__(self, real: Tensor) -> None:
        self.features = DigitsFeatures().eval()
        with torch.no_grad():
            self.real_raw = self.features(real.float().cpu())  # [N, 128]

    @torch.no_grad()
    def __call__(self, fake: Tensor) -> float:
        from .intervals import kid_unbiased, standardise

        return kid_unbiased(*standardise(self.real_raw, self.features(fake.float().cpu())))


@torch.no_grad()
def class_hits(images: Tensor, labels: Tensor) -> Tensor:
    """[N] 1.0 where the digits classifier reads image [1, 8, 8] (in [0, 1]) as its conditioning label."""
    clf = load_digits_classifier(images.device)
    return (clf(images * 2 - 1).argmax(dim=1) == labels.to(images.device)).float()


@torch.no_grad()
def label_probability(images: Tensor, labels: Tensor) -> Tensor:
    """[N] the digits classifier's softmax probability of each image's conditioning label (images
    [N, 1, 8, 8] in [0, 1])."""
    clf = load_digits_classifier(images.device)
    probabilities = clf(images * 2 - 1).softmax(dim=1)  # [N, 10]
    return probabilities.gather(1, labels.to(images.device).long().view(-1, 1)).squeeze(1)


def class_accuracy(images: Tensor, labels: Tensor) -> float:
    """Share of images [N, 1, 8, 8] in [0, 1] the digits classifier reads as their conditioning label."""
    return float(class_hits(images, labels).mean())
