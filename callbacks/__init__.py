"""Optional callbacks for Diff-ES runs (installed as `diffes_pl.callbacks`).

Nothing in `diffes_pl/` imports this package: a run's required outputs (schedule.json, the store)
never depend on which callbacks are configured.
"""
from .evaluate import EvaluateAtFitEnd
from .plots import SampleGrid, SearchPlots
from .progress import SearchProgress

__all__ = ["EvaluateAtFitEnd", "SampleGrid", "SearchPlots", "SearchProgress"]
