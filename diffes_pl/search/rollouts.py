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
from ..partition import StagePartition
from ..schedule import Schedule
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
        self.batch_candidates = False  # the search evaluates a round's candidates with `run_many`
        self.batch_rows: int | None = None  # rows (candidates × probes) per denoiser call of `run_many` (None: all)
        self.nfe = 0  # sampling steps run (full rollout = partition.num_steps, on any number of probes)
        self.probe_steps = 0  # probes × sampling steps run: the cost meter's unit (the CFG pair counts once)

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
            start_latents: list[Tensor] | None = None, probes: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Final latents [p, C, H, W] and the latents entering each stage (list of S tensors, CPU).

        `levels=None` runs the dense denoiser; a joint search's schedules are (levels, intervals)
        pairs. With `start_stage > 0`, `start_latents` (the parent's stage-entry latents) supply the
        state entering that stage. `probes` (indices [p], default all P) runs only those probes —
        `start_latents` then hold those probes' rows, in that order; a probe's result does not depend
        on which others run with it (its noise, label and step-noise seed are its own)."""
        adapter, partition = self.adapter, self.partition
        index = torch.arange(len(self.probes.noise)) if probes is None else probes
        listeners = [] if levels is None else self._listeners(levels)
        first_step = partition.steps_of_stage(start_stage).start if start_stage < partition.num_stages else partition.num_steps
        x = (self.probes.noise[index] if start_stage == 0 else start_latents[start_stage]) if start_stage < partition.num_stages else start_latents[-1]
        conditions = self.probes.conditions[index]
        noise_seeds = [self.probes.noise_seeds[int(i)] for i in index]
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
                                  listeners=listeners, on_latents=keep)
                finals.append(latents.cpu())
                per_batch_entries.append(seen)
        finally:
            for listener in reversed(listeners):  # the cache unwraps first, then the router restores
                listener.remove()
        self.nfe += partition.num_steps - first_step
        self.probe_steps += len(index) * (partition.num_steps - first_step)
        for s in range(len(per_batch_entries[0])):
            entries.append(torch.cat([batch[s] for batch in per_batch_entries]))
        return torch.cat(finals), entries

    # --- candidates batched ---------------------------------------------------------------------
    def _stage_config(self, individual: Individual, stage: int) -> tuple:
        """What decides stage `stage`'s denoiser: its level (and cache interval)."""
        if self.joint:
            return (int(individual[0][stage]), int(individual[1][stage]))
        return (int(individual[stage]),)

    def _stage_listeners(self, stage: int, config: tuple) -> list:
        """Router (+ cache) running stage `stage` at `config` (only that stage's weights prepared): every
        stage's weights at a level depend on the stage and the level only, so any schedule with that
        level there routes it alike — a uniform one is used."""
        S, level = self.partition.num_stages, config[0]
        schedule = Schedule.uniform(level, self.levels_max, self.partition.steps_per_stage,
                                    partition=self.partition.to_dict())
        router = Router(self.adapter, self.store, schedule, resident=self.resident, stages=[stage])
        if not self.joint or config[1] == 1:
            return [router]
        from ..caching import feature_cache  # caching builds on routing; imported late

        try:
            return [router, feature_cache(self.adapter, [config[1]] * S, self.space.branch, levels=[level] * S)]
        except BaseException:
            router.remove()
            raise

    @torch.no_grad()
    def run_many(self, jobs: list[tuple[Individual, int, list[Tensor] | None]], probes: Tensor | None = None
                 ) -> list[tuple[Tensor, list[Tensor], list[int]]]:
        """`run` for several schedules at once, stage by stage: for each (individual, start stage,
        start latents) job, (final latents, stage-entry latents, the stages this job paid for).

        The latents entering stage s depend only on the configurations of stages < s, so jobs sharing a
        prefix share its computation (each prefix is computed once: the first job needing it pays), and
        all prefixes continuing with the same configuration at stage s run in ONE denoiser call per
        `rows` (their latents concatenated): a GPU sees candidates × probes rows instead of probes.
        Equal to `run` job by job up to float rounding (a kernel's last bits may depend on the batch).
        Multistep samplers (no prefix reuse) run job by job."""
        if not self.resumable:
            return [(*self.run(ind, start, cached, probes=probes), list(range(start, self.partition.num_stages)))
                    for ind, start, cached in jobs]
        adapter, partition = self.adapter, self.partition
        S = partition.num_stages
        index = torch.arange(len(self.probes.noise)) if probes is None else probes
        n = len(index)
        stochastic = adapter.sampler(self.sampler).stochastic
        seeds = [self.probes.noise_seeds[int(i)] for i in index] if stochastic else None
        configs = [tuple(self._stage_config(ind, s) for s in range(S)) for ind, _, _ in jobs]
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
            for j in range(len(jobs)):
                if starts[j] > s:
                    continue
                prefix = configs[j][:s]
                entries[j].append(states[prefix])
                following = groups.setdefault(configs[j][s], [])
                if prefix + (configs[j][s],) not in states and prefix not in following:
                    following.append(prefix)
                    paid[j].append(s)
            for config, prefixes in groups.items():
                if not prefixes:
                    continue
                x = torch.cat([states[p] for p in prefixes])
                out = self._run_stage(s, config, x, index, seeds, len(prefixes))
                for i, p in enumerate(prefixes):
                    states[p + (config,)] = out[i * n:(i + 1) * n]
        for j in range(len(jobs)):
            steps = sum(partition.steps_per_stage[s] for s in paid[j])
            self.nfe += steps
            self.probe_steps += n * steps
        return [(states[configs[j]], entries[j], paid[j]) for j in range(len(jobs))]

    def _run_stage(self, stage: int, config: tuple, x: Tensor, index: Tensor, seeds, copies: int) -> Tensor:
        """Stage `stage`'s steps at `config` on `copies` concatenated latents of the probes `index`."""
        adapter, partition = self.adapter, self.partition
        listeners = self._stage_listeners(stage, config)
        steps = partition.steps_of_stage(stage)
        cond = self.probes.conditions[index.repeat(copies)]  # labels or a TextCondition, row by row
        noise_seeds = None if seeds is None else seeds * copies
        rows = self.batch_rows or len(x)
        out = []
        try:
            for b in range(0, len(x), rows):
                scheduler = prepare_scheduler(adapter, self.sampler, partition.num_steps)
                out.append(rollout(adapter, scheduler, x[b:b + rows].to(adapter.device, adapter.dtype),
                                   cond[b:b + rows].to(adapter.device), guidance=self.guidance, partition=partition,
                                   noise_seeds=None if noise_seeds is None else noise_seeds[b:b + rows],
                                   steps=steps, listeners=listeners).cpu())
        finally:
            for listener in reversed(listeners):
                listener.remove()
        return torch.cat(out)
