"""Structured OBS with weight compensation (heads and MLP channels as input-column groups).

`prune_groups` (the pure solver, testable on one nn.Linear) lives in obs_solver.py; the
`OBSPruner` gathers Hessians per stage and stores, for every level 1..H, the compensated
output-layer weight on the kept columns.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from ..denoisers.base import UnitGroup, keep_from_order
from .base import Pruner
from .obs_solver import PruneResult, damp_hessian, prune_groups, solve_threads
from .stats import HessianStatistic

__all__ = ["OBSPruner", "PruneResult", "damp_hessian", "prune_groups", "solve_summary", "timestep_weight"]


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
                 stat_dtype: str = "float64", store_dtype: str | None = None, timestep_weighting: bool = False,
                 w_min: float = 0.1, w_max: float = 1.0, sequential_groups: int = 1,
                 sequential_level: int | None = None) -> None:
        """
        Args:
            damp: diagonal damping relative to the mean Hessian diagonal.
            mode: `fast` (batched, lazy updates) or `exact` (one group at a time, every weight updated).
            solver_dtype: `float64` (default) or `float32` for the OBS solver.
            stat_dtype: dtype of the accumulated Hessians.
            store_dtype: dtype of stored compensated weights (default: the denoiser's).
            timestep_weighting: weight every calibration sample's contribution to the Hessian by
                OBS-Diff's log-decreasing w_t (early, high-noise steps weigh most). Off by default.
            w_min: the smallest timestep weight w_t (the last, low-noise step; with timestep_weighting).
            w_max: the largest timestep weight w_t (the first, high-noise step; with timestep_weighting).
            sequential_groups: K > 1 calibrates the blocks in K contiguous groups in turn, each
                group's Hessians gathered with the earlier groups already pruned at
                `sequential_level` (OBS-Diff's group-wise sequential calibration). 1: all at once.
            sequential_level: the level the earlier groups are pruned at (the run's target level;
                required when sequential_groups > 1). Use with `num_stages: 1` and
                `timestep_weighting: true` for the OBS-Diff baseline (configs/*_obsdiff.yaml).
        """
        super().__init__(stat_dtype=stat_dtype, store_dtype=store_dtype)
        if mode not in ("fast", "exact"):
            raise ValueError(f"OBS mode must be 'fast' or 'exact', got {mode!r}")
        if damp < 0:
            raise ValueError(f"damp must be ≥ 0, got {damp}")
        if sequential_groups < 1:
            raise ValueError(f"sequential_groups must be ≥ 1, got {sequential_groups}")
        if sequential_groups > 1 and (sequential_level is None or sequential_level < 1):
            raise ValueError("sequential_groups > 1 needs sequential_level ≥ 1: the level at which earlier block "
                             "groups are pruned while later ones are calibrated (set it to the run's target_level)")
        self.passes = sequential_groups
        self.save_hyperparameters()

    def make_statistic(self, group: UnitGroup, layer: nn.Linear) -> HessianStatistic:
        return HessianStatistic(group, layer.in_features, self.device, self.stat_dtype, weights=self._sample_weights)

    def _sample_weights(self) -> Tensor | None:
        return getattr(self, "_batch_weights", None)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        if self.hparams.timestep_weighting:
            # the native timestep's position along the trajectory: t = 0 at the first sampling step
            T = float(self.adapter.noise_schedule.get("num_train_timesteps", 1000))
            position = (T - 1 - batch["timesteps"].double().cpu()) / (T - 1) * T
            self._batch_weights = torch.tensor([timestep_weight(float(p), T, self.hparams.w_min, self.hparams.w_max)
                                                for p in position], dtype=self.stat_dtype, device=self.device)
        try:
            return super().predict_step(batch, batch_idx)
        finally:
            self._batch_weights = None

    def call_state(self) -> Tensor | None:
        return getattr(self, "_batch_weights", None)  # the batch's timestep weights [B], or None

    def use_call_state(self, state: Tensor | None) -> None:
        self._batch_weights = state

    def after_part(self, tensors: dict[str, Tensor]) -> None:
        """Installs the pass's groups pruned (and compensated) at `sequential_level`, so that the
        next block group is calibrated on the inputs the pruned model really produces."""
        level = min(int(self.hparams.sequential_level), self.levels_max)
        for group in self.part_groups():
            removed = group.removed_at(level, self.levels_max)
            if removed == 0:
                continue
            keep = keep_from_order(tensors[f"{group.name}.order"], removed)
            weight = tensors[f"{group.name}.weight.{level}"].to(self.device, self.adapter.dtype)
            self.adapter.install(group, self.adapter.sliced_module(group, keep, weight))

    def stage_trajectory(self) -> dict[str, Tensor]:
        """The shell's stage trajectory, with the solve's threads set (obs_solver.solve_threads) and its
        time summed per block: one line per stage (after the last pass or carried block), on rank 0 (a
        resumed stage's line counts the blocks solved since)."""
        first = self.part == 0 and (not self.carry or self._block == self.first_block)
        last = self.part == self.passes - 1 and (not self.carry or self._block == len(self.adapter.blocks()) - 1)
        if first or not hasattr(self, "_solve_seconds"):
            self._solve_seconds: dict[str, tuple[int, float]] = {}
        # a single pass solves on rank 0 alone while the others wait; sequential passes solve on every rank
        solving = self.trainer.world_size if self.passes > 1 else 1
        with solve_threads(self.device, solving, self.trainer.world_size):
            out = super().stage_trajectory()
        if last and self.global_rank == 0 and self._solve_seconds:
            print(solve_summary(self.stage, self._solve_seconds), flush=True)
        return out

    def group_trajectory(self, group: UnitGroup, weight: Tensor, stat: HessianStatistic):
        milestones = self.milestones(group)
        start = time.perf_counter()
        # on the pruner's device (the accelerator the Hessians were gathered on), float64 by default:
        # obs_solver's module docstring says where that precision matters
        results = prune_groups(weight, stat.hessian, group.unit_width, milestones, damp=self.hparams.damp,
                               dtype=getattr(torch, self.hparams.solver_dtype), mode=self.hparams.mode,
                               device=self.device)
        if self.device.type == "cuda":  # kernels are queued: the time is the solve's once they have run
            torch.cuda.synchronize(self.device)
        seconds = getattr(self, "_solve_seconds", None)
        if seconds is not None:
            seconds[group.name] = (group.block, time.perf_counter() - start)
        deepest = max(results, key=lambda r: len(r.removed))
        order = torch.cat([deepest.removed, deepest.kept])  # never-removed units last, ascending
        weights = {level: r.weight for level, r in zip(range(1, self.levels_max + 1), results) if len(r.removed) > 0}
        return order, weights


def solve_summary(stage: int, seconds: dict[str, tuple[int, float]]) -> str:
    """One line for a stage's OBS solve: total, blocks, the slowest block and its slowest group,
    e.g. `stage 3: OBS solve 12.4 s (28 blocks, 56 groups; slowest block 17 0.9 s, blocks.17.ff 0.8 s)`.
    `seconds`: {group name: (block index, seconds)}."""
    blocks: dict[int, float] = {}
    for block, t in seconds.values():
        blocks[block] = blocks.get(block, 0.0) + t
    slow_block = max(blocks, key=blocks.get)
    slow_group = max(seconds, key=lambda name: seconds[name][1])
    return (f"stage {stage}: OBS solve {sum(blocks.values()):.1f} s ({len(blocks)} blocks, {len(seconds)} groups; "
            f"slowest block {slow_block} {blocks[slow_block]:.1f} s, {slow_group} {seconds[slow_group][1]:.1f} s)")
