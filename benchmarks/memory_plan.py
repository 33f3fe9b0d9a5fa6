"""Memory a config's run needs, from the code's own estimates (the README's memory table).

    python benchmarks/memory_plan.py                          # every configs/*.yaml
    python benchmarks/memory_plan.py configs/sdxl_obs.yaml    # one config

Offline and in seconds: each denoiser is built on the meta device from its shipped config
(`denoisers.architecture`, no weights), the config's pruner is made, and the figures are the ones the
run checks before it allocates: the denoiser's weights in the config's dtype (`memory.module_bytes`,
what `footprint.check_denoiser_memory` checks before loading), one stage's calibration statistics
(`pruners.base.estimate_stat_bytes`, checked before the first calibration epoch), the trajectory
store on disk (`estimate_store_bytes`) and the sliced weights a router prepares for the uniform
schedule at the config's target (`routing.estimate_prepared_bytes`, resident and `resident=False`).
Not counted: text encoders, VAE, activations. Writes benchmarks/results/memory_plan.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from diffes_pl.denoisers import architecture
from diffes_pl.memory import module_bytes
from diffes_pl.pruners.base import estimate_stat_bytes, estimate_store_bytes
from diffes_pl.routing import estimate_prepared_bytes
from diffes_pl.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def plan(config: Path) -> dict:
    raw = yaml.safe_load(config.read_text())
    model = raw["model"]
    name, dtype_name = model.get("denoiser", "tiny-digits"), model.get("dtype", "float32")
    dtype = getattr(torch, dtype_name)
    module, _, cls = model["pruner"]["class_path"].rpartition(".")
    pruner = getattr(importlib.import_module(module), cls)(**(model["pruner"].get("init_args") or {}))
    adapter = architecture(name, dtype=dtype)
    H = int(model.get("levels") or adapter.default_levels("depth" if pruner.depth else "width"))
    # not SearchSettings: it would check the fitness metric's weights, which memory does not need
    target = model["target_level"] if model.get("target_level") is not None else model.get("sparsity", 0.5) * H
    S = int(model.get("num_stages", 10))
    steps = [1] * S  # the router's memory depends on the levels only
    store = SimpleNamespace(depth=pruner.depth, levels_max=H, compensated=pruner.compensated)
    uniform = Schedule.uniform(int(target), H, steps) if float(target).is_integer() else None
    routed = {r: None if uniform is None else estimate_prepared_bytes(adapter, store, uniform, resident=r)
              for r in (True, False)}
    return {"config": str(config.relative_to(ROOT)), "denoiser": name, "dtype": dtype_name,
            "pruner": pruner.name, "H": H, "target_level": target, "num_stages": S,
            "parameters": sum(p.numel() for p in adapter.denoiser.parameters()),
            "denoiser_bytes": module_bytes(adapter.denoiser, dtype),
            "stat_dtype": str(pruner.stat_dtype).removeprefix("torch."),
            "stat_bytes_per_stage": estimate_stat_bytes(adapter, pruner),
            "store_bytes": estimate_store_bytes(adapter, pruner, H, S),
            "routed_resident_bytes": routed[True], "routed_shared_bytes": routed[False]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, help="config files (default: every configs/*.yaml)")
    args = parser.parse_args()
    configs = [c.resolve() for c in args.configs] or sorted((ROOT / "configs").glob("*.yaml"))
    rows = [plan(c) for c in configs]
    fmt = lambda b: "–" if b is None else f"{b / GB:.2f} GB"
    print(f"{'config':28s} {'params':>8s} {'weights':>10s} {'stats/stage':>12s} {'store':>10s} "
          f"{'routed':>10s} {'shared':>10s}")
    for r in rows:
        print(f"{Path(r['config']).name:28s} {r['parameters'] / 1e9:7.2f}B {fmt(r['denoiser_bytes']):>10s} "
              f"{fmt(r['stat_bytes_per_stage']):>12s} {fmt(r['store_bytes']):>10s} "
              f"{fmt(r['routed_resident_bytes']):>10s} {fmt(r['routed_shared_bytes']):>10s}")
    if not args.configs:
        out = ROOT / "benchmarks" / "results" / "memory_plan.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"→ {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
