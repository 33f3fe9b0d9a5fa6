"""`diffes-pl test`: evaluates the run's searched schedule against the dense model and the uniform
schedule at the same budget, on probes the search never saw (another seed)."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from ..evaluation.macs import count_macs
from ..fitness import FitnessInputs, get_metric
from ..io import write_json
from ..partition import Schedule
from ..routing import Router
from ..trajectory import TrajectoryStore
from .rollouts import Probes, RolloutEngine


def schedule_macs(adapter, router: Router | None, partition) -> int:
    """MACs of a whole sampling run at batch 1 (one forward per step, the CFG duplicate not counted)."""
    if router is None:
        return count_macs(adapter) * partition.num_steps
    total = 0
    for stage in range(partition.num_stages):
        router.install(stage)
        total += count_macs(adapter) * partition.steps_per_stage[stage]
    router.restore_dense()
    return total


@torch.no_grad()
def evaluate_schedules(module, schedules: dict[str, Schedule], num_probes: int = 256, probe_seed: int = 99991,
                       metrics=("ssim", "psnr")) -> dict:
    """Metrics of each schedule (and the dense model) on fresh probes."""
    adapter = module.load()
    store = TrajectoryStore.open(module.store_path)
    probes = Probes.make(adapter, num_probes, probe_seed)
    hp = module.hparams
    engine = RolloutEngine(adapter, store, module.partition, probes, sampler=hp.sampler, guidance=hp.guidance,
                           batch_size=hp.probe_batch_size, levels_max=module.levels_max, target_level=hp.target_level)
    ref_latents, _ = engine.run(None)
    ref_images = adapter.decode(ref_latents.to(adapter.device)).cpu()
    names = list(metrics)
    if getattr(adapter, "name", "") == "tiny-digits":
        names += ["class_accuracy", "digits_fid"]
    results = {}
    dense_macs = schedule_macs(adapter, None, module.partition)
    for label, schedule in {"dense": None, **schedules}.items():
        if schedule is None:
            latents, images, macs = ref_latents, ref_images, dense_macs
        else:
            latents, _ = engine.run(tuple(schedule.levels))
            images = adapter.decode(latents.to(adapter.device)).cpu()
            with Router(adapter, store, schedule) as router:
                macs = schedule_macs(adapter, router, module.partition)
        inputs = FitnessInputs(images, latents, ref_images, ref_latents, probes.conditions)
        row = {"levels": None if schedule is None else schedule.levels, "macs": macs,
               "mac_ratio": dense_macs / macs}
        row.update({n: float(get_metric(n)(inputs)) for n in names})
        results[label] = row
    return results


def evaluate_run(module, trainer: L.Trainer, log=print) -> dict:
    run = Path(trainer.default_root_dir)
    schedule = Schedule.load(run / "schedule.json")
    hp = module.hparams
    module.load()
    uniform = Schedule.uniform(int(hp.target_level), module.levels_max, module.partition.steps_per_stage,
                               partition=module.partition.to_dict()) if float(hp.target_level).is_integer() else None
    schedules = {"searched": schedule, **({"uniform": uniform} if uniform else {})}
    results = evaluate_schedules(module, schedules)
    write_json(run / "evaluation.json", results)
    log(json.dumps(results, indent=1))
    return results
