"""Stages: which sampling step belongs to which stage, and which native timesteps calibrate it.

Stage 0 holds the FIRST sampling steps (highest noise). The same `StagePartition` object serves
calibration (stage → interval of native timesteps) and sampling (step → stage). How much each stage
prunes is a `schedule.Schedule`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
