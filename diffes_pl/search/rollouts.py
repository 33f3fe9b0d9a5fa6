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

from ..caching.installed import install_schedule
from ..denoisers.base import DenoiserAdapter
from ..denoisers.registry import family_titles
from ..partition import StagePartition
from ..sampling import prepare_scheduler, rollout, seeded_noise
from ..schedule import Schedule
from ..trajectory import TrajectoryStore


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
                             f"({family_titles(conditioning='text')}); remove model.prompts")
        g = torch.Generator().manual_seed(seed + 7919)
        labels = torch.randperm(num_probes, generator=g) % adapter.num_classes
        return cls(noise, labels, seed)


class RolloutEngine:
    """Runs probes through a schedule (`caching.installed.install_schedule`: its router, and its feature cache when a
    stage caches), caching the latents entering every stage. Every stage starts with a full step (the
    refresh rule), so nothing but the latents crosses a stage boundary and stage-prefix reuse stays
    exact. The engine knows schedules only; the search space that made them is the search's.

    Args:
        batch_size: probes per denoiser call of `run` (default: all).
        resident: `Router(resident=…)`; False shares one buffer per layer (far less memory).
        batch_rows: rows (candidates × probes) per denoiser call of `run_many` (default: all).
    """

    def __init__(self, adapter: DenoiserAdapter, store: TrajectoryStore | None, partition: StagePartition,
                 probes: Probes, *, sampler: str, guidance: float, batch_size: int | None = None,
                 resident: bool = True, batch_rows: int | None = None) -> None:
        self.adapter = adapter
        self.store = store
        self.partition = partition
        self.probes = probes
        self.sampler = sampler
        self.guidance = guidance
        self.batch_size = batch_size or len(probes.noise)
        self.resident = resident
        self.batch_rows = batch_rows
        self.nfe = 0  # sampling steps run (full rollout = partition.num_steps, on any number of probes)
        self.probe_steps = 0  # probes × sampling steps run: the cost meter's unit (the CFG pair counts once)

    @property
    def resumable(self) -> bool:
        """Whether a rollout may start from cached stage-entry latents (no multistep history)."""
        return not self.adapter.sampler(self.sampler).multistep

    @torch.no_grad()
    def run(self, schedule: Schedule | None, start_stage: int = 0,
            start_latents: list[Tensor] | None = None, probes: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Final latents [p, C, H, W] and the latents entering each stage (list of S tensors, CPU).

        `schedule=None` runs the dense denoiser. With `start_stage > 0`, `start_latents` (the parent's
        stage-entry latents) supply the state entering that stage. `probes` (indices [p], default all
        P) runs only those probes — `start_latents` then hold those probes' rows, in that order; a
        probe's result does not depend on which others run with it (its noise, label and step-noise
        seed are its own)."""
        adapter, partition = self.adapter, self.partition
        index = torch.arange(len(self.probes.noise)) if probes is None else probes
        first_step = partition.steps_of_stage(start_stage).start if start_stage < partition.num_stages else partition.num_steps
        x = (self.probes.noise[index] if start_stage == 0 else start_latents[start_stage]) if start_stage < partition.num_stages else start_latents[-1]
        conditions = self.probes.conditions[index]
        noise_seeds = [self.probes.noise_seeds[int(i)] for i in index]
        entries: list[Tensor] = list(start_latents[:start_stage]) if start_stage else []
        stage_starts = {partition.steps_of_stage(s).start: s for s in range(partition.num_stages)}
        finals = []
        per_batch_entries: list[list[Tensor]] = []
        with install_schedule(adapter, self.store, schedule, resident=self.resident) as installed:
            for b in range(0, len(x), self.batch_size):
                scheduler = prepare_scheduler(adapter, self.sampler, partition.num_steps)
                latents = x[b:b + self.batch_size].to(adapter.device, adapter.dtype)
                if start_stage == 0:
                    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: none
                cond = conditions[b:b + self.batch_size].to(adapter.device)
                seen: list[Tensor] = []

                def keep(step: int, lat: Tensor) -> None:
                    if step in stage_starts and stage_starts[step] >= start_stage:
                        seen.append(lat.detach().cpu())

                stochastic = adapter.sampler(self.sampler).stochastic
                seeds = noise_seeds[b:b + self.batch_size] if stochastic else None
                latents = rollout(adapter, scheduler, latents, cond, guidance=self.guidance, partition=partition,
                                  noise_seeds=seeds,
                                  steps=range(first_step, partition.num_steps),
                                  listeners=installed.listeners, on_latents=keep)
                finals.append(latents.cpu())
                per_batch_entries.append(seen)
        self.nfe += partition.num_steps - first_step
        self.probe_steps += len(index) * (partition.num_steps - first_step)
        for s in range(len(per_batch_entries[0])):
            entries.append(torch.cat([batch[s] for batch in per_batch_entries]))
        return torch.cat(finals), entries

    # --- candidates batched ---------------------------------------------------------------------
    @torch.no_grad()
    def run_many(self, jobs: list[tuple[Schedule, int, list[Tensor] | None]], probes: Tensor | None = None
                 ) -> list[tuple[Tensor, list[Tensor], list[int]]]:
        """`run` for several schedules at once, stage by stage: for each (schedule, start stage,
        start latents) job, (final latents, stage-entry latents, the stages this job paid for).

        The latents entering stage s depend only on the configurations — (level, cache interval) — of
        stages < s, so jobs sharing a prefix share its computation (each prefix is computed once: the
        first job needing it pays), and all prefixes continuing with the same configuration at stage s
        run in ONE denoiser call per `batch_rows` (their latents concatenated): a GPU sees candidates
        × probes rows instead of probes. Equal to `run` job by job up to float rounding (a kernel's
        last bits may depend on the batch). Multistep samplers (no prefix reuse) run job by job."""
        if not self.resumable:
            return [(*self.run(schedule, start, cached, probes=probes), list(range(start, self.partition.num_stages)))
                    for schedule, start, cached in jobs]
        adapter, partition = self.adapter, self.partition
        S = partition.num_stages
        index = torch.arange(len(self.probes.noise)) if probes is None else probes
        n = len(index)
        stochastic = adapter.sampler(self.sampler).stochastic
        seeds = [self.probes.noise_seeds[int(i)] for i in index] if stochastic else None
        configs = [tuple(schedule.stage_config(s) for s in range(S)) for schedule, _, _ in jobs]
        starts = [min(start, S - 1) for _, start, _ in jobs]
        states: dict[tuple, Tensor] = {}  # prefix (configs of stages < s) → latents entering stage s [n, ...]
        entries: list[list[Tensor]] = [[] for _ in jobs]
        paid: list[list[int]] = [[] for _ in jobs]
        for j, (_, start, cached) in enumerate(jobs):
            entries[j] = list(cached[:starts[j]]) if starts[j] else []
            if starts[j] == 0:
                scheduler = prepare_scheduler(adapter, self.sampler, partition.num_steps)
                states.setdefault((), self.probes.noise[index] * getattr(scheduler, "init_noise_sigma", 1.0))
            else:
                states.setdefault(configs[j][:starts[j]], cached[starts[j]])
        for s in range(min(starts), S):
            groups: dict[tuple, list[tuple]] = {}  # stage config → prefixes continuing with it
            owner: dict[tuple, Schedule] = {}  # stage config → a job's schedule that has it at stage s
            for j in range(len(jobs)):
                if starts[j] > s:
                    continue
                prefix = configs[j][:s]
                entries[j].append(states[prefix])
                following = groups.setdefault(configs[j][s], [])
                owner.setdefault(configs[j][s], jobs[j][0])
                if prefix + (configs[j][s],) not in states and prefix not in following:
                    following.append(prefix)
                    paid[j].append(s)
            for config, prefixes in groups.items():
                if not prefixes:
                    continue
                x = torch.cat([states[p] for p in prefixes])
                out = self._run_stage(s, owner[config], x, index, seeds, len(prefixes))
                for i, p in enumerate(prefixes):
                    states[p + (config,)] = out[i * n:(i + 1) * n]
        for j in range(len(jobs)):
            steps = sum(partition.steps_per_stage[s] for s in paid[j])
            self.nfe += steps
            self.probe_steps += n * steps
        return [(states[configs[j]], entries[j], paid[j]) for j in range(len(jobs))]

    def _run_stage(self, stage: int, schedule: Schedule, x: Tensor, index: Tensor, seeds, copies: int) -> Tensor:
        """Stage `stage`'s steps of `schedule` on `copies` concatenated latents of the probes `index`.
        A stage's weights and cache depend on its level and interval only, so any schedule with that
        configuration there runs it alike: `Schedule.repeat_stage` (one configuration everywhere, only
        that stage's weights prepared)."""
        adapter, partition = self.adapter, self.partition
        steps = partition.steps_of_stage(stage)
        cond = self.probes.conditions[index.repeat(copies)]  # labels or a TextCondition, row by row
        noise_seeds = None if seeds is None else seeds * copies
        rows = self.batch_rows or len(x)
        out = []
        with install_schedule(adapter, self.store, schedule.repeat_stage(stage), resident=self.resident,
                    stages=[stage]) as installed:
            for b in range(0, len(x), rows):
                scheduler = prepare_scheduler(adapter, self.sampler, partition.num_steps)
                out.append(rollout(adapter, scheduler, x[b:b + rows].to(adapter.device, adapter.dtype),
                                   cond[b:b + rows].to(adapter.device), guidance=self.guidance, partition=partition,
                                   noise_seeds=None if noise_seeds is None else noise_seeds[b:b + rows],
                                   steps=steps, listeners=installed.listeners).cpu())
        return torch.cat(out)
