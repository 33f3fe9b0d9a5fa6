"""A search's run folder: its checkpoint after every generation, and what a restart may do with it.

Lightning's `ModelCheckpoint(save_last=True, save_top_k=0)` writes `last.ckpt` only when training
ends, and `fit(ckpt_path="last")` is resolved before the callbacks of `configure_callbacks` are
attached (and in the logger's folder when a logger is configured). So the search owns its
checkpoint: `GenerationCheckpoint` writes `<run>/checkpoints/last.ckpt` atomically at the end of
every generation, and `resolve_resume` turns `--ckpt_path last` into that file (or refuses) before
any work starts. It is a `Checkpoint` (Lightning runs those after the module's epoch-end hook, so the
generation's outputs are written first) but not a `ModelCheckpoint`, so a user's own
`ModelCheckpoint` is neither replaced by it nor mistaken for it. The CLI also gives it to the Trainer,
so that Lightning adds no default `ModelCheckpoint` of its own (`epoch=…-step=….ckpt` files).

The checkpoint carries the sha256 of the whole file in its zip archive comment (`integrity.seal_zip`:
torch.save writes a zip, and zip readers — torch.load's, so Lightning's `fit(ckpt_path=…)` too — skip
the comment), and `read_checkpoint` verifies it before unpickling anything: damaged latents would
otherwise resume silently. Checkpoints of older versions (no comment) are read with a warning.
"""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from ..integrity import DamagedFileError, check_zip, seal_zip

CHECKPOINT = Path("checkpoints") / "last.ckpt"
# the checkpoint's format, written with its checksum (a change to what `diffes` holds bumps it)
CHECKPOINT_FORMAT = "diffes-pl-checkpoint/1"
# the files a search writes into its run folder (a finished or stopped search is recognised by them)
OUTPUTS = ("schedule.json", "evaluations.jsonl", "checkpoints", "plots")
# settings a resumed search may change: they decide how fast the fitness is computed, not its value
# (to float rounding: a kernel's last bits may depend on the batch) or the search's course
# (shared-buffer routing rolls out what resident routing does — tested), or only when it stops
FREE_TO_CHANGE = {"probe_batch_size", "resident_routing", "batch_candidates", "stop_patience", "stop_delta",
                  "calibrate_by", "stream_weights"}
# settings added after checkpoints were written without them, with the value those searches used
# (a function of the saved settings), so that such a checkpoint resumes only as it ran: a joint
# search (more than one cache interval) drew interval moves with probability 0.5 before
# `interval_rate` existed; a level-only or fixed-interval search drew none, as with today's default
LEGACY_SETTINGS = {"interval_rate": lambda saved: 0.5 if len(set(saved.get("cache_intervals") or ())) > 1 else None}


class ResumeError(ValueError):
    """A run folder or checkpoint that this `fit` cannot start from as asked."""


