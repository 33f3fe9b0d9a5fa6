"""When a latency comparison is noise: `diffes-pl test` says so instead of printing a bare speedup.

One timed run has no spread to judge it by; on a loaded machine the runs of one schedule can differ
by more than the dense and pruned models do (a 0.22× "speedup" from a single repeat). The rule: fewer
than `MIN_REPEATS` runs, or a spread (max − min over the runs, of the noisier side) at least as large
as the difference of the medians, makes the figure noise.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

MIN_REPEATS = 3
OPTION = "latency_repeats (`--eval.latency_repeats` of `diffes-pl test`)"


def spread(times: Sequence[float]) -> float:
    """max − min of the timed runs (0 for fewer than two)."""
    return max(times) - min(times) if len(times) > 1 else 0.0


def too_few_runs(runs: int) -> str | None:
    """Why latency from `runs` timed runs cannot be trusted, with the fix; None for enough runs."""
    if runs >= MIN_REPEATS:
        return None
    return (f"latency from {runs} timed run(s) has no spread to judge it by, so the speedups may be noise; "
            f"set {OPTION} to {MIN_REPEATS} or more")


def latency_warning(name: str, dense: Sequence[float], pruned: Sequence[float]) -> str | None:
    """Why `name`'s speedup over dense (seconds per image of each timed run) cannot be trusted, with
    the fix; None when it can."""
    few = too_few_runs(min(len(dense), len(pruned)))
    if few is not None:
        return f"{name}: {few}"
    effect = abs(statistics.median(dense) - statistics.median(pruned))
    noise = max(spread(dense), spread(pruned))
    if noise >= effect:
        return (f"{name}: its latency differs from dense by {effect * 1e3:.2f} ms/image, no more than the spread "
                f"of the timed runs ({noise * 1e3:.2f} ms/image): the speedup is noise (a busy machine?); measure "
                f"on an idle machine or raise {OPTION}")
    return None


def latency_warnings(rows: dict) -> list[str]:
    """The warnings of an evaluation's rows {name: {latency_runs_s, …}} against `dense`: too few runs
    once for all, else `latency_warning` per row (rows without timed runs, latency skipped, give none)."""
    dense = rows.get("dense", {}).get("latency_runs_s")
    timed = {name: row["latency_runs_s"] for name, row in rows.items()
             if name != "dense" and dense and row.get("latency_runs_s")}
    if not timed:
        return []
    few = too_few_runs(min(len(dense), *(len(t) for t in timed.values())))
    if few is not None:
        return [few]
    return [w for w in (latency_warning(name, dense, t) for name, t in timed.items()) if w is not None]
