"""Schedules: how much each stage prunes (a level per stage, and a cache interval per stage in a
joint schedule), and the budgets they meet (docs/DESIGN.md: Vocabulary, schedule, budget):
- level-only schedules (no caching): the step-weighted mean level equals the target level exactly
  (`budget_met`);
- joint schedules: the trajectory's MACs meet a MAC budget (`step_costs.mac_budget_met`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from numbers import Real
from typing import Sequence

from .errors import ScheduleError
from .io import write_json
from .step_costs import StepCosts, is_whole, mac_budget_met


def units_removed(level: int, levels_max: int, size: int) -> int:
    """round(level / levels_max · size), halves rounded up, in exact integer arithmetic."""
    if not 0 <= level <= levels_max:
        raise ScheduleError(f"level {level} outside [0, {levels_max}]")
    return (2 * level * size + levels_max) // (2 * levels_max)


def budget_met(levels: Sequence[int], steps_per_stage: Sequence[int], target_level: float | Fraction) -> bool:
    """The budget rule: the step-weighted mean level equals the target exactly."""
    total = sum(l * w for l, w in zip(levels, steps_per_stage))
    return Fraction(total) == Fraction(str(target_level)) * sum(steps_per_stage)


_CACHE_FIELDS = ("cache_intervals", "cache_branch", "mac_budget", "step_costs")
_PARTITION_INTS = ("num_stages", "num_train_timesteps", "steps_per_stage")  # the partition's integer fields


def _whole_to_int(value):
    """`value` with every whole float (JSON's 4.0) in it, in lists at any depth, made an int; anything
    else (4.5, True, a string) left as it is, for validation to refuse."""
    if isinstance(value, (list, tuple)):
        return type(value)(_whole_to_int(v) for v in value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


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
        # numpy integers from a search, and whole floats from a JSON file (4.0), become plain ints
        self.levels = [int(l) for l in self.levels]
        self.steps_per_stage = [int(w) for w in self.steps_per_stage]
        self.levels_max = int(self.levels_max)
        if self.cache_intervals is not None:
            self.cache_intervals = [int(k) for k in self.cache_intervals]
        if self.cache_branch is not None:
            self.cache_branch = int(self.cache_branch)
        if isinstance(self.partition, dict):
            self.partition = {k: _whole_to_int(v) if k in _PARTITION_INTS else v for k, v in self.partition.items()}
        if isinstance(self.step_costs, dict):
            self.step_costs = {k: _whole_to_int(v) for k, v in self.step_costs.items()}
        self.validate()

    def _check_types(self) -> None:
        # A float level would be truncated and a string coerced: both would evaluate another schedule
        # than the one written, so anything but a whole number is refused (bool is no level either).
        for name in ("levels", "steps_per_stage"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ScheduleError(f"{name} must be a list of integers, one per stage; got {value!r}")
            bad = [v for v in value if not is_whole(v)]
            if bad:
                raise ScheduleError(f"{name} must be whole numbers; got {bad!r} in {list(value)!r}")
        if not is_whole(self.levels_max) or self.levels_max < 1:
            raise ScheduleError(f"levels_max (H) must be a whole number ≥ 1; got {self.levels_max!r}")
        if min(self.steps_per_stage, default=1) < 1:
            raise ScheduleError(f"steps_per_stage must be ≥ 1 each; got {list(self.steps_per_stage)}")
        target = self.target_level
        if isinstance(target, bool) or not isinstance(target, Real) or not math.isfinite(target):
            raise ScheduleError(f"target_level must be a number (the step-weighted mean level); got {target!r}")
        ks = self.cache_intervals
        if ks is not None and (not isinstance(ks, (list, tuple)) or any(not is_whole(k) or k < 1 for k in ks)):
            raise ScheduleError(f"cache_intervals must be a list of whole numbers ≥ 1, one per stage (1: no caching); "
                                f"got {ks!r}")
        if self.cache_branch is not None and (not is_whole(self.cache_branch) or self.cache_branch < 0):
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

    def stage_config(self, stage: int) -> tuple[int, int]:
        """(level, cache interval) of `stage`: all that decides what its denoiser runs."""
        return self.levels[stage], self.intervals[stage]

    def repeat_stage(self, stage: int) -> "Schedule":
        """The schedule running stage `stage`'s level (and cache interval) in every stage, on the same
        partition: a stage's weights and cache depend on its configuration only, so this routes that
        stage as this schedule does (`Router(stages=[stage])`). A joint schedule's copy is budgeted at
        its own MACs, with this schedule's cost table and cache branch."""
        S, w = self.num_stages, self.steps_per_stage
        level, interval = self.stage_config(stage)
        if self.mac_budget is None:
            return Schedule.uniform(level, self.levels_max, w, partition=self.partition)
        costs, levels, intervals = self.costs, [level] * S, [interval] * S
        return Schedule(levels, self.levels_max, level, list(w), partition=self.partition,
                        cache_intervals=intervals, cache_branch=self.cache_branch,
                        mac_budget=costs.trajectory_macs(levels, intervals, w) / costs.dense_macs(w),
                        step_costs=self.step_costs)

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
