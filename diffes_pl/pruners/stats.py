"""Statistics gathered on output-layer inputs: the Hessian X·Xᵀ (OBS) and per-column ‖x‖² (Wanda,
activation). Each counts the tokens it has seen."""
from __future__ import annotations

import torch
from torch import Tensor

from ..denoisers.base import UnitGroup
from .base import Statistic, as_rows


class HessianStatistic(Statistic):
    """H = Σ x xᵀ over every token [in, in]; `tokens` is the normaliser."""

    def __init__(self, group: UnitGroup, in_features: int, device, dtype, weights=None) -> None:
        super().__init__(group, in_features, device, dtype)
        self.dtype = dtype
        self.weights = weights  # callable → per-sample weights [B] of the current batch, or None
        self.buffers = {"hessian": torch.zeros(in_features, in_features, device=device, dtype=dtype),
                        "tokens": torch.zeros((), device=device, dtype=dtype)}

    def add_batch(self, x: Tensor) -> None:
        rows = as_rows(x, self.dtype)  # [B·N, in]
        w = self.weights() if self.weights is not None else None
        if w is not None:  # Σ w_b x xᵀ: scale each sample's tokens by √w_b
            rows = rows * w.sqrt().repeat_interleave(rows.shape[0] // w.shape[0])[:, None]
        self.buffers["hessian"].addmm_(rows.T, rows)
        self.buffers["tokens"] += rows.shape[0]

    @property
    def hessian(self) -> Tensor:
        return self.buffers["hessian"] / self.buffers["tokens"].clamp_min(1)


class ColumnNormStatistic(Statistic):
    """Σ x_j² per input column [in] (‖X_j‖₂² over every token)."""

    def __init__(self, group: UnitGroup, in_features: int, device, dtype) -> None:
        super().__init__(group, in_features, device, dtype)
        self.dtype = dtype
        self.buffers = {"sq_norm": torch.zeros(in_features, device=device, dtype=dtype),
                        "tokens": torch.zeros((), device=device, dtype=dtype)}

    def add_batch(self, x: Tensor) -> None:
        rows = as_rows(x, self.dtype)
        self.buffers["sq_norm"] += rows.square().sum(dim=0)
        self.buffers["tokens"] += rows.shape[0]

    @property
    def norm(self) -> Tensor:
        """‖X_j‖₂ [in]."""
        return self.buffers["sq_norm"].sqrt()
