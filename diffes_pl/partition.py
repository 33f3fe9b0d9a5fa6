"""Stages and schedules: which sampling step belongs to which stage, and how much each stage prunes.

Stage 0 holds the FIRST sampling steps (highest noise). The same `StagePartition` object serves
calibration (stage → interval of native timesteps) and sampling (step → stage).

Two budgets (DESIGN: schedule, cache interval):
- level-only schedules (no caching): the step-weighted mean level equals the target level exactly
  (`budget_met`);
- joint schedules (a level AND a cache interval k per stage): the trajectory's MACs, counted per
  step from a recorded table (`StepCosts`, built by `caching.budget.step_cost_table` with
  `count_macs`), equal `mac_budget` × the dense trajectory's MACs within `StepCosts.tolerance`:
  half the largest change one level of one stage can make. That is the finest resolution the
  levels guarantee for ANY intervals (the stage costs are non-increasing in the level and one level
  moves the total by at most twice the tolerance, so walking the levels from all-0 to all-H passes
  within the tolerance of every budget in between). A stage of w steps with interval k runs
  ceil(w / k) full steps and w − ceil(w / k) cached ones: every stage starts full
  (`caching.refresh`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from numbers import Integral, Real
from typing import Any, Sequence

from .io import write_json


class ScheduleError(ValueError):
    """A schedule that cannot be used: wrong length, level out of bounds, budget not met."""


def split_steps(num_steps: int, num_stages: int) -> list[int]:
    """Contiguous, balanced: stage sizes differ by at most one, earlier stages take the extra step."""
    if num_stages < 1 or num_steps < num_stages:
        raise ValueError(
            f"cannot cut {num_steps} sampling steps into {num_stages} stages: "
            f"use 1 ≤ num_stages ≤ steps (got num_stages={num_stages}, steps={num_steps})"
        )
    base, extra = divmod(num_steps, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


@dataclass(frozen=True)
class StagePartition:
    """Maps sampling steps to stages and stages to native (training) timestep intervals.

    `timesteps` are the sampler's native timesteps in sampling order (e.g. 20-step DDIM:
    999, 946, …, 53, 0). Stage s covers the native interval from its first step's timestep down to
    just above the next stage's first timestep; the last stage reaches down to 0, so the stage
    intervals tile the whole training range and calibration sees every noise level once.
    """

    timesteps: tuple[float, ...]
    num_stages: int
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        split_steps(len(self.timesteps), self.num_stages)  # validates
        if any(a < b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError("timesteps must be in sampling order (non-increasing)")

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_steps: int, num_stages: int) -> "StagePartition":
        """Partition of a diffusers scheduler's `num_steps`-step trajectory."""
        scheduler.set_timesteps(num_steps)
        steps = [float(t) for t in scheduler.timesteps]
        return cls(tuple(steps), num_stages, int(scheduler.config.num_train_timesteps))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def steps_per_stage(self) -> list[int]:
        return split_steps(self.num_steps, self.num_stages)

    @property
    def step_to_stage(self) -> list[int]:
        return [s for s, n in enumerate(self.steps_per_stage) for _ in range(n)]

    def stage_of_step(self, step: int) -> int:
        return self.step_to_stage[step]

    def steps_of_stage(self, stage: int) -> range:
        start = sum(self.steps_per_stage[:stage])
        return range(start, start + self.steps_per_stage[stage])

    def stage_interval(self, stage: int) -> tuple[float, float]:
        """(low, high) native timesteps for calibrating `stage`: high inclusive, low exclusive
        (low = the next stage's first timestep, or -1 for the last stage so that t=0 is included)."""
        steps = self.steps_of_stage(stage)
        high = self.timesteps[steps.start]
        if stage == 0:
            high = max(high, float(self.num_train_timesteps - 1))
        low = self.timesteps[steps.stop] if stage + 1 < self.num_stages else -1.0
        return low, high

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "num_stages": self.num_stages,
                "num_train_timesteps": self.num_train_timesteps, "steps_per_stage": self.steps_per_stage}

    @classmethod
    def from_dict(cls, data: dict) -> "StagePartition":
        return cls(tuple(data["timesteps"]), int(data["num_stages"]), int(data.get("num_train_timesteps", 1000)))


