"""The plain line a search prints per generation where no live display can be seen.

A batch job (SLURM, nohup: stdout redirected to a file) or `--trainer.enable_progress_bar false`
gets one line per generation, e.g.
`generation 3/10 · best ssim 0.9512 · median 0.9011 · evaluated 24 · 1,234 probe-steps · elapsed 0:03:10 · ETA 0:05:40`.
The search module prints it, not a callback: callbacks are optional (docs/DESIGN.md: Layering rules),
and a run without any must still say what it is doing.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (0:03:10)."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def generation_line(generation: int, total: int, statistics: Mapping[str, float], metric: str,
                    elapsed: float, eta: float | None) -> str:
    """The line of generation `generation` (1-based) of `total`, from the statistics
    `EvolutionarySearch.step` returned for it; `eta`: None when it cannot be estimated yet."""
    parts = [f"generation {generation}/{total}", f"best {metric} {statistics['best_fitness']:.4f}",
             f"median {statistics['median_fitness']:.4f}", f"evaluated {int(statistics['evaluated'])}"]
    if statistics.get("raced_out"):
        parts.append(f"raced out {int(statistics['raced_out'])}")
    parts += [f"{int(statistics['probe_steps_total']):,} probe-steps", f"elapsed {clock(elapsed)}",
              f"ETA {clock(eta)}" if eta is not None else "ETA unknown"]
    return " · ".join(parts)


class GenerationTimer:
    """Elapsed time since this process started searching and the time the remaining generations
    take at this process's mean pace (generations restored from a checkpoint took no time here)."""

    def __init__(self, first_generation: int, now: Callable[[], float] = time.monotonic) -> None:
        self.first, self.now, self.start = first_generation, now, now()

    def elapsed(self) -> float:
        return self.now() - self.start

    def eta(self, done: int, total: int) -> float | None:
        """Seconds left after `done` of `total` generations (None before one ran in this process)."""
        ran = done - self.first
        return None if ran <= 0 else self.elapsed() / ran * max(0, total - done)


def wants_plain_lines(progress_bar: object | None, stream=None) -> bool:
    """True where a live progress display cannot be seen: no progress bar (`enable_progress_bar
    false`), or stdout is not a terminal (a live display there prints nothing per generation)."""
    stream = sys.stdout if stream is None else stream
    return progress_bar is None or not stream.isatty()
