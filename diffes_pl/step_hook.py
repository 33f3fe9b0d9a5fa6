"""The step source inside any diffusers pipeline: a diffusers `ModelHook` on the denoiser, keyed on
the timestep each call receives.

diffusers' pipelines differ in what they offer between steps (`callback_on_step_end`, a legacy
`callback`, nothing at all in `DiTPipeline`), but every one calls the denoiser with the step's
`timestep`. `apply_step_source` registers a hook (the mechanism of diffusers' own cache hooks) whose
`pre_forward` reads that argument, finds the step of the searched trajectory it belongs to and tells
the listeners (the router first, then a feature cache) `on_step(step, stage)` before the call runs.
Nothing in the pipeline's loop changes, so routing works in every pipeline and in `dp.sample`.

Reading the timestep's value costs one host sync per denoiser call when the pipeline passes it on
the accelerator (DiTPipeline does): microseconds beside a step of a real model, but the one per-step
sync of routed sampling — `dp.sample` with a `Router` (the loop's own step counter) has none.

A pipeline that runs other timesteps (another sampler or step count) is refused at the first call
that leaves the trajectory (a timestep on none of its steps, or steps out of order), never routed
with the wrong stages. Calls within one step (CFG halves run separately) are told once. `remove()`
unregisters the hook and leaves the denoiser's `forward` as it was.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .partition import StagePartition

HOOK_NAME = "diffes_pl_step_source"
# relative: FLUX's pipeline rounds the timestep to the latents' dtype (bfloat16 keeps 8 bits)
TOLERANCE = 1e-2


class StepSourceError(ValueError):
    """A denoiser call at a timestep off the trajectory the schedule was searched on."""


class StepSource:
    """The hook's state: the trajectory's timesteps as the denoiser receives them, the listeners,
    and the step last told (see module docstring). Built by `apply_step_source`."""

    def __init__(self, denoiser: nn.Module, partition: StagePartition, listeners: Sequence[Any],
                 denoiser_timesteps: Sequence[float], error: type[Exception] = StepSourceError) -> None:
        self.denoiser = denoiser
        self.partition = partition
        self.listeners = [listener for listener in listeners if listener is not None]
        self.timesteps = torch.tensor([float(t) for t in denoiser_timesteps], dtype=torch.float64)
        self.error = error
        self.last: int | None = None  # the step last told to the listeners
        # where `timestep` sits among forward's positional arguments (self excluded), found once: the
        # hook runs at every denoiser call
        names = list(inspect.signature(type(denoiser).forward).parameters)[1:]
        self._position = names.index("timestep") if "timestep" in names else None

    def timestep_of(self, args: tuple, kwargs: dict) -> float:
        """The timestep argument of one denoiser call (a scalar or a [B] tensor of equal values)."""
        t = kwargs.get("timestep")
        if t is None and self._position is not None and len(args) > self._position:
            t = args[self._position]
        if t is None:
            raise self.error(f"{type(self.denoiser).__name__} was called without a `timestep`: the step source "
                             "routes by the timestep each call receives")
        return float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)

    def step_of(self, t: float) -> int:
        """The trajectory step whose timestep `t` is (within TOLERANCE), in sampling order."""
        distance = (self.timesteps - t).abs()
        step = int(distance.argmin())
        expected = float(self.timesteps[step])
        if float(distance[step]) > TOLERANCE * max(abs(expected), float(self.timesteps.abs().max()) * 1e-3):
            raise self.error(self._off_trajectory(f"timestep {t:g} is on none of its steps"))
        if self.last is not None and step not in (self.last, self.last + 1, 0):
            raise self.error(self._off_trajectory(f"step {step} (timestep {t:g}) came after step {self.last}"))
        return step

    def _off_trajectory(self, what: str) -> str:
        shown = ", ".join(f"{float(t):g}" for t in self.timesteps[:4])
        return (f"the denoiser is driven off the trajectory the schedule was searched on ({what}; the schedule's "
                f"{self.partition.num_steps} steps run timesteps {shown}, …): sample with the searched sampler "
                f"and step count ({self.partition.num_steps} steps)")

    def on_call(self, args: tuple, kwargs: dict) -> None:
        step = self.step_of(self.timestep_of(args, kwargs))
        if step == self.last and step != 0:
            return  # another call within the step (CFG halves called one by one)
        for listener in self.listeners:
            listener.on_step(step, self.partition.step_to_stage[step])
        self.last = step

    def remove(self) -> None:
        """Unregisters the hook; the denoiser runs as it did before `apply_step_source`."""
        registry = getattr(self.denoiser, "_diffusers_hook", None)
        if registry is None or registry.get_hook(HOOK_NAME) is None:
            return
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks:
            # the registry wrapped `forward` as an instance attribute: drop both, back to the class's forward
            del self.denoiser._diffusers_hook
            self.denoiser.__dict__.pop("forward", None)

    def __enter__(self) -> "StepSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class _StepSourceHook(ModelHook):
    def __init__(self, source: StepSource) -> None:
        super().__init__()
        self.source = source

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        self.source.on_call(args, kwargs)
        return args, kwargs


def apply_step_source(adapter: Any, partition: StagePartition, listeners: Sequence[Any],
                      error: type[Exception] = StepSourceError) -> StepSource:
    """Drives `listeners` (router first, then a cache; None entries are skipped) from the timestep of
    every call to `adapter.denoiser`, in any pipeline (module docstring). One step source per
    denoiser: an earlier one is replaced. Returns it; `remove()` it (or use `with`) afterwards."""
    denoiser = adapter.denoiser
    timesteps = [adapter.denoiser_timestep(t) for t in partition.timesteps]
    source = StepSource(denoiser, partition, listeners, timesteps, error)
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    if registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    registry.register_hook(_StepSourceHook(source), HOOK_NAME)
    return source
