"""A progress display for Diff-ES runs: calibration stage by stage, then the search generation by
generation with the best fitness so far, the generation's denoiser steps (NFE), elapsed time and an
ETA for the whole search.

Why not Lightning's TQDMProgressBar / RichProgressBar: they count batches within one epoch, and a
generation is one batch, so they show 1/1 per generation and no ETA for the search; where stdout is
not a terminal, tqdm writes carriage-return redraws and rich nothing until its bar stops (a whole
search left one line, cut at 80 columns). This class keeps Lightning's `ProgressBar` base (so
`enable_progress_bar` and the Trainer treat it as the bar) and draws a live rich display on a
terminal only. Elsewhere (a batch job) it prints one plain line per calibration stage, and the search
module prints one per generation (diffes_pl/search/progress_line.py: a run without this callback
gets them too), so each generation shows once."""
from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from diffes_pl.pruners.base import Pruner
from diffes_pl.search.progress_line import clock


class SearchProgress(ProgressBar):
    """generation k/N ━━━━ best 0.9512 · NFE 212 · 0:03:10 elapsed · 0:05:40 left (rank 0 only); on
    a stdout that is not a terminal: `calibration, stage 3 · batches 4/4 · elapsed 0:00:02` per stage."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._progress: Progress | None = None
        self._task: Any = None
        self._plain: dict | None = None  # the task under way, printed as one line when it ends (not a terminal)

    # ProgressBar's protocol
    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def _start(self, trainer: L.Trainer, description: str, total: int, completed: int = 0, live_only: bool = False) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        if not sys.stdout.isatty():  # a batch job: one line when the task ends, nothing live
            self._plain = None if live_only else {"what": description, "done": completed, "total": total,
                                                  "start": time.monotonic()}
            return
        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
            self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")

    def _update(self, **kwargs: Any) -> None:
        if self._plain is not None:
            self._plain["done"] += kwargs.get("advance", 0)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, **kwargs)

    def _stop(self, finished: bool = True) -> None:
        if self._plain is not None and finished:
            plain = self._plain
            print(f"{plain['what']} · batches {plain['done']}/{plain['total']} · "
                  f"elapsed {clock(time.monotonic() - plain['start'])}", flush=True)
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._task, self._plain = None, None, None

    # calibration: one predict epoch per stage
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = sum(int(n) for n in trainer.num_predict_batches)
        what = f"calibration, stage {pl_module.stage}" if isinstance(pl_module, Pruner) else "sampling"
        self._start(trainer, what, total)

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._update(advance=1)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    # search: one training epoch per generation (not a terminal: the search module's lines)
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, "search, generation", int(trainer.max_epochs or 0), completed=trainer.current_epoch,
                    live_only=True)

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
        self._stop(finished=False)
