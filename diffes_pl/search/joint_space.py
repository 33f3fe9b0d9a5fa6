"""The joint space: a level AND a cache interval per stage, under a MAC budget.

An individual is (levels, intervals): two tuples of S integers. Its budget is the trajectory's MACs
(`step_costs.StepCosts`, `step_costs.mac_budget_met`): within the tolerance T ± τ/2 of the budget,
τ being the largest change one level of one stage can make. Every operator keeps that band by a
level REPAIR: after a move, levels of other stages step one at a time towards the band (raised while
the trajectory costs too much, lowered while too little) until inside. A step never jumps over the
band (its width is τ ≥ any one-level step), so a repair moves the cost monotonically and ends in the
band, or finds no stage left to move (the move is then refused).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Sequence

import torch

from ..errors import ScheduleError
from ..schedule import Schedule
from ..step_costs import StepCosts
from .level_space import PATTERNS, patterned, uniform
from .space import (Individual, check_gen, check_moves, first_changed_stage, offspring, rand, randint,
                    seeded_population, step_weights)

JOINT_INITS = ("hybrid", "random")


@dataclass(frozen=True)
class JointSpace:
    """The joint search space: H, steps per stage w, the MAC table, the allowed cache intervals (the
    search draws k from them, capped at the stage's step count; 1 = no caching), the budget, the
    cache branch b the costs were counted with, and how `mutate` splits its moves between intervals
    and levels (`interval_rate`; it lives here, with the move set it weighs, so every caller of the
    mutation uses the run's value). Build it with `joint_space`."""

    H: int
    w: tuple[int, ...]
    costs: StepCosts
    intervals: tuple[int, ...]
    target_level: float
    mac_budget: float
    branch: int | None = None
    interval_rate: float | None = None
    inits = JOINT_INITS

    @property
    def S(self) -> int:
        return len(self.w)

    @property
    def budget_macs(self) -> int:
        return self.costs.budget_macs(self.mac_budget, self.w)

    @property
    def tolerance(self) -> Fraction:
        """In MACs (the smallest resolution the levels guarantee; `step_costs.StepCosts.tolerance`)."""
        return self.costs.tolerance(self.w)

    def stage_intervals(self, stage: int) -> tuple[int, ...]:
        """The intervals stage `stage` may take: k ≥ w (one full step, the rest cached) all behave
        alike in a stage of w steps, so they are one choice, k = w."""
        return tuple(sorted({min(k, self.w[stage]) for k in self.intervals}))

    # --- one individual ---------------------------------------------------------------------------
    def cost(self, ind: Individual) -> int:
        return self.costs.trajectory_macs(ind[0], ind[1], self.w)

    def feasible(self, ind: Individual) -> bool:
        levels, ks = ind
        if len(levels) != self.S or len(ks) != self.S or any(not 0 <= l <= self.H for l in levels) \
                or any(k not in self.stage_intervals(s) for s, k in enumerate(ks)):
            return False
        return abs(self.cost(ind) - self.budget_macs) <= self.tolerance

    def stage_config(self, ind: Individual, stage: int) -> tuple[int, int]:
        return int(ind[0][stage]), int(ind[1][stage])

    def first_changed_stage(self, parent: Individual, child: Individual) -> int:
        """The first stage whose (level, k) differs: every stage starts with an empty cache (the refresh
        rule), so the child's rollout can reuse the parent's latents up to that stage's first step."""
        return first_changed_stage(list(zip(*parent)), list(zip(*child)))

    def schedule(self, ind: Individual, **fields: Any) -> Schedule:
        """The `Schedule` of a joint individual (fields: partition, store, pruner, metric, fitness, …)."""
        return Schedule(list(ind[0]), self.H, self.target_level, list(self.w), cache_intervals=list(ind[1]),
                        cache_branch=self.branch, mac_budget=self.mac_budget, step_costs=self.costs.to_dict(),
                        **fields)

    def individual(self, schedule: Schedule) -> Individual:
        return self.check_seed([schedule.levels, schedule.intervals])

    def check_seed(self, seed: Any, index: int | None = None) -> Individual:
        """A user's (levels, intervals) pair — or plain levels, meaning cache interval 1 in every
        stage — as an individual; ScheduleError naming the problem."""
        name = "seed schedule" + (f" #{index}" if index is not None else "")
        if isinstance(seed, (list, tuple)) and seed and not isinstance(seed[0], (list, tuple)):
            seed = (seed, (1,) * len(seed))
        try:
            levels, ks = seed
            ind = (tuple(int(l) for l in levels), tuple(int(k) for k in ks))
            if any(int(v) != v for v in (*levels, *ks)):
                raise ValueError
        except (TypeError, ValueError):
            raise ScheduleError(f"{name} must be (levels, cache intervals): two lists of whole numbers; "
                                f"got {seed!r}") from None
        if not self.feasible(ind):
            raise ScheduleError(f"{name} {[list(p) for p in ind]} is not usable: it must have {self.S} levels in "
                                f"[0, {self.H}], cache intervals in {list(self.intervals)} and meet the MAC budget "
                                f"{self.mac_budget}")
        return ind

    def describe(self, ind: Individual) -> dict:
        """levels, intervals and the MACs as a fraction of the dense trajectory's."""
        return {"levels": list(ind[0]), "intervals": list(ind[1]),
                "macs": self.cost(ind) / self.costs.dense_macs(self.w)}

    def to_state(self, ind: Individual) -> list:
        return [list(ind[0]), list(ind[1])]

    def from_state(self, data: Any) -> Individual:
        if not isinstance(data, (list, tuple)) or len(data) != 2 or \
                any(not isinstance(part, (list, tuple)) or len(part) != self.S for part in data):
            raise ValueError(f"{data!r} is not a [levels, cache intervals] pair of {self.S} stages")
        return tuple(int(l) for l in data[0]), tuple(int(k) for k in data[1])

    # --- the level repair -------------------------------------------------------------------------
    def _stage_cost(self, s: int, level: int, k: int) -> int:
        return self.costs.stage_macs(s, self.w[s], level, k)

    def repair_levels(self, levels: Sequence[int], intervals: Sequence[int], x: Sequence[Fraction] | None = None,
                      frozen: Iterable[int] = (), gen: torch.Generator | None = None) -> tuple[int, ...] | None:
        """Levels meeting the MAC budget with `intervals`, reached from `levels` one level of one stage
        at a time (module note above); stages in `frozen` keep their level. The stage to move: drawn
        from `gen`, or (gen None) the one whose move adds least to Σ w[s]·(level[s] − x[s])² (x: the
        starting levels by default), ties to the lowest stage. None if no stage can move further."""
        S, H, w = self.S, self.H, self.w
        out = [int(l) for l in levels]
        ks = [int(k) for k in intervals]
        x = [Fraction(v) for v in (out if x is None else x)]
        frozen = set(frozen)
        stage = [self._stage_cost(s, out[s], ks[s]) for s in range(S)]
        cost, target, tol = sum(stage), self.budget_macs, self.tolerance
        while abs(cost - target) > tol:
            step = 1 if cost > target else -1  # too many MACs: prune more
            cands = []
            for s in range(S):
                new = out[s] + step
                if s in frozen or not 0 <= new <= H:
                    continue
                delta = self._stage_cost(s, new, ks[s]) - stage[s]
                if delta != 0:
                    cands.append((w[s] * ((new - x[s]) ** 2 - (out[s] - x[s]) ** 2), s, delta))
            if not cands:
                return None
            _, s, delta = cands[randint(gen, len(cands))] if gen is not None else min(cands)
            out[s] += step
            stage[s] += delta
            cost += delta
        return tuple(out)

    # --- populations ------------------------------------------------------------------------------
    def bases(self) -> list[Individual]:
        """The deterministic part of a hybrid population, in this order: the level-only uniform schedule
        (k = 1), one cache-only schedule per cache interval k > 1 (level 0, k everywhere — capped at
        each stage's steps —; where caching alone saves more than the budget asks, k is lowered stage by
        stage, finest cost step first, and where it saves less, levels are repaired up from 0), then
        the level-only patterned schedules, then for every k > 1 the STACKING schedules: k fixed in
        every stage (capped at its steps) with the uniform and each patterned level schedule repaired
        to the MAC budget (levels lowered, nearest first, since caching already saves MACs) — what a
        search with `intervals=(k,)` starts from, so the joint search's start contains the paper's
        stacking search's. Level-only ones are the level space's `uniform` / `patterned` schedules
        (exact level budget), repaired to the MAC budget where their MACs miss it (stage-dependent
        costs)."""
        S, H, w, t = self.S, self.H, self.w, self.target_level
        out: list[Individual] = []
        ones = (1,) * S

        def level_only(make) -> None:
            if 1 not in self.intervals:
                return
            try:
                levels = make()
            except ScheduleError:  # an explicit mac_budget with a target no level schedule meets exactly
                return
            levels = self.repair_levels(levels, ones)
            if levels is not None:
                out.append((levels, ones))

        level_only(lambda: uniform(S, H, t, w))
        if not out and 1 in self.intervals:  # the target level cannot be met exactly: round it
            level_only(lambda: (min(H, max(0, round(t))),) * S)
        for k in self.intervals:
            if k == 1:
                continue
            options = [self.stage_intervals(s) for s in range(S)]
            ks = [min(k, w[s]) for s in range(S)]
            lowest = self.budget_macs - self.tolerance
            while sum(self._stage_cost(s, 0, ks[s]) for s in range(S)) < lowest:
                lower = [(self._stage_cost(s, 0, options[s][options[s].index(ks[s]) - 1])
                          - self._stage_cost(s, 0, ks[s]), s) for s in range(S) if ks[s] > options[s][0]]
                if not lower:
                    break
                s = min(lower)[1]
                ks[s] = options[s][options[s].index(ks[s]) - 1]
            levels = self.repair_levels((0,) * S, ks)
            if levels is not None:
                out.append((levels, tuple(ks)))
        for kind in PATTERNS:
            level_only(lambda kind=kind: patterned(kind, S, H, t, w))
        for k in self.intervals:  # the stacking schedules: k fixed in every stage, levels level-only-style
            if k == 1:
                continue
            ks = tuple(min(k, w[s]) for s in range(S))
            starts = [(min(H, max(0, round(t))),) * S]  # used when the target level cannot be met exactly
            for make in [lambda: uniform(S, H, t, w)] + [lambda kind=kind: patterned(kind, S, H, t, w)
                                                         for kind in PATTERNS]:
                try:
                    starts.append(make())
                except ScheduleError:
                    pass
            for start in starts[1:] or starts:
                levels = self.repair_levels(start, ks)
                if levels is not None:
                    out.append((levels, ks))
        return list(dict.fromkeys(out))

    def random_individual(self, gen: torch.Generator, max_tries: int = 64) -> Individual | None:
        """k per stage uniform from the allowed intervals, a real level per stage uniform in [0, H], then
        the nearest-first level repair. None if `max_tries` draws all fail."""
        check_gen(gen)
        for _ in range(max_tries):
            options = [self.stage_intervals(s) for s in range(self.S)]
            ks = tuple(o[randint(gen, len(o))] for o in options)
            x = [Fraction(str(rand(gen))) * self.H for _ in range(self.S)]
            levels = self.repair_levels(_nearest_levels(x, self.H), ks, x=x)
            if levels is not None:
                return levels, ks
        return None

    def initial_population(self, n: int, gen: torch.Generator, init: str = "hybrid",
                           seeds: Iterable[Any] = ()) -> list[Individual]:
        """Up to n distinct individuals meeting the MAC budget, user `seeds` first.

        init "hybrid": `bases` (level-only uniform at k = 1, cache-only at level 0 per k > 1, the
        level-only patterns, the fixed-k stacking schedules per k > 1), then `random_individual`
        mixes; "random": mixes only. Deterministic from `gen`. Fewer than n only when 20·n + 100
        random draws find no new individual (a tiny space)."""
        check_gen(gen)
        if init not in JOINT_INITS:
            raise ValueError(f"unknown joint initial population {init!r}; choose one of {', '.join(JOINT_INITS)}")
        out = seeded_population(n, seeds, self.check_seed)
        for ind in self.bases() if init == "hybrid" else ():
            if len(out) < n and ind not in out:
                out.append(ind)
        have = set(out)
        for _ in range(20 * n + 100):
            if len(out) >= n:
                break
            ind = self.random_individual(gen)
            if ind is not None and ind not in have:
                out.append(ind)
                have.add(ind)
        return out

    # --- moves ------------------------------------------------------------------------------------
    def _moves(self, ind: Individual, i: int, max_move: int) -> tuple[list[int], list[int]]:
        """Stage i's moves: the other intervals it may take, and its level steps ±1..max_move in [0, H]."""
        levels, ks = ind
        others = [k for k in self.stage_intervals(i) if k != ks[i]]
        steps = [d for d in range(-max_move, max_move + 1) if d and 0 <= levels[i] + d <= self.H]
        return others, steps

    def _moved(self, ind: Individual, i: int, is_interval: bool, value: int,
               gen: torch.Generator | None) -> Individual | None:
        """`ind` with stage i's interval set to `value` (or its level moved by `value`), the other
        stages' levels repaired to the budget (drawn from `gen`, or nearest first); None if the
        repair fails or nothing changed."""
        levels, ks = ind
        new_l, new_k = list(levels), list(ks)
        if is_interval:
            new_k[i] = value
        else:
            new_l[i] += value
        repaired = self.repair_levels(new_l, new_k, frozen=(i,) if self.S > 1 else (), gen=gen)
        if repaired is None or (repaired, tuple(new_k)) == (levels, ks):
            return None
        return repaired, tuple(new_k)

    def mutate(self, ind: Individual, gen: torch.Generator, max_move: int, moves_per_child: int = 1,
               max_tries: int = 16) -> Individual:
        """`moves_per_child` moves. A move draws a stage i uniformly, then either an INTERVAL move — stage
        i takes another allowed k — or a LEVEL move — stage i moves by ±m levels, m in [1, max_move]
        within [0, H]; then the other stages' levels are repaired to the MAC budget (stages drawn from
        `gen`; stage i kept unless it is the only one). Which kind, by `interval_rate`:
        - None (default): every move of stage i is equally likely (each other interval, each ±m), as
          the level space draws level-switch moves uniformly. With 2-step stages (k ∈ {1, 2}) and
          max_move 3 about one move in seven changes an interval; the more intervals a stage may take,
          the more. A space with one interval draws exactly the random numbers of the fixed-interval
          search.
        - a rate r: an interval move with probability r (when more than one interval is allowed; the
          behaviour before the setting existed is r = 0.5), else a level move.
        An interval move shifts a whole stage's cost at once and the repair spreads the difference over
        other stages' levels, so it disturbs a schedule far more than a level move: spending a fixed half
        of the moves on it slowed the level search (the joint search ended below the fixed-interval
        search it contains, at the same number of evaluations).
        A move whose repair fails, or that returns the individual unchanged, is redrawn up to
        `max_tries` times; the result always meets the budget (the parent if no move works)."""
        check_gen(gen)
        check_moves(max_move, moves_per_child)
        ind = (tuple(int(l) for l in ind[0]), tuple(int(k) for k in ind[1]))
        if not self.feasible(ind):
            raise ScheduleError(f"parent {[list(p) for p in ind]} does not meet the joint search space's budget")
        rate = self.interval_rate
        for _ in range(moves_per_child):
            for _ in range(max_tries):
                i = randint(gen, self.S)
                others, steps = self._moves(ind, i, max_move)
                if rate is None:  # uniform over stage i's moves; interval moves first, then the level steps
                    moves = [(True, k) for k in others] + [(False, d) for d in steps]
                    if not moves:
                        continue
                    is_interval, value = moves[randint(gen, len(moves))]
                elif len(self.intervals) > 1 and rand(gen) < rate:
                    if not others:
                        continue
                    is_interval, value = True, others[randint(gen, len(others))]
                else:
                    if not steps:
                        continue
                    is_interval, value = False, steps[randint(gen, len(steps))]
                moved = self._moved(ind, i, is_interval, value, gen)
                if moved is not None:
                    ind = moved
                    break
        return ind

    def neighbours(self, ind: Individual, max_move: int) -> list[Individual]:
        """Every individual one move away (`mutate`'s moves, the repair nearest first instead of drawn),
        distinct, in a deterministic order: stage, then its interval moves, then its level steps."""
        check_moves(max_move, 1)
        ind = (tuple(int(l) for l in ind[0]), tuple(int(k) for k in ind[1]))
        out: dict[Individual, None] = {}
        for i in range(self.S):
            others, steps = self._moves(ind, i, max_move)
            for is_interval, value in [(True, k) for k in others] + [(False, d) for d in steps]:
                moved = self._moved(ind, i, is_interval, value, None)
                if moved is not None:
                    out.setdefault(moved)
        return list(out)

    def next_generation(self, survivors: Sequence[Individual], n_offspring: int, gen: torch.Generator,
                        max_move: int, moves_per_child: int = 1, seen: set | frozenset = frozenset(),
                        max_retries: int = 32) -> list[tuple[Individual, Individual]]:
        """n_offspring (child, parent) pairs, parents in turn, each child a `mutate` of its parent,
        redrawn while it repeats (`space.offspring`)."""
        check_gen(gen)
        if not survivors:
            raise ValueError("next_generation needs at least one survivor")
        parents = [(tuple(int(l) for l in p[0]), tuple(int(k) for k in p[1])) for p in survivors]
        return offspring(parents, n_offspring, lambda parent: self.mutate(parent, gen, max_move, moves_per_child),
                         seen, max_retries)


def _nearest_levels(x: Sequence[Fraction], H: int) -> list[int]:
    """x rounded (halves down) and clipped to [0, H]."""
    return [min(H, max(0, math.ceil(v - Fraction(1, 2)))) for v in x]


def interval_rate_problem(rate) -> str | None:
    """Why `rate` is not a valid `interval_rate` (None when it is): the one check that `joint_space`
    raises and the search settings report with the others before any work."""
    if rate is None or (not isinstance(rate, bool) and isinstance(rate, (int, float)) and 0 <= rate <= 1):
        return None
    return (f"interval_rate must be a probability in [0, 1] (the share of mutation moves that change a stage's "
            f"cache interval) or null/None (every single-stage move equally likely); got {rate!r}")


def joint_space(H: int, w: Sequence[int], step_costs: dict | StepCosts, target_level: float,
                intervals: Sequence[int] = (1, 2, 3), branch: int | None = None,
                mac_budget: float | None = None, interval_rate: float | None = None) -> JointSpace:
    """The joint space. The MAC budget is `mac_budget` (a fraction of the dense trajectory's MACs) or,
    by default, what the level-only uniform schedule at `target_level` costs (`uniform`), so that
    the level-only schedules meeting the level budget meet it too (exactly when the full-step cost is
    affine in the level and the same in every stage, as for width pruning with n divisible by H).
    `interval_rate`: see `JointSpace.mutate` (None: every single-stage move equally likely).
    Raises ScheduleError when no individual meets the budget, ValueError for a rate outside [0, 1]."""
    problem = interval_rate_problem(interval_rate)
    if problem:
        raise ValueError(problem)
    w = step_weights(len(w), w)
    S = len(w)
    costs = step_costs if isinstance(step_costs, StepCosts) else StepCosts.parse(step_costs, S, H)
    ks = tuple(sorted(set(int(k) for k in intervals)))
    if not ks or any(k < 1 for k in ks):
        raise ScheduleError(f"cache intervals must be whole numbers ≥ 1 (1: no caching); got {list(intervals)}")
    if ks[-1] > 1 and (costs.cached is None or branch is None):
        raise ScheduleError(f"cache intervals {list(ks)} cache, so give step_costs with a 'cached' table and the "
                            f"cache branch it was counted with (caching.budget.step_cost_table(..., branch=b))")
    if not 0 <= Fraction(str(target_level)) <= H:
        raise ScheduleError(f"target level {target_level} outside [0, {H}]: choose a level ≤ H = {H}")
    if mac_budget is None:
        levels = uniform(S, H, target_level, w)  # raises if the level budget cannot be met
        macs = costs.trajectory_macs(levels, None, w)
        mac_budget = macs / costs.dense_macs(w)
        assert costs.budget_macs(mac_budget, w) == macs  # exact below 2**52 MACs per trajectory
    space = JointSpace(int(H), w, costs, ks, float(target_level), float(mac_budget), branch,
                       None if interval_rate is None else float(interval_rate))
    if not space.bases():
        raise ScheduleError(f"no schedule of levels in [0, {H}] and cache intervals {list(ks)} meets the MAC budget "
                            f"{mac_budget} with steps per stage {list(w)}")
    return space
