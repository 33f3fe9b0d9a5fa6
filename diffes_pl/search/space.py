"""What the evolutionary search searches over: the `SearchSpace` protocol, the one `Individual` type,
and the operators every space shares (selection, offspring, the search's random numbers).

A search space knows its individuals: how to make an initial population, mutate one, compare two
stage by stage, check one against the budget, cost it, turn it into a `Schedule` and back, check a
user's seed, and write it into an archive row or a checkpoint. Everything else — the search
(`evolution.EvolutionarySearch`), the rollout engine, hold-out scoring, the LightningModule — holds
one space and asks it; none of them knows which space it holds. Two spaces exist:
- `level_space.LevelSpace`: a level per stage under the level budget (the paper's search);
- `joint_space.JointSpace`: a level AND a cache interval per stage under a MAC budget.
A new search dimension is a new space (docs/DESIGN.md: "Adding a search dimension").

All randomness comes from an explicit CPU `torch.Generator` passed in (never the global RNG), so a
search can be checkpointed and resumed bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import ScheduleError
from ..schedule import Schedule
from ..step_costs import StepCosts

# A point of a search space: an immutable, hashable, ordered tuple whose layout its space defines
# (LevelSpace: S levels; JointSpace: a (levels, cache intervals) pair of S-tuples). The search keys
# its fitness cache, archive and checkpoint by it and never looks inside.
Individual = tuple


@runtime_checkable
class SearchSpace(Protocol):
    """The individuals an evolutionary search may visit, and the operators on them."""

    inits: tuple[str, ...]  # the initial populations `initial_population` can make

    @property
    def S(self) -> int:
        """Stages."""

    @property
    def costs(self) -> StepCosts | None:
        """MACs of one denoiser step per stage, level (and cached step): the cost meter's table."""

    def initial_population(self, n: int, gen: torch.Generator, init: str = "hybrid",
                           seeds: Iterable[Any] = ()) -> list[Individual]:
        """Up to n distinct individuals meeting the budget, the user's `seeds` first."""

    def next_generation(self, survivors: Sequence[Individual], n_offspring: int, gen: torch.Generator,
                        max_move: int, moves_per_child: int = 1,
                        seen: set | frozenset = frozenset()) -> list[tuple[Individual, Individual]]:
        """n_offspring (child, parent) pairs, each child a `mutate` of its parent (not in `seen`)."""

    def mutate(self, ind: Individual, gen: torch.Generator, max_move: int, moves_per_child: int = 1) -> Individual:
        """`moves_per_child` random moves of size ≤ max_move that keep the budget."""

    def neighbours(self, ind: Individual, max_move: int) -> list[Individual]:
        """Every individual one move of size ≤ max_move away, in a deterministic order."""

    def first_changed_stage(self, parent: Individual, child: Individual) -> int:
        """The first stage whose configuration differs (S if none): the child's rollout can reuse
        the parent's latents entering it."""

    def stage_config(self, ind: Individual, stage: int) -> tuple[int, int]:
        """(level, cache interval) of one stage: what decides that stage's denoiser."""

    def feasible(self, ind: Individual) -> bool:
        """Whether `ind` is a point of this space meeting its budget."""

    def cost(self, ind: Individual) -> int:
        """MACs of the whole trajectory of `ind` (batch 1, no CFG duplicate)."""

    def schedule(self, ind: Individual, **fields: Any) -> Schedule:
        """The `Schedule` of `ind` (fields: partition, store, pruner, metric, fitness, …)."""

    def individual(self, schedule: Schedule) -> Individual:
        """The individual of a schedule of this space (ScheduleError if it is not one)."""

    def check_seed(self, seed: Any, index: int | None = None) -> Individual:
        """A user's seed schedule as an individual, or ScheduleError naming the problem."""

    def describe(self, ind: Individual) -> dict:
        """The archive row's fields for `ind` (evaluations.jsonl)."""

    def to_state(self, ind: Individual) -> list:
        """`ind` as plain lists (checkpoint and JSON form)."""

    def from_state(self, data: Any) -> Individual:
        """The individual of `to_state`'s form; ValueError if `data` is not one of this space's."""


