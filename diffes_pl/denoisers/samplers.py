"""Noise schedules and samplers as adapters declare them.

An adapter's `noise_schedule` is its training noise as a diffusers scheduler config: `_class_name`
says which kind (`DDPMScheduler`: betas and a `prediction_type`; `FlowMatchEulerDiscreteScheduler`:
rectified flow, its `shift`), the other keys are that class's settings — the form of a pipeline's
`scheduler/scheduler_config.json`. Calibration noises latents from it; every sampler builds its
scheduler from it.

A `Sampler` is one sampling method: the diffusers scheduler class and its settings on top of the
noise schedule, and the two properties callers need: `stochastic` (fresh noise every step, seeded per
sample and step: `sampling.step_generators`) and `multistep` (earlier model outputs are carried from
step to step, so a rollout cannot resume from cached latents mid-trajectory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

DDPM = "DDPMScheduler"
FLOW_MATCHING = "FlowMatchEulerDiscreteScheduler"


def scheduler_config(settings: Mapping[str, Any]) -> dict:
    """`settings` as a declared noise schedule: `_class_name` DDPMScheduler unless given, and for it
    an explicit `prediction_type` (diffusers' default, "epsilon"). Exports written before the class
    was declared mark flow matching with {"flow": true}: read as FlowMatchEulerDiscreteScheduler."""
    config = dict(settings)
    if config.pop("flow", False):
        config.setdefault("_class_name", FLOW_MATCHING)
    config.setdefault("_class_name", DDPM)
    if config["_class_name"] == DDPM:
        config.setdefault("prediction_type", "epsilon")
    return config


def schedule_settings(config: Mapping[str, Any]) -> dict:
    """The constructor arguments of a scheduler config (diffusers' `_`-prefixed keys are metadata)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def is_flow_matching(config: Mapping[str, Any]) -> bool:
    return scheduler_config(config)["_class_name"] == FLOW_MATCHING


@dataclass(frozen=True)
class Sampler:
    """One sampling method of an adapter (see the module docstring)."""

    name: str
    scheduler_class: type  # what `make_scheduler` returns
    settings: Mapping[str, Any] = field(default_factory=dict)  # on top of the noise schedule's settings
    stochastic: bool = False
    multistep: bool = False
    aliases: tuple[str, ...] = ()

    def make_scheduler(self, noise_schedule: Mapping[str, Any]) -> Any:
        return self.scheduler_class(**schedule_settings(noise_schedule), **self.settings)


def find_sampler(samplers: tuple[Sampler, ...], name: str, family: str) -> Sampler:
    """The sampler called `name` (or one of its aliases); unknown names are refused with the choices."""
    for sampler in samplers:
        if name == sampler.name or name in sampler.aliases:
            return sampler
    choices = ", ".join(s.name for s in samplers)
    raise ValueError(f"unknown sampler {name!r} for {family}; choose one of: {choices}")
