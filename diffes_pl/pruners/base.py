"""The pruner shell: a LightningModule with no optimizer whose `predict_step` runs the denoiser on
calibration batches while forward hooks feed per-group statistics (anomalib's PaDiM shape:
collect in the steps, finalise at epoch end).

One predict epoch = one stage. At its end the statistics are all-reduced across processes ONCE
(never inside `predict_step`: ranks may hold uneven shards), the stage's trajectory is computed and
rank 0 writes it as one shard. `build_store` runs the S stages and seals the store atomically.
Keeping one stage's statistics at a time bounds memory (DiT-XL/2 OBS: one stage of Hessians).
"""
from __future__ import annotations

import shutil
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..denoisers.base import DenoiserAdapter, UnitGroup
from ..partition import StagePartition
from ..locks import LockedError
from ..trajectory import (DiskSpaceError, TrajectoryStore, canonical, check_free_space, make_key, partial_dir,
                          remove_stale, shard_name, writing)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class Statistic:
    """Statistics of one unit group's output-layer inputs for the current stage (sparsegpt's
    `add_batch` shape). Subclasses keep tensors in `self.buffers` so the shell can all-reduce them."""

    def __init__(self, group: UnitGroup, in_features: int, device: torch.device, dtype: torch.dtype) -> None:
        self.group = group
        self.buffers: dict[str, Tensor] = {}

    def add_batch(self, x: Tensor) -> None:
        """x: [B, N, in] or [B·N, in] inputs of the output-side layer."""


def as_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """[..., in] → [tokens, in] in the accumulation dtype."""
    return x.reshape(-1, x.shape[-1]).to(dtype)


