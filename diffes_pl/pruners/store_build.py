"""Building a trajectory store: every stage calibrated by the pruner shell (`base.Pruner`, one
`trainer.predict` epoch per stage, or per block), the shards sealed into the store atomically.

Preemption: each finished stage's shard is kept with its checksum (`trajectory.PartialStore`), so a
killed build's rerun resumes at the first missing stage. A stop request (SIGTERM, Ctrl-C) takes effect
at the next calibration batch: the stage under way is abandoned (its statistics dropped), the finished
ones kept, and `CalibrationStopped` says how many.
"""
from __future__ import annotations

import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..denoisers.base import DenoiserAdapter
from ..locks import LockedError
from ..partition import StagePartition
from ..trajectory import (DiskSpaceError, PartialStore, TrajectoryStore, check_free_space, make_key, remove_stale,
                          writing)
from .base import Pruner, check_stat_memory, estimate_stat_bytes, estimate_store_bytes, store_key_fields


class CalibrationStopped(SIGTERMException):
    """A stop request (SIGTERM, Ctrl-C) ended calibration: stages 0..kept − 1 of `num_stages` are kept
    in `folder` (the partial store; the store itself when all are), and a rerun resumes after them.
    A SIGTERMException, so whoever stops on Lightning's flag handles it as any stop."""

    def __init__(self, kept: int, num_stages: int, folder: Path, sealed: bool = False, blocks: int = 0) -> None:
        super().__init__()  # no SystemExit code: the CLI chooses the exit code (128 + the signal)
        self.kept, self.num_stages, self.folder, self.sealed = int(kept), int(num_stages), Path(folder), sealed
        self.blocks = int(blocks)  # finished blocks of stage `kept` (carried block by block)

    def resume_line(self) -> str:
        """What is kept and what a rerun does (the second half of the CLI's one stop line)."""
        if self.sealed:
            return f"the trajectory store {self.folder} is complete: a rerun reuses it"
        if self.kept == self.num_stages:  # stopped while sealing
            return (f"all {self.num_stages} calibration stages kept in {self.folder}: run the command again to "
                    f"seal the store")
        at = f"stage {self.kept}" + (f", block {self.blocks}" if self.blocks else "")
        if self.kept == 0 and not self.blocks:
            return "no calibration stage had finished; nothing to resume: run the command again"
        kept = "no stage" if self.kept == 0 else first(self.kept, "stage")
        kept += f" and {first(self.blocks, 'block')} of stage {self.kept}" if self.blocks else ""
        return f"calibration {kept} of {self.num_stages} kept in {self.folder}: run the command again to resume at {at}"


def build_store(trainer: L.Trainer, pruner: Pruner, datamodule: Any, adapter: DenoiserAdapter,
                partition: StagePartition, path: str | Path, levels_max: int, log=print,
                calibrate_by: str = "model", stream: bool | None = False) -> TrajectoryStore:
    """Calibrates every stage (one `trainer.predict` epoch each) and writes the store atomically. The
    finished stages of a killed build of the same store are kept: calibration resumes after them."""
    path = Path(path)
    key_fields = store_key_fields(adapter, partition, datamodule.settings(), pruner, levels_max)
    partial = PartialStore(path, make_key(key_fields), partition.num_stages)
    pruner.attach(adapter, levels_max, partial)
    datamodule.attach(adapter, partition)
    pruner.calibrate_by(calibrate_by, adapter, trainer.strategy.root_device, stream)
    if trainer.global_rank == 0:
        held = ("per stage" if not pruner.by_block else
                "per block at most (block by block, activations carried" + (", weights streamed)" if pruner.stream else ")")
                if pruner.carry else "per block at most (block by block)")
        log(f"calibration: {partition.num_stages} stages, statistics {estimate_stat_bytes(adapter, pruner) / 2**20:.1f} MiB "
            f"{held}; store ≈ {estimate_store_bytes(adapter, pruner, levels_max, partition.num_stages) / 2**20:.1f} MiB "
            f"→ {path}")
    check_stat_memory(adapter, pruner, trainer.strategy.root_device)  # before the first predict epoch
    with ExitStack() as held:
        start, first_block = _claim_store(trainer, held, partial,
                                          estimate_store_bytes(adapter, pruner, levels_max, partition.num_stages), log)
        # whole-model, re-run and sequential calibrations redo the stage from its start
        pruner.first_block = first_block if pruner.carry and pruner.passes == 1 else 0
        _calibrate(trainer, pruner, datamodule, adapter, partition, partial, start, key_fields, levels_max, log)
    return TrajectoryStore.open(path, key_fields=key_fields)


