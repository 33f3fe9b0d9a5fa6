"""Fitness rollouts on fixed probes, with work saved: a child differs from its parent only from its
first changed stage on, so the parent's latents entering that stage are reused. Results are
identical because DDIM, flow-match Euler and Euler ancestral carry no state between steps but the
latents (a stochastic sampler's noise, Euler ancestral's, is a pure function of probe and step:
`sampling.step_generators`). A multistep sampler (DPM-Solver++) keeps earlier model outputs, so its
rollouts always start at step 0: the rule reads the adapter's declared `Sampler`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..denoisers.base import DenoiserAdapter
from ..partition import Schedule, StagePartition
from ..routing import Router
from ..sampling import prepare_scheduler, rollout, seeded_noise
from ..trajectory import TrajectoryStore

Individual = Any  # levels (tuple of S ints), or a joint (levels, cache intervals) pair of tuples


@dataclass
class Probes:
    """Seeded initial noise [P, C, H, W] and the conditions the fitness is measured on: class labels
    [P] int64, or for text-conditioned denoisers the TextCondition [P rows] of `prompts`."""

    noise: Tensor
    conditions: Any
    seed: int = 0
    prompts: list[str] | None = None

    @property
    def noise_seeds(self) -> list[int]:
        """Per-probe seeds of a stochastic sampler's step noise."""
        return [self.seed * 65_537 + i for i in range(len(self.noise))]

    @classmethod
    def make(cls, adapter: DenoiserAdapter, num_probes: int, seed: int, prompts: list[str] | None = None) -> "Probes":
        """`num_probes` seeded latents; text-conditioned denoisers pair probe i with prompts[i % len(prompts)]
        (encoded once by the adapter's text encoders), the others with seeded class labels."""
        if num_probes < 1:
            raise ValueError(f"num_probes must be ≥ 1 (got {num_probes}): the fitness needs images to score")
        noise = seeded_noise((num_probes, *adapter.latent_shape), seed)
        if adapter.conditioning == "text":
            if not prompts:
                raise ValueError(f"{adapter.name} is text-conditioned: give the probe prompts (model.prompts: a list "
                                 "of strings; probe i uses prompts[i % len(prompts)])")
            chosen = [prompts[i % len(prompts)] for i in range(num_probes)]
            return cls(noise, adapter.encode_prompts(chosen), seed, chosen)
        if prompts:
            raise ValueError(f"{adapter.name} is class-conditional: prompts are for text-conditioned denoisers "
                             "(SDXL, FLUX); remove model.prompts")
        g = torch.Generator().manual_seed(seed + 7919)
        labels = torch.randperm(num_probes, generator=g) % adapter.num_classes
        return cls(noise, labels, seed)


class RolloutEngine:
    """Runs probes through the router for a schedule, caching the latents entering every stage.

    With a joint search space (`space`, `population.joint_space`), a schedule is a (levels, cache
    intervals) pair: the rollout installs the router and, after it, the feature cache of the
    space's branch (`caching.feature_cache`). Every stage starts with a full step (the refresh rule),
    so nothing but the latents crosses a stage boundary and stage-prefix reuse stays exact."""

    def __init__(self, adapter: DenoiserAdapter, store: TrajectoryStore | None, partition: StagePartition,
                 probes: Probes, *, sampler: str, guidance: float, batch_size: int | None = None,
                 levels_max: int = 0, target_level: float = 0, resident: bool = True, space: Any = None) -> None:
        self.adapter = adapter
        self.store = store
        self.partition = partition
        self.probes = probes
        self.sampler = sampler
        self.guidance = guidance
        self.batch_size = batch_size or len(probes.noise)
        self.levels_max = levels_max
        self.target_level = target_level
        self.resident = resident  # Router(resident=False): one shared buffer per layer, far less memory
        self.space = space  # population.JointSpace of a joint (level, cache interval) search; None: level-only
        self.nfe = 0  # sampling steps run over the probe set (full rollout = partition.num_steps)

    @property
    def resumable(self) -> bool:
        """Whether a rollout may start from cached stage-entry latents (no multistep history)."""
        return not self.adapter.sampler(self.sampler).multistep

    @property
    def joint(self) -> bool:
        """Whether schedules are (levels, cache intervals) pairs."""
        return self.space is not None

    def _schedule(self, levels) -> Schedule:
        if self.joint:
            return self.space.schedule(levels, partition=self.partition.to_dict())
        return Schedule(list(levels), self.levels_max, self.target_level, self.partition.steps_per_stage,
                        partition=self.partition.to_dict())

    def _listeners(self, individual: Individual) -> list:
        """[router] or, for a joint individual, [router, its feature cache] (router first)."""
        router = Router(self.adapter, self.store, self._schedule(individual), resident=self.resident)
        if not self.joint or all(int(k) == 1 for k in individual[1]):  # no stage caches: the router alone
            return [router]
        from ..caching import feature_cache  # caching builds on routing; imported late

        levels, intervals = individual
        try:
            return [router, feature_cache(self.adapter, [int(k) for k in intervals], self.space.branch,
                                          levels=levels)]
        except BaseException:
            router.remove()
            raise

    @torch.no_grad()
    def run(self, levels: Individual | None, start_stage: int = 0,
            start_latents: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Final latents [P, C, H, W] and the latents entering each stage (list of S tensors, CPU).

        `levels=None` runs the dense denoiser; a joint search's schedules are (levels, intervals)
        pairs. With `start_stage > 0`, `start_latents` (the parent's stage-entry latents) supply the
        state entering that stage."""
        adapter, partition = self.adapter, self.partition
        listeners = [] if levels is None else self._listeners(levels)
        first_step = partition.steps_of_stage(start_stage).start if start_stage < partition.num_stages else partition.num_steps
        x = (self.probes.noise if start_stage == 0 else start_latents[start_stage]) if start_stage < partition.num_stages else start_latents[-1]
        entries: list[Tensor] = list(start_latents[:start_stage]) if start_stage else []
        stage_starts = {partition.steps_of_stage(s).start: s for s in range(partition.num_stages)}
        finals = []
        per_batch_entries: list[list[Tensor]] = []
        try:
            for b in range(0, len(x), self.batch_size):
                scheduler = prepare_scheduler(adapter, self.sampler, partition.num_steps)
                latents = x[b:b + self.batch_size].to(adapter.device, adapter.dtype)
                if start_stage == 0:
                    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: none
                cond = self.probes.conditions[b:b + self.batch_size].to(adapter.device)
                seen: list[Tensor] = []

                def keep(step: int, lat: Tensor) -> None:
                    if step in stage_starts and stage_starts[step] >= start_stage:
                        seen.append(lat.detach().cpu())

                stochastic = adapter.sampler(self.sampler).stochastic
                seeds = self.probes.noise_seeds[b:b + self.batch_size] if stochastic else None
                latents = rollout(adapter, scheduler, latents, cond, guidance=self.guidance, partition=partition,
                                  noise_seeds=seeds,
                                  steps=range(first_step, partition.num_steps),
                                  listeners=listeners, on_latents=keep)
                finals.append(latents.cpu())
                per_batch_entries.append(seen)
        finally:
            for listener in reversed(listeners):  # the cache unwraps first, then the router restores
                listener.remove()
        self.nfe += partition.num_steps - first_step
        for s in range(len(per_batch_entries[0])):
            entries.append(torch.cat([batch[s] for batch in per_batch_entries]))
        return torch.cat(finals), entries
