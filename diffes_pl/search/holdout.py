"""Schedules scored like the search scores them, on probes it never saw: SSIM / PSNR against the
dense model (plus the metrics the denoiser's declared evaluation reference supports: class accuracy
and digits-FID for the built-in model) and MACs, per schedule. The notebook and
benchmarks/compare_baselines.py compare the searched schedule with the baselines this way; FID, IS
and latency on many images are `diffes-pl test` (evaluation/report.py)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..caching.budget import trajectory_macs
from ..fitness import FitnessInputs, get_metric
from ..run import RunContext
from ..schedule import Schedule
from .rollouts import Probes, RolloutEngine


def _engine(context: RunContext, num_probes: int, probe_seed: int) -> tuple[RolloutEngine, Probes]:
    probes = Probes.make(context.adapter, num_probes, probe_seed, prompts=context.prompts)
    return RolloutEngine(context.adapter, context.store, context.partition, probes, sampler=context.sampler,
                         guidance=context.guidance, batch_size=context.probe_batch_size), probes


@torch.no_grad()
def dense_outputs(context: RunContext, num_probes: int = 256, probe_seed: int = 99991) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, images) of the dense model on the probes `evaluate_schedules` makes, sampled as
    `context` samples: pass them as its `reference` to score another run's schedules (another
    sampler or step count) against this run's dense outputs."""
    engine, _ = _engine(context, num_probes, probe_seed)
    latents, _ = engine.run(None)
    return latents, context.adapter.decode(latents.to(context.adapter.device)).cpu()


@torch.no_grad()
def evaluate_schedules(context: RunContext, schedules: dict[str, Schedule], num_probes: int = 256,
                       probe_seed: int = 99991, metrics=("ssim", "psnr"),
                       extra_metrics: dict[str, Callable[[FitnessInputs], float]] | None = None,
                       reference: tuple[torch.Tensor, torch.Tensor] | None = None,
                       per_probe: tuple[str, ...] = (), images: dict | None = None) -> dict:
    """{name: {levels, intervals, macs, mac_ratio, <metric>: value}} for the dense model (`dense`) and each
    schedule, on `num_probes` fresh probes seeded with `probe_seed`, sampled as the run samples.
    `per_probe`: metrics (of `metrics`) whose [P] per-probe values go in the row too, as
    `<metric>_per_probe` lists (oriented as the metric: SSIM per image; PSNR's is −MSE) — for paired
    differences between two schedules on the same probes.
    `extra_metrics`: more columns, {name: callable of the row's FitnessInputs} (e.g. digits-FID
    against another real set). `reference`: the (latents, images) the reference metrics compare
    with (`dense_outputs` of another context on the same probes); default this context's dense
    model. `mac_ratio` is always against this context's dense model. `images`: a dict that receives
    each row's decoded images [P, C, H, W] (for set-level statistics such as FID intervals)."""
    adapter, partition, store = context.adapter, context.partition, context.store
    engine, probes = _engine(context, num_probes, probe_seed)
    dense_latents, _ = engine.run(None)
    dense_images = adapter.decode(dense_latents.to(adapter.device)).cpu()
    ref_latents, ref_images = (dense_latents, dense_images) if reference is None else reference
    declared = adapter.evaluation_reference
    names = list(metrics) + (list(declared.metrics) if declared is not None else [])
    results = {}
    dense_macs = trajectory_macs(adapter, None, partition)
    for label, schedule in {"dense": None, **schedules}.items():
        latents = dense_latents if schedule is None else engine.run(schedule)[0]  # routed (+ cached)
        decoded = dense_images if schedule is None else adapter.decode(latents.to(adapter.device)).cpu()
        macs = trajectory_macs(adapter, schedule, partition, store=store)  # a router only to count a level-only one
        if images is not None:
            images[label] = decoded
        inputs = FitnessInputs(decoded, latents, ref_images, ref_latents, probes.conditions)
        row = {"levels": None if schedule is None else schedule.levels,
               "intervals": None if schedule is None else schedule.intervals, "macs": macs,
               "mac_ratio": dense_macs / macs}
        row.update({n: float(get_metric(n)(inputs)) for n in names})
        row.update({f"{n}_per_probe": get_metric(n).probe_values(inputs).tolist() for n in per_probe})
        row.update({n: float(fn(inputs)) for n, fn in (extra_metrics or {}).items()})
        results[label] = row
    return results

