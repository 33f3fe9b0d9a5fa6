"""Optional callbacks for Diff-ES runs (`diffes_pl.callbacks`).

Nothing else in `diffes_pl/` imports this package (tests/test_layering.py checks it): a run's required
outputs (schedule.json, the store) never depend on which callbacks are configured.
"""
from .evaluate import EvaluateAtFitEnd
from .plots import SampleGrid, SearchPlots
from .progress import SearchProgress

__all__ = ["EvaluateAtFitEnd", "SampleGrid", "SearchPlots", "SearchProgress"]
