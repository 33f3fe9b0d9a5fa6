"""Schedules scored like the search scores them, on probes it never saw: SSIM / PSNR against the
dense model (plus the metrics the denoiser's declared evaluation reference supports: class accuracy
and digits-FID for the built-in model) and MACs, per schedule. The notebook and
benchmarks/compare_baselines.py compare the searched schedule with the baselines this way; FID, IS
and latency on many images are `diffes-pl test` (evaluation/report.py)."""
from __future__ import annotations

import torch

from ..evaluation.macs import schedule_macs
from ..fitness import FitnessInputs, get_metric
from ..partition import Schedule
from ..routing import Router
from ..run import RunContext
from .rollouts import Probes, RolloutEngine


@torch.no_grad()
def evaluate_schedules(context: RunContext, schedules: dict[str, Schedule], num_probes: int = 256,
                       probe_seed: int = 99991, metrics=("ssim", "psnr")) -> dict:
    """{name: {levels, macs, mac_ratio, <metric>: value}} for the dense model (`dense`) and each
    schedule, on `num_probes` fresh probes seeded with `probe_seed`, sampled as the run samples."""
    adapter, partition, store = context.adapter, context.partition, context.store
    probes = Probes.make(adapter, num_probes, probe_seed, prompts=context.prompts)
    engine = RolloutEngine(adapter, store, partition, probes, sampler=context.sampler, guidance=context.guidance,
                           batch_size=context.probe_batch_size, levels_max=context.levels_max,
                           target_level=context.target_level)
    ref_latents, _ = engine.run(None)
    ref_images = adapter.decode(ref_latents.to(adapter.device)).cpu()
    declared = adapter.evaluation_reference
    names = list(metrics) + (list(declared.metrics) if declared is not None else [])
    results = {}
    dense_macs = schedule_macs(adapter, None, partition)
    for label, schedule in {"dense": None, **schedules}.items():
        if schedule is None:
            latents, images, macs = ref_latents, ref_images, dense_macs
        else:
            latents, _ = engine.run(tuple(schedule.levels))
            images = adapter.decode(latents.to(adapter.device)).cpu()
            with Router(adapter, store, schedule) as router:
                macs = schedule_macs(adapter, router, partition)
        inputs = FitnessInputs(images, latents, ref_images, ref_latents, probes.conditions)
        row = {"levels": None if schedule is None else schedule.levels, "macs": macs,
               "mac_ratio": dense_macs / macs}
        row.update({n: float(get_metric(n)(inputs)) for n in names})
        results[label] = row
    return results