# --------------------------------------------------------------------------------------------------
# the search's random numbers


def check_gen(gen: torch.Generator | None, optional: bool = False) -> None:
    if gen is None and optional:
        return
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"pass an explicit torch.Generator (got {type(gen).__name__}); the search never uses "
                        "the global RNG, so that it can be resumed exactly")
    if gen.device.type != "cpu":
        raise TypeError(f"the search generator must live on the CPU (got {gen.device})")


def randint(gen: torch.Generator, n: int) -> int:
    """Uniform integer in [0, n) from `gen`."""
    return int(torch.randint(n, (1,), generator=gen).item())


def rand(gen: torch.Generator) -> float:
    """Uniform float in [0, 1) from `gen`."""
    return float(torch.rand((), generator=gen, dtype=torch.float64).item())


def step_weights(S: int, w: Sequence[int]) -> tuple[int, ...]:
    """The steps per stage as a tuple of positive integers, one per stage."""
    w = tuple(int(x) for x in w)
    if len(w) != S:
        raise ScheduleError(f"{len(w)} step weights for {S} stages: give one weight (steps) per stage")
    if any(x < 1 for x in w):
        raise ScheduleError(f"step weights {list(w)} must be positive integers")
    return w


def check_moves(max_move: int, moves_per_child: int) -> None:
    if max_move < 1 or moves_per_child < 1:
        raise ValueError(f"max_move and moves_per_child must be ≥ 1 (got {max_move}, {moves_per_child})")


# --------------------------------------------------------------------------------------------------
# operators every space shares


def first_changed_stage(parent: Sequence, child: Sequence) -> int:
    """The first stage where two per-stage sequences differ (len if identical)."""
    if len(parent) != len(child):
        raise ValueError(f"schedules of different lengths: {len(parent)} and {len(child)}")
    for s, (a, b) in enumerate(zip(parent, child)):
        if a != b:
            return s
    return len(parent)


def select(scored: dict[Individual, float], k: int, higher_is_better: bool = True) -> list[Individual]:
    """The k best individuals, best first. Ties: the smallest individual first (tuple order); NaN is worst."""
    def key(item):
        ind, f = item
        f = float(f)
        nan = math.isnan(f)
        return (nan, 0.0 if nan else (-f if higher_is_better else f), tuple(ind))

    return [tuple(ind) for ind, _ in sorted(scored.items(), key=key)[: max(0, k)]]


def offspring(parents: list[Individual], n_offspring: int, make_child: Callable[[Individual], Individual],
              seen: set | frozenset, max_retries: int = 32) -> list[tuple[Individual, Individual]]:
    """(child, parent) pairs, parents in turn (round robin), each child `make_child(parent)` redrawn up
    to `max_retries` times while it is in `seen`, a parent, or already made this generation (after
    that a repeat is kept: it will be a cache hit). `seen` is not modified."""
    if not parents:
        raise ValueError("a generation needs at least one survivor")
    taken = set(seen) | set(parents)
    out = []
    for k in range(n_offspring):
        parent = parents[k % len(parents)]
        for _ in range(max_retries):
            child = make_child(parent)
            if child not in taken:
                break
        taken.add(child)
        out.append((child, parent))
    return out


def seeded_population(n: int, seeds: Iterable[Any], check: Callable[[Any, int], Individual]) -> list[Individual]:
    """The user's seeds (checked by `check(seed, index)`), each once, in order: the head of an initial
    population of n (ValueError if more distinct seeds than n)."""
    if n < 1:
        raise ValueError(f"population size must be ≥ 1 (got {n})")
    out: list[Individual] = []
    for k, seed in enumerate(seeds):
        ind = check(seed, k)
        if ind not in out:
            if len(out) >= n:
                raise ValueError(f"more distinct seed schedules than the population holds ({n}); "
                                 "give fewer seeds or a larger population")
            out.append(ind)
    return out
