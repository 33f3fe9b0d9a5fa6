"""Export a routed denoiser and load it back without the trajectory store.

An export folder holds:
    pipeline/            the dense model as a diffusers pipeline folder, written by the pipeline's own
                         `save_pretrained` (the adapter's `pipeline_class`): the denoiser
                         (`transformer/` or `unet/`), `scheduler/` (the adapter's sampler), the VAE
                         and, for text-conditioned families, the text encoders and tokenizers when the
                         adapter has them. `diffusers.DiffusionPipeline.from_pretrained(path / "pipeline")` opens
                         it; components the adapter lacks (the pixel-space built-in model has no VAE,
                         a text-conditioned adapter may have no text encoders) are recorded as
                         `[null, null]` and listed in export.json `pipeline_missing`: pass them as
                         `None` (`from_pretrained(..., vae=None)`). That pipeline samples the DENSE model;
                         the routed one needs `load` below.
    routes/              a trajectory store cut down to what the schedule uses: per stage, the
                         removal orders and the compensated weights at that stage's level only
    schedule.json        levels, partition, H; for a joint schedule also its cache (per-stage
                         `cache_intervals`, `cache_branch`, `mac_budget` and the `step_costs` table):
                         caching needs no weights, so the routes are the same
    export.json          what the folder is (format, denoiser name and family, noise schedule), the
                         sha256 and size of every other file (`files`) and of itself (`export_sha256`)
`load` first verifies every file against export.json (a damaged, changed or missing file is refused
naming it, before any model loads; exports of format /2 have no checksums and load unverified), then
rebuilds the adapter with `load_denoiser` on `pipeline/` (diffusers' own `from_pretrained`),
opens `routes/` and returns the adapter and a Router: sampling with it reproduces the routed samples
exactly, for every family with a pipeline class. An export whose schedule caches is opened with
`load_cached` (adapter, router and the schedule's feature cache, to pass to `dp.sample(...,
cache=cache)`); `load` refuses it, since the router alone would run every step in full — not the
schedule that was searched and reported.

A single-stage, uniformly pruned denoiser cannot be written for diffusers' `from_pretrained`: in
`DiTTransformer2DModel`, the SDXL UNet's `Transformer2DModel` and FLUX's blocks an attention's width
is `num_attention_heads × attention_head_dim` AND the block's residual width, and the MLP width is
derived from it (×4, or GEGLU's ×4), so a config cannot say "fewer heads at the same width" or "a
narrower MLP"; such a model is exported in this format instead (a 1-stage schedule).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .denoisers import family_of, load_denoiser
from .denoisers.base import DenoiserAdapter
from .denoisers.samplers import scheduler_config
from .integrity import DamagedFileError, file_sha256, seal_holds, sealed
from .io import write_json
from .schedule import Schedule
from .routing import Router
from .trajectory import MANIFEST_SHA256, TrajectoryStore

# /3: export.json holds every file's sha256 and size (`files`) and its own (`export_sha256`); /2
# exports (no checksums) still load, unverified, with a warning
FORMAT = "diffes-pl-routed/3"
LEGACY_FORMATS = ("diffes-pl-routed/2",)
EXPORT_SHA256 = "export_sha256"


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


def save(adapter: DenoiserAdapter, store: TrajectoryStore, schedule: Schedule, path: str | os.PathLike,
         sampler: str | None = None) -> Path:
    """Writes the export folder atomically (temporary name, then rename). `sampler` names the
    scheduler written to `pipeline/scheduler/` (default: the adapter's default sampler)."""
    Router(adapter, store, schedule).remove()  # refuses what the store cannot serve, before writing
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        was_dense = adapter.is_dense()
        if not was_dense:
            raise RuntimeError("the adapter has a router installed; export from the dense denoiser")
        text_encoders, missing = _save_pipeline(adapter, tmp / "pipeline", sampler)
        manifest = {k: v for k, v in store.manifest.items() if k not in ("nbytes", "format", MANIFEST_SHA256)}
        TrajectoryStore.write(tmp / "routes", manifest, _routes(store, schedule, adapter))
        schedule.save(tmp / "schedule.json")
        files = {p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / "export.json", sealed({"format": FORMAT, "name": adapter.name, "family": adapter.family,
                                                "noise_schedule": adapter.noise_schedule,
                                                "text_encoders": text_encoders,
                                                # pass these as None to DiffusionPipeline.from_pretrained
                                                "pipeline_missing": missing,
                                                # what a pipeline folder does not say: FLUX's T5 token count
                                                "text_len": adapter.text_len,
                                                "files": files}, EXPORT_SHA256))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _save_pipeline(adapter: DenoiserAdapter, folder: Path, sampler: str | None) -> tuple[bool, list[str]]:
    """The dense model as a diffusers pipeline folder, written by the pipeline's own `save_pretrained`
    so that `DiffusionPipeline.from_pretrained` opens it. Returns (whether text encoders were written,
    the pipeline components the adapter lacks)."""
    import diffusers

    if adapter.pipeline_class is None:
        raise ValueError(f"cannot export a denoiser of the {adapter.family!r} family: its adapter names no "
                         "diffusers pipeline (pipeline_class)")
    pipeline_cls = getattr(diffusers, adapter.pipeline_class)
    scheduler = adapter.make_scheduler() if sampler is None else adapter.make_scheduler(sampler)
    components = {adapter.denoiser_subfolder: adapter.denoiser, "vae": adapter.vae,
                  "scheduler": _diffusers_scheduler(scheduler)}
    encoders = _text_encoders(adapter)
    if encoders is not None:
        specs = family_of(adapter.family).text_encoders  # the pipeline's component names
        for spec, tok, model in zip(specs, encoders.tokenizers, encoders.encoders):
            components[spec.tokenizer], components[spec.subfolder] = tok, model
    for name, param in inspect.signature(pipeline_cls.__init__).parameters.items():
        if name != "self" and param.default is inspect.Parameter.empty:
            components.setdefault(name, None)  # e.g. text encoders the adapter does not have
    missing = sorted(name for name, value in components.items() if value is None)
    with _quiet_diffusers():  # "vae=None … cannot be saved": expected, and recorded in `missing`
        pipeline_cls(**components).save_pretrained(folder, safe_serialization=True)
    return encoders is not None, missing


def _text_encoders(adapter: DenoiserAdapter):
    """The adapter's text encoders, or None for a class-conditional adapter or one without them (the
    export then samples from prompt embeddings, `TextCondition`, only)."""
    if adapter.conditioning != "text":
        return None
    from .denoisers.text import MissingTextEncodersError

    try:
        return adapter.text_encoders()
    except MissingTextEncodersError:
        return None


def _diffusers_scheduler(scheduler):
    """`scheduler` as the diffusers class it derives from, so that `from_pretrained` can import it
    (FLUX's FluxPipelineScheduler only changes `set_timesteps`' default sigmas, which FluxPipeline
    passes itself); same config."""
    base = next(cls for cls in type(scheduler).__mro__ if cls.__module__.startswith("diffusers."))
    return scheduler if base is type(scheduler) else base.from_config(scheduler.config)


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[DenoiserAdapter, Router]:
    """(adapter, router) from an export folder; no trajectory store needed. Refuses an export whose
    schedule caches (use `load_cached`)."""
    info = verify(path)
    schedule = Schedule.load(Path(path) / "schedule.json") if (Path(path) / "schedule.json").exists() else None
    if schedule is not None and schedule.caches:
        raise ValueError(f"{path}: this export's schedule caches (cache intervals {schedule.intervals}, branch "
                         f"{schedule.cache_branch}); a router alone would run every step in full. Open it with "
                         f"diffes_pl.export.load_cached(path) → (adapter, router, cache) and sample with "
                         f"dp.sample(..., router=router, cache=cache)")
    return _load(path, device, info)


def load_cached(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(adapter, router, cache) from an export folder: the cache its schedule asks for
    (`caching.schedule_cache`; None for a level-only schedule), built on the loaded denoiser. Remove
    the cache (`cache.remove()`) before the router."""
    from .caching import schedule_cache

    adapter, router = _load(path, device)
    return adapter, router, schedule_cache(adapter, router.schedule)


def verify(path: str | os.PathLike) -> dict:
    """export.json of the export at `path`, after checking it and every file it lists (size, then
    sha256): a damaged, changed or missing file raises `DamagedFileError` naming it. A /2 export has
    no checksums: it is returned with a warning."""
    path = Path(path)
    info_path = path / "export.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{path} is not a diffes-pl export (no export.json); write one with diffes_pl.export.save")

    def damaged(name: str, what: str) -> DamagedFileError:
        return DamagedFileError(f"export {path}: {name} is damaged ({what}); export again with diffes_pl.export.save")

    try:
        info = json.loads(info_path.read_text())
    except ValueError:  # a UnicodeDecodeError too
        raise damaged("export.json", "not valid JSON") from None
    if not isinstance(info, dict):
        raise damaged("export.json", "not a JSON object")
    if info.get("format") in LEGACY_FORMATS:
        warnings.warn(f"export {path} has no checksums (format {info['format']}, written by an older diffes-pl): "
                      "its files are read unverified; export again to verify them", stacklevel=3)
        return info
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported export format {info.get('format')!r} (this version reads {FORMAT})")
    if not seal_holds(info, EXPORT_SHA256):
        raise damaged("export.json", "checksum mismatch" if EXPORT_SHA256 in info else "its checksum is missing")
    for name, record in info["files"].items():
        file = path / name
        if not file.is_file():
            raise damaged(name, "the file is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise damaged(name, f"{size} bytes where export.json says {record['bytes']}")
        if file_sha256(file) != record["sha256"]:
            raise damaged(name, "checksum mismatch")
    return info


def _load(path: str | os.PathLike, device: str | torch.device,
          info: dict | None = None) -> tuple[DenoiserAdapter, Router]:
    path = Path(path)
    info = verify(path) if info is None else info
    adapter = load_denoiser(str(path / "pipeline"), device=device)
    if info.get("noise_schedule") is not None:
        # the schedule it was trained (and routed) with; older exports say {"flow": true} for flow matching
        adapter.noise_schedule = scheduler_config(info["noise_schedule"])
    adapter.name = info["name"]
    if info.get("text_len") is not None:
        adapter.text_len = int(info["text_len"])  # read when the text encoders load (first prompt)
    store = TrajectoryStore.open(path / "routes")
    return adapter, Router(adapter, store, Schedule.load(path / "schedule.json"), device=device)
