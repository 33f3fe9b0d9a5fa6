"""Pruners that store orders only (no compensation): Wanda, magnitude and activation.

Every score lives on the output-side layer's INPUT columns — that is where heads (head_dim columns
each) and MLP channels (one column each) are; summing over output rows, as the paper's released
DiT code did, has no head structure.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..denoisers.base import UnitGroup
from .base import Pruner, Statistic, order_by_score, unit_scores
from .stats import ColumnNormStatistic


class WandaPruner(Pruner):
    """Wanda: unit score Σ_{i, j∈unit} |W_ij| · ‖X_j‖₂ (lowest removed first)."""

    name = "wanda"

    def __init__(self, stat_dtype: str = "float64") -> None:
        """
        Args:
            stat_dtype: dtype of the accumulated column norms.
        """
        super().__init__(stat_dtype=stat_dtype)
        self.save_hyperparameters()

    def make_statistic(self, group: UnitGroup, layer: nn.Linear) -> Statistic:
        return ColumnNormStatistic(group, layer.in_features, self.device, self.stat_dtype)

    def group_trajectory(self, group: UnitGroup, weight: Tensor, stat: ColumnNormStatistic):
        columns = (weight.abs().to(stat.norm.dtype) * stat.norm[None, :]).sum(dim=0)  # [in]
        return order_by_score(unit_scores(group, columns)), {}


class ActivationPruner(WandaPruner):
    """Activation: unit score Σ_{j∈unit} ‖X_j‖₂ — how much signal reaches the output projection."""

    name = "activation"

    def group_trajectory(self, group: UnitGroup, weight: Tensor, stat: ColumnNormStatistic):
        return order_by_score(unit_scores(group, stat.norm)), {}


class MagnitudePruner(Pruner):
    """Magnitude: unit score ‖W_{:, unit}‖₂ (data-free; every stage gets the same order)."""

    name = "magnitude"

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()

    def make_statistic(self, group: UnitGroup, layer: nn.Linear) -> Statistic:
        return Statistic(group, layer.in_features, self.device, self.stat_dtype)

    def group_trajectory(self, group: UnitGroup, weight: Tensor, stat: Statistic):
        columns = weight.to(torch.float64).square().sum(dim=0)  # [in]
        return order_by_score(unit_scores(group, columns).sqrt()), {}
