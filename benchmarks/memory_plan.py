"""Memory a config's run needs, from the code's own estimates (the README's memory table).

    python benchmarks/memory_plan.py                          # every configs/*.yaml
    python benchmarks/memory_plan.py configs/sdxl_obs.yaml    # one config
    python benchmarks/memory_plan.py --full configs/flux_obs.yaml   # the whole plan, as `--dry_run true` prints it

Offline and in seconds: a thin caller of `diffes_pl.memory_plan.plan_memory` (what `diffes-pl predict`
and `fit` print and check before any work): each denoiser is built on the meta device from its shipped
config (`denoisers.architecture`, no weights) and the config's pruner is made. The table's figures are
rows of that plan: the denoiser's weights in the config's dtype, one stage's calibration statistics
(`pruners.base.estimate_stat_bytes`), the trajectory store on disk (`estimate_store_bytes`), the sliced
weights a router prepares for the uniform schedule at the config's target
(`routing.estimate_prepared_bytes`, resident and `resident=False`), and the plan's peaks on the
accelerator and the host (activations, solver temporaries and the stage's trajectory included; see
the module's docstring for what is not counted). Writes benchmarks/results/memory_plan.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch
import yaml

from diffes_pl.denoisers import architecture
from diffes_pl.memory_plan import MemoryPlan, plan_memory

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def config_plan(config: Path) -> tuple[dict, MemoryPlan]:
    """(the config's settings, its memory plan)."""
    raw = yaml.safe_load(config.read_text())
    model, data, trainer = raw["model"], raw.get("data") or {}, raw.get("trainer") or {}
    name, dtype_name = model.get("denoiser", "tiny-digits"), model.get("dtype", "float32")
    module, _, cls = model["pruner"]["class_path"].rpartition(".")
    pruner = getattr(importlib.import_module(module), cls)(**(model["pruner"].get("init_args") or {}))
    adapter = architecture(name, dtype=getattr(torch, dtype_name))
    H = int(model.get("levels") or adapter.default_levels("depth" if pruner.depth else "width"))
    # not SearchSettings: it would check the fitness metric's weights, which memory does not need
    target = model["target_level"] if model.get("target_level") is not None else model.get("sparsity", 0.5) * H
    S = int(model.get("num_stages", 10))
    device = "cuda" if str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda") else "cpu"
    # resident_routing false: the search row is the shared figure, the sampling row the resident one
    plan = plan_memory(adapter, pruner, levels_max=H, num_stages=S, nsamples=int(data.get("nsamples", 64)),
                       batch_size=int(data.get("batch_size", 32)), device=device, target_level=target,
                       resident_routing=False, probe_rows=int(model.get("probe_batch_size") or model.get("num_probes", 64)),
                       guidance=float(model.get("guidance", 2.0)), title=f"{config.name}: {name}, {pruner.name}, {dtype_name}")
    settings = {"denoiser": name, "dtype": dtype_name, "pruner": pruner, "adapter": adapter, "H": H,
                "target_level": target, "num_stages": S}
    return settings, plan


def plan(config: Path) -> dict:
    settings, memory = config_plan(config)
    pruner, adapter = settings["pruner"], settings["adapter"]
    phase = "calibration: gathering"
    rows = {r.name.split(" (")[0].split(",")[0]: r for r in memory.rows if r.phase in (phase, "calibration: solving")}
    routed = lambda phase: next(r.nbytes for r in memory.rows if r.phase == phase and r.name.startswith("routed"))
    return {"config": str(config.relative_to(ROOT)), "denoiser": settings["denoiser"], "dtype": settings["dtype"],
            "pruner": pruner.name, "H": settings["H"], "target_level": settings["target_level"],
            "num_stages": settings["num_stages"],
            "parameters": sum(p.numel() for p in adapter.denoiser.parameters()),
            "denoiser_bytes": rows["denoiser weights"].nbytes,
            "stat_dtype": str(pruner.stat_dtype).removeprefix("torch."),
            "stat_bytes_per_stage": rows["statistics of one stage"].nbytes,
            "store_bytes": rows["trajectory store"].nbytes,
            "routed_resident_bytes": routed("sampling"), "routed_shared_bytes": routed("search"),
            "peak_accelerator_bytes": memory.peak("accelerator"), "peak_accelerator_phase": memory.peak_phase("accelerator"),
            "peak_host_bytes": memory.peak("host"), "peak_host_phase": memory.peak_phase("host")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, help="config files (default: every configs/*.yaml)")
    parser.add_argument("--full", action="store_true", help="print each config's whole plan (per phase and place)")
    args = parser.parse_args()
    configs = [c.resolve() for c in args.configs] or sorted((ROOT / "configs").glob("*.yaml"))
    if args.full:
        for c in configs:
            print(config_plan(c)[1].format(), end="\n\n")
        return
    rows = [plan(c) for c in configs]
    fmt = lambda b: "–" if b is None else f"{b / GB:.2f} GB"
    print(f"{'config':28s} {'params':>8s} {'weights':>10s} {'stats/stage':>12s} {'store':>10s} "
          f"{'routed':>10s} {'shared':>10s} {'peak acc.':>10s} {'peak host':>10s}")
    for r in rows:
        print(f"{Path(r['config']).name:28s} {r['parameters'] / 1e9:7.2f}B {fmt(r['denoiser_bytes']):>10s} "
              f"{fmt(r['stat_bytes_per_stage']):>12s} {fmt(r['store_bytes']):>10s} "
              f"{fmt(r['routed_resident_bytes']):>10s} {fmt(r['routed_shared_bytes']):>10s} "
              f"{fmt(r['peak_accelerator_bytes'] or None):>10s} {fmt(r['peak_host_bytes']):>10s}")
    if not args.configs:
        out = ROOT / "benchmarks" / "results" / "memory_plan.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"→ {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