def _is_int(value: Any) -> bool:
    """A whole number as JSON or numpy gives one: int or numpy integer, never bool, float or str."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def units_removed(level: int, levels_max: int, size: int) -> int:
    """round(level / levels_max · size), halves rounded up, in exact integer arithmetic."""
    if not 0 <= level <= levels_max:
        raise ScheduleError(f"level {level} outside [0, {levels_max}]")
    return (2 * level * size + levels_max) // (2 * levels_max)


def budget_met(levels: Sequence[int], steps_per_stage: Sequence[int], target_level: float | Fraction) -> bool:
    """The budget rule: the step-weighted mean level equals the target exactly."""
    total = sum(l * w for l, w in zip(levels, steps_per_stage))
    return Fraction(total) == Fraction(str(target_level)) * sum(steps_per_stage)


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
    bad = [v for r in rows for v in r if not _is_int(v) or v < 0]
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


_CACHE_FIELDS = ("cache_intervals", "cache_branch", "mac_budget", "step_costs")


@dataclass
class Schedule:
    """The S per-stage levels (and cache intervals) and the settings they were searched under.

    Level-only (mac_budget None, no cache interval > 1): Σ levels[s] · steps_per_stage[s] =
    target_level · Σ steps_per_stage, exactly — today's rule, and what a schedule file without the
    cache fields means.
    Joint (mac_budget set): the trajectory's MACs from `step_costs` meet mac_budget (a fraction of
    the dense trajectory's MACs) within `StepCosts.tolerance` (module docstring); target_level is
    then the level whose level-only uniform schedule the budget was derived from (the search's
    setting), checked to lie in [0, H] only. A schedule with a cache interval > 1 must be joint and
    name its cache branch b (the costs were counted with it).
    """

    levels: list[int]
    levels_max: int
    target_level: float
    steps_per_stage: list[int]
    partition: dict | None = None
    store: str | None = None
    pruner: str | None = None
    metric: str | None = None
    fitness: float | None = None
    extra: dict = field(default_factory=dict)
    # key of the trajectory store the schedule was searched on (routing refuses any other store);
    # None in schedules written before stores were bound, and in hand-made ones
    store_key: str | None = None
    # the cache dimension (None in level-only schedules and in every schedule written before it)
    cache_intervals: list[int] | None = None  # k per stage; None ≡ all 1
    cache_branch: int | None = None  # b: where the cached deep part starts (caching.feature_cache)
    mac_budget: float | None = None  # fraction of the dense trajectory's MACs
    step_costs: dict | None = None  # {"full": …, "cached": …}: MACs per step and level (StepCosts)

    def __post_init__(self) -> None:
        self._check_types()
        self.levels = [int(l) for l in self.levels]  # numpy integers from a search become plain ints
        self.steps_per_stage = [int(w) for w in self.steps_per_stage]
        if self.cache_intervals is not None:
            self.cache_intervals = [int(k) for k in self.cache_intervals]
        self.validate()

    def _check_types(self) -> None:
        # A float level would be truncated and a string coerced: both would evaluate another schedule
        # than the one written, so anything but a whole number is refused (bool is no level either).
        for name in ("levels", "steps_per_stage"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ScheduleError(f"{name} must be a list of integers, one per stage; got {value!r}")
            bad = [v for v in value if not _is_int(v)]
            if bad:
                raise ScheduleError(f"{name} must be whole numbers; got {bad!r} in {list(value)!r}")
        if not _is_int(self.levels_max) or self.levels_max < 1:
            raise ScheduleError(f"levels_max (H) must be a whole number ≥ 1; got {self.levels_max!r}")
        if min(self.steps_per_stage, default=1) < 1:
            raise ScheduleError(f"steps_per_stage must be ≥ 1 each; got {list(self.steps_per_stage)}")
        target = self.target_level
        if isinstance(target, bool) or not isinstance(target, Real) or not math.isfinite(target):
            raise ScheduleError(f"target_level must be a number (the step-weighted mean level); got {target!r}")
        ks = self.cache_intervals
        if ks is not None and (not isinstance(ks, (list, tuple)) or any(not _is_int(k) or k < 1 for k in ks)):
            raise ScheduleError(f"cache_intervals must be a list of whole numbers ≥ 1, one per stage (1: no caching); "
                                f"got {ks!r}")
        if self.cache_branch is not None and (not _is_int(self.cache_branch) or self.cache_branch < 0):
            raise ScheduleError(f"cache_branch must be a whole number ≥ 0 (the cache branch b); got {self.cache_branch!r}")
        budget = self.mac_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, Real)
                                   or not math.isfinite(budget) or not 0 < budget <= 1):
            raise ScheduleError(f"mac_budget must be a number in (0, 1] (a fraction of the dense trajectory's MACs); "
                                f"got {budget!r}")

    @property
    def num_stages(self) -> int:
        return len(self.levels)

    def validate(self) -> None:
        if len(self.levels) != len(self.steps_per_stage):
            raise ScheduleError(
                f"schedule has {len(self.levels)} levels but the partition has {len(self.steps_per_stage)} stages; "
                "give one level per stage"
            )
        bad = [l for l in self.levels if not 0 <= l <= self.levels_max]
        if bad:
            raise ScheduleError(f"levels {bad} outside [0, {self.levels_max}] (levels_max = H)")
        if not 0 <= Fraction(str(self.target_level)) <= self.levels_max:
            raise ScheduleError(f"target level {self.target_level} outside [0, {self.levels_max}]")
        if self.cache_intervals is not None and len(self.cache_intervals) != len(self.levels):
            raise ScheduleError(f"schedule has {len(self.levels)} levels but {len(self.cache_intervals)} cache_intervals; "
                                "give one cache interval per stage (1: no caching)")
        if self.caches and (self.mac_budget is None or self.cache_branch is None):
            raise ScheduleError(f"cache_intervals {self.cache_intervals} cache some stages, so the schedule is budgeted in "
                                "MACs: give mac_budget, step_costs (caching.budget.step_cost_table) and cache_branch")
        if (self.mac_budget is None) != (self.step_costs is None):
            raise ScheduleError("mac_budget and step_costs go together (the budget and the MAC table that checks it): "
                                "give both, or neither for a level-only schedule")
        if self.mac_budget is not None:
            self._validate_macs()
            return
        if not budget_met(self.levels, self.steps_per_stage, self.target_level):
            mean = sum(l * w for l, w in zip(self.levels, self.steps_per_stage)) / sum(self.steps_per_stage)
            raise ScheduleError(
                f"schedule {self.levels} misses the budget: its step-weighted mean level is {mean:.4f}, "
                f"the target is {self.target_level}; change the levels so that they average to the target"
            )

    def _validate_macs(self) -> None:
        costs = self.costs
        if not mac_budget_met(self.levels, self.cache_intervals, self.steps_per_stage, costs, self.mac_budget):
            dense = costs.dense_macs(self.steps_per_stage)
            have = costs.trajectory_macs(self.levels, self.cache_intervals, self.steps_per_stage) / dense
            tol = float(costs.tolerance(self.steps_per_stage)) / dense
            raise ScheduleError(f"schedule {self.levels} with cache intervals {self.intervals} misses the MAC budget: "
                                f"its trajectory costs {have:.6f} of the dense MACs, the budget is {self.mac_budget} "
                                f"± {tol:.6f} (half the largest one-level step); change the levels or intervals")

    @property
    def intervals(self) -> list[int]:
        """The cache interval of every stage (all 1 for a level-only schedule)."""
        return list(self.cache_intervals) if self.cache_intervals is not None else [1] * self.num_stages

    @property
    def caches(self) -> bool:
        """Whether any stage caches (k > 1)."""
        return any(k > 1 for k in self.intervals)

    @property
    def costs(self) -> StepCosts | None:
        """The recorded MAC table (None for a level-only schedule)."""
        return None if self.step_costs is None else StepCosts.parse(self.step_costs, self.num_stages, self.levels_max)

    def mac_fraction(self) -> float | None:
        """The trajectory's MACs as a fraction of the dense trajectory's (None without step_costs)."""
        costs = self.costs
        if costs is None:
            return None
        return costs.trajectory_macs(self.levels, self.cache_intervals, self.steps_per_stage) / \
            costs.dense_macs(self.steps_per_stage)

    @property
    def sparsity(self) -> float:
        return float(self.target_level) / self.levels_max

    def to_dict(self) -> dict:
        """JSON-ready; the cache fields are left out when unset, so a level-only schedule writes what
        schedules written before them hold."""
        data = asdict(self)
        for name in _CACHE_FIELDS:
            if data[name] is None:
                del data[name]
        data["num_stages"] = self.num_stages
        return data

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        data = dict(data)
        data.pop("num_stages", None)
        partition = data.get("partition")
        if partition is not None and not isinstance(partition, dict):
            raise ScheduleError(f"partition must be an object (as a fit run writes it); got {partition!r}")
        if "steps_per_stage" not in data and partition and "steps_per_stage" in partition:
            data["steps_per_stage"] = partition["steps_per_stage"]
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ScheduleError(f"unknown schedule fields {sorted(unknown)}; known: {sorted(known)}")
        missing = [f for f in ("levels", "levels_max", "target_level", "steps_per_stage") if f not in data]
        if missing:
            raise ScheduleError(f"missing schedule fields {missing}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        try:
            data = json.loads(open(path).read())
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"schedule file {path} does not exist; a fit run writes <run>/schedule.json") from None
        except IsADirectoryError:
            raise ScheduleError(f"schedule file {path} is a folder; pass its schedule.json") from None
        except json.JSONDecodeError as err:
            raise ScheduleError(f"schedule file {path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                                f"{err.colno}): fix that line, or use the schedule.json a fit run wrote") from None
        except UnicodeDecodeError:
            raise ScheduleError(f"schedule file {path} is not a text (JSON) file: pass the schedule.json a fit "
                                "run wrote") from None
        if not isinstance(data, dict):
            raise ScheduleError(f"schedule file {path} holds a JSON {type(data).__name__}, not an object with "
                                "levels, levels_max, target_level and steps_per_stage")
        try:
            return cls.from_dict(data)
        except ScheduleError as err:
            raise ScheduleError(f"schedule file {path}: {err}; fix the file, or use the schedule.json a fit "
                                "run wrote") from None

    @classmethod
    def uniform(cls, target_level: int, levels_max: int, steps_per_stage: Sequence[int], **kw) -> "Schedule":
        return cls([int(target_level)] * len(steps_per_stage), levels_max, target_level, list(steps_per_stage), **kw)


def check_target(target_level: float, levels_max: int, steps_per_stage: Sequence[int]) -> None:
    """Refuses a target level that no schedule of integer levels can meet, before any work starts."""
    target = Fraction(str(target_level))
    if not 0 <= target <= levels_max:
        raise ScheduleError(f"target level {target_level} outside [0, {levels_max}]: choose a level ≤ H = {levels_max}")
    need = target * sum(steps_per_stage)
    if need.denominator != 1:
        raise ScheduleError(
            f"no schedule meets target level {target_level}: Σ levels·steps must equal {float(need)} "
            f"(not an integer with {sum(steps_per_stage)} steps); choose a target that is a multiple of "
            f"1/{sum(steps_per_stage)}"
        )
    # With integer weights, which totals are reachable? Use a reachability set (small S·H).
    reach = {0}
    for w in steps_per_stage:
        reach = {r + l * w for r in reach for l in range(levels_max + 1)}
    if int(need) not in reach:
        raise ScheduleError(f"no schedule of levels in [0, {levels_max}] meets target level {target_level} "
                            f"with steps per stage {list(steps_per_stage)}")
