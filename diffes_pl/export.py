"""Export a routed denoiser and load it back without the trajectory store.

An export folder holds:
    denoiser/            the dense denoiser as diffusers saves it (config.json + safetensors)
    routes/              a trajectory store cut down to what the schedule uses: per stage, the
                         removal orders and the compensated weights at that stage's level only
    schedule.json        levels, partition, H
    export.json          what the folder is (format, denoiser name and family)
`load` rebuilds the denoiser with diffusers' own `from_pretrained`, opens `routes/` and returns
the adapter and a Router: sampling with it reproduces the routed samples exactly.

A single-stage, uniformly pruned DiT cannot be written for diffusers' `from_pretrained`:
`DiTTransformer2DModel` derives the model width from `num_attention_heads × attention_head_dim`
and the MLP width from it (×4), so a config cannot say "fewer heads at the same width" or "a
narrower MLP"; such a model is exported in this format instead (a 1-stage schedule).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .denoisers import DiTAdapter
from .denoisers.base import DenoiserAdapter
from .io import write_json
from .partition import Schedule
from .routing import Router
from .trajectory import TrajectoryStore

FORMAT = "diffes-pl-routed/1"


def _routes(store: TrajectoryStore, schedule: Schedule, adapter: DenoiserAdapter):
    for stage, level in enumerate(schedule.levels):
        tensors = {}
        if store.depth:
            tensors["blocks.order"] = store.block_order(stage)
        else:
            for group in adapter.unit_groups():
                tensors[f"{group.name}.order"] = store.order(stage, group.name)
                weight = store.weight(stage, group.name, level)
                if weight is not None:
                    tensors[f"{group.name}.weight.{level}"] = weight
        yield tensors


def save(adapter: DenoiserAdapter, store: TrajectoryStore, schedule: Schedule, path: str | os.PathLike) -> Path:
    """Writes the export folder atomically (temporary name, then rename)."""
    Router(adapter, store, schedule).remove()  # refuses what the store cannot serve, before writing
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        was_dense = adapter.is_dense()
        if not was_dense:
            raise RuntimeError("the adapter has a router installed; export from the dense denoiser")
        adapter.denoiser.save_pretrained(tmp / "denoiser", safe_serialization=True)
        manifest = {k: v for k, v in store.manifest.items() if k not in ("nbytes", "format")}
        TrajectoryStore.write(tmp / "routes", manifest, _routes(store, schedule, adapter))
        schedule.save(tmp / "schedule.json")
        write_json(tmp / "export.json", {"format": FORMAT, "name": adapter.name, "family": adapter.family,
                                         "noise_schedule": getattr(adapter, "noise_schedule", None)})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[DenoiserAdapter, Router]:
    """(adapter, router) from an export folder; no trajectory store needed."""
    from diffusers import DiTTransformer2DModel

    path = Path(path)
    info_path = path / "export.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{path} is not a diffes-pl export (no export.json); write one with diffes_pl.export.save")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported export format {info.get('format')!r} (this version reads {FORMAT})")
    if info["family"] != "dit":
        raise ValueError(f"{path}: exports of the {info['family']} family are not supported by this version")
    denoiser = DiTTransformer2DModel.from_pretrained(path / "denoiser").to(device)
    adapter = DiTAdapter(denoiser, info["name"], noise_schedule=info.get("noise_schedule"))
    store = TrajectoryStore.open(path / "routes")
    return adapter, Router(adapter, store, Schedule.load(path / "schedule.json"), device=device)
