"""Structured OBS with weight compensation (heads and MLP channels as input-column groups).

`prune_groups` (the pure solver, testable on one nn.Linear) lives in obs_solver.py; the
`OBSPruner` gathers Hessians per stage and stores, for every level 1..H, the compensated
output-layer weight on the kept columns.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..denoisers.base import UnitGroup
from .base import Pruner
from .obs_solver import PruneResult, damp_hessian, prune_groups
from .stats import HessianStatistic

__all__ = ["OBSPruner", "PruneResult", "damp_hessian", "prune_groups", "timestep_weight"]


def timestep_weight(step_index: float, total: float, w_min: float = 0.1, w_max: float = 1.0) -> float:
    """OBS-Diff's log-decreasing weight: w_t = w_min + (w_max − w_min) · ln(T − t) / ln(T), with t = 0
    the FIRST sampling step (so early, high-noise steps weigh most)."""
    if total <= 1:
        return w_max
    return w_min + (w_max - w_min) * math.log(max(total - step_index, 1.0)) / math.log(total)


class OBSPruner(Pruner):
    """Structured Optimal Brain Surgeon: greedy removal of the head / channel whose loss
    w_Gᵀ (H⁻¹_GG)⁻¹ w_G is least, with the remaining weights updated to compensate."""

    name = "obs"
    compensated = True

    def __init__(self, damp: float = 0.01, mode: str = "fast", solver_dtype: str = "float64",
                 stat_dtype: str = "float64", store_dtype: str | None = None) -> None:
        """
        Args:
            damp: diagonal damping relative to the mean Hessian diagonal.
            mode: `fast` (batched, lazy updates) or `exact` (one group at a time, every weight updated).
            solver_dtype: `float64` (default) or `float32` for the OBS solver.
            stat_dtype: dtype of the accumulated Hessians.
            store_dtype: dtype of stored compensated weights (default: the denoiser's).
        """
        super().__init__(stat_dtype=stat_dtype, store_dtype=store_dtype)
        if mode not in ("fast", "exact"):
            raise ValueError(f"OBS mode must be 'fast' or 'exact', got {mode!r}")
        if damp < 0:
            raise ValueError(f"damp must be ≥ 0, got {damp}")
        self.save_hyperparameters()

    def make_statistic(self, group: UnitGroup, layer: nn.Linear) -> HessianStatistic:
        return HessianStatistic(group, layer.in_features, self.device, self.stat_dtype)

    def group_trajectory(self, group: UnitGroup, weight: Tensor, stat: HessianStatistic):
        milestones = self.milestones(group)
        results = prune_groups(weight, stat.hessian, group.unit_width, milestones, damp=self.hparams.damp,
                               dtype=getattr(torch, self.hparams.solver_dtype), mode=self.hparams.mode)
        deepest = max(results, key=lambda r: len(r.removed))
        order = torch.cat([deepest.removed, deepest.kept])  # never-removed units last, ascending
        weights = {level: r.weight for level, r in zip(range(1, self.levels_max + 1), results) if len(r.removed) > 0}
        return order, weights
