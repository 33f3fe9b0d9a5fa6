"""Baselines the evolutionary search is compared with (pure: no model; fitness is a callable).

- `mosaicdiff_schedule`: MosaicDiff-style three-phase heuristic.
- `random_search`, `greedy_search`: spend the same number of fitness evaluations as the evolutionary
  search (distinct schedules; a repeated schedule is a cache hit and costs nothing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterator, Sequence

import torch

from ..partition import split_steps
from . import level_space
from .space import Individual, select


def mosaicdiff_schedule(S: int, H: int, target: float, w: Sequence[int], amplitude: float = 0.5) -> Individual:
    """Three contiguous phases of stages (beginning, middle, end; balanced, earlier phases take the extra
    stage). Importance beginning > end > middle, so pruning is lowest at the beginning, highest in the
    middle and in between at the end: phase shape (−1, +1, 0), centred on the target (step-weighted)
    and scaled as in `level_space.shaped`, then the nearest budget-meeting schedule (deterministic).
    S = 2: beginning < end; S = 1: uniform."""
    if S < 3:
        phase_value = [Fraction(-1), Fraction(0)] if S == 2 else [Fraction(0)]
        return level_space.shaped(phase_value, H, target, w, amplitude)
    sizes = split_steps(S, 3)
    phase_value = (Fraction(-1), Fraction(1), Fraction(0))
    f = [phase_value[p] for p, size in enumerate(sizes) for _ in range(size)]
    return level_space.shaped(f, H, target, w, amplitude)


@dataclass
class SearchResult:
    """Unpacks as (best_levels, best_fitness, history); also tells how many evaluations were spent."""

    best_levels: Individual
    best_fitness: float
    history: list[tuple[Individual, float]]
    n_evals: int
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def evals_used(self) -> int:
        return len(self.history)

    @property
    def evals_unused(self) -> int:
        return self.n_evals - len(self.history)

    def __iter__(self) -> Iterator:
        return iter((self.best_levels, self.best_fitness, self.history))

    def __getitem__(self, i: int):
        return (self.best_levels, self.best_fitness, self.history)[i]

    def __len__(self) -> int:
        return 3


class _Budgeted:
    """Caches `evaluate` and refuses to spend more than n_evals distinct evaluations."""

    def __init__(self, evaluate: Callable[[Individual], float], n_evals: int):
        if n_evals < 1:
            raise ValueError(f"n_evals must be ≥ 1 (got {n_evals})")
        self.evaluate, self.n_evals = evaluate, n_evals
        self.cache: dict[Individual, float] = {}
        self.history: list[tuple[Individual, float]] = []

    @property
    def left(self) -> int:
        return self.n_evals - len(self.history)

    def __call__(self, levels: Individual) -> float | None:
        """The fitness, or None if it is new and the budget is spent."""
        if levels in self.cache:
            return self.cache[levels]
        if self.left <= 0:
            return None
        value = float(self.evaluate(levels))
        self.cache[levels] = value
        self.history.append((levels, value))
        return value

    def result(self, stopped_early: bool = False) -> SearchResult:
        best = select(self.cache, 1, higher_is_better=True)[0]
        return SearchResult(best, self.cache[best], list(self.history), self.n_evals, stopped_early)


def random_search(evaluate: Callable[[Individual], float], n_evals: int, S: int, H: int, target: float,
                  w: Sequence[int], gen: torch.Generator) -> SearchResult:
    """n_evals distinct schedules drawn uniformly from the budget-meeting ones (fewer if fewer exist),
    each evaluated once (higher fitness is better). Returns (best_levels, best_fitness, history)."""
    budget = _Budgeted(evaluate, n_evals)
    for levels in level_space.initial_population(n_evals, S, H, target, w, gen, init="random"):
        budget(levels)
    return budget.result()


def greedy_search(evaluate: Callable[[Individual], float], n_evals: int, S: int, H: int, target: float,
                  w: Sequence[int], max_move: int) -> SearchResult:
    """Best-improvement hill climbing from the uniform schedule: each round evaluates the neighbours one
    level-switch move of size 1..max_move away (`level_space.neighbours` order) until the evaluation
    budget is spent, moves to the best if it is strictly better, else stops early (`evals_unused` says
    how much budget was left). Deterministic. Returns (best_levels, best_fitness, history)."""
    if max_move < 1:
        raise ValueError(f"max_move must be ≥ 1 (got {max_move})")
    w = tuple(int(x) for x in w)
    budget = _Budgeted(evaluate, n_evals)
    current = level_space.uniform(S, H, target, w)
    current_fit = budget(current)
    while True:
        best, best_fit, spent = None, current_fit, False
        for cand in level_space.neighbours(current, H, w, max_move):
            value = budget(cand)
            if value is None:
                spent = True
                break
            if value > best_fit:
                best, best_fit = cand, value
        if best is None:
            return budget.result(stopped_early=not spent)
        current, current_fit = best, best_fit
        if spent:
            return budget.result(stopped_early=False)
