"""Unstructured and N:M pruners: OBS (SparseGPT's sweep with compensation), Wanda and magnitude at the
granularity of single weights, with the levels of `sparsity.py` (issue 25).

They gather one statistic per `SparseLayer` (q, k and v of a self-attention share theirs) and write,
per stage and layer, the removal-level map and (OBS) the compensated kept weights of every level.
Everything else is the structured pruners' shell: one predict epoch per stage, carried block by
block, OBS-Diff's timestep weights and group-sequential calibration (`SparseOBSPruner`), resumable
shards. Level ℓ + 1 is solved from level ℓ's weight with level ℓ's mask kept removed, so masks nest
(`sparse_solver` module docstring).
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from ..denoisers.base import DenoiserAdapter, SparseLayer, UnitGroup
from ..sparsity import Granularity, level_weight
from .base import Pruner
from .obs import OBSPruner
from .scores import MagnitudePruner, WandaPruner
from .sparse_solver import magnitude_mask, obs_sparse, wanda_mask


class SparsePruner(Pruner):
    """The shell's hooks for single-weight granularities; the concrete pruners below mix it with a
    structured pruner (its statistic and settings) and choose the mask in `layer_masks`."""

    def _set_granularity(self, granularity: str, m: int) -> None:
        self.granularity = Granularity(granularity, m)

    def default_levels(self, adapter: DenoiserAdapter) -> int:
        return self.granularity.default_levels()

    def check_denoiser(self, adapter: DenoiserAdapter, levels_max: int) -> None:
        """Refuses, before any calibration, a denoiser or H the granularity cannot prune."""
        for layer in adapter.sparse_layers():
            self.granularity.check(levels_max, layer.in_features)

    def layers_of(self, group: UnitGroup) -> list[SparseLayer]:
        return [layer for layer in self.adapter.sparse_layers() if layer.group == group.name]

    def stat_features(self, adapter: DenoiserAdapter, groups: list[UnitGroup]) -> list[int]:
        names = {g.name for g in groups}
        return [layer.in_features for layer in adapter.sparse_layers() if layer.group in names]

    def _gather(self, groups: list[UnitGroup]) -> None:
        """A statistic per sparse layer, fed by a pre-hook on its first linear."""
        for group in groups:
            module = self.adapter.dense_module(group)
            for layer in self.layers_of(group):
                linear = module.get_submodule(layer.paths[0])
                stat = self.make_statistic(group, linear)
                self._stats[layer.key] = stat
                self._handles.append(linear.register_forward_pre_hook(lambda _m, args, s=stat: s.add_batch(args[0])))

    def group_tensors(self, group: UnitGroup) -> dict[str, Tensor]:
        """Per linear layer of the group: `<layer>.level` (uint8 [out, in]) and, compensated,
        `<layer>.values.<ℓ>` for the levels that keep weights."""
        start = time.perf_counter()
        module, H = self.adapter.dense_module(group), self.levels_max
        out: dict[str, Tensor] = {}
        for layer in self.layers_of(group):
            stat = self._stats[layer.key]
            for path, name in zip(layer.paths, layer.names()):
                weight = module.get_submodule(path).weight.detach()
                level_map = torch.zeros(weight.shape, dtype=torch.uint8)
                removed = torch.zeros(weight.shape, dtype=torch.bool)
                current = weight
                for level in range(1, H + 1):
                    target = self.granularity.target(level, H, tuple(weight.shape))
                    mask, current = (torch.ones_like(removed), None) if not target else \
                        self.layer_mask(weight, current, stat, target, removed)
                    level_map[mask & ~removed] = level
                    if self.compensated and current is not None:
                        out[f"{name}.values.{level}"] = current[~mask.to(current.device)].to(self.store_dtype).cpu()
                    removed = mask
                out[f"{name}.level"] = level_map
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = getattr(self, "_solve_seconds", None)  # OBS's per-stage solve line
        if seconds is not None:
            seconds[group.name] = (group.block, time.perf_counter() - start)
        return out

    def layer_mask(self, dense: Tensor, current: Tensor, stat, target: dict, removed: Tensor) -> tuple[Tensor, Tensor]:
        """(mask [out, in] bool on the host, the next level's weight) of one level; `current` is the
        previous level's weight (compensated pruners) and `removed` its mask."""
        raise NotImplementedError

    def after_part(self, tensors: dict[str, Tensor]) -> None:
        """OBS-Diff's group-sequential calibration: the pass's groups installed at the sequential level."""
        level = min(int(self.hparams.sequential_level), self.levels_max)
        for group in self.part_groups():
            module = self.adapter.dense_module(group)
            weights = {}
            for layer in self.layers_of(group):
                for path, name in zip(layer.paths, layer.names()):
                    dense = module.get_submodule(path).weight
                    values = tensors.get(f"{name}.values.{level}")
                    weights[path] = level_weight(dense, tensors[f"{name}.level"], level, values)
            self.adapter.install(group, self.adapter.sparse_module(group, weights))


class SparseOBSPruner(SparsePruner, OBSPruner):
    """Unstructured / N:M OBS: SparseGPT's column sweep with compensation, refined towards the
    least-squares optimum of its mask (`sparse_solver.obs_sparse`), from OBS's Hessians (float64,
    damping, OBS-Diff's timestep weights and group-sequential calibration as `OBSPruner`)."""

    name = "obs_sparse"

    def __init__(self, granularity: str = "unstructured", m: int = 4, damp: float = 0.01, mode: str = "fast",
                 block_size: int = 128, refine_steps: int = 20, solver_dtype: str = "float64",
                 stat_dtype: str = "float64", store_dtype: str | None = None, timestep_weighting: bool = False,
                 w_min: float = 0.1, w_max: float = 1.0, sequential_groups: int = 1,
                 sequential_level: int | None = None) -> None:
        """
        Args:
            granularity: `unstructured` (level ℓ of H removes ℓ/H of each layer's weights) or `n:m`
                (ℓ/H of every `m` consecutive inputs of each row: with m = H = 4, level 2 is 2:4).
            m: the N:M group of consecutive inputs (with granularity n:m).
            damp: diagonal damping relative to the mean Hessian diagonal.
            mode: `fast` (column sweep refined by conjugate gradient) or `exact` (the sweep's mask,
                weights solved as the least-squares optimum: small layers).
            block_size: columns per lazy-update block of the sweep (SparseGPT's 128).
            refine_steps: conjugate-gradient steps on the sweep's weights (0: SparseGPT's weights).
            solver_dtype: `float64` (default) or `float32` for the solve.
            stat_dtype: dtype of the accumulated Hessians.
            store_dtype: dtype of stored compensated weights (default: the denoiser's).
            timestep_weighting: OBS-Diff's log-decreasing weight per calibration sample.
            w_min: the smallest timestep weight (with timestep_weighting).
            w_max: the largest timestep weight (with timestep_weighting).
            sequential_groups: K > 1: OBS-Diff's group-wise sequential calibration (earlier block
                groups installed at `sequential_level`).
            sequential_level: the level earlier groups are pruned at (the run's target level).
        """
        super().__init__(damp=damp, mode=mode, solver_dtype=solver_dtype, stat_dtype=stat_dtype,
                         store_dtype=store_dtype, timestep_weighting=timestep_weighting, w_min=w_min, w_max=w_max,
                         sequential_groups=sequential_groups, sequential_level=sequential_level)
        self._set_granularity(granularity, m)

    def layer_mask(self, dense, current, stat, target, removed):
        hp = self.hparams
        result = obs_sparse(current, stat.hessian, removed=removed, block_size=hp.block_size, damp=hp.damp,
                            dtype=getattr(torch, hp.solver_dtype), device=self.device,
                            mode=hp.mode, refine_steps=hp.refine_steps, **target)
        return result.mask, result.weight


class SparseWandaPruner(SparsePruner, WandaPruner):
    """Wanda at single weights: score |W_ij| · ‖X_j‖₂ compared within each output row (N:M: within each
    group of m inputs of a row), no compensation. Masks nest: the scores do not change with the level."""

    name = "wanda_sparse"

    def __init__(self, granularity: str = "unstructured", m: int = 4, stat_dtype: str = "float64") -> None:
        """
        Args:
            granularity: `unstructured` or `n:m` (as `SparseOBSPruner`).
            m: the N:M group of consecutive inputs (with granularity n:m).
            stat_dtype: dtype of the accumulated column norms.
        """
        super().__init__(stat_dtype=stat_dtype)
        self._set_granularity(granularity, m)

    def layer_mask(self, dense, current, stat, target, removed):
        return wanda_mask(dense, stat.norm, removed=removed, **target), None


class SparseMagnitudePruner(SparsePruner, MagnitudePruner):
    """Magnitude at single weights: |W_ij| within each row (N:M: each group of m inputs); data-free."""

    name = "magnitude_sparse"

    def __init__(self, granularity: str = "unstructured", m: int = 4) -> None:
        """
        Args:
            granularity: `unstructured` or `n:m` (as `SparseOBSPruner`).
            m: the N:M group of consecutive inputs (with granularity n:m).
        """
        super().__init__()
        self._set_granularity(granularity, m)

    def layer_mask(self, dense, current, stat, target, removed):
        return magnitude_mask(dense, removed=removed, **target), None