def _claim_store(trainer: L.Trainer, held: ExitStack, partial: PartialStore, needed: int, log) -> tuple[int, int]:
    """Before any calibration, on rank 0: the store's lock (another process building the same store
    refuses this one at once), a killed build's finished stages kept when verified and built for the
    same key (anything else it left removed), free space checked. Every rank raises rank 0's refusal,
    so none waits at a barrier for a rank that stopped, and gets the stage (and, carried block by block,
    the block) to start at (where the process group is up already; a rank launched by the first predict
    run learns it in `Pruner.setup`)."""
    path, refusal, start, blocks = partial.path, None, 0, 0
    if trainer.global_rank == 0:
        try:
            held.enter_context(writing(path))
            stale = remove_stale(path, keep_partial=True)
            if stale:
                log(f"removed what an interrupted build of {path} left: {', '.join(p.name for p in stale)}")
            for line in partial.resume():
                log(line)
            start, blocks = partial.kept, partial.blocks_kept
            if start or blocks:
                kept = "no stage" if not start else first(start, "stage")
                more = (f"calibrating from stage {start}" if start < partial.num_stages else
                        "every stage is done: sealing")
                if blocks:
                    kept += f" and {first(blocks, 'block')} of stage {start}"
                    more = f"calibrating stage {start} from block {blocks}"
                log(f"resuming calibration of {path}: {kept} kept (verified), {more}")
            check_free_space(path, max(needed - sum(r["bytes"] for r in partial.shards.values()), 0))
        except (LockedError, DiskSpaceError) as err:
            refusal = err
    if trainer.world_size > 1:
        # every rank starts at rank 0's stage: the stages before it are not calibrated again anywhere
        refusal, start, blocks = trainer.strategy.broadcast((refusal, start, blocks), src=0)
        trainer.strategy.barrier("diffes-store-start")
    if refusal is not None:
        raise refusal
    return start, blocks


def first(count: int, what: str) -> str:
    """"stage 0", "stages 0–3": the first `count` stages (blocks)."""
    return f"{what} 0" if count == 1 else f"{what}s 0–{count - 1}"


def _calibrate(trainer: L.Trainer, pruner: Pruner, datamodule: Any, adapter: DenoiserAdapter,
               partition: StagePartition, partial: PartialStore, start: int, key_fields: dict, levels_max: int,
               log) -> None:
    """The predict epochs of stages `start`..S − 1 (shards into the partial store), then the store
    sealed by rank 0. A stop or failure abandons the stage under way and keeps the finished ones."""
    # predict_step returns nothing on purpose: the statistics are the product.
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    path, done = partial.path, start  # done: stages finished, the same count on every rank
    last = (partition.num_stages - 1, pruner.num_parts - 1)
    try:
        stage, part = start, 0
        while stage < partition.num_stages:
            datamodule.set_stage(stage)
            pruner.begin_pass(stage, part)
            trainer.predict(pruner, datamodule=datamodule, return_predictions=False)
            stage, part = pruner.stage, pruner.part  # rank 0's, which a rank launched by this run adopted
            if part == pruner.num_parts - 1:
                done = stage + 1
            if (stage, part) != last:  # the last: sealed first
                _stop_if_requested(trainer)
            stage, part = (stage + 1, 0) if part == pruner.num_parts - 1 else (stage, part + 1)
        if trainer.global_rank == 0:
            store = _seal(partial.folder, path, {
                "key": make_key(key_fields), "key_fields": key_fields, "pruner": pruner.name,
                "levels_max": levels_max, "num_stages": partition.num_stages,
                "compensated": pruner.compensated, "depth": pruner.depth,
                "groups": [vars(g) for g in adapter.unit_groups()], "dtype": str(pruner.store_dtype),
                **({} if pruner.granularity is None else {"sparse": {
                    **pruner.granularity.to_dict(),
                    "layers": {name: list(linear.weight.shape) for name, linear in adapter.sparse_linears().items()}}})})
            log(f"trajectory store written: {path} ({store.nbytes / 2**20:.1f} MiB)")
    except SIGTERMException:
        pruner.abandon_stage()
        if trainer.global_rank == 0:
            partial.discard_if_empty()
        raise CalibrationStopped(done, partition.num_stages, partial.folder, blocks=_blocks_kept(trainer, partial)) from None
    except BaseException:
        pruner.abandon_stage()
        if trainer.global_rank == 0:
            partial.discard_if_empty()  # finished stages stay: a rerun after the fix resumes after them
        raise
    if trainer.world_size > 1:
        trainer.strategy.barrier("diffes-store-sealed")
    if _stop_requested(trainer):  # during the last stage: the store is complete, and a rerun reuses it
        raise CalibrationStopped(partition.num_stages, partition.num_stages, path, sealed=True)


def _blocks_kept(trainer: L.Trainer, partial: PartialStore) -> int:
    """Finished blocks of the stage under way, as rank 0 (which writes them) knows."""
    kept = partial.blocks_kept
    if trainer.world_size > 1:
        kept = trainer.strategy.broadcast(kept, src=0)
    return int(kept)


def _stop_requested(trainer: L.Trainer) -> bool:
    """Whether a SIGTERM or Ctrl-C was received, as rank 0 saw it (every rank gets rank 0's answer)."""
    stop = trainer.received_sigterm
    if trainer.world_size > 1:
        stop = trainer.strategy.broadcast(stop, src=0)
    return bool(stop)


def _stop_if_requested(trainer: L.Trainer) -> None:
    """Between two predict epochs (stages, or passes of one): a SIGTERM or Ctrl-C received during the
    last one stops calibration here, on every rank as rank 0 decides; the stages finished are kept
    (`_calibrate` says how many), a stage whose passes are not all done is abandoned."""
    if _stop_requested(trainer):
        raise SIGTERMException()


def _seal(shard_dir: Path, path: Path, manifest: dict) -> TrajectoryStore:
    """Shards → a complete store, atomically: checksums into the manifest, written last, and the
    shard folder renamed into place (no copy: sealing needs no space beyond the shards)."""
    return TrajectoryStore.seal(shard_dir, path, manifest)
