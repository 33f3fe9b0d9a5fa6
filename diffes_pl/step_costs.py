"""MACs of one denoiser step per stage and level (`StepCosts`), and the MAC budget rule of joint
schedules (a level AND a cache interval k per stage).

The trajectory's MACs, counted per step from a recorded table (built by
`caching.budget.step_cost_table` with `count_macs`), must equal `mac_budget` × the dense
trajectory's MACs within `StepCosts.tolerance`: half the largest change one level of one stage can
make. That is the finest resolution the levels guarantee for ANY intervals (the stage costs are
non-increasing in the level and one level moves the total by at most twice the tolerance, so walking
the levels from all-0 to all-H passes within the tolerance of every budget in between). A stage of w
steps with interval k runs ceil(w / k) full steps and w − ceil(w / k) cached ones: every stage
starts full (`caching.refresh`).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral
from typing import Any, Sequence

from .errors import ScheduleError


def is_whole(value: Any) -> bool:
    """A whole number as JSON or numpy gives one: int or numpy integer, or a float that is whole (JSON's
    `4.0`); never bool, str or a float with a fraction. Read it with `int()`."""
    if isinstance(value, bool):
        return False
    return isinstance(value, Integral) or (isinstance(value, float) and value.is_integer())


def stage_full_steps(steps: int, interval: int) -> int:
    """Full steps of a stage of `steps` steps with cache interval k: ceil(steps / k) (every stage
    starts full, then every k-th step; `caching.refresh`)."""
    return -(-int(steps) // int(interval))


def _cost_rows(value: Any, name: str, S: int, H: int) -> tuple[tuple[int, ...], ...]:
    """A step-cost table: one list of H+1 MAC counts (the same for every stage, width pruning) or
    S such lists (one per stage, depth pruning); returned as S rows."""
    fix = (f"give step_costs.{name} as H+1 = {H + 1} MAC counts per step (one per level), or {S} such lists "
           f"(one per stage), as caching.budget.step_cost_table writes them")
    if not isinstance(value, (list, tuple)) or not value:
        raise ScheduleError(f"step_costs.{name} must be a list; got {value!r}: {fix}")
    rows = [value] if not isinstance(value[0], (list, tuple)) else list(value)
    if len(rows) not in (1, S) or any(not isinstance(r, (list, tuple)) or len(r) != H + 1 for r in rows):
        raise ScheduleError(f"step_costs.{name} has the wrong shape for {S} stages and H = {H}: {fix}")
    bad = [v for r in rows for v in r if not is_whole(v) or v < 0]
    if bad:
        raise ScheduleError(f"step_costs.{name} must hold whole MAC counts ≥ 0; got {bad[:3]!r}: {fix}")
    if any(a < b for r in rows for a, b in zip(r, r[1:])):
        raise ScheduleError(f"step_costs.{name} increases with the level somewhere; a higher level removes "
                            f"units, so its MACs must not grow: recount with caching.budget.step_cost_table")
    rows = [tuple(int(v) for v in r) for r in rows]
    return tuple(rows * S if len(rows) == 1 else rows)


@dataclass(frozen=True)
class StepCosts:
    """MACs of one denoiser step per stage and level (batch 1, no CFG duplicate): `full[s][l]` for a
    full step, `cached[s][l]` for a cached one (None when nothing caches). Level 0 of a full step
    is the dense denoiser in every stage."""

    full: tuple[tuple[int, ...], ...]
    cached: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def parse(cls, data: Any, num_stages: int, levels_max: int) -> "StepCosts":
        """From a schedule's `step_costs` ({"full": …, "cached": …}); ScheduleError naming the field."""
        if not isinstance(data, dict) or "full" not in data or set(data) - {"full", "cached"}:
            raise ScheduleError(f"step_costs must be an object with 'full' (and 'cached' when a stage caches) MAC "
                                f"counts per level; got {data!r}: build it with caching.budget.step_cost_table")
        full = _cost_rows(data["full"], "full", num_stages, levels_max)
        cached = None if data.get("cached") is None else _cost_rows(data["cached"], "cached", num_stages, levels_max)
        if len({row[0] for row in full}) != 1:
            raise ScheduleError("step_costs.full differs between stages at level 0, which is the dense denoiser in "
                                "every stage: recount with caching.budget.step_cost_table")
        if cached is not None and any(c > f for fr, cr in zip(full, cached) for f, c in zip(fr, cr)):
            raise ScheduleError("step_costs.cached exceeds step_costs.full somewhere; a cached step runs only the "
                                "shallow part: recount with caching.budget.step_cost_table")
        return cls(full, cached)

    @property
    def dense(self) -> int:
        """MACs of one dense step."""
        return self.full[0][0]

    def stage_macs(self, stage: int, steps: int, level: int, interval: int) -> int:
        """MACs of stage `stage` (`steps` steps) at `level` with cache interval k."""
        n_full = stage_full_steps(steps, interval)
        total = n_full * self.full[stage][level]
        if n_full < steps:
            if self.cached is None:
                raise ScheduleError(f"stage {stage} caches (interval {interval}) but step_costs has no 'cached' "
                                    f"table: build it with caching.budget.step_cost_table(..., branch=b)")
            total += (steps - n_full) * self.cached[stage][level]
        return total

    def trajectory_macs(self, levels: Sequence[int], intervals: Sequence[int] | None,
                        steps_per_stage: Sequence[int]) -> int:
        """MACs of the whole trajectory (intervals None: every k = 1)."""
        ks = [1] * len(levels) if intervals is None else intervals
        return sum(self.stage_macs(s, w, l, k) for s, (l, k, w) in enumerate(zip(levels, ks, steps_per_stage)))

    def dense_macs(self, steps_per_stage: Sequence[int]) -> int:
        return self.dense * sum(steps_per_stage)

    def tolerance(self, steps_per_stage: Sequence[int]) -> Fraction:
        """The MAC tolerance of the budget: half the largest change of a stage's MACs by one level
        (any interval): max over s, l of w_s · max(full drop, cached drop) / 2."""
        drops = [0]
        for s, w in enumerate(steps_per_stage):
            for table in (self.full, self.cached or ()):
                if table:
                    drops.append(w * max((a - b for a, b in zip(table[s], table[s][1:])), default=0))
        return Fraction(max(drops), 2)

    def budget_macs(self, mac_budget: float, steps_per_stage: Sequence[int]) -> int:
        """The budget in MACs: mac_budget × the dense trajectory's, rounded to a whole MAC (exact)."""
        return round(Fraction(mac_budget) * self.dense_macs(steps_per_stage))

    def to_dict(self) -> dict:
        def rows(table):
            return [list(r) for r in table] if len(set(table)) > 1 else list(table[0])
        return {"full": rows(self.full), "cached": None if self.cached is None else rows(self.cached)}


def mac_budget_met(levels: Sequence[int], intervals: Sequence[int] | None, steps_per_stage: Sequence[int],
                   costs: StepCosts, mac_budget: float) -> bool:
    """The MAC budget rule: |trajectory MACs − mac_budget · dense trajectory MACs| ≤ the tolerance."""
    target = costs.budget_macs(mac_budget, steps_per_stage)
    return abs(costs.trajectory_macs(levels, intervals, steps_per_stage) - target) <= costs.tolerance(steps_per_stage)