class Pruner(L.LightningModule):
    """Base of every pruner. Subclasses set `name`, `compensated`, `depth` and implement
    `make_statistic` and `group_trajectory` (or `block_trajectory` for depth pruning)."""

    name = "base"
    compensated = False
    depth = False
    passes = 1  # predict epochs per stage; OBS-Diff's sequential calibration uses one per block group
    # a stop request (SIGTERM, Ctrl-C: trainer.received_sigterm) ends calibration after the predict epoch
    # under way (`_calibrate`); Lightning's predict loop does not look at it
    stops_at_boundaries = True

    def __init__(self, stat_dtype: str = "float64", store_dtype: str | None = None) -> None:
        """
        Args:
            stat_dtype: dtype in which statistics are accumulated (float64 keeps multi-process sums
                equal to single-process ones to ~1e-12).
            store_dtype: dtype of stored weights; default the denoiser's inference dtype.
        """
        super().__init__()
        if stat_dtype not in DTYPES or (store_dtype is not None and store_dtype not in DTYPES):
            raise ValueError(f"dtypes must be one of {sorted(DTYPES)}; got stat_dtype={stat_dtype!r}, store_dtype={store_dtype!r}")
        self.stat_dtype = DTYPES[stat_dtype]
        self.store_dtype_name = store_dtype
        self.adapter: DenoiserAdapter | None = None
        self.levels_max = 0
        self.stage = 0
        self._stats: dict[str, Statistic] = {}
        self._handles: list[Any] = []
        self._shard_dir: Path | None = None
        self.part = 0  # which pass of the current stage runs (0 .. passes − 1)
        self._stage_out: dict[str, Tensor] = {}

    def begin_pass(self, stage: int, part: int = 0) -> None:
        """The next predict epoch calibrates `stage`, pass `part` (of `passes`)."""
        self.stage, self.part = int(stage), int(part)

    # --- settings that identify a store ------------------------------------------------------
    def settings(self) -> dict:
        """Everything that changes the trajectories (goes into the store key)."""
        return {"name": self.name, **{k: v for k, v in self.hparams.items()}}

    def attach(self, adapter: DenoiserAdapter, levels_max: int, shard_dir: str | Path) -> None:
        """Binds the denoiser (kept out of this module's state dict) and where stage shards go."""
        object.__setattr__(self, "adapter", adapter)  # not a submodule: no checkpointing of the denoiser
        self.levels_max = int(levels_max)
        self._shard_dir = Path(shard_dir)

    def store_dtype_for(self, adapter: DenoiserAdapter) -> torch.dtype:
        return DTYPES[self.store_dtype_name] if self.store_dtype_name else adapter.dtype

    @property
    def store_dtype(self) -> torch.dtype:
        return self.store_dtype_for(self.adapter)

    def milestones(self, group: UnitGroup) -> list[int]:
        """Units removed at levels 1..H."""
        return [group.removed_at(level, self.levels_max) for level in range(1, self.levels_max + 1)]

    # --- gathering -----------------------------------------------------------------------------
    def make_statistic(self, group: UnitGroup, layer: nn.Linear) -> Statistic:
        raise NotImplementedError

    def on_predict_epoch_start(self) -> None:
        adapter = self.adapter
        adapter.denoiser.to(self.device)
        self._stats = {}
        self._handles = []
        if self.depth:
            self._register_block_hooks()
            return
        for group in self.part_groups():
            layer = adapter.output_layer(group)
            stat = self.make_statistic(group, layer)
            self._stats[group.name] = stat
            self._handles.append(layer.register_forward_pre_hook(lambda _m, args, s=stat: s.add_batch(args[0])))

    def _register_block_hooks(self) -> None:
        raise NotImplementedError

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        stages = batch["stage"]
        if not bool((stages == self.stage).all()):
            raise RuntimeError(f"calibration batch holds stages {stages.unique().tolist()} while stage {self.stage} is being calibrated")
        self.adapter.predict_noise(batch["latents"].to(self.adapter.dtype), batch["timesteps"], batch["cond"])
        return None

    def on_predict_epoch_end(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        # One all-reduce per buffer, here and only here: every rank reaches this point once per stage.
        for stat in self._stats.values():
            for key, buf in stat.buffers.items():
                stat.buffers[key] = self._all_reduce(buf)
        # Sequential passes need the part's trajectory on every rank (the next pass runs on the
        # pruned part); a single pass computes it on rank 0 only.
        if self.global_rank == 0 or self.passes > 1:
            tensors = self.stage_trajectory()
            self._stage_out.update(tensors)
            if self.passes > 1:
                self.after_part(tensors)
        self._stats = {}
        if self.part == self.passes - 1:
            if self.passes > 1:
                self.adapter.restore_dense()
            if self.global_rank == 0:
                self._shard_dir.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous().cpu() for k, v in self._stage_out.items()},
                          str(self._shard_dir / shard_name(self.stage)))
            self._stage_out = {}
        self.trainer.strategy.barrier("diffes-stage-written")

    def part_groups(self) -> list[UnitGroup]:
        """The unit groups calibrated in the current pass: all of them, or with `passes` = K > 1
        the groups of the `part`-th of K contiguous chunks of blocks."""
        groups = self.adapter.unit_groups()
        if self.passes == 1:
            return groups
        n = len(self.adapter.blocks())
        bounds = [round(k * n / self.passes) for k in range(self.passes + 1)]
        return [g for g in groups if bounds[self.part] <= g.block < bounds[self.part + 1]]

    def after_part(self, tensors: dict[str, Tensor]) -> None:
        """Called on every rank after a pass of a multi-pass stage with that pass's trajectory."""

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return tensor
        # Predict runs under inference mode: reduce a normal tensor copy of the inference tensor.
        with torch.inference_mode(False):
            out = tensor.clone()
            return self.trainer.strategy.reduce(out, reduce_op="sum")

    # --- finalising ----------------------------------------------------------------------------
    def stage_trajectory(self) -> dict[str, Tensor]:
        """The current stage's tensors for the store: orders (and compensated weights)."""
        out: dict[str, Tensor] = {}
        if self.depth:
            out["blocks.order"] = self.block_order()
            return out
        for group in self.part_groups():
            layer = self.adapter.output_layer(group)
            order, weights = self.group_trajectory(group, layer.weight.detach(), self._stats[group.name])
            out[f"{group.name}.order"] = order.to(torch.long)
            for level, w in weights.items():
                out[f"{group.name}.weight.{level}"] = w.to(self.store_dtype)
        return out

    def group_trajectory(self, group: UnitGroup, weight: Tensor, stat: Statistic) -> tuple[Tensor, dict[int, Tensor]]:
        """(removal order [n], {level: compensated weight}) of one group."""
        raise NotImplementedError

    def block_order(self) -> Tensor:
        raise NotImplementedError

    def configure_optimizers(self) -> None:
        return None


