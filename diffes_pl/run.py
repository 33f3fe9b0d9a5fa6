"""The run context: what the parts of one run share, read-only.

A run is a folder (`root_dir`, the Trainer's `default_root_dir`), a trajectory store, and the
denoiser, stage partition and sampling settings every schedule of the run is sampled under.
`DiffES.prepare` builds it once the denoiser is loaded and exposes it as `DiffES.context`;
callbacks and evaluation (`evaluation.report`) read it, and only it, instead of the
LightningModule's internals. The search's own state (population, fitness cache, archive) is not
here: it is `DiffES.search`. This module sits above both search and evaluation, so each can take a
context without importing the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .denoisers.base import DenoiserAdapter
from .fitness import Metric
from .partition import StagePartition
from .trajectory import TrajectoryStore


@dataclass
class RunContext:
    """One run's folder, store, denoiser, partition and sampling settings.

    Args:
        root_dir: the run folder (schedule.json, evaluations.jsonl, checkpoints, plots, eval/).
        store_path: the trajectory store folder (`model.store`, default <root_dir>/store).
        adapter: the loaded denoiser's adapter.
        partition: sampling step → stage, shared by calibration, search and evaluation.
        levels_max: H, the number of levels. target_level: the budget (step-weighted mean level).
        sampler, steps, guidance, dtype: how every schedule of the run is sampled.
        metric: the search's fitness metric (its name and direction).
        prompts: probe prompts of a text-conditioned denoiser (None: class-conditional).
        probe_batch_size: probes per denoiser call (None: all at once).
    """

    root_dir: Path
    store_path: Path
    adapter: DenoiserAdapter
    partition: StagePartition
    levels_max: int
    target_level: float
    sampler: str
    steps: int
    guidance: float
    dtype: str
    metric: Metric
    prompts: list[str] | None = None
    probe_batch_size: int | None = None

    @cached_property
    def store(self) -> TrajectoryStore:
        """The run's trajectory store, opened when first read (after calibration has built it)."""
        return TrajectoryStore.open(self.store_path)
