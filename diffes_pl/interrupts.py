"""Ctrl-C (SIGINT) handled as Lightning handles SIGTERM: the run stops at its next boundary and leaves
what can be resumed (docs/DESIGN.md: Rules that keep it honest).

Lightning's `_SignalConnector` installs a SIGTERM handler for the length of each Trainer run (fit,
predict): it sets `trainer.received_sigterm`, passes the signal on to the processes its launcher
started, and whoever looks at the flag stops at a boundary by raising Lightning's `SIGTERMException`:
Lightning's training loop at a generation's end, the search between two rollouts
(`DiffES._stop_if_terminated`), calibration at its next batch, keeping the finished stages
(`pruners.base.Pruner.on_predict_batch_start`, `pruners.store_build.CalibrationStopped`).
A LightningModule whose runs look at the flag says so with `stops_at_boundaries = True`.

`stop_on_signals` (the CLI, for the length of a subcommand) gives Ctrl-C the same path: while such a
run is under way and Lightning's handler is installed, SIGINT goes to that handler (the flag, the
launched ranks). Anywhere else — loading a model, between two runs, a run that never looks at the
flag (sampling for `test`) — SIGINT and SIGTERM raise `SIGTERMException` at once (Lightning's handler
calls this one after its own for SIGTERM). The first Ctrl-C puts back the handler that was there
before, so a second one interrupts immediately (KeyboardInterrupt).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Interrupt:
    """The stop signal a subcommand received (SIGTERM when `stop_on_signals` saw none: Lightning's
    handler alone stopped the run)."""

    received: signal.Signals | None = None

    @property
    def signal(self) -> signal.Signals:
        return self.received or signal.SIGTERM

    @property
    def exit_code(self) -> int:
        """128 + the signal: 130 for Ctrl-C, 143 for SIGTERM (a scheduler may requeue the job)."""
        return 128 + int(self.signal)


@contextlib.contextmanager
def stop_on_signals(trainer_of: Callable[[], Any]) -> Iterator[Interrupt]:
    """For the length of the block, SIGINT and SIGTERM stop the run at its next boundary, or at once
    where nothing looks at Lightning's flag (module docstring); `trainer_of()` is the Trainer of the
    run, or None. Yields the `Interrupt` naming what was received. A signal someone else handles or
    ignores (a background job ignores SIGINT) is left alone, and so is everything off the main thread."""
    interrupt = Interrupt()
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    ours = [s for s in SIGNALS if previous[s] in (signal.SIG_DFL, signal.default_int_handler)]
    if threading.current_thread() is not threading.main_thread():
        ours = []
    passing_on: list[signal.Signals] = []  # non-empty while Lightning's handler (which calls this one) runs

    def handler(signum: int, frame: Any) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        signum = signal.Signals(signum)
        if passing_on:  # called back by Lightning's handler, which this one is passing the signal to
            return
        trainer = trainer_of()
        # a rank the launcher started gets Ctrl-C from the terminal AND from rank 0 (the signal is
        # passed on): a repeat there is the same Ctrl-C, and rank 0's second one kills it anyway
        launched = trainer is not None and trainer.local_rank > 0
        if interrupt.received is not None:  # already stopping
            if signum == signal.SIGINT and not launched:  # a second Ctrl-C: at once
                _default(previous[signal.SIGINT], signum, frame)
            return
        interrupt.received = signum
        if signum == signal.SIGINT and not launched:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])  # a second Ctrl-C interrupts at once
        lightning = signal.getsignal(signal.SIGTERM)
        in_run = trainer is not None and _is_lightnings(lightning)
        if in_run and _looks_at_flag(trainer):
            if signum != signal.SIGTERM:  # (a SIGTERM came here through Lightning's handler: flag set)
                passing_on.append(signum)
                try:
                    with _quiet_signal_log():  # it would log "Received SIGTERM: 2"; the CLI says what stopped
                        lightning(signum, frame)
                finally:
                    passing_on.clear()
            return
        launcher = trainer.strategy.launcher if trainer is not None else None
        if launcher is not None and not launched and not (in_run and signum == signal.SIGTERM):
            launcher.kill(signum)  # the ranks it started stop too, as Lightning's handler has them
        raise SIGTERMException()

    for s in ours:
        signal.signal(s, handler)
    try:
        yield interrupt
    finally:
        for s in ours:
            signal.signal(s, previous[s])


def _looks_at_flag(trainer: Any) -> bool:
    """Whether the module under way stops at its next boundary when `trainer.received_sigterm` is set."""
    return bool(getattr(trainer.lightning_module, "stops_at_boundaries", False))


def _is_lightnings(handler: Any) -> bool:
    """Whether `handler` (SIGTERM's) is the one Lightning installs for the length of a Trainer run."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    return isinstance(handler, _HandlersCompose)


@contextlib.contextmanager
def _quiet_signal_log() -> Iterator[None]:
    from lightning.pytorch.trainer.connectors import signal_connector

    log = logging.getLogger(signal_connector.__name__)
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled


def _default(previous: Any, signum: int, frame: Any) -> None:
    """What SIGINT did before `stop_on_interrupt`: Python's KeyboardInterrupt, as a rule."""
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