def order_by_score(scores: Tensor) -> Tensor:
    """Removal order: lowest score first; ties broken by unit index (stable)."""
    return torch.sort(scores.to(torch.float64), stable=True).indices


def unit_scores(group: UnitGroup, column_scores: Tensor) -> Tensor:
    """Sums per-column scores [n · unit_width] over each unit's columns → [n]."""
    return column_scores.reshape(group.size, group.unit_width).sum(dim=1)


def store_key_fields(adapter: DenoiserAdapter, partition: StagePartition, calibration: dict, pruner: Pruner,
                     levels_max: int) -> dict:
    """What a store depends on, and nothing else: denoiser identity and config, calibration
    settings, the stage partition (boundaries and timesteps) and the pruner's settings and H."""
    return canonical({"denoiser": adapter.identity(), "calibration": calibration,
                      "partition": partition.to_dict(), "pruner": pruner.settings(), "levels_max": levels_max,
                      "store_dtype": str(pruner.store_dtype_for(adapter))})


def estimate_stat_bytes(adapter: DenoiserAdapter, pruner: Pruner) -> int:
    """Bytes of one stage's statistics (what calibration holds at once)."""
    size = torch.finfo(pruner.stat_dtype).bits // 8
    if pruner.depth:
        return 2 * len(adapter.blocks()) * size
    total = 0
    for group in adapter.unit_groups():
        n_in = adapter.output_layer(group).in_features
        total += (n_in * n_in if pruner.compensated else n_in) * size
    return total


def check_stat_memory(adapter: DenoiserAdapter, pruner: Pruner, device: torch.device) -> None:
    """Refuses (InsufficientMemoryError) before the first predict epoch when one stage's statistics
    do not fit on the calibration device (OBS: one in×in Hessian per unit group)."""
    from ..memory import check_fits

    dtype = str(pruner.stat_dtype).removeprefix("torch.")
    ways = ["set model.pruner.init_args.stat_dtype: float32"] if pruner.stat_dtype == torch.float64 else []
    ways += ["prune fewer or smaller unit groups", "use a pruner without Hessians (Wanda)",
             "or calibrate on a device with more memory"]  # every rank holds a whole stage's statistics
    check_fits(estimate_stat_bytes(adapter, pruner), device,
               f"calibration statistics of the {pruner.name} pruner (one stage, {dtype})", ", ".join(ways))


def estimate_store_bytes(adapter: DenoiserAdapter, pruner: Pruner, levels_max: int, num_stages: int) -> int:
    """Bytes of the store about to be written (compensated weights dominate)."""
    total = 0
    elem = torch.finfo(pruner.store_dtype_for(adapter)).bits // 8 if pruner.compensated else 0
    for group in ([] if pruner.depth else adapter.unit_groups()):
        total += group.size * 8
        if pruner.compensated:
            out = adapter.output_layer(group).out_features
            for level in range(1, levels_max + 1):
                total += out * (group.size - group.removed_at(level, levels_max)) * group.unit_width * elem
    return (total + (len(adapter.blocks()) * 8 if pruner.depth else 0)) * num_stages


