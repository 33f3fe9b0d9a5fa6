"""Export a routed denoiser and load it back without the trajectory store.

An export folder holds:
    pipeline/            the dense model as a diffusers pipeline folder: the denoiser (`transformer/`
                         or `unet/`), its VAE and, for SDXL/FLUX, the text encoders and tokenizers
                         when the adapter has them (model_index.json names the pipeline class)
    routes/              a trajectory store cut down to what the schedule uses: per stage, the
                         removal orders and the compensated weights at that stage's level only
    schedule.json        levels, partition, H
    export.json          what the folder is (format, denoiser name and family, noise schedule)
`load` rebuilds the adapter with `load_denoiser` on `pipeline/` (diffusers' own `from_pretrained`),
opens `routes/` and returns the adapter and a Router: sampling with it reproduces the routed samples
exactly, for every family (DiT, SDXL, FLUX).

A single-stage, uniformly pruned denoiser cannot be written for diffusers' `from_pretrained`: in
`DiTTransformer2DModel`, the SDXL UNet's `Transformer2DModel` and FLUX's blocks an attention's width
is `num_attention_heads × attention_head_dim` AND the block's residual width, and the MLP width is
derived from it (×4, or GEGLU's ×4), so a config cannot say "fewer heads at the same width" or "a
narrower MLP"; such a model is exported in this format instead (a 1-stage schedule).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .denoisers import load_denoiser
from .denoisers.base import DenoiserAdapter
from .io import write_json
from .partition import Schedule
from .routing import Router
from .trajectory import TrajectoryStore

# family → (diffusers pipeline class named in model_index.json, the denoiser's subfolder)
PIPELINES = {"dit": ("DiTPipeline", "transformer"), "sdxl": ("StableDiffusionXLPipeline", "unet"),
             "flux": ("FluxPipeline", "transformer")}
FORMAT = "diffes-pl-routed/2"


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
        text_encoders = _save_pipeline(adapter, tmp / "pipeline")
        manifest = {k: v for k, v in store.manifest.items() if k not in ("nbytes", "format")}
        TrajectoryStore.write(tmp / "routes", manifest, _routes(store, schedule, adapter))
        schedule.save(tmp / "schedule.json")
        write_json(tmp / "export.json", {"format": FORMAT, "name": adapter.name, "family": adapter.family,
                                         "noise_schedule": getattr(adapter, "noise_schedule", None),
                                         "text_encoders": text_encoders,
                                         # what a pipeline folder does not say: FLUX's T5 token count
                                         "text_len": getattr(adapter, "text_len", None)})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _save_pipeline(adapter: DenoiserAdapter, folder: Path) -> bool:
    """The dense model as a diffusers pipeline folder; returns whether text encoders were written."""
    if adapter.family not in PIPELINES:
        raise ValueError(f"cannot export a denoiser of the {adapter.family!r} family (known: {sorted(PIPELINES)})")
    pipeline, sub = PIPELINES[adapter.family]
    adapter.denoiser.save_pretrained(folder / sub, safe_serialization=True)
    if getattr(adapter, "vae", None) is not None:
        adapter.vae.save_pretrained(folder / "vae", safe_serialization=True)
    encoders = None
    if hasattr(adapter, "text_encoders"):
        from .denoisers.text import MissingTextEncodersError

        try:
            encoders = adapter.text_encoders()
        except MissingTextEncodersError:
            encoders = None  # the export samples from prompt embeddings (TextCondition) only
    if encoders is not None:
        for (tok_dir, enc_dir), tok, model in zip((("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
                                                  encoders.tokenizers, encoders.encoders):
            tok.save_pretrained(folder / tok_dir)
            model.save_pretrained(folder / enc_dir, safe_serialization=True)
    write_json(folder / "model_index.json", {"_class_name": pipeline})
    return encoders is not None


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[DenoiserAdapter, Router]:
    """(adapter, router) from an export folder; no trajectory store needed."""
    path = Path(path)
    info_path = path / "export.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{path} is not a diffes-pl export (no export.json); write one with diffes_pl.export.save")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported export format {info.get('format')!r} (this version reads {FORMAT})")
    adapter = load_denoiser(str(path / "pipeline"), device=device)
    if info.get("noise_schedule") is not None:
        adapter.noise_schedule = dict(info["noise_schedule"])  # the schedule it was trained (and routed) with
    adapter.name = info["name"]
    if info.get("text_len") is not None:
        adapter.text_len = int(info["text_len"])  # read when the text encoders load (first prompt)
    store = TrajectoryStore.open(path / "routes")
    return adapter, Router(adapter, store, Schedule.load(path / "schedule.json"), device=device)
