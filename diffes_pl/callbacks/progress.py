"""A rich progress display for Diff-ES runs: calibration stage by stage, then the search generation
by generation with the best fitness so far, the generation's denoiser steps (NFE), elapsed time and
an ETA for the whole search (Lightning's own bars count batches within one epoch, which is one tick
per generation here)."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from diffes_pl.pruners.base import Pruner


class SearchProgress(ProgressBar):
    """generation k/N ━━━━ best 0.9512 · NFE 212 · 0:03:10 elapsed · 0:05:40 left (rank 0 only)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._progress: Progress | None = None
        self._task: Any = None

    # ProgressBar's protocol
    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def _start(self, trainer: L.Trainer, description: str, total: int, completed: int = 0, **fields: Any) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
            self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, info="", **fields)

    def _update(self, **kwargs: Any) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, **kwargs)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._task = None, None

    # calibration: one predict epoch per stage
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = sum(int(n) for n in trainer.num_predict_batches)
        what = f"calibration, stage {pl_module.stage}" if isinstance(pl_module, Pruner) else "sampling"
        self._start(trainer, what, total)

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._update(advance=1)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    # search: one training epoch per generation
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, "search, generation", int(trainer.max_epochs or 0), completed=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        info = []
        if "best_fitness" in metrics:
            info.append(f"best {pl_module.context.metric.name} {float(metrics['best_fitness']):.4f}")
        if "nfe" in metrics:
            info.append(f"NFE {int(metrics['nfe'])}")
        if "probe_steps_total" in metrics:  # the cost meter, kept short: a narrow console cuts the line
            info.append(f"{int(metrics['probe_steps_total']):,} probe-steps")
        self._update(completed=trainer.current_epoch + 1, info=" · ".join(info))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()
