"""Export a routed denoiser as a diffusers pipeline folder that opens pruned.

An export folder (format diffes-pl-routed/4) IS a diffusers pipeline folder, written by the
pipeline's own `save_pretrained` (the adapter's `pipeline_class`):
    model_index.json     names the denoiser as ["diffes_pl.routed_model", "Routed<Class>"], so
                         `diffusers.DiffusionPipeline.from_pretrained(path)` samples the PRUNED model
                         (routed by the timestep, with its cache for a joint schedule; routed_model.py)
    transformer/ or unet/  the routed denoiser's folder: config.json, the dense weights, routes/
                         (the trajectory store cut down to what the schedule uses), schedule.json
                         (levels, partition, H; a joint schedule's cache) and routing.json
    scheduler/           the adapter's sampler; vae/ and, for text-conditioned families, the text
                         encoders and tokenizers when the adapter has them. Components the adapter
                         lacks (the pixel-space built-in model has no VAE) are recorded as
                         `[null, null]` and listed in export.json `pipeline_missing`: pass them as
                         `None` (`from_pretrained(path, vae=None)`)
    export.json          what the folder is (format, denoiser name and family, noise schedule), the
                         sha256 and size of every other file (`files`) and of itself (`export_sha256`)
`push_to_hub` of the pipeline uploads it as it is. `load` first verifies every file against
export.json (a damaged, changed or missing file is refused naming it, before any model loads), then
returns the DENSE adapter (`load_denoiser`, diffusers' own `from_pretrained`) and a Router over the
routes, for `dp.sample(adapter, ..., router=router)`; sampling with it reproduces the routed samples
exactly. An export whose schedule caches is opened with `load_cached` (adapter, router and the
schedule's feature cache); `load` refuses it, since the router alone would run every step in full.
Exports of the earlier layout (/3: `pipeline/`, `routes/`, `schedule.json` side by side; /2 without
checksums, loaded unverified with a warning) still load.

A single-stage, uniformly pruned denoiser cannot be written as a plain (unrouted) diffusers model:
in `DiTTransformer2DModel`, the SDXL UNet's `Transformer2DModel` and FLUX's blocks an attention's
width is `num_attention_heads × attention_head_dim` AND the block's residual width, and the MLP
width is derived from it, so a config cannot say "fewer heads at the same width"; such a model is
exported in this format too (a 1-stage schedule).
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
from .integrity import DamagedFileError, check_files, file_records, seal_holds, sealed
from .io import write_json
from .schedule import Schedule
from .routing import Router
from .trajectory import TrajectoryStore

# /4: the folder is a diffusers pipeline whose denoiser is a routed model (routes inside its folder);
# /3: pipeline/ (dense), routes/ and schedule.json side by side, with checksums; /2: /3 without them
FORMAT = "diffes-pl-routed/4"
LAYOUT_3 = ("diffes-pl-routed/3",)
LEGACY_FORMATS = ("diffes-pl-routed/2",)
EXPORT_SHA256 = "export_sha256"


def save(adapter: DenoiserAdapter, store: TrajectoryStore, schedule: Schedule, path: str | os.PathLike,
         sampler: str | None = None) -> Path:
    """Writes the export folder atomically (temporary name, then rename). `sampler` names the
    scheduler written to `scheduler/` (default: the adapter's default sampler)."""
    from .routed_model import routed_denoiser

    Router(adapter, store, schedule).remove()  # refuses what the store cannot serve, before writing
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if not adapter.is_dense():
            raise RuntimeError("the adapter has a router installed; export from the dense denoiser")
        denoiser = routed_denoiser(adapter, store, schedule, start=False)  # nothing to route while writing
        text_encoders, missing = _save_pipeline(adapter, denoiser, tmp, sampler)
        write_json(tmp / "export.json", sealed({"format": FORMAT, "name": adapter.name, "family": adapter.family,
                                                "noise_schedule": adapter.noise_schedule,
                                                "text_encoders": text_encoders,
                                                # pass these as None to DiffusionPipeline.from_pretrained
                                                "pipeline_missing": missing,
                                                # what a pipeline folder does not say: FLUX's T5 token count
                                                "text_len": adapter.text_len,
                                                "files": file_records(tmp)}, EXPORT_SHA256))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _save_pipeline(adapter: DenoiserAdapter, denoiser: torch.nn.Module, folder: Path,
                   sampler: str | None) -> tuple[bool, list[str]]:
    """The pipeline with `denoiser` (the routed model) as a diffusers pipeline folder, written by the
    pipeline's own `save_pretrained` so that `DiffusionPipeline.from_pretrained` opens it. Returns
    (whether text encoders were written, the pipeline components the adapter lacks)."""
    import diffusers

    if adapter.pipeline_class is None:
        raise ValueError(f"cannot export a denoiser of the {adapter.family!r} family: its adapter names no "
                         "diffusers pipeline (pipeline_class)")
    pipeline_cls = getattr(diffusers, adapter.pipeline_class)
    scheduler = adapter.make_scheduler() if sampler is None else adapter.make_scheduler(sampler)
    components = {adapter.denoiser_subfolder: denoiser, "vae": adapter.vae,
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
    schedule = _schedule(path, info)
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
    if info.get("format") not in (FORMAT, *LAYOUT_3):
        raise ValueError(f"{path}: unsupported export format {info.get('format')!r} (this version reads {FORMAT} "
                         f"and the earlier {', '.join(LAYOUT_3 + LEGACY_FORMATS)})")
    if not seal_holds(info, EXPORT_SHA256):
        raise damaged("export.json", "checksum mismatch" if EXPORT_SHA256 in info else "its checksum is missing")
    check_files(path, info["files"], damaged)
    return info


def _parts(path: Path, info: dict) -> tuple[Path, Path, Path]:
    """(the pipeline folder, the routes, schedule.json) of an export of either layout."""
    if info.get("format") == FORMAT:
        denoiser = path / family_of(info["family"]).denoiser_subfolder
        return path, denoiser / "routes", denoiser / "schedule.json"
    return path / "pipeline", path / "routes", path / "schedule.json"


def _schedule(path: str | os.PathLike, info: dict) -> Schedule | None:
    schedule = _parts(Path(path), info)[2]
    return Schedule.load(schedule) if schedule.exists() else None


def _load(path: str | os.PathLike, device: str | torch.device,
          info: dict | None = None) -> tuple[DenoiserAdapter, Router]:
    path = Path(path)
    info = verify(path) if info is None else info
    pipeline, routes, schedule = _parts(path, info)
    with _quiet_diffusers():  # the denoiser's config names the routed class: read here as its dense base
        adapter = load_denoiser(str(pipeline), device=device)
    if info.get("noise_schedule") is not None:
        # the schedule it was trained (and routed) with; older exports say {"flow": true} for flow matching
        adapter.noise_schedule = scheduler_config(info["noise_schedule"])
    adapter.name = info["name"]
    if info.get("text_len") is not None:
        adapter.text_len = int(info["text_len"])  # read when the text encoders load (first prompt)
    return adapter, Router(adapter, TrajectoryStore.open(routes), Schedule.load(schedule), device=device)
