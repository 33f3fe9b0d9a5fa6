"""The evolutionary search as a plain object: no Trainer, no LightningModule.

`EvolutionarySearch` holds what a search is: the survivors (the population kept between
generations), the fitness cache, the archive (one record per evaluated schedule), the survivors'
stage-entry latents (so that a child's rollout starts where it first differs from a cached schedule)
and the search's own `torch.Generator`. One `step()` is one generation: make the candidates
(the initial population, then level-switch mutants of the survivors), evaluate the new ones, keep
the best. `state_dict()` / `load_state_dict()` are the whole search, so a search stopped after any
generation and restored continues exactly as an uninterrupted one.

What an individual is, how a population is made and mutated, where two individuals first differ, and
how an individual reads in the archive and the checkpoint: the search's one `space.SearchSpace`
(`level_space.LevelSpace`, `joint_space.JointSpace`) says. The search asks it and never looks inside
an individual.

With racing (`racing.Racing`), a generation scores its new children on a probe subset first (rung
by rung on more probes, with rungs) and finishes only those that can still reach the worst survivor
(in the first generation: the μ-th best newcomer on the first rung); the survivors' per-probe values
(on all probes) and the raced-out children are part of the state.

`DiffES` (lightning_module.py) drives it under `Trainer.fit`, one generation per epoch, and tells `step` its
rank, the world size and how to sum a tensor over ranks (the new schedules are split across them);
alone, `step` evaluates them in this process.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..fitness import FitnessInputs, Metric
from ..schedule import Schedule
from .racing import Racing
from .rollouts import RolloutEngine
from .space import Individual, SearchSpace, select
# the new schedules of a generation, each with the survivor it was mutated from (None: initial)
Pending = list[tuple[Individual, Individual | None]]
# sums a tensor over the processes of a run (each process fills only its own slots; None: one process)
Reduce = Callable[[Tensor], Tensor]
# how a generation's new schedules are made: mutants of the survivors (Diff-ES), fresh random draws
# (random search), or the best schedule's whole one-move neighbourhood (greedy hill climbing)
PROPOSALS = ("evolution", "random", "greedy")


@dataclass
class Scored:
    """One schedule rolled out on some probes (all P, or a racing subset)."""

    latents: Tensor  # [p, C, H, W] final latents, CPU
    entries: list[Tensor]  # S tensors [p, C, H, W]: the latents entering each stage
    value: float  # the metric on these probes (on all P: the fitness)
    per_probe: Tensor | None  # [p] float64 per-probe values (racing only)
    nfe: int  # sampling steps run
    probe_steps: int  # probes × sampling steps run
    macs: int  # denoiser MACs spent (the CFG pair counts twice)


@dataclass
class Round:
    """What one evaluation round gives every process: per pending schedule (zeros where a schedule was
    not in the round), summed over processes."""

    values: Tensor  # [n] float64
    per_probe: Tensor  # [n, p] float64 (p = 0 without racing)
    nfe: Tensor  # [n]
    probe_steps: Tensor  # [n]
    macs: Tensor  # [n]

    @classmethod
    def zeros(cls, n: int, p: int) -> "Round":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(z(n), z(n, p), z(n), z(n), z(n))

    def fill(self, i: int, scored: Scored) -> None:
        self.values[i], self.nfe[i] = scored.value, scored.nfe
        self.probe_steps[i], self.macs[i] = scored.probe_steps, scored.macs
        if scored.per_probe is not None and self.per_probe.shape[1]:
            self.per_probe[i] = scored.per_probe

    def reduced(self, reduce: Reduce | None) -> "Round":
        if reduce is None:
            return self
        return Round(*(reduce(t) for t in (self.values, self.per_probe, self.nfe, self.probe_steps, self.macs)))


class EvolutionarySearch:
    """Elitist evolutionary search over budget-meeting schedules, scored by `metric` on fixed probes.

    Args:
        engine: rolls the probes out under a schedule (on the search space's partition).
        metric: the fitness (compared with the dense model's rollout of the same probes).
        space: the individuals searched over (`space.SearchSpace`); its `costs` are the cost meter's
            MACs per step.
        offspring: children per generation. survivors: individuals kept (elitist).
        max_move: largest move. moves_per_child: moves applied per child.
        init: initial population (one of `space.inits`). seeds: user schedules put into it.
        seed: seed of the search's own generator (population, mutation).
        proposal: how each generation's new schedules are made (`PROPOSALS`). "evolution": the initial
            population, then `offspring` mutants of the survivors. The other two are the baselines,
            searched by the same loop (same probes, fitness, racing, cost meter and checkpoint), so
            that "equal evaluations" means the same thing for all three: "random" draws
            `offspring + survivors` random budget-meeting schedules, then `offspring` fresh ones each
            generation; "greedy" starts from the uniform schedule (or the first of `seeds`) and each
            generation evaluates every schedule one move of size 1 away from the best one not yet
            evaluated (best-improvement hill climbing in whole neighbourhood rounds; once the best
            has no new neighbour, a generation evaluates nothing).
        racing: score children on a probe subset first (`racing.Racing`); None: every child on all
            probes. The metric must give per-probe values, and the engine's probe batch must divide
            every rung (`Racing.batch_divisor`).
        batch_candidates: evaluate a round's candidates together, stage by stage (`RolloutEngine.run_many`).

    Building it rolls the probes out once with the dense denoiser: the reference of every fitness.

    Cost meter: every schedule's archive row holds the probe-steps (one probe through one denoiser
    step; the CFG pair counts once) and the denoiser MACs (CFG pair counted twice) its evaluation
    spent; `cost()` sums them with the dense reference rollout's.
    """

    def __init__(self, engine: RolloutEngine, metric: Metric, *, space: SearchSpace, offspring: int, survivors: int,
                 max_move: int, moves_per_child: int = 1, init: str = "hybrid", seeds: Sequence[Any] = (),
                 seed: int = 0, racing: Racing | None = None, batch_candidates: bool = False,
                 proposal: str = "evolution") -> None:
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {', '.join(PROPOSALS)} (got {proposal!r})")
        self.engine, self.metric, self.space = engine, metric, space
        self.proposal = proposal
        if proposal == "greedy" and "uniform" not in space.inits:
            raise ValueError("the greedy proposal climbs from the uniform schedule, which this search space does not "
                             f"make (it makes {', '.join(space.inits)}): use it with the level-only search")
        self.num_probes = len(engine.probes.noise)
        self.racing = racing
        if racing is not None:
            racing.check(self.num_probes)
            if metric.per_probe is None:
                metric.probe_values(None)  # raises: the metric cannot be raced
            # A probe's rollout can differ in the last bits with the batch it runs in (CPU kernels block
            # by batch size). Probe batches that divide the subset size make the subset's batches and
            # the rest's the very batches of a full rollout: a finished child's fitness is exactly
            # its full evaluation's, whichever way it was reached (with rungs: divide every rung).
            fits = racing.batch_divisor(engine.batch_size)
            if fits != engine.batch_size:
                raise ValueError(f"racing on rungs {list(racing.rungs)} needs probe batches that divide every rung: "
                                 f"build the rollout engine with batch_size={fits} (not {engine.batch_size})")
        if init not in space.inits:
            raise ValueError(f"unknown initial population {init!r}; this search space makes {', '.join(space.inits)}")
        self.offspring, self.num_survivors = offspring, survivors
        self.max_move, self.moves_per_child = max_move, moves_per_child
        self.batch_candidates = batch_candidates
        self.init, self.seeds = init, list(seeds)
        self.generator = torch.Generator().manual_seed(seed)
        self.survivors: list[Individual] = []
        self.fitness: dict[Individual, float] = {}
        self.archive: list[dict] = []
        self.entries: dict[Individual, list[Tensor]] = {}
        self.per_probe: dict[Individual, Tensor] = {}  # racing: survivors' per-probe values on all P probes
        self.raced_out: dict[Individual, float] = {}  # racing: children stopped on the subset (their subset value)
        self.nfe_history: list[int] = []  # denoiser steps per generation
        self.cost_history: list[dict[str, int]] = []  # per generation: probe_steps, macs
        self.evaluated_here = 0  # schedules evaluated by this process (a restored search holds the rest)
        self.costs = space.costs
        probe_steps = engine.probe_steps  # the engine counts on; every cost here is a difference
        self.reference_latents, _ = engine.run(None)
        self.reference_images = self._decode(self.reference_latents)
        self.reference_cost = {"probe_steps": engine.probe_steps - probe_steps,
                               "macs": self._macs(None, range(engine.partition.num_stages), self.num_probes)}

    # --- state ------------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Generations completed (the next one's index)."""
        return len(self.nfe_history)

    @property
    def best(self) -> Individual:
        """The best schedule's levels (the first survivor)."""
        if not self.survivors:
            raise RuntimeError("the search has not completed a generation yet: there is no best schedule")
        return self.survivors[0]

    @property
    def best_fitness(self) -> float:
        return float(self.fitness[self.best])

    # --- one generation ---------------------------------------------------------------------------
    def candidates(self) -> list[tuple[Individual, Individual | None]]:
        """This generation's (schedule, parent) pairs: the initial population (no parents), then
        `offspring` mutants of the survivors."""
        first = self.generation == 0 and not self.survivors
        if self.proposal == "greedy":
            if first:
                return [(self.space.initial_population(1, self.generator, init="uniform", seeds=self.seeds[:1])[0],
                         None)]
            known = self.known()
            return [(ind, self.best) for ind in self.space.neighbours(self.best, 1) if ind not in known]
        if self.proposal == "random":
            return [(ind, None) for ind in self._random_new(self.offspring + self.num_survivors if first
                                                            else self.offspring, first)]
        if first:
            return [(ind, None) for ind in self.space.initial_population(
                self.offspring + self.num_survivors, self.generator, init=self.init, seeds=self.seeds)]
        return self.space.next_generation(self.survivors, self.offspring, self.generator, self.max_move,
                                          self.moves_per_child, self.known())

    def _random_new(self, n: int, first: bool, max_draws: int = 32) -> list[Individual]:
        """n random budget-meeting schedules not evaluated yet (the user's seeds first in the first
        generation); fewer only if `max_draws` draws of n find no more (a nearly exhausted space)."""
        known, out = self.known(), []
        for draw in range(max_draws):
            seeds = self.seeds if first and draw == 0 else ()
            for ind in self.space.initial_population(n, self.generator, init="random", seeds=seeds):
                if ind not in known and ind not in out and len(out) < n:
                    out.append(ind)
            if len(out) == n:
                break
        return out

    def known(self) -> set[Individual]:
        """Schedules evaluated already (raced out included): mutation draws new ones in their place."""
        return set(self.fitness) | set(self.raced_out)

    def pending(self, candidates: Pending) -> Pending:
        """The candidates not in the fitness cache, each once, in order."""
        todo, seen = [], set()
        for levels, parent in candidates:
            # a child raced out once stays out: the bar (the worst survivor) only rises
            if levels not in self.fitness and levels not in self.raced_out and levels not in seen:
                seen.add(levels)
                todo.append((levels, parent))
        return todo

    def evaluate(self, levels: Individual, parent: Individual | None = None) -> tuple[float, int]:
        """Fitness of a schedule on all probes (cached) and the denoiser steps it cost (`parent` is for
        the archive only). Rolled out from the longest stage prefix shared with a cached schedule
        (`_score`)."""
        if levels in self.fitness:
            return self.fitness[levels], 0
        scored = self._full(levels)
        return scored.value, scored.nfe

    def _start(self, individual: Individual, sources: dict[Individual, list[Tensor]]) -> tuple[int, list | None]:
        """The longest stage prefix `individual` shares with one of `sources` (stage-entry latents): the
        latents entering stage k depend only on the stages < k, so starting there is exact."""
        start, cached = 0, None
        if self.engine.resumable:
            for source, entries in sources.items():
                shared = self.space.first_changed_stage(source, individual)
                if shared > start:
                    start, cached = shared, entries
        return start, cached if start else None

    def _score(self, individual: Individual, probes: Tensor, sources: dict[Individual, list[Tensor]],
               judge: bool = True) -> Scored:
        """Rolls `individual` out on `probes` (indices) from the longest prefix shared with `sources`
        (those probes' stage-entry latents): identical to a full rollout. judge=False skips the decode
        and the metric (a later rung's piece: `_joined` judges the joined probes once)."""
        engine = self.engine
        start, cached = self._start(individual, sources)
        nfe, probe_steps = engine.nfe, engine.probe_steps
        latents, entries = engine.run(self.schedule(individual), start, cached, probes=probes)
        return self._scored(individual, probes, latents, entries, engine.nfe - nfe, engine.probe_steps - probe_steps,
                            range(start, engine.partition.num_stages), judge)

    def _score_many(self, individuals: list[Individual], probes: Tensor,
                    sources: dict[Individual, list[Tensor]], judge: bool = True) -> list[Scored]:
        """`_score` for several schedules at once (`RolloutEngine.run_many`: candidates sharing a
        stage's configuration share its denoiser calls; shared prefixes run once — each schedule is
        charged the stages it ran first)."""
        jobs = [(self.schedule(ind), *self._start(ind, sources)) for ind in individuals]
        w = self.engine.partition.steps_per_stage
        return [self._scored(ind, probes, latents, entries, sum(w[s] for s in paid),
                             len(probes) * sum(w[s] for s in paid), paid, judge)
                for ind, (latents, entries, paid) in zip(individuals, self.engine.run_many(jobs, probes))]

    def _scored(self, individual: Individual, probes: Tensor, latents: Tensor, entries: list[Tensor], nfe: int,
                probe_steps: int, stages, judge: bool = True) -> Scored:
        macs = self._macs(individual, stages, len(probes))
        if not judge:
            return Scored(latents, entries, float("nan"), None, nfe, probe_steps, macs)
        inputs = self._inputs(latents, probes)
        per_probe = self.metric.probe_values(inputs) if self.racing is not None else None
        return Scored(latents, entries, self.metric(inputs), per_probe, nfe, probe_steps, macs)

    def _full(self, individual: Individual) -> Scored:
        """Scores `individual` on all probes and caches it (fitness, stage-entry latents)."""
        scored = self._score(individual, torch.arange(self.num_probes), self.entries)
        self._keep(individual, scored)
        self.evaluated_here += 1
        return scored

    def _joined(self, individual: Individual, first: Scored, part: Scored, final: bool) -> Scored:
        """A racing child scored on probes [0, m) (`first`) and the next rung's [m, m') (`part`) as one
        Scored on [0, m'): the metric and per-probe values are recomputed on all its images, so on
        the last rung (`final`, m' = P) the fitness is the very value a full evaluation gives, and the
        child is kept (fitness, stage-entry latents). The cost fields are `part`'s (the earlier
        rungs' were counted in their rounds)."""
        latents = torch.cat([first.latents, part.latents])  # rungs are consecutive probe ranges: probe order
        inputs = self._inputs(latents, torch.arange(len(latents)))
        scored = Scored(latents, [torch.cat(pair) for pair in zip(first.entries, part.entries)],
                        self.metric(inputs), self.metric.probe_values(inputs), part.nfe, part.probe_steps, part.macs)
        if final:
            self._keep(individual, scored)
        return scored

    @staticmethod
    def _sliced(sources: dict[Individual, list[Tensor]], probes: Tensor) -> dict[Individual, list[Tensor]]:
        return {ind: [e[probes] for e in entries] for ind, entries in sources.items()}

    def _keep(self, individual: Individual, scored: Scored) -> None:
        self.fitness[individual] = scored.value
        self.entries[individual] = scored.entries
        if scored.per_probe is not None:
            self.per_probe[individual] = scored.per_probe

    def _inputs(self, latents: Tensor, probes: Tensor) -> FitnessInputs:
        return FitnessInputs(self._decode(latents), latents, self.reference_images[probes],
                             self.reference_latents[probes], self.engine.probes.conditions[probes])

    def evaluate_here(self, todo: Pending) -> tuple[Tensor, Tensor]:
        """Every pending schedule on all probes, in this process: (fitness values, denoiser steps)."""
        values = torch.zeros(len(todo), dtype=torch.float64)
        nfes = torch.zeros(len(todo), dtype=torch.float64)
        for i, item in enumerate(todo):
            values[i], nfes[i] = self.evaluate(*item)
        return values, nfes

    def _round(self, todo: Pending, which: Sequence[int], score: Callable[[int], Scored], width: int,
               reduce: Reduce | None, rank: int, world: int, before_each: Callable[[], None] | None) -> Round:
        """Scores todo[i] for i in `which` — this process takes every `world`-th (by i, so that a
        racing child finishes where it started) — and sums the results over processes."""
        out = Round.zeros(len(todo), width)
        for i in which:
            if i % world == rank:
                if before_each is not None:
                    before_each()
                out.fill(i, score(i))
        return out.reduced(reduce)

    def _ahead(self, todo: Pending, which, rank: int, world: int, probes: Tensor,
               sources: dict[Individual, list[Tensor]], judge: bool = True) -> dict[int, Scored]:
        """This process's share of `which` scored at once (`_score_many`), by index into `todo`."""
        mine = [i for i in which if i % world == rank]
        return dict(zip(mine, self._score_many([todo[i][0] for i in mine], probes, sources, judge)))

    def step(self, reduce: Reduce | None = None, rank: int = 0, world: int = 1,
             before_each: Callable[[], None] | None = None) -> dict[str, float]:
        """Runs one generation: candidates, their evaluation, selection. Several processes split the
        new schedules (process `rank` of `world`; `reduce` sums a tensor over them, so that every
        process ends with the same fitness values); `before_each` runs before each rollout (the
        run's stop check). Returns the generation's statistics (best and median fitness, schedules
        evaluated and raced out, denoiser steps, probe-steps and MACs spent)."""
        generation = self.generation
        candidates = self.candidates()
        todo = self.pending(candidates)
        n, P = len(todo), self.num_probes
        width = P if self.racing is not None else 0
        # racing's cut: the worst survivor; in the first generation (no survivors yet) the μ-th best
        # newcomer on the first rung — it passes every rung (d = 0), so μ schedules finish on all probes
        cut = self.survivors[-1] if len(self.survivors) >= self.num_survivors else None
        racing = self.racing is not None and (cut is not None or (not self.survivors and n > self.num_survivors))
        batched = self.batch_candidates
        every = torch.arange(P)
        if not racing:  # every new schedule on all probes
            ready = self._ahead(todo, range(n), rank, world, every, self.entries) if batched else {}
            for i, scored in ready.items():
                self._keep(todo[i][0], scored)
                self.evaluated_here += 1
            full = self._round(todo, range(n), lambda i: ready[i] if batched else self._full(todo[i][0]), width,
                               reduce, rank, world, before_each)
            rows = {i: (full, i, P, False) for i in range(n)}
            spent = [full]
        else:  # racing: rung by rung on more probes; only the children that can still reach the cut go on
            bounds, alive, rows, spent = self.racing.bounds(P), list(range(n)), {}, []
            done: dict[int, Scored] = {}  # this process's children scored so far, on probes [0, lo)
            first = -1  # the first generation's cut: the child that sets it, chosen on the first rung
            for lo, hi in itertools.pairwise(bounds):
                probes = torch.arange(lo, hi)
                # prefixes on these probes: the survivors', and this round's siblings' as they finish
                sources = self._sliced({ind: self.entries[ind] for ind in self.survivors if ind in self.entries},
                                       probes)
                # a later rung's piece is judged only joined with the earlier probes (`_joined`)
                ready = self._ahead(todo, alive, rank, world, probes, sources, judge=lo == 0) if batched else {}
                if lo == 0:
                    self.evaluated_here += len(ready)

                def score(i: int, lo=lo, hi=hi, probes=probes, sources=sources, ready=ready) -> Scored:
                    part = ready.get(i)
                    if part is None:
                        part = self._score(todo[i][0], probes, sources, judge=lo == 0)
                        sources[todo[i][0]] = part.entries
                        self.evaluated_here += lo == 0
                    done[i] = part if lo == 0 else self._joined(todo[i][0], done[i], part, final=hi == P)
                    return done[i]

                result = self._round(todo, alive, score, hi, reduce, rank, world, before_each)
                spent.append(result)
                if hi == P:
                    rows.update({i: (result, i, P, False) for i in alive})
                    break
                if cut is not None:
                    bar = self.per_probe[cut][:hi]
                else:  # the first generation's cut: the μ-th best on the first rung (ties: by index)
                    first = first if lo else sorted(alive, key=lambda i: -float(result.per_probe[i].mean())
                                                    )[self.num_survivors - 1]
                    bar = result.per_probe[first]
                passed = [i for i in alive if self.racing.can_reach(result.per_probe[i], bar, P)]
                rows.update({i: (result, i, hi, True) for i in alive if i not in passed})
                alive = passed
        for i, (levels, parent) in enumerate(todo):
            result, j, probes, raced_out = rows[i]
            value = float(result.values[j])
            if raced_out:
                self.raced_out[levels] = value
            else:
                self.fitness[levels] = value
                if width:
                    self.per_probe[levels] = result.per_probe[j].clone()
            cost = [int(sum(float(r.probe_steps[i]) for r in spent)), int(sum(float(r.macs[i]) for r in spent))]
            nfe = int(sum(float(r.nfe[i]) for r in spent))
            self.archive.append(self._record(generation, levels, value, nfe, parent, probes, *cost, raced_out))
        pool = {ind: self.metric.score(self.fitness[ind])
                for ind in {*self.survivors, *(c for c, _ in candidates)} if ind in self.fitness}
        self.survivors = select(pool, self.num_survivors, higher_is_better=True)
        self.entries = {ind: self.entries[ind] for ind in self.survivors if ind in self.entries}
        self.per_probe = {ind: self.per_probe[ind] for ind in self.survivors if ind in self.per_probe}
        records = self.archive[len(self.archive) - n:] if n else []  # greedy at a local optimum: none
        self.nfe_history = self.nfe_history + [sum(r["nfe"] for r in records)]
        self.cost_history = self.cost_history + [{"probe_steps": sum(r["probe_steps"] for r in records),
                                                  "macs": sum(r["macs_spent"] for r in records)}]
        scored = [self.fitness[c] for c, _ in candidates if c in self.fitness] or [self.best_fitness]
        total = self.cost()
        return {"best_fitness": self.best_fitness, "median_fitness": float(torch.tensor(scored).median()),
                "evaluated": float(n), "raced_out": float(sum(r.get("raced_out", False) for r in records)),
                "nfe": float(self.nfe_history[-1]), "nfe_total": float(sum(self.nfe_history)),
                "probe_steps": float(self.cost_history[-1]["probe_steps"]),
                "probe_steps_total": float(total["probe_steps"]),
                "macs": float(self.cost_history[-1]["macs"]), "macs_total": float(total["macs"])}

    # --- cost meter -------------------------------------------------------------------------------
    def cost(self) -> dict[str, int]:
        """What the search has spent so far: probe-steps and denoiser MACs, the dense reference
        rollout included (`reference_*`: that part alone)."""
        return {"probe_steps": self.reference_cost["probe_steps"] + sum(c["probe_steps"] for c in self.cost_history),
                "macs": self.reference_cost["macs"] + sum(c["macs"] for c in self.cost_history),
                "reference_probe_steps": self.reference_cost["probe_steps"],
                "reference_macs": self.reference_cost["macs"], "generations": self.generation}

    def _macs(self, individual: Individual | None, stages, probes: int) -> int:
        """Denoiser MACs of rolling `probes` probes through `stages` of `individual` (None: dense);
        the CFG pair is two forwards."""
        w = self.engine.partition.steps_per_stage
        cfg = 1 if self.engine.guidance == 1.0 else 2
        if individual is None:
            per_probe = self.costs.dense * sum(w[s] for s in stages)
        else:
            per_probe = sum(self.costs.stage_macs(s, w[s], *self.space.stage_config(individual, s)) for s in stages)
        return per_probe * probes * cfg

    def _record(self, generation: int, individual: Individual, value: float, nfe: int, parent: Individual | None,
                probes: int, probe_steps: int, macs_spent: int, raced_out: bool) -> dict:
        """The archive row (evaluations.jsonl) of one evaluated schedule: `fitness` on `probes` probes
        (racing: a raced-out child's is its subset value, marked `raced_out`), and what it cost."""
        row = {"generation": generation, **self.space.describe(individual), "fitness": value, "nfe": nfe,
               "parent": self.space.to_state(parent) if parent is not None else None}
        row.update(probes=probes, probe_steps=probe_steps, macs_spent=macs_spent)
        if self.racing is not None:
            row["raced_out"] = raced_out
        return row

    # --- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole search (plain types and CPU tensors), as the run's checkpoint stores it; individuals
        in their space's plain-list form (`SearchSpace.to_state`)."""
        state = self.space.to_state
        return {
            "survivors": [state(s) for s in self.survivors],
            "fitness": [[state(k), v] for k, v in self.fitness.items()],
            "archive": self.archive,
            "entries": {json.dumps(state(k)): v for k, v in self.entries.items()},
            "generator": self.generator.get_state(),
            "nfe_history": self.nfe_history,
            "cost_history": self.cost_history,
            "per_probe": [[state(k), v] for k, v in self.per_probe.items()],
            "raced_out": [[state(k), v] for k, v in self.raced_out.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            read = [self.space.from_state(s) for s in state["survivors"]]
        except ValueError as err:
            raise ValueError(f"the checkpoint's search ran in another search space ({err}): model.cache_intervals "
                             "differs from the run that wrote it; restore it, or start a new search with "
                             "--overwrite true") from None
        individual = self.space.from_state
        self.survivors = read
        self.fitness = {individual(k): v for k, v in state["fitness"]}
        self.archive = state["archive"]
        self.entries = {individual(json.loads(k)): v for k, v in state["entries"].items()}
        self.generator.set_state(state["generator"])
        self.nfe_history = state["nfe_history"]
        # checkpoints written before the cost meter: their generations' cost is unknown (counted as 0)
        self.cost_history = state.get("cost_history", [{"probe_steps": 0, "macs": 0}] * len(self.nfe_history))
        self.per_probe = {individual(k): v for k, v in state.get("per_probe", [])}
        self.raced_out = {individual(k): v for k, v in state.get("raced_out", [])}
        if self.racing is not None and any(ind not in self.per_probe for ind in self.survivors):
            raise ValueError("the checkpoint's search ran without racing (its survivors have no per-probe values): "
                             "resume it with race_probes: null, or start a new search with --overwrite true")

    def schedule(self, individual: Individual, **fields: Any) -> Schedule:
        """The schedule of `individual` on the engine's partition (fields: store, pruner, metric, …)."""
        return self.space.schedule(individual, partition=self.engine.partition.to_dict(), **fields)

    def _decode(self, latents: Tensor) -> Tensor:
        adapter = self.engine.adapter
        return adapter.decode(latents.to(adapter.device)).cpu()

