"""The evolutionary search as a plain object: no Trainer, no LightningModule.

`EvolutionarySearch` holds what a search is: the survivors (the population kept between
generations), the fitness cache, the archive (one record per evaluated schedule), the survivors'
stage-entry latents (so that a child's rollout starts where it first differs from a cached schedule)
and the search's own `torch.Generator`. One `step()` is one generation: make the candidates
(the initial population, then level-switch mutants of the survivors), evaluate the new ones, keep
the best. `state_dict()` / `load_state_dict()` are the whole search, so a search stopped after any
generation and restored continues exactly as an uninterrupted one.

A joint search (the engine has a `population.JointSpace`) works the same way on (levels, cache
intervals) pairs: `initial_joint_population` / `next_joint_generation` under the MAC budget, prefix
reuse from `first_changed_joint_stage` (exact: every stage starts with a full step), archive rows
with `intervals` and `macs` (fraction of the dense trajectory's). A level-only search is untouched:
same operators, same random numbers, same archive and checkpoint.

`DiffES` (module.py) drives it under `Trainer.fit`, one generation per epoch, and hands `step` an
evaluator that splits the new schedules across ranks and gathers their fitness; alone, `step`
evaluates them in this process.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..fitness import FitnessInputs, Metric
from . import population as pop
from .rollouts import RolloutEngine

Individual = tuple  # levels (S ints), or in a joint search a (levels, cache intervals) pair of tuples
# the new schedules of a generation, each with the survivor it was mutated from (None: initial)
Pending = list[tuple[Individual, Individual | None]]
# evaluates pending schedules → (fitness values, denoiser steps), float64 tensors in the same order
Evaluator = Callable[[Pending], tuple[Tensor, Tensor]]


class EvolutionarySearch:
    """Elitist evolutionary search over budget-meeting schedules, scored by `metric` on fixed probes.

    Args:
        engine: rolls the probes out under a schedule (its partition, H and target level are the
            search space's).
        metric: the fitness (compared with the dense model's rollout of the same probes).
        offspring: children per generation. survivors: individuals kept (elitist).
        max_move: largest level-switch move. moves_per_child: moves applied per child.
        init: initial population (`population.INITS`). seeds: user schedules put into it.
        seed: seed of the search's own generator (population, mutation).

    Building it rolls the probes out once with the dense denoiser: the reference of every fitness.
    """

    def __init__(self, engine: RolloutEngine, metric: Metric, *, offspring: int, survivors: int, max_move: int,
                 moves_per_child: int = 1, init: str = "hybrid", seeds: Sequence[Sequence[int]] = (),
                 seed: int = 0) -> None:
        self.engine, self.metric = engine, metric
        self.offspring, self.num_survivors = offspring, survivors
        self.max_move, self.moves_per_child = max_move, moves_per_child
        self.space = engine.space  # population.JointSpace (joint search) or None (level-only)
        self.init, self.seeds = init, [tuple(s) for s in seeds]
        if self.space is not None:  # a joint seed is [levels, intervals]; plain levels mean k = 1 everywhere
            self.seeds = [s if s and isinstance(s[0], (list, tuple)) else (s, (1,) * len(s)) for s in self.seeds]
        self.generator = torch.Generator().manual_seed(seed)
        self.survivors: list[Individual] = []
        self.fitness: dict[Individual, float] = {}
        self.archive: list[dict] = []
        self.entries: dict[Individual, list[Tensor]] = {}
        self.nfe_history: list[int] = []  # denoiser steps per generation
        self.evaluated_here = 0  # schedules evaluated by this process (a restored search holds the rest)
        self.reference_latents, _ = engine.run(None)
        self.reference_images = self._decode(self.reference_latents)
        engine.nfe = 0

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
        engine = self.engine
        H, w = engine.levels_max, engine.partition.steps_per_stage
        if self.space is not None:
            if self.generation == 0 and not self.survivors:
                return [(ind, None) for ind in pop.initial_joint_population(
                    self.offspring + self.num_survivors, self.space, self.generator, init=self.init,
                    seeds=self.seeds)]
            return pop.next_joint_generation(self.survivors, self.offspring, self.space, self.generator,
                                             self.max_move, self.moves_per_child, set(self.fitness))
        if self.generation == 0 and not self.survivors:
            return [(ind, None) for ind in pop.initial_population(
                self.offspring + self.num_survivors, len(w), H, engine.target_level, w, self.generator,
                init=self.init, seeds=self.seeds)]
        return pop.next_generation(self.survivors, self.offspring, H, w, self.generator, self.max_move,
                                   self.moves_per_child, set(self.fitness))

    def pending(self, candidates: Pending) -> Pending:
        """The candidates not in the fitness cache, each once, in order."""
        todo, seen = [], set()
        for levels, parent in candidates:
            if levels not in self.fitness and levels not in seen:
                seen.add(levels)
                todo.append((levels, parent))
        return todo

    def evaluate(self, levels: Individual, parent: Individual | None = None) -> tuple[float, int]:
        """Fitness of a schedule (cached) and the denoiser steps it cost.

        The rollout starts from the longest stage prefix shared with any schedule whose stage-entry
        latents are cached (the survivors and this generation's evaluated schedules — the parent
        among them): the latents entering stage k depend only on the levels of stages < k, so the
        result is identical to a full rollout. `parent` is kept for the archive; it needs no special
        treatment here."""
        if levels in self.fitness:
            return self.fitness[levels], 0
        start, cached = 0, None
        if self.engine.resumable:
            first_changed = pop.first_changed_joint_stage if self.space is not None else pop.first_changed_stage
            for source, entries in self.entries.items():
                shared = first_changed(source, levels)
                if shared > start:
                    start, cached = shared, entries
        before = self.engine.nfe
        latents, entries = self.engine.run(levels, start, cached if start else None)
        value = self.metric(FitnessInputs(self._decode(latents), latents, self.reference_images,
                                          self.reference_latents, self.engine.probes.conditions))
        self.fitness[levels] = value
        self.entries[levels] = entries
        self.evaluated_here += 1
        return value, self.engine.nfe - before

    def evaluate_here(self, todo: Pending) -> tuple[Tensor, Tensor]:
        """The default evaluator: every pending schedule, in this process."""
        values = torch.zeros(len(todo), dtype=torch.float64)
        nfes = torch.zeros(len(todo), dtype=torch.float64)
        for i, item in enumerate(todo):
            values[i], nfes[i] = self.evaluate(*item)
        return values, nfes

    def step(self, evaluate: Evaluator | None = None) -> dict[str, float]:
        """Runs one generation: candidates, their evaluation (`evaluate`, default `evaluate_here`;
        it must return the same values on every process), selection. Returns the generation's
        statistics (best and median fitness, schedules evaluated, denoiser steps)."""
        generation = self.generation
        candidates = self.candidates()
        todo = self.pending(candidates)
        values, nfes = (evaluate or self.evaluate_here)(todo)
        for i, (levels, parent) in enumerate(todo):
            value = float(values[i])
            self.fitness[levels] = value
            self.archive.append(self._record(generation, levels, value, int(nfes[i]), parent))
        pool = {ind: self.metric.score(self.fitness[ind]) for ind in {*self.survivors, *(c for c, _ in candidates)}}
        self.survivors = pop.select(pool, self.num_survivors, higher_is_better=True)
        self.entries = {ind: self.entries[ind] for ind in self.survivors if ind in self.entries}
        self.nfe_history = self.nfe_history + [int(nfes.sum())]
        scores = torch.tensor([self.fitness[c] for c, _ in candidates], dtype=torch.float64)
        return {"best_fitness": self.best_fitness, "median_fitness": float(scores.median()),
                "evaluated": float(len(todo)), "nfe": float(self.nfe_history[-1]),
                "nfe_total": float(sum(self.nfe_history))}

    def _record(self, generation: int, individual: Individual, value: float, nfe: int,
                parent: Individual | None) -> dict:
        """The archive row (evaluations.jsonl) of one evaluated schedule."""
        if self.space is None:
            return {"generation": generation, "levels": list(individual), "fitness": value, "nfe": nfe,
                    "parent": list(parent) if parent is not None else None}
        levels, intervals = individual
        macs = self.space.cost(individual) / self.space.costs.dense_macs(self.space.w)
        return {"generation": generation, "levels": list(levels), "intervals": list(intervals), "macs": macs,
                "fitness": value, "nfe": nfe, "parent": _lists(parent) if parent is not None else None}

    # --- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole search (plain types and CPU tensors), as the run's checkpoint stores it. Joint
        individuals are stored as [levels, intervals] lists."""
        return {
            "survivors": [_lists(s) for s in self.survivors],
            "fitness": [[_lists(k), v] for k, v in self.fitness.items()],
            "archive": self.archive,
            "entries": {json.dumps(_lists(k)): v for k, v in self.entries.items()},
            "generator": self.generator.get_state(),
            "nfe_history": self.nfe_history,
        }

    def load_state_dict(self, state: dict) -> None:
        joint = [bool(s) and isinstance(s[0], (list, tuple)) for s in state["survivors"]]
        if any(joint) != (self.space is not None):
            raise ValueError(f"the checkpoint holds a {'joint' if any(joint) else 'level-only'} search and this "
                             f"run is a {'joint' if self.space is not None else 'level-only'} one (model.cache_intervals "
                             "differs); restore it, or start a new search with --overwrite true")
        self.survivors = [_tuples(s) for s in state["survivors"]]
        self.fitness = {_tuples(k): v for k, v in state["fitness"]}
        self.archive = state["archive"]
        self.entries = {_tuples(json.loads(k)): v for k, v in state["entries"].items()}
        self.generator.set_state(state["generator"])
        self.nfe_history = state["nfe_history"]

    def _decode(self, latents: Tensor) -> Tensor:
        adapter = self.engine.adapter
        return adapter.decode(latents.to(adapter.device)).cpu()


def _tuples(x):
    """Nested lists → nested tuples (a level vector, or a joint (levels, intervals) pair)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else int(x)


def _lists(x):
    """Nested tuples → nested lists (JSON and checkpoint form)."""
    return [_lists(v) for v in x] if isinstance(x, (list, tuple)) else x
