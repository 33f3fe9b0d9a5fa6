"""The memory a run will need, per phase and place, known before any weight is loaded.

`plan_memory` counts, on the adapter over the architecture on the meta device (`denoisers.architecture`),
what each phase of the CURRENT code holds at its peak (whole-model calibration: one stage's statistics
for every unit group at once, the whole denoiser on the accelerator):

- loading: the weights on the accelerator, and on the host while diffusers reads the checkpoint there;
- calibration, gathering: weights, one stage's statistics (`pruners.base.estimate_stat_bytes`), the
  activations of one calibration batch, and the statistic hook's copy of the largest output-layer
  input in the statistics' dtype; on the host the calibration set (clean latents, the stage's noise
  and noised copy, float32) and its conditions;
- calibration, solving (compensating pruners): weights, statistics, the OBS solver's temporaries of the
  largest unit group (groups are solved one at a time); the stage's trajectory goes to the host as
  each group is solved, until its shard is written;
- search: weights, the routed stages of one candidate (`routing.estimate_prepared_bytes`, resident or
  shared as `resident_routing` says) and the activations of one probe batch (×2 with CFG);
- sampling (`diffes-pl test`, exports): weights, resident routed stages, one probe batch;
- disk: the store (`estimate_store_bytes`).

Block by block (`pruner.by_block`) the statistics row is the largest block's; carried
(`pruner.carry`) the host also holds the stage's recorded block calls (`carried_bytes`) and one
block's trajectory instead of the stage's, the accelerator one batch's call and its outputs; streamed
(`pruner.stream`) the accelerator holds the weights outside the blocks and the largest block, the
host all of them. Phases run one after another: a place's peak is its
largest phase. On a CPU run the accelerator IS the host: every row is counted on the host.
Not counted: the VAE and text encoders (loaded with the pipeline, not part of the architecture
counted here), Python, CUDA context and allocator slack.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from .memory import check_fits, gib, module_bytes

PLACES = ("accelerator", "host", "disk")
HALF = (torch.float16, torch.bfloat16)
FAST_BLOCK_GROUPS = 32  # obs_solver.prune_groups' default block_groups (fast mode's pending updates)


@dataclass(frozen=True)
class Row:
    """One term: `nbytes` held on `place` during `phase` (None: not estimated, `fix` says why)."""

    phase: str
    place: str  # "accelerator", "host" or "disk"
    name: str
    nbytes: int | None
    fix: str = ""  # what lowers this term (named in a refusal when it is the biggest)


@dataclass
class MemoryPlan:
    """Named rows of bytes per phase and place; `peak(place)` is the largest phase's sum."""

    title: str
    device: str  # the accelerator's torch device type ("cuda", "cpu", …)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def phases(self) -> list[str]:
        return list(dict.fromkeys(r.phase for r in self.rows))

    def total(self, phase: str, place: str) -> int:
        return sum(r.nbytes or 0 for r in self.rows if r.phase == phase and r.place == place)

    def peak_phase(self, place: str, phases: Sequence[str] | None = None) -> str | None:
        """The phase with the most bytes on `place` (among `phases`), None if none holds any."""
        candidates = [p for p in self.phases if phases is None or p in phases]
        best = max(candidates, key=lambda p: self.total(p, place), default=None)
        return best if best is not None and self.total(best, place) > 0 else None

    def peak(self, place: str, phases: Sequence[str] | None = None) -> int:
        phase = self.peak_phase(place, phases)
        return 0 if phase is None else self.total(phase, place)

    def row(self, name: str, phase: str | None = None) -> Row:
        return next(r for r in self.rows if r.name == name and (phase is None or r.phase == phase))

    def biggest(self, phase: str, place: str) -> Row:
        return max((r for r in self.rows if r.phase == phase and r.place == place), key=lambda r: r.nbytes or 0)

    def format(self) -> str:
        """A small aligned table in GiB (MiB below 1 GiB), one block of lines."""
        places = [p for p in PLACES[:2] if any(r.place == p for r in self.rows)]
        width = max(len(r.name) for r in self.rows) + 4
        size = lambda b: "–" if b is None else gib(b)
        lines = [f"memory plan: {self.title}", f"  {'':{width}s}" + "".join(f"{p:>13s}" for p in places)]
        for phase in self.phases:
            lines.append(f"  {phase}")
            for r in self.rows:
                if r.phase == phase and r.place in places:
                    lines.append(f"    {r.name:{width - 2}s}" + "".join(
                        f"{size(r.nbytes) if p == r.place else '':>13s}" for p in places))
            lines.append(f"    {'total':{width - 2}s}" + "".join(f"{gib(self.total(phase, p)):>13s}" for p in places))
        peaks = [f"{p} {gib(self.peak(p))} ({self.peak_phase(p)})" for p in places if self.peak_phase(p)]
        disk = sum(r.nbytes or 0 for r in self.rows if r.place == "disk")
        lines.append("  peak: " + ", ".join(peaks) + (f"; store on disk {gib(disk)}" if disk else ""))
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def check(self, phases: Sequence[str] | None = None, device: str | torch.device | None = None) -> None:
        """Refuses (InsufficientMemoryError, one line: `memory.check_fits`) when a place's peak over
        `phases` exceeds what is free there, naming the peak's biggest term and what lowers it."""
        places = {"accelerator": torch.device(device if device is not None else self.device), "host": torch.device("cpu")}
        for place, where in places.items():
            phase = self.peak_phase(place, phases)
            if phase is None or where.type == "meta":
                continue
            nbytes, big = self.total(phase, place), self.biggest(phase, place)
            check_fits(nbytes, where, f"{phase} of {self.title} ({place})",
                       f"its biggest term is {big.name} ({gib(big.nbytes or 0)}): {big.fix or 'use a machine with more memory'}")


