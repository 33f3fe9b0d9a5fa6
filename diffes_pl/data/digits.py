"""scikit-learn's digits: 1,797 real handwritten 8×8 digits shipped inside scikit-learn (no download).

The split is fixed (stratified, seed 0) so that the built-in model, its classifier and digits-FID all
agree on which images were held out from training.
"""
from __future__ import annotations

import torch
from torch import Tensor

NUM_CLASSES = 10
HELD_OUT = 297  # ~1/6 of the set, stratified: real digits the built-in model never saw


def load_digits_split(split: str = "train") -> tuple[Tensor, Tensor]:
    """Images [N, 1, 8, 8] in [-1, 1] (float32) and labels [N] (int64) of the `train` or `test` split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0  # [N,1,8,8]
    labels = torch.tensor(data.target, dtype=torch.int64)
    if split == "all":
        return images, labels
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=HELD_OUT, stratify=labels.numpy(), random_state=0)
    pick = torch.as_tensor(train_idx if split == "train" else test_idx)
    return images[pick], labels[pick]
