"""Which sampling steps are full (the whole denoiser runs and the cache is refreshed) and which are
cached (only the shallow part runs), from the step source alone — never from a tensor.

The rule (docs/DESIGN.md: Vocabulary, cache interval): a step is FULL when
- it is the first step of a STAGE (the first step of a run included), or
- k steps have passed since the last full step, k being the stage's cache interval.
Every other step is CACHED. k = 1 makes every step full (the dense-equivalent, level-only case).
A stage of w steps with interval k therefore has exactly ceil(w / k) full steps (its steps 0, k,
2k, …) and w − ceil(w / k) cached ones (`stage_full_steps`), whatever the other stages hold.

Why every stage starts full, even when its (level, k) equals the previous stage's:
- each stage has its OWN pruned weights even at the same level (per-stage calibration: other
  removal orders, other compensated weights), so features computed with the previous stage's
  weights are never reused;
- stage boundaries become clean cut points: the cache is empty at every stage entry, so a rollout
  resumed at a stage boundary (the search's stage-prefix reuse) carries no cache state and equals
  the full rollout exactly, and a stage's MAC cost depends on that stage alone (the MAC budget of
  `schedule.Schedule` is a sum over stages).
"""
from __future__ import annotations

from typing import Sequence

from ..step_costs import stage_full_steps

__all__ = ["RefreshRule", "full_steps", "stage_full_steps", "stage_intervals"]


def stage_intervals(intervals: int | Sequence[int]) -> tuple[int, ...] | int:
    """Checks cache intervals: one k ≥ 1 for every stage, or one per stage."""
    values = list(intervals) if isinstance(intervals, (list, tuple)) else [intervals]
    if not values or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in values):
        raise ValueError(f"cache intervals must be integers ≥ 1 (1: no caching); got {intervals!r}")
    return intervals if isinstance(intervals, int) else tuple(values)


class RefreshRule:
    """The rule above, applied step by step (`step(step, stage)` → full?). A step that does not
    follow the previous one (step 0 again, or any step ≤ the last) starts a new run."""

    def __init__(self, intervals: int | Sequence[int], levels: Sequence[int] | None = None) -> None:
        """
        Args:
            intervals: k for every stage, or k_s per stage.
            levels: the schedule's level per stage, kept to check that a cache serves the router's
                schedule (`sampling.sample` compares them); the rule itself does not read them,
                since every stage starts full.
        """
        self.intervals = stage_intervals(intervals)
        self.levels = None if levels is None else tuple(int(v) for v in levels)
        if self.levels is not None and not isinstance(self.intervals, int) and len(self.levels) != len(self.intervals):
            raise ValueError(f"{len(self.intervals)} cache intervals for {len(self.levels)} stage levels")
        self.reset()

    def reset(self) -> None:
        self._last_step: int | None = None
        self._stage: int | None = None
        self._last_full: int | None = None

    @property
    def stage(self) -> int | None:
        """The stage of the last step seen (None before a run's first step)."""
        return self._stage

    def interval(self, stage: int) -> int:
        if isinstance(self.intervals, int):
            return self.intervals
        if not 0 <= stage < len(self.intervals):
            raise ValueError(f"stage {stage} has no cache interval ({len(self.intervals)} given)")
        return self.intervals[stage]

    def check_stage(self, stage: int) -> None:
        """Refuses a stage without a cache interval (or without a level, when levels are given)."""
        if self.levels is not None and not 0 <= stage < len(self.levels):
            raise ValueError(f"stage {stage} has no level ({len(self.levels)} given)")
        self.interval(stage)

    def new_run(self, step: int) -> bool:
        return self._last_step is None or step <= self._last_step

    def step(self, step: int, stage: int) -> bool:
        """Whether sampling step `step` (in stage `stage`) is full; advances the rule."""
        if self.new_run(step):
            self.reset()
        self.check_stage(stage)
        full = self._last_full is None or stage != self._stage or step - self._last_full >= self.interval(stage)
        if full:
            self._last_full = step
        self._last_step, self._stage = step, stage
        return full


def full_steps(step_to_stage: Sequence[int], intervals: int | Sequence[int],
               levels: Sequence[int] | None = None) -> list[bool]:
    """For every step of a run (its stage from `step_to_stage`), whether it is full."""
    rule = RefreshRule(intervals, levels)
    return [rule.step(step, stage) for step, stage in enumerate(step_to_stage)]
