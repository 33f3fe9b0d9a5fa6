"""Figures, images and text to the trainer's loggers, beside the files written to disk.

TensorBoard gets the media itself (`add_figure`, `add_image`, `add_text`, at the trainer's global
step, so they sit beside the search's scalars); any other logger (CSV, …) gets the written file's path
as a hyperparameter `<tag>: <path>` — CSVLogger keeps them in its hparams.yaml — since it has no
place for pictures. Rank 0 only: the callers write their files on rank 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor


def _loggers(trainer) -> list:
    if trainer is None or trainer.global_rank != 0:
        return []
    return list(trainer.loggers)


def _tensorboard(logger) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def _log(trainer, tag: str, path: Path, to_tensorboard) -> None:
    for logger in _loggers(trainer):
        if _tensorboard(logger):
            to_tensorboard(logger.experiment, trainer.global_step)
        else:
            logger.log_hyperparams({tag: str(path)})
        logger.save()


def log_figure(trainer, tag: str, figure: Any, path: Path) -> None:
    """A matplotlib figure (saved at `path`) under `tag`; the caller closes it."""
    _log(trainer, tag, path, lambda tb, step: tb.add_figure(tag, figure, step, close=False))


def log_image(trainer, tag: str, image: Tensor, path: Path) -> None:
    """A uint8 image [C, H, W] (C = 1 or 3; saved at `path`) under `tag`."""
    _log(trainer, tag, path, lambda tb, step: tb.add_image(tag, image, step, dataformats="CHW"))


def log_text(trainer, tag: str, text: str, path: Path) -> None:
    """Markdown text (its data saved at `path`) under `tag`."""
    _log(trainer, tag, path, lambda tb, step: tb.add_text(tag, text, step))
