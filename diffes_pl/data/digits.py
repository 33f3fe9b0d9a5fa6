"""scikit-learn's digits: 1,797 real handwritten 8×8 digits shipped inside scikit-learn (no download).

The split is fixed (stratified, seed 0) so that the built-in model, its classifier and digits-FID all
agree on which images were held out from training.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NUM_CLASSES = 10
HELD_OUT = 297  # ~1/6 of the set, stratified: real digits the built-in model never saw


def _split_indices(labels: Tensor, split: str) -> Tensor | None:
    """Row indices of `split` (None for `all`): stratified, seed 0, `HELD_OUT` test rows."""
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")
    if split == "all":
        return None
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=HELD_OUT, stratify=labels.numpy(), random_state=0)
    return torch.as_tensor(train_idx if split == "train" else test_idx)


def _raw_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: intensities 0..16 [N, 8, 8] float32 and labels [N] int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64)


def load_digits_split(split: str = "train") -> tuple[Tensor, Tensor]:
    """Images [N, 1, 8, 8] in [-1, 1] (float32) and labels [N] (int64) of the `train` or `test` split."""
    raw, labels = _raw_digits()
    pick = _split_indices(labels, split)
    images = raw.unsqueeze(1) / 16.0 * 2.0 - 1.0  # [N,1,8,8]
    return (images, labels) if pick is None else (images[pick], labels[pick])


def digits_dataset(split: str = "train") -> Any:
    """The digits of `split` as a Hugging Face `datasets.Dataset` built in memory (no download), so
    that calibration reads them as it reads ImageNet or COCO: an `image` column (datasets.Image,
    8×8 grayscale) and a `label` column (ClassLabel 0..9), rows in `load_digits_split`'s order.

    The images are PIL mode "F" (32-bit float, stored losslessly as TIFF by datasets) holding
    k · 255/16 for intensity k = 0..16: on the usual 0..255 scale, so the shared preprocessing
    (p / 127.5 − 1) gives exactly k/8 − 1, the values `load_digits_split` gives. An 8-bit "L" image
    cannot: 255·k/16 is not an integer, and rounding would change the calibration (and the demo's
    schedule)."""
    import datasets
    from PIL import Image

    raw, labels = _raw_digits()
    pick = _split_indices(labels, split)
    if pick is not None:
        raw, labels = raw[pick], labels[pick]
    pixels = (raw * (255.0 / 16.0)).numpy()  # exact: 255·k/16 is a dyadic rational
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(NUM_CLASSES)])})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": labels.tolist()},
                                      features=features, split=split)