def forward_sizes(adapter: Any, rows: int, stat_dtype: torch.dtype | None = None) -> tuple[int | None, int]:
    """(largest hidden state one layer returns, largest output-layer input in `stat_dtype`) in bytes for
    a denoiser call on `rows` samples, from one forward on the meta device at batch 1 scaled by `rows`
    (activations grow linearly with the batch). (None, 0) where the architecture cannot run on meta."""
    denoiser = adapter.denoiser
    device = next(denoiser.parameters()).device  # meta; the built-in model is built on the CPU (it is tiny)
    largest = [0, 0]

    def output(_m, _args, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    def layer_input(_m, args):
        if stat_dtype is not None:
            largest[1] = max(largest[1], args[0].numel() * stat_dtype.itemsize)

    handles = [m.register_forward_hook(output) for m in denoiser.modules() if not any(True for _ in m.children())]
    if stat_dtype is not None:
        handles += [adapter.output_layer(g).register_forward_pre_hook(layer_input) for g in adapter.unit_groups()]
    try:
        C, H, W = adapter.latent_shape
        latents = torch.zeros(1, C, H, W, device=device, dtype=adapter.dtype)
        timesteps = torch.full((1,), 500, device=device, dtype=torch.long)
        with torch.inference_mode():
            adapter.predict_noise(latents, timesteps, adapter.example_condition(1, device=device))
    except Exception:  # an architecture with a data-dependent step: the term is reported as not estimated
        return None, 0
    finally:
        for h in handles:
            h.remove()
    return largest[0] * rows, largest[1] * rows


def carried_bytes(adapter: Any, nsamples: int, batch_size: int) -> int | None:
    """Bytes of the first block's recorded calls (`pruners/carry.py`: the residual streams and what
    every block shares) for `nsamples` samples in batches of `batch_size`: per-sample tensors scale
    with the samples, batch-free ones (FLUX's rotary embeddings) with the batches. From forwards on
    the meta device at batch 1 and 2; None where the architecture cannot run on meta."""
    one, two = carried_call_bytes(adapter, 1), carried_call_bytes(adapter, 2)
    if one is None or two is None:
        return None
    per_sample = two - one
    return per_sample * nsamples + (one - per_sample) * -(-nsamples // batch_size)


def carried_call_bytes(adapter: Any, rows: int = 1) -> int | None:
    """Bytes of the first block's recorded call for a batch of `rows` samples (meta forward)."""
    from .pruners.carry import CarriedCalls, PartDone, call_bytes

    device = next(adapter.denoiser.parameters()).device
    calls = CarriedCalls(adapter.block_io, host="meta")
    handle = adapter.blocks()[0].register_forward_pre_hook(calls.capture, with_kwargs=True)
    try:
        C, H, W = adapter.latent_shape
        latents = torch.zeros(rows, C, H, W, device=device, dtype=adapter.dtype)
        timesteps = torch.full((rows,), 500, device=device, dtype=torch.long)
        with torch.inference_mode():
            adapter.predict_noise(latents, timesteps, adapter.example_condition(rows, device=device))
    except PartDone:
        return call_bytes(calls.calls[0])
    except Exception:  # an architecture with a data-dependent step
        return None
    finally:
        handle.remove()
    return None


def estimate_solver_bytes(adapter: Any, pruner: Any, levels_max: int) -> int:
    """Peak temporaries of the OBS solve (`pruners/obs_solver.py` `prune_groups`) of the largest unit
    group — groups are solved one after another. Per group of k = in, o = out columns, s the solver's
    and t the statistics' element size: the normalised Hessian (k²·t, held by the caller); fast mode:
    Hinv, Hf, Qf and, when a quarter is dropped, compacted copies of Hf and Qf made while the old ones
    live (≤ 4.125·k²·s), W (o·k·s) and the pending factors (3·32·g·k·s); the closed form then holds
    Hinv, Hinv_R, L and P (4·k²·s), W, Ŵ, Y (3·o·k·s) and every level's compensated weight in the
    solver dtype; exact mode instead a W snapshot per level beside W and Hinv and their clones
    ((H + 2)·o·k·s + 2·k²·s), or the inverse's four k×k matrices. Checked against the bytes the solve
    allocates (tests/test_memory_plan.py: within 10 %). Depth and non-compensating pruners solve nothing."""
    if pruner.depth or not pruner.compensated:
        return 0
    hp = getattr(pruner, "hparams", {})
    s = getattr(torch, hp.get("solver_dtype", "float64")).itemsize
    t = pruner.stat_dtype.itemsize
    exact = hp.get("mode", "fast") == "exact"
    if pruner.granularity is not None:
        # unstructured / N:M (`sparse_solver.obs_sparse`), one layer at a time: the caller's Hessian, the
        # damped copy, H⁻¹ and its Cholesky factor (3·k²·s), and about six [o, k] buffers of the sweep and
        # the conjugate-gradient refinement. An estimate from the code, not measured against allocations
        return max(k * k * t + 3 * k * k * s + 6 * o * k * s
                   for o, k in (tuple(lin.weight.shape) for lin in adapter.sparse_linears().values()))
    most = 0
    for group in adapter.unit_groups():
        layer = adapter.output_layer(group)
        k, o, g = layer.in_features, layer.out_features, group.unit_width
        levels = sum(o * (group.size - group.removed_at(L, levels_max)) * g for L in range(1, levels_max + 1))
        if exact:  # the inverse (H, L, identity, Hinv) beside W; then W, Hinv and their per-level snapshots
            need = k * k * t + max(4 * k * k * s + o * k * s, 2 * k * k * s + (levels_max + 2) * o * k * s)
        else:
            greedy = 4.125 * k * k * s + o * k * s + 3 * FAST_BLOCK_GROUPS * g * k * s
            closed = 4 * k * k * s + 3 * o * k * s + levels * s
            need = k * k * t + max(greedy, closed)
        most = max(most, int(need))
    return most


def plan_memory(adapter: Any, pruner: Any, *, levels_max: int, num_stages: int, nsamples: int, batch_size: int,
                device: str | torch.device = "cuda", target_level: float | None = None,
                resident_routing: bool = True, probe_rows: int = 1, guidance: float = 1.0, title: str | None = None,
                calibrate: bool = True) -> MemoryPlan:
    """The run's memory plan from its settings and the adapter over the architecture (no weights).

    Args:
        adapter: the adapter over the denoiser (meta device: `denoisers.architecture`), in the run's dtype.
        pruner: the run's pruner (its statistics, solver and store dtypes).
        levels_max: H.
        num_stages: S.
        nsamples: calibration samples (the calibration set held on the host).
        batch_size: calibration samples per batch (the activations of one batch).
        device: the accelerator (`trainer.strategy.root_device`); on the CPU every row is host memory.
        target_level: the search's budget; the routed stages are counted for the uniform schedule at
            it (not estimated for a fractional target).
        resident_routing: the search's routing: every stage resident, or one shared buffer per layer.
        probe_rows: probes per denoiser call in the search (`probe_batch_size`, or all probes).
        guidance: CFG scale; above 1 every call runs the conditional and unconditional halves together.
        title: the plan's first line (default: the denoiser's name, pruner and dtype).
        calibrate: False leaves the calibration phases out (the store exists).
    """
    from .pruners.base import estimate_stat_bytes, estimate_store_bytes
    from .routing import estimate_prepared_bytes
    from .schedule import Schedule

    device = torch.device(device)
    acc = "host" if device.type == "cpu" else "accelerator"  # one memory on a CPU run
    dtype = adapter.dtype
    dname = str(dtype).removeprefix("torch.")
    sname = str(pruner.stat_dtype).removeprefix("torch.")
    title = title or f"{adapter.name}, {pruner.name} pruner, {dname} on {device.type}"
    plan = MemoryPlan(title, device.type)
    weights = module_bytes(adapter.denoiser, dtype)
    lower_dtype = "--model.dtype bfloat16" if dtype not in HALF else ""
    weight_fix = ", ".join(x for x in (lower_dtype, "a device with more memory") if x)
    stream_fix = ", ".join(x for x in (lower_dtype, "--model.calibrate_by block --model.stream_weights true"
                                       if adapter.carries_blocks and not pruner.depth and pruner.passes == 1 else "") if x)
    add = lambda phase, place, name, nbytes, fix="": plan.rows.append(Row(phase, place, name, nbytes, fix))

    if not (calibrate and pruner.stream):  # streamed, the denoiser loads on the host and stays there
        add("loading", acc, f"denoiser weights ({dname})", weights, weight_fix)
    if acc != "host":  # diffusers reads the checkpoint on the host first (footprint.check_denoiser_memory)
        add("loading", "host", f"checkpoint read ({dname})", weights, weight_fix)

    store_bytes = estimate_store_bytes(adapter, pruner, levels_max, num_stages)
    one_hidden, one_copy = forward_sizes(adapter, 1, None if pruner.depth else pruner.stat_dtype)  # one forward
    if calibrate:
        stats = estimate_stat_bytes(adapter, pruner)
        stat_fix = ", ".join((["--model.pruner.init_args.stat_dtype float32"] if pruner.stat_dtype == torch.float64 else [])
                             + ["a pruner without Hessians (wanda)"])
        hidden, hook_copy = (None, 0) if one_hidden is None else (one_hidden * batch_size, one_copy * batch_size)
        batch_fix = f"a smaller --data.batch_size (now {batch_size})"
        C, H, W = adapter.latent_shape
        latents = nsamples * C * H * W * 4  # float32, whatever the denoiser's dtype
        cond = _condition_bytes(adapter, nsamples)
        samples_fix = f"fewer --data.nsamples (now {nsamples})"
        carried = carried_bytes(adapter, nsamples, batch_size) if pruner.carry else 0
        for phase in ("calibration: gathering", "calibration: solving"):
            if pruner.stream:
                largest = max(module_bytes(b, dtype) for b in adapter.blocks())
                outside = weights - sum(module_bytes(b, dtype) for b in adapter.blocks())
                add(phase, acc, f"weights outside the blocks + the largest block, streamed ({dname})",
                    outside + largest, lower_dtype)
                add(phase, "host", f"denoiser weights, streamed from here ({dname})", weights, lower_dtype)
            else:
                add(phase, acc, f"denoiser weights ({dname})", weights, stream_fix or weight_fix)
            held = "one stage" if not pruner.by_block else "one stage, its largest block (block by block)"
            add(phase, acc, f"statistics of {held} ({sname})", stats, stat_fix)
            add(phase, "host", "calibration latents (clean, noise, noised; float32)", 3 * latents, samples_fix)
            if cond:
                add(phase, "host", "calibration conditions (float32)", cond, samples_fix)
            if pruner.carry:
                add(phase, "host", f"carried block calls of the stage's {nsamples} samples", carried, samples_fix)
        phase = "calibration: gathering"
        add(phase, acc, f"activations of one batch of {batch_size} (≈3× largest hidden state)",
            None if hidden is None else 3 * hidden, batch_fix)
        if pruner.carry and acc != "host":  # on the CPU the carried calls are the host row already
            one_batch = carried_call_bytes(adapter, batch_size)
            add(phase, acc, f"one batch's block call and outputs ({batch_size} samples)",
                None if one_batch is None else 2 * one_batch, batch_fix)
        if hook_copy:
            add(phase, acc, f"statistic hook's copy of a layer input ({sname})", hook_copy, batch_fix)
        phase = "calibration: solving"
        solver = estimate_solver_bytes(adapter, pruner, levels_max)
        if solver:
            solver_dtype = getattr(pruner, "hparams", {}).get("solver_dtype", "float64")
            add(phase, acc, f"OBS solver temporaries, largest group ({solver_dtype})", solver,
                "--model.pruner.init_args.solver_dtype float32" if solver_dtype == "float64" else "")
        stage = estimate_store_bytes(adapter, pruner, levels_max, 1)
        if pruner.carry and pruner.passes == 1:  # each block's part goes to disk as it is solved
            stage = max(estimate_store_bytes(adapter, pruner, levels_max, 1, block=b) for b in range(len(adapter.blocks())))
            add(phase, "host", "one block's trajectory (until its shard is written)", stage, "fewer --model.levels")
        else:
            add(phase, "host", "one stage's trajectory (until its shard is written)", stage,
                "fewer --model.levels" + (", --model.calibrate_by block" if adapter.carries_blocks else ""))
        add("calibration: solving", "disk", "trajectory store", store_bytes, "a lower store_dtype or fewer stages")

    store = SimpleNamespace(depth=pruner.depth, levels_max=levels_max, compensated=pruner.compensated,
                            sparse=pruner.granularity is not None, granularity=pruner.granularity)
    uniform = None
    if target_level is not None and float(target_level).is_integer():
        uniform = Schedule.uniform(int(target_level), levels_max, [1] * num_stages)  # memory depends on levels only
    routed = {r: None if uniform is None else estimate_prepared_bytes(adapter, store, uniform, resident=r)
              for r in (True, False)}
    rows_per_call = probe_rows * (2 if guidance > 1 else 1)
    probe_hidden = None if one_hidden is None else one_hidden * rows_per_call
    probe_fix = f"a smaller --model.probe_batch_size (now {probe_rows})"
    for phase, resident in (("search", resident_routing), ("sampling", True)):
        add(phase, acc, f"denoiser weights ({dname})", weights, weight_fix)
        how = "resident" if resident else "shared buffers"
        fix = ("--model.resident_routing false (" + gib(routed[False]) + ")" if resident and routed[False] is not None
               else "fewer stages")
        add(phase, acc, f"routed stages, uniform level {target_level:g} ({how})", routed[resident], fix)
        add(phase, acc, f"activations of one call, {rows_per_call} rows (≈3× largest hidden state)",
            None if probe_hidden is None else 3 * probe_hidden, probe_fix)
    if (hidden if calibrate else probe_hidden) is None:
        plan.notes.append("activations: not estimated (the architecture does not run on the meta device)")
    plan.notes.append("not counted: VAE, text encoders, CUDA context and allocator slack")
    return plan


def _condition_bytes(adapter: Any, nsamples: int) -> int:
    """The calibration set's conditions: class labels (int64), or the encoded text of every sample
    (float32, shaped as the adapter's example condition)."""
    cond = adapter.example_condition(1, device="meta")
    tensors = [cond] if isinstance(cond, torch.Tensor) else [v for v in vars(cond).values() if isinstance(v, torch.Tensor)]
    per_sample = sum(t.numel() * (t.element_size() if not t.is_floating_point() else 4) for t in tensors)
    return per_sample * nsamples


def run_plan(settings: Any, run: Any, pruner: Any, *, nsamples: int, batch_size: int, device: str | torch.device,
             calibrate: bool = True) -> MemoryPlan:
    """`plan_memory` for a run: its `SearchSettings` and `builder.RunPlan` (the meta adapter, H, S, target)."""
    return plan_memory(run.adapter, pruner, levels_max=run.levels_max, num_stages=run.partition.num_stages,
                       nsamples=nsamples, batch_size=batch_size, device=device, target_level=run.target_level,
                       resident_routing=settings.resident_routing,
                       probe_rows=settings.probe_batch_size or settings.num_probes, guidance=settings.guidance,
                       title=f"{settings.denoiser}, {pruner.name} pruner, {settings.dtype} on {torch.device(device).type}",
                       calibrate=calibrate)


__all__ = ["MemoryPlan", "Row", "carried_bytes", "carried_call_bytes", "estimate_solver_bytes", "forward_sizes",
           "plan_memory", "run_plan"]