def build_store(trainer: L.Trainer, pruner: Pruner, datamodule: Any, adapter: DenoiserAdapter,
                partition: StagePartition, path: str | Path, levels_max: int, log=print) -> TrajectoryStore:
    """Calibrates every stage (one `trainer.predict` epoch each) and writes the store atomically."""
    path = Path(path)
    shard_dir = partial_dir(path)
    key_fields = store_key_fields(adapter, partition, datamodule.settings(), pruner, levels_max)
    pruner.attach(adapter, levels_max, shard_dir)
    datamodule.attach(adapter, partition)
    if trainer.global_rank == 0:
        log(f"calibration: {partition.num_stages} stages, statistics {estimate_stat_bytes(adapter, pruner) / 2**20:.1f} MiB "
            f"per stage; store ≈ {estimate_store_bytes(adapter, pruner, levels_max, partition.num_stages) / 2**20:.1f} MiB "
            f"→ {path}")
    check_stat_memory(adapter, pruner, trainer.strategy.root_device)  # before the first predict epoch
    with ExitStack() as held:
        _claim_store(trainer, held, path, estimate_store_bytes(adapter, pruner, levels_max, partition.num_stages), log)
        _calibrate(trainer, pruner, datamodule, adapter, partition, path, shard_dir, key_fields, levels_max, log)
    return TrajectoryStore.open(path, key_fields=key_fields)


def _claim_store(trainer: L.Trainer, held: ExitStack, path: Path, needed: int, log) -> None:
    """Before any calibration, on rank 0: the store's lock (another process building the same store
    refuses this one at once), leftovers of a killed build removed, free space checked. Every rank
    raises rank 0's refusal, so none waits at a barrier for a rank that stopped."""
    refusal = None
    if trainer.global_rank == 0:
        try:
            held.enter_context(writing(path))
            stale = remove_stale(path)
            if stale:
                log(f"removed what an interrupted build of {path} left: {', '.join(p.name for p in stale)}")
            check_free_space(path, needed)
        except (LockedError, DiskSpaceError) as err:
            refusal = err
    if trainer.world_size > 1:
        refusal = trainer.strategy.broadcast(refusal, src=0)
        trainer.strategy.barrier("diffes-store-start")
    if refusal is not None:
        raise refusal


def _calibrate(trainer: L.Trainer, pruner: Pruner, datamodule: Any, adapter: DenoiserAdapter,
               partition: StagePartition, path: Path, shard_dir: Path, key_fields: dict, levels_max: int, log) -> None:
    """The S stages' predict epochs (shards into `shard_dir`), then the store sealed by rank 0."""
    # predict_step returns nothing on purpose: the statistics are the product.
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    try:
        for stage in range(partition.num_stages):
            datamodule.set_stage(stage)
            for part in range(pruner.passes):
                pruner.begin_pass(stage, part)
                trainer.predict(pruner, datamodule=datamodule, return_predictions=False)
                if (stage, part) != (partition.num_stages - 1, pruner.passes - 1):  # the last: sealed first
                    _stop_if_requested(trainer)
        if trainer.global_rank == 0:
            store = _seal(shard_dir, path, {
                "key": make_key(key_fields), "key_fields": key_fields, "pruner": pruner.name,
                "levels_max": levels_max, "num_stages": partition.num_stages,
                "compensated": pruner.compensated, "depth": pruner.depth,
                "groups": [vars(g) for g in adapter.unit_groups()], "dtype": str(pruner.store_dtype)})
            log(f"trajectory store written: {path} ({store.nbytes / 2**20:.1f} MiB)")
    finally:
        if trainer.global_rank == 0 and shard_dir.exists():
            shutil.rmtree(shard_dir)
    if trainer.world_size > 1:
        trainer.strategy.barrier("diffes-store-sealed")
    _stop_if_requested(trainer)  # during the last stage: the store is complete, and a rerun reuses it


def _stop_if_requested(trainer: L.Trainer) -> None:
    """Between two predict epochs (stages, or passes of one): a SIGTERM or Ctrl-C received during the
    last one stops calibration here, on every rank as rank 0 decides (nothing of it is resumable: the
    shards are removed, a rerun calibrates again)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    stop = trainer.received_sigterm
    if trainer.world_size > 1:
        stop = trainer.strategy.broadcast(stop, src=0)
    if stop:
        raise SIGTERMException()


def _seal(shard_dir: Path, path: Path, manifest: dict) -> TrajectoryStore:
    """Shards → a complete store, atomically: checksums into the manifest, written last, and the
    shard folder renamed into place (no copy: sealing needs no space beyond the shards)."""
    return TrajectoryStore.seal(shard_dir, path, manifest)
