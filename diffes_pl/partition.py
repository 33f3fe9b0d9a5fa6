"""Stages and schedules: which sampling step belongs to which stage, and how much each stage prunes.

Stage 0 holds the FIRST sampling steps (highest noise). The same `StagePartition` object serves
calibration (stage → interval of native timesteps) and sampling (step → stage).
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


@dataclass
class Schedule:
    """The S per-stage levels and the settings they were searched under.

    Budget: Σ levels[s] · steps_per_stage[s] = target_level · Σ steps_per_stage, exactly.
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

    def __post_init__(self) -> None:
        self._check_types()
        self.levels = [int(l) for l in self.levels]  # numpy integers from a search become plain ints
        self.steps_per_stage = [int(w) for w in self.steps_per_stage]
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
        if not budget_met(self.levels, self.steps_per_stage, self.target_level):
            mean = sum(l * w for l, w in zip(self.levels, self.steps_per_stage)) / sum(self.steps_per_stage)
            raise ScheduleError(
                f"schedule {self.levels} misses the budget: its step-weighted mean level is {mean:.4f}, "
                f"the target is {self.target_level}; change the levels so that they average to the target"
            )

    @property
    def sparsity(self) -> float:
        return float(self.target_level) / self.levels_max

    def to_dict(self) -> dict:
        data = asdict(self)
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