class GenerationCheckpoint(Checkpoint):
    """Saves the whole search (survivors, fitness cache, archive, generator state, Lightning's loop
    state) to `<run>/checkpoints/last.ckpt` after every generation, by writing a temporary file and
    renaming it: a kill at any moment leaves the previous generation's checkpoint intact."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.default_root_dir) / CHECKPOINT
        tmp = path.with_name(f".{path.name}.tmp")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            seal_zip(tmp, CHECKPOINT_FORMAT)  # before the rename: last.ckpt is always sealed
            os.replace(tmp, path)
        trainer.strategy.barrier("diffes-checkpoint")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The search state of a checkpoint, or a one-line error naming the file and the way out."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"checkpoint {path} does not exist; pass an existing checkpoint or start without --ckpt_path")
    fix = "resume from a copy, or start again with --overwrite true (its generations are lost)"
    verified, problem = check_zip(path, CHECKPOINT_FORMAT)
    if problem:
        state = "is damaged" if "mismatch" in problem else "is truncated or corrupt"
        raise DamagedFileError(f"checkpoint {path} {state} ({problem}); {fix}")
    if not verified:
        warnings.warn(f"checkpoint {path} has no checksum (written by an older diffes-pl): it is read unverified",
                      stacklevel=2)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ResumeError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); delete it and start again "
                          "with --overwrite true (its generations are lost), or resume from a copy") from None
    if not isinstance(checkpoint, dict) or "diffes" not in checkpoint:
        raise ResumeError(f"{path} is not a diffes-pl search checkpoint (no search state); "
                          "resume from <run>/checkpoints/last.ckpt")
    return checkpoint


def changed_settings(saved: dict, current: dict) -> list[str]:
    """Names of the search-defining settings whose values differ between a checkpoint and this run."""
    keys = (set(saved) | set(current)) - FREE_TO_CHANGE
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def generations_done(checkpoint: dict) -> int:
    return len(checkpoint["diffes"].get("nfe_history", []))


def describe(run_dir: Path) -> str:
    """What a run folder holds, in a few words (for refusals)."""
    import json

    try:
        extra = json.loads((run_dir / "schedule.json").read_text()).get("extra", {})
        state = "finished" if extra.get("finished") else "stopped"
        return f"a {state} search ({extra.get('generations', '?')} generations)"
    except (OSError, ValueError, AttributeError):
        return "a search's outputs"


def resolve_resume(run_dir: str | os.PathLike, ckpt_path: str | None, overwrite: bool) -> str | None:
    """The checkpoint file a `fit` resumes from (None: a new search), after refusing what would lose
    or mix results: a new search over an existing one without `overwrite`, `last` with nothing to
    resume. Nothing is removed here: with `overwrite`, `clear_outputs` removes the old search's
    outputs once every other check has passed."""
    run_dir = Path(run_dir)
    if ckpt_path is None:
        existing = [name for name in OUTPUTS if (run_dir / name).exists()]
        if existing and not overwrite:
            raise ResumeError(
                f"{run_dir} already holds {describe(run_dir)} ({', '.join(existing)}); resume it with "
                "--ckpt_path last, start over with --overwrite true, or choose another --trainer.default_root_dir")
        return None
    if overwrite:
        raise ResumeError("--overwrite true starts a new search and --ckpt_path resumes one: pass only one of them")
    path = checkpoint_file(run_dir, ckpt_path)
    if ckpt_path == "last":
        if not Path(path).is_file():
            raise ResumeError(f"--ckpt_path last: there is no checkpoint to resume in {run_dir} (no {CHECKPOINT}); "
                              "start a new search without --ckpt_path")
    elif ckpt_path in ("best", "hpc", "registry"):
        raise ResumeError(f"--ckpt_path {ckpt_path} has no meaning for a search; use --ckpt_path last or a file")
    return path


def clear_outputs(run_dir: str | os.PathLike) -> None:
    """Removes a search's outputs from `run_dir` (`--overwrite true`); the store is kept: it is keyed,
    and reused only when it matches."""
    for name in OUTPUTS:
        target = Path(run_dir) / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def checkpoint_file(run_dir: str | os.PathLike, ckpt_path: str | None) -> str | None:
    """`--ckpt_path` as a file: `last` is the run folder's own checkpoint, whatever loggers are set."""
    return str(Path(run_dir) / CHECKPOINT) if ckpt_path == "last" else ckpt_path


def check_resumable(checkpoint: dict, path: str, hparams: dict[str, Any], store_key: str | None,
                    max_generations: int | None) -> str:
    """Refuses a resume whose search-defining settings changed (naming them); returns the line that
    says where the search resumes."""
    saved = dict(checkpoint.get("hyper_parameters", {}))
    for key, value in LEGACY_SETTINGS.items():
        if key not in saved:
            saved[key] = value(saved)
    changed = changed_settings(saved, dict(hparams))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} → {hparams.get(k)!r}" for k in changed)
        raise ResumeError(f"cannot resume {path}: search settings changed since it was written ({shown}); "
                          "restore them, or start a new search with --overwrite true")
    saved_key = checkpoint["diffes"].get("store_key")
    if store_key is not None and saved_key is not None and saved_key != store_key:
        raise ResumeError(f"cannot resume {path}: it searched another trajectory store (pruner or calibration "
                          "settings changed); restore them, or start a new search with --overwrite true")
    done = generations_done(checkpoint)
    if max_generations is not None and done >= max_generations:
        return (f"the search in {path} already ran all {done} generations; raise --trainer.max_epochs to "
                "continue it")
    total = f" of {max_generations}" if max_generations is not None else ""
    return f"resuming the search from {path}: {done}{total} generations done, continuing at generation {done + 1}"
