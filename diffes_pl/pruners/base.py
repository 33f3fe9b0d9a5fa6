"""The pruner shell: a LightningModule with no optimizer whose `predict_step` runs the denoiser on
calibration batches while forward hooks feed per-group statistics (anomalib's PaDiM shape:
collect in the steps, finalise at epoch end).

One predict epoch = one stage. At its end the statistics are all-reduced across processes ONCE
(never inside `predict_step`: ranks may hold uneven shards), the stage's trajectory is computed and
rank 0 writes it as one shard (`store_build.build_store` runs the S stages and seals the store).
Keeping one stage's statistics at a time bounds memory (DiT-XL/2 OBS: one stage of Hessians); block
by block (`calibrate_by`), one block's. A stop request (SIGTERM, Ctrl-C) takes effect at the next
calibration batch: the stage under way is abandoned (`abandon_stage`).
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from ..denoisers.base import DenoiserAdapter, UnitGroup
from ..partition import StagePartition
from ..sparsity import Granularity
from ..trajectory import PartialStore, canonical
from .carry import CarriedCalls, PartDone, place_outside

CALIBRATE_BY = ("auto", "model", "block")
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
    granularity: Granularity | None = None  # unstructured / N:M (pruners/sparse.py); None: units or blocks
    passes = 1  # predict epochs per stage; OBS-Diff's sequential calibration uses one per block group
    # a stop request (SIGTERM, Ctrl-C: trainer.received_sigterm) ends calibration at the next batch
    # (`on_predict_batch_start`; Lightning's predict loop does not look at the flag), abandoning the
    # stage under way and keeping the finished ones
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
        self._partial: PartialStore | None = None
        self._stopping = False  # several processes: a stop seen here, agreed on at the epoch end
        self.part = 0  # which pass of the current stage runs (0 .. num_parts − 1)
        # block-by-block calibration (`calibrate_by`): a single-pass stage split into this many passes,
        # each gathering the statistics of one block's groups only. Not a setting of the store: the
        # statistics, hence the store, are the same bit for bit (only memory and time differ)
        self.block_parts = 1
        # block by block on a stack of blocks: activations carried from block to block (pruners/carry.py),
        # one predict epoch per stage; `stream`: the blocks' weights on the host, one on the device at a time
        self.carry = False
        self.stream = False
        self.first_block = 0  # a carried stage starts at this block (the blocks before it are done)
        self._block: int | None = None  # the block being calibrated (carried)
        self._calls: CarriedCalls | None = None
        self._call_states: list[Any] = []  # per recorded call, what the statistics need of its batch
        self._stage_out: dict[str, Tensor] = {}

    def begin_pass(self, stage: int, part: int = 0) -> None:
        """The next predict epoch calibrates `stage`, pass `part` (of `num_parts`)."""
        self.stage, self.part = int(stage), int(part)

    @property
    def num_parts(self) -> int:
        """Predict epochs per stage: 1 when carried, else OBS-Diff's sequential groups (`passes`), or
        the blocks of a block-by-block calibration re-running the forward, or 1."""
        if self.carry:
            return 1
        return self.passes if self.passes > 1 else self.block_parts

    def calibrate_by(self, mode: str, adapter: DenoiserAdapter, device: torch.device | str,
                     stream: bool | None = False) -> str:
        """Chooses whole-model or block-by-block calibration, and streamed weights; returns the choice.

        `model`: one predict epoch per stage holds every group's statistics at once; it stays because
        it holds no carried calls on the host (a FLUX stage of 256 samples carries 6.6 GiB) and on a
        UNet runs each block once per batch, so where the statistics fit it is the cheaper. `block`: one
        block's statistics at a time, so peak statistics follow the largest block, not the depth: on a
        stack of blocks (`adapter.carries_blocks`) the calibration inputs are embedded once and each
        block's dense outputs carried to the next (pruners/carry.py: the forward count of `model`);
        on a UNet one predict epoch per block, the forward stopped after it (about half the depth more
        in forward passes). `auto`: `block` when one stage's whole-model statistics, or the weights
        beside them, do not fit in the device's free memory. Depth pruning (a few numbers per block)
        and OBS-Diff's sequential groups (already one group of blocks per pass) keep their own passes.

        `stream`: keep the blocks' weights on the host and move one at a time to the device (carried
        block-by-block calibration only); None: when the weights and one block's statistics do not fit."""
        if mode not in CALIBRATE_BY:
            raise ValueError(f"calibrate_by must be one of {', '.join(CALIBRATE_BY)}; got {mode!r}")
        self.block_parts, self.carry, self.stream = 1, False, False
        if self.depth:
            if stream:
                raise ValueError(f"stream_weights needs block-by-block calibration; the {self.name} pruner calibrates "
                                 "whole blocks (set stream_weights: false)")
            return "model"
        free = device_room(adapter, device)
        # weights to place on an accelerator (on the CPU they are where calibration runs already)
        weights = 0 if torch.device(device).type == "cpu" else sum(
            p.numel() * p.element_size() for p in adapter.denoiser.parameters())
        if mode == "auto":
            mode = "block" if free is not None and weights + estimate_stat_bytes(adapter, self, by_block=False) > free else "model"
        if mode == "block":
            if adapter.carries_blocks:
                self.carry = True  # OBS-Diff's sequential groups too: each group's blocks carried in turn
            elif self.passes == 1:
                self.block_parts = len(adapter.blocks())
            else:  # a UNet's sequential groups keep their passes (one group of blocks each)
                mode = "model"
        if stream is None:
            stream = self.carry and free is not None and weights + estimate_stat_bytes(adapter, self) > free
        if stream and not self.carry:
            why = ("calibrate_by: block" if mode != "block" else
                   f"{adapter.name}'s blocks do not run one after another (a UNet)")
            raise ValueError(f"stream_weights needs block-by-block calibration on a stack of blocks ({why}); "
                             "set stream_weights: false")
        self.stream = bool(stream)
        return mode

    @property
    def by_block(self) -> bool:
        """One block's statistics at a time (carried, or re-running the forward per block)."""
        return self.carry or self.block_parts > 1

    def setup(self, stage: str) -> None:
        """Every rank runs rank 0's (stage, pass). Why: Lightning's launcher starts the other ranks only
        at the first `trainer.predict`, after rank 0 alone resumed a killed build (`_claim_store`): a
        rank started then planned stage 0. Here, in each run, the process group is up and the
        calibration data not yet loaded (`predict_dataloader` comes after `setup`)."""
        if stage != "predict" or self.trainer.world_size == 1:
            return
        agreed = tuple(self.trainer.strategy.broadcast((self.stage, self.part, self.first_block), src=0))
        self.first_block = agreed[2]
        if agreed[:2] != (self.stage, self.part):
            self.begin_pass(*agreed[:2])
            self.trainer.datamodule.set_stage(agreed[0])

    def on_predict_start(self) -> None:
        """Several processes: Lightning's SIGTERM handler broadcasts from inside the handler, which
        deadlocks when the signal lands while another rank waits in one of calibration's collectives
        (a carried block's all-reduce: a rank blocked there cannot run its own handler). During
        calibration the handler only records the request and passes the signal on to the ranks this
        one launched, as Lightning's does; the ranks agree at their next common point
        (`_stop_if_agreed`). Lightning restores the handlers it found when the run ends."""
        if self.trainer.world_size == 1 or threading.current_thread() is not threading.main_thread():
            return
        trainer = self.trainer
        connector = trainer._signal_connector  # whose flag `trainer.received_sigterm` reads

        def note(signum: int, _frame: Any) -> None:
            if not connector.received_sigterm and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)
            connector.received_sigterm = True

        signal.signal(signal.SIGTERM, note)

    # --- settings that identify a store ------------------------------------------------------
    def settings(self) -> dict:
        """Everything that changes the trajectories (goes into the store key)."""
        return {"name": self.name, **{k: v for k, v in self.hparams.items()}}

    def attach(self, adapter: DenoiserAdapter, levels_max: int, partial: PartialStore) -> None:
        """Binds the denoiser (kept out of this module's state dict) and the store being built, into
        which rank 0 writes each finished stage's shard."""
        object.__setattr__(self, "adapter", adapter)  # not a submodule: no checkpointing of the denoiser
        self.levels_max = int(levels_max)
        self._partial = partial

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

    def stat_features(self, adapter: DenoiserAdapter, groups: list[UnitGroup]) -> list[int]:
        """Input width of each statistic the groups' calibration gathers (one per output layer)."""
        return [adapter.output_layer(g).in_features for g in groups]

    def default_levels(self, adapter: DenoiserAdapter) -> int:
        """H when the run does not set `levels`: the adapter's, for width or depth pruning."""
        return adapter.default_levels("depth" if self.depth else "width")

    def on_predict_epoch_start(self) -> None:
        adapter = self.adapter
        if self.stream:  # every block on the host; each visits the device for its turn (_carry_block)
            for block in adapter.blocks():
                block.to("cpu")
            place_outside(adapter.denoiser, adapter.blocks(), self.device)
        else:
            adapter.denoiser.to(self.device)
        self._stats = {}
        self._handles = []
        self._stopping = False
        if self.depth:
            self._register_block_hooks()
            return
        if self.carry:  # this epoch embeds the batches and records the first block's calls
            self._block, self._calls, self._call_states = None, CarriedCalls(adapter.block_io), []
            first = adapter.blocks()[self.first_block]
            self._handles.append(first.register_forward_pre_hook(self._calls.capture, with_kwargs=True))
            return
        groups = self.part_groups()
        self._gather(groups)
        if self.num_parts > 1:
            self._handles += stop_after(adapter, {g.block for g in groups})

    def _gather(self, groups: list[UnitGroup]) -> None:
        """A statistic per group, fed by a pre-hook on the group's output layer."""
        for group in groups:
            layer = self.adapter.output_layer(group)
            stat = self.make_statistic(group, layer)
            self._stats[group.name] = stat
            self._handles.append(layer.register_forward_pre_hook(lambda _m, args, s=stat: s.add_batch(args[0])))

    def _register_block_hooks(self) -> None:
        raise NotImplementedError

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """A stop request takes effect here, before the next batch: one process stops at once; several
        skip their remaining batches (a collective here would hang: ranks hold uneven shards) and
        agree at the epoch end (`on_predict_epoch_end`)."""
        if self.trainer.received_sigterm and not self._stopping:
            if self.trainer.world_size == 1:
                raise SIGTERMException()
            self._stopping = True

    def _stop_now(self) -> None:
        """One process, between two groups' solves at the epoch end: the stage is abandoned at once
        (several processes wait for rank 0 at the stage's barrier, and stop between stages)."""
        if self.trainer.world_size == 1 and self.trainer.received_sigterm:
            raise SIGTERMException()

    def abandon_stage(self) -> None:
        """Drops the stage under way: its statistics, its passes' trajectories, the statistics hooks,
        and (sequential passes) the pruned parts installed, so the denoiser is dense again."""
        for h in self._handles:
            h.remove()
        self._handles, self._stats, self._stage_out, self._stopping = [], {}, {}, False
        self._block, self._calls, self._call_states = None, None, []
        if self.passes > 1 and self.adapter is not None:
            self.adapter.restore_dense()

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        if self._stopping:  # stopping (several processes): the rest of the stage is skipped
            return None
        stages = batch["stage"]
        if not bool((stages == self.stage).all()):
            raise RuntimeError(f"calibration batch holds stages {stages.unique().tolist()} while stage {self.stage} is being calibrated")
        try:
            self.adapter.predict_noise(batch["latents"].to(self.adapter.dtype), batch["timesteps"], batch["cond"])
        except PartDone:  # every block of this pass ran (or, carried, the first block's call is recorded)
            pass
        if self.carry:
            self._call_states.append(self.call_state())
        return None

    def call_state(self) -> Any:
        """What the statistics need of the current batch besides the layer inputs (OBS-Diff's timestep
        weights), kept with its recorded call when carried and restored by `use_call_state` when the
        call runs a block."""
        return None

    def use_call_state(self, state: Any) -> None:
        """Restores a recorded call's `call_state` before the call runs a block (None: after the last)."""

    def on_predict_epoch_end(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stop_if_agreed()
        if self.carry:
            self._carry_stage()
        else:
            self._finish_part()
        if self.part == self.num_parts - 1:
            if self.passes > 1:
                self.adapter.restore_dense()
            if self.global_rank == 0:
                self._partial.write_stage(self.stage, self._stage_out)  # whole and checksummed, or absent
            self._stage_out, self.first_block = {}, 0
        self.trainer.strategy.barrier("diffes-stage-written")

    def _stop_if_agreed(self) -> None:
        """Where every rank arrives together (a pass's end, a carried block's start): stops (abandoning
        the stage) when any process was asked to. One process stops at once, several agree first."""
        asked = self._stopping or self.trainer.received_sigterm
        if self.trainer.world_size > 1:
            flag = torch.tensor([float(asked)], device=self.device)
            asked = float(self._all_reduce(flag)[0]) > 0
        if asked:
            self.abandon_stage()
            raise SIGTERMException()

    def _carry_stage(self) -> None:
        """The blocks of a carried stage in turn, from `first_block`. OBS-Diff's sequential groups
        (`passes` > 1): each group of blocks is calibrated dense on the outputs of the earlier groups
        pruned at the sequential level — after a group is solved it is installed pruned and run again
        from its recorded input calls, whose outputs the next group calibrates on."""
        blocks = self.adapter.blocks()
        n, groups = len(blocks), max(self.passes, 1)
        bounds = [round(k * n / groups) for k in range(groups + 1)]
        for part in range(groups):
            self.part, chunk = part, range(bounds[part], bounds[part + 1])
            sequential = part < groups - 1 and groups > 1  # a later group calibrates on this one pruned
            inputs = list(self._calls.calls) if sequential else None
            part_out: dict[str, Tensor] = {}
            for b in chunk:
                if b >= self.first_block:
                    out = self._carry_block(b, advance=b < n - 1 and not (sequential and b == chunk[-1]))
                    if sequential:  # otherwise each block's part is on disk already: not held here
                        part_out.update(out)
            if sequential:
                self._block = None
                self.after_part(part_out)  # this group pruned at the sequential level, on every rank
                self._calls.calls = inputs
                with torch.inference_mode():
                    for b in chunk:
                        if self.stream:
                            blocks[b].to(self.device)
                        self._calls.run(blocks[b], self.device, advance=True)
                        if self.stream:
                            blocks[b].to("cpu")
        self.part = 0
        self._block, self._calls, self._call_states = None, None, []

    def _carry_block(self, index: int, advance: bool) -> dict[str, Tensor]:
        """Block `index` of a carried stage: its groups' statistics over every recorded call, reduced
        and solved (the block's part of the trajectory, returned); with `advance`, the calls become the
        next block's (dense outputs)."""
        if index > self.first_block:
            self._stop_if_agreed()  # between two blocks (a block's solve may take minutes)
        start = time.monotonic()
        self._block = index
        block = self.adapter.blocks()[index]
        if self.stream:
            block.to(self.device)
        self._gather(self.part_groups())
        try:
            with torch.inference_mode():
                self._calls.run(block, self.device, advance=advance,
                                before=lambda i: self.use_call_state(self._call_states[i]))
        finally:
            self.use_call_state(None)
            for h in self._handles:
                h.remove()
            self._handles = []
        tensors = self._finish_part()
        # kept: a stop or kill from here on resumes at the next block (not the stage's last block: the
        # stage's shard comes next; not with sequential groups, whose resumption would need the
        # earlier groups installed pruned)
        if self.global_rank == 0 and index < len(self.adapter.blocks()) - 1 and self.passes == 1:
            self._partial.write_block(self.stage, index, tensors)
            self._stage_out = {}  # on disk now: the stage's shard is assembled from the blocks' shards
        if self.stream:
            block.to("cpu")
        if self.global_rank == 0:  # a big model's stage takes hours after its batches: a line per block
            print(f"calibration block {index + 1}/{len(self.adapter.blocks())} of stage {self.stage}: "
                  f"{time.monotonic() - start:.1f} s", flush=True)
        return tensors

    def _finish_part(self) -> dict[str, Tensor]:
        """The statistics of the pass (or carried block) reduced across processes, solved into its
        part of the stage's trajectory (returned; empty on a rank that does not solve)."""
        # One all-reduce per buffer, here and only here: every rank reaches this point once per part.
        for stat in self._stats.values():
            for key, buf in stat.buffers.items():
                stat.buffers[key] = self._all_reduce(buf)
        # Sequential passes need the part's trajectory on every rank (the next pass runs on the
        # pruned part); a single pass computes it on rank 0 only.
        if self.global_rank == 0 or self.passes > 1:
            tensors = self.stage_trajectory()
            self._stage_out.update(tensors)
            if self.passes > 1 and not self.carry:  # carried: after the group's last block (_carry_stage)
                self.after_part(tensors)
        else:
            tensors = {}
        self._stats = {}
        return tensors

    def part_groups(self, part: int | None = None) -> list[UnitGroup]:
        """The unit groups calibrated in pass `part` (default: the current one): all of them, or with
        `num_parts` = K > 1 the groups of the `part`-th of K contiguous chunks of blocks; carried, the
        current block's."""
        groups = self.adapter.unit_groups()
        if self.carry and part is None and self._block is not None:
            return [g for g in groups if g.block == self._block]
        parts = self.passes if self.passes > 1 else self.num_parts  # carried: the sequential groups
        part = self.part if part is None else part
        if parts == 1:
            return groups
        n = len(self.adapter.blocks())
        bounds = [round(k * n / parts) for k in range(parts + 1)]
        return [g for g in groups if bounds[part] <= g.block < bounds[part + 1]]

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
            self._stop_now()  # a solve may take minutes per group on a big model
            # to the host as each group is solved: a stage's trajectory (FLUX: ~73 GiB) never sits on the
            # accelerator beside the weights and statistics
            out.update(self.group_tensors(group))
        return out

    def group_tensors(self, group: UnitGroup) -> dict[str, Tensor]:
        """One group's part of the stage's tensors, on the host: its removal order and compensated weights."""
        layer = self.adapter.output_layer(group)
        order, weights = self.group_trajectory(group, layer.weight.detach(), self._stats[group.name])
        out = {f"{group.name}.order": order.to(torch.long).cpu()}
        for level, w in weights.items():
            out[f"{group.name}.weight.{level}"] = w.to(self.store_dtype).cpu()
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


def estimate_stat_bytes(adapter: DenoiserAdapter, pruner: Pruner, by_block: bool | None = None) -> int:
    """Bytes of one stage's statistics (what calibration holds at once): per unit group the buffers
    of `stats.py` — X·Xᵀ [in, in] (compensating pruners) or ‖x‖² [in], and the token count (one
    element); depth pruning: a cosine sum and a token count per block. tests/test_memory_plan.py
    checks it against the buffers a calibration allocates."""
    size = torch.finfo(pruner.stat_dtype).bits // 8
    if pruner.depth:
        return 2 * len(adapter.blocks()) * size

    def part_bytes(groups: list[UnitGroup]) -> int:
        return sum(((n * n if pruner.compensated else n) + 1) * size for n in pruner.stat_features(adapter, groups))

    if not (pruner.by_block if by_block is None else by_block):  # block by block: its largest block's only
        return part_bytes(adapter.unit_groups())
    n = len(adapter.blocks())
    return max(part_bytes([g for g in adapter.unit_groups() if g.block == b]) for b in range(n))


def stop_after(adapter: DenoiserAdapter, blocks: set[int]) -> list[Any]:
    """Forward hooks that end the denoiser's forward (raising PartDone) once each of `blocks` has run
    in it, whatever order the architecture runs them in (a UNet's up blocks after its down blocks).
    Returns the handles to remove."""
    modules = {i: adapter.blocks()[i] for i in blocks}
    seen: set[int] = set()

    def ran(index: int) -> None:
        seen.add(index)
        if seen >= blocks:
            seen.clear()
            raise PartDone()

    def reset(*_: Any) -> None:
        seen.clear()

    handles = [module.register_forward_hook(lambda *_, i=i: ran(i)) for i, module in modules.items()]
    handles.append(adapter.denoiser.register_forward_pre_hook(reset))  # a new forward starts afresh
    return handles


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


def estimate_store_bytes(adapter: DenoiserAdapter, pruner: Pruner, levels_max: int, num_stages: int,
                         block: int | None = None) -> int:
    """Bytes of the store about to be written (compensated weights dominate); `block`: that block's part."""
    total = 0
    elem = torch.finfo(pruner.store_dtype_for(adapter)).bits // 8 if pruner.compensated else 0
    granularity = pruner.granularity
    if granularity is not None:
        blocks = {name: layer.block for layer in adapter.sparse_layers() for name in layer.names()}
        for name, linear in adapter.sparse_linears().items():
            if block is None or blocks[name] == block:
                shape = tuple(linear.weight.shape)
                total += shape[0] * shape[1] + sum(granularity.kept(level, levels_max, shape) * elem
                                                   for level in range(1, levels_max))
        return total * num_stages
    for group in ([] if pruner.depth else adapter.unit_groups()):
        if block is not None and group.block != block:
            continue
        total += group.size * 8
        if pruner.compensated:
            out = adapter.output_layer(group).out_features
            for level in range(1, levels_max + 1):
                total += out * (group.size - group.removed_at(level, levels_max)) * group.unit_width * elem
    return (total + (len(adapter.blocks()) * 8 if pruner.depth else 0)) * num_stages


def device_room(adapter: DenoiserAdapter, device: torch.device | str) -> int | None:
    """Bytes a calibration may use on `device`: its free memory plus what the denoiser already holds
    there; None where unknown (a device this machine lacks: a dry run's plan)."""
    from ..memory import available_bytes

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return None
    free = available_bytes(device)
    if free is None:
        return None
    held = sum(p.numel() * p.element_size() for p in adapter.denoiser.parameters() if p.device.type == device.type)
    return free + (held if device.type != "cpu" else 0)
