"""A small CNN trained on the digits training split: class accuracy and the feature network of digits-FID/IS."""
from __future__ import annotations

import torch
from torch import Tensor, nn

FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """Images [N, 1, 8, 8] in [-1, 1] → logits [N, 10]; `features` gives the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 64, 4, 4]
            nn.Conv2d(64, FEATURE_DIM, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # [N, 128]
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def load_digits_classifier(device: str | torch.device = "cpu") -> DigitsClassifier:
    """The committed classifier (diffes_pl/assets/digits_classifier.safetensors), in eval mode."""
    from safetensors.torch import load_file

    from ..denoisers.assets import asset_path

    model = DigitsClassifier()
    model.load_state_dict(load_file(asset_path("digits_classifier.safetensors")))
    return model.to(device).eval().requires_grad_(False)
