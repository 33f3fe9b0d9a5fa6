"""The level space: a level per stage under the level budget (the paper's search), and its
operators on integer level vectors.

An individual is a tuple of S integer levels in [0, H]. Every individual made here meets the budget
exactly: Σ levels[s]·w[s] == target·Σ w, with w the (integer) sampling steps per stage (see
`diffes_pl.schedule.budget_met`).

Level-switch move: stage i is pruned more and stage j ≠ i less, by amounts that keep the budget
exact. With equal step weights a move of size m is +m on i and −m on j. With unequal weights the
smallest exact move is a *quantum* of w[j]/g levels on i against w[i]/g levels on j
(g = gcd(w[i], w[j])); a move of size m is m quanta. E.g. w = [7, 7, 6]: stages 0 and 1 trade one
level for one level, stages 0 and 2 trade 6 levels for 7.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ScheduleError
from ..schedule import Schedule, check_target
from ..step_costs import StepCosts
from .space import (Individual, check_gen, check_moves, first_changed_stage, offspring, rand, randint,
                    seeded_population, step_weights)

PATTERNS = ("front-heavy", "back-heavy", "middle-heavy", "ends-heavy", "zig-zag")
INITS = ("hybrid", "uniform", "random", "patterned")

# When the feasible set is this small (or ≤ 4·n), filling a population enumerates it instead of
# drawing at random, so a population never loops forever looking for schedules that do not exist.
_ENUMERATE_LIMIT = 4096


@lru_cache(maxsize=64)
def _count_table(H: int, need: int, w: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """C[s][r] = number of level choices for stages s..S-1 (each in [0, H]) with Σ level·w = r, for
    r in [0, need]. Float64: exact below 2**53, a fine sampling weight above."""
    S = len(w)
    table = [None] * (S + 1)
    last = np.zeros(need + 1)
    last[0] = 1.0
    last.setflags(write=False)
    table[S] = last
    for s in range(S - 1, -1, -1):
        nxt = table[s + 1]
        cur = np.zeros(need + 1)
        for level in range(H + 1):
            shift = level * w[s]
            if shift > need:
                break
            cur[shift:] += nxt[: need + 1 - shift]
        cur.setflags(write=False)
        table[s] = cur
    return tuple(table)


def _setup(S: int, H: int, target: float | Fraction, w: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Validates the search space; returns (weights, need) with need = target·Σw (an integer)."""
    if int(S) != S or S < 1:
        raise ScheduleError(f"number of stages must be ≥ 1 (got {S})")
    if int(H) != H or H < 0:
        raise ScheduleError(f"H (levels) must be an integer ≥ 0 (got {H})")
    w = step_weights(S, w)
    t = Fraction(str(target))
    need = t * sum(w)
    if not 0 <= t <= H or need.denominator != 1 or _count_table(int(H), int(need), w)[0][int(need)] == 0:
        check_target(target, H, w)  # raises with the cause and the fix
        raise ScheduleError(f"no schedule of levels in [0, {H}] meets target level {target} with steps per "
                            f"stage {list(w)}")
    return w, int(need)


def num_feasible(S: int, H: int, target: float, w: Sequence[int]) -> int:
    """How many schedules meet the budget (exact below 2**53)."""
    w, need = _setup(S, H, target, w)
    return int(_count_table(H, need, w)[0][need])


def is_feasible(levels: Sequence[int], H: int, target: float, w: Sequence[int]) -> bool:
    """Integer levels, one per stage, each in [0, H], meeting the budget exactly."""
    if len(levels) != len(w) or any(int(l) != l or not 0 <= l <= H for l in levels):
        return False
    return sum(int(l) * int(x) for l, x in zip(levels, w)) == Fraction(str(target)) * sum(w)


def _enumerate(H: int, need: int, w: tuple[int, ...]) -> Iterator[Individual]:
    """All feasible schedules in lexicographic order (count-pruned depth-first)."""
    table = _count_table(H, need, w)
    S = len(w)
    prefix: list[int] = []

    def rec(s: int, r: int) -> Iterator[Individual]:
        if s == S:
            yield tuple(prefix)
            return
        for level in range(min(H, r // w[s]) + 1):
            if table[s + 1][r - level * w[s]] > 0:
                prefix.append(level)
                yield from rec(s + 1, r - level * w[s])
                prefix.pop()

    yield from rec(0, need)


def _nearest(x: Sequence[Fraction], H: int, need: int, w: tuple[int, ...],
             gen: torch.Generator | None = None) -> Individual:
    """The budget-meeting schedule nearest to the real vector x: minimises Σ w[s]·(l[s] − x[s])²
    subject to Σ l[s]·w[s] = need, l[s] in [0, H]. Ties: the lexicographically smallest, or a random
    one from `gen`. Exact (integer) arithmetic; searches a window around x that widens until
    feasible."""
    x = [min(max(Fraction(v), Fraction(0)), Fraction(H)) for v in x]
    D = math.lcm(*(v.denominator for v in x))
    X = [int(v * D) for v in x]
    k = 1
    while True:
        opts = [range(max(0, math.floor(v) - k), min(H, math.ceil(v) + k) + 1) for v in x]
        found = _nearest_dp(opts, X, D, need, w, gen)
        if found is not None:
            return found
        if all(o.start == 0 and o.stop == H + 1 for o in opts):
            raise ScheduleError(f"no schedule of levels in [0, {H}] has Σ levels·steps = {need} "
                                f"with steps per stage {list(w)}")
        k *= 2


def _nearest_dp(opts: list[range], X: list[int], D: int, need: int, w: tuple[int, ...],
                gen: torch.Generator | None) -> Individual | None:
    S = len(w)
    lo = [0] * (S + 1)
    hi = [0] * (S + 1)
    for s in range(S - 1, -1, -1):
        lo[s] = lo[s + 1] + opts[s].start * w[s]
        hi[s] = hi[s + 1] + (opts[s].stop - 1) * w[s]
    if not lo[0] <= need <= hi[0]:
        return None
    reach: list[set[int]] = [{need}]
    for s in range(S):
        nxt = {r - l * w[s] for r in reach[s] for l in opts[s]}
        reach.append({r for r in nxt if lo[s + 1] <= r <= hi[s + 1]})
    if 0 not in reach[S]:
        return None
    cost = [{l: w[s] * (l * D - X[s]) ** 2 for l in opts[s]} for s in range(S)]
    best: list[dict[int, int]] = [dict() for _ in range(S + 1)]
    best[S] = {0: 0}
    for s in range(S - 1, -1, -1):
        after = best[s + 1]
        for r in reach[s]:
            vals = [cost[s][l] + after[r - l * w[s]] for l in opts[s] if r - l * w[s] in after]
            if vals:
                best[s][r] = min(vals)
    if need not in best[0]:
        return None
    out, r = [], need
    for s in range(S):
        after = best[s + 1]
        ties = [l for l in opts[s] if r - l * w[s] in after and cost[s][l] + after[r - l * w[s]] == best[s][r]]
        level = ties[0] if gen is None or len(ties) == 1 else ties[randint(gen, len(ties))]
        out.append(level)
        r -= level * w[s]
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# single schedules


def uniform(S: int, H: int, target: float, w: Sequence[int]) -> Individual:
    """Every stage at the target level; for a non-integral target, the budget-meeting schedule nearest
    to it (levels ⌊target⌋/⌈target⌉, lower levels first where the choice is free)."""
    w, need = _setup(S, H, target, w)
    t = Fraction(str(target))
    if t.denominator == 1:
        return (int(t),) * S
    return _nearest([t] * S, H, need, w)


def repair(levels: Sequence[float], H: int, target: float, w: Sequence[int],
           gen: torch.Generator | None = None) -> Individual:
    """The budget-meeting schedule nearest to `levels` (clipped to [0, H]; may be non-integral):
    minimises Σ w[s]·(new[s] − levels[s])². Ties: lexicographically smallest, or drawn from `gen`.
    Raises ScheduleError if no schedule meets the target."""
    check_gen(gen, optional=True)
    w, need = _setup(len(levels), H, target, w)
    x = [Fraction(l) if isinstance(l, (int, Fraction)) else Fraction(str(float(l))) for l in levels]
    return _nearest(x, H, need, w, gen)


def _shape(kind: str, S: int) -> list[Fraction]:
    if S == 1:
        return [Fraction(0)]
    u = [Fraction(s, S - 1) for s in range(S)]
    if kind == "front-heavy":
        return [1 - v for v in u]
    if kind == "back-heavy":
        return list(u)
    if kind == "middle-heavy":
        return [1 - abs(2 * v - 1) for v in u]
    if kind == "ends-heavy":
        return [abs(2 * v - 1) for v in u]
    if kind == "zig-zag":
        return [Fraction(1 if s % 2 == 0 else -1) for s in range(S)]
    raise ValueError(f"unknown pattern {kind!r}; choose one of {', '.join(PATTERNS)}")


def shaped(f: Sequence[Fraction], H: int, target: float, w: Sequence[int], amplitude: float = 0.5) -> Individual:
    """A shape f (higher = more pruning) centred on the target (step-weighted), scaled so that its
    largest deviation is `amplitude` × the distance from the target to the nearer bound (0 or H),
    clipped to [0, H], then repaired deterministically to meet the budget exactly."""
    w, need = _setup(len(f), H, target, w)
    t = Fraction(str(target))
    f = [Fraction(v) for v in f]
    mean = sum(v * x for v, x in zip(f, w)) / sum(w)
    g = [v - mean for v in f]
    peak = max(abs(v) for v in g)
    a = Fraction(str(amplitude)) * min(t, H - t)
    x = [t + (a * v / peak if peak else 0) for v in g]
    return _nearest(x, H, need, w)


def patterned(kind: str, S: int, H: int, target: float, w: Sequence[int], amplitude: float = 0.5) -> Individual:
    """A patterned schedule (deterministic). Higher level = more pruning; stage 0 = first sampling steps.

    front-heavy: linear ramp down (prunes the early stages most); back-heavy: ramp up; middle-heavy:
    tent; ends-heavy: V; zig-zag: alternating high/low starting high. See `shaped` for the scaling.
    """
    return shaped(_shape(kind, S), H, target, w, amplitude)


def random_schedule(S: int, H: int, target: float, w: Sequence[int], gen: torch.Generator) -> Individual:
    """A schedule drawn uniformly from all budget-meeting schedules (exact counting, stage by stage)."""
    check_gen(gen)
    w, need = _setup(S, H, target, w)
    table = _count_table(H, need, w)
    out, r = [], need
    for s in range(S):
        top = min(H, r // w[s])
        ways = table[s + 1][r - np.arange(top + 1) * w[s]]
        cum = np.cumsum(ways)
        level = int(np.searchsorted(cum, rand(gen) * cum[-1], side="right"))
        level = min(level, top)
        while ways[level] == 0:  # float edge: never pick an impossible level
            level -= 1
        out.append(level)
        r -= level * w[s]
    assert r == 0
    return tuple(out)


def check_seed(seed: Sequence[int], H: int, target: float, w: Sequence[int], index: int | None = None) -> Individual:
    """Validates a user schedule; returns it as a tuple or raises ScheduleError naming the problem."""
    name = "seed schedule" + (f" #{index}" if index is not None else "") + f" {list(seed)}"
    bad = [l for l in seed if isinstance(l, bool) or not isinstance(l, (int, np.integer, float)) or int(l) != l]
    if bad:
        raise ScheduleError(f"{name}: levels must be integers (got {bad})")
    try:
        Schedule([int(l) for l in seed], H, target, list(w))
    except ScheduleError as e:
        raise ScheduleError(f"{name} is not usable: {e}") from None
    return tuple(int(l) for l in seed)


# --------------------------------------------------------------------------------------------------
# mutation, populations, selection


def _quanta(w: Sequence[int], i: int, j: int) -> tuple[int, int]:
    """Levels gained on i and lost on j by one exact quantum (Δi·w[i] = Δj·w[j])."""
    g = math.gcd(w[i], w[j])
    return w[j] // g, w[i] // g


def _room(levels: Sequence[int], H: int, w: Sequence[int], i: int, j: int) -> int:
    """How many quanta the bounds allow for moving pruning from stage j to stage i."""
    qi, qj = _quanta(w, i, j)
    return min((H - levels[i]) // qi, levels[j] // qj)


def _apply(levels: Sequence[int], w: Sequence[int], i: int, j: int, m: int) -> Individual:
    qi, qj = _quanta(w, i, j)
    out = list(levels)
    out[i] += m * qi
    out[j] -= m * qj
    return tuple(out)


def neighbours(levels: Sequence[int], H: int, w: Sequence[int], max_move: int) -> list[Individual]:
    """Every schedule one level-switch move of size 1..max_move (quanta) away, in a deterministic order:
    move size first, then the stage gaining pruning, then the stage losing it."""
    S = len(levels)
    out = []
    for m in range(1, max_move + 1):
        for i in range(S):
            for j in range(S):
                if i != j and _room(levels, H, w, i, j) >= m:
                    out.append(_apply(levels, w, i, j, m))
    return out


def mutate(levels: Sequence[int], H: int, w: Sequence[int], gen: torch.Generator, max_move: int,
           moves_per_child: int = 1) -> Individual:
    """Level-switch mutation, `moves_per_child` times: a stage i (more pruning) and a stage j ≠ i (less)
    drawn uniformly among the pairs the bounds allow, then m uniform in [1, min(max_move, room)] quanta
    (a quantum is one level each way for equal step weights). The budget is preserved exactly.
    Returns the parent unchanged if no move is possible."""
    check_gen(gen)
    w = step_weights(len(levels), w)
    check_moves(max_move, moves_per_child)
    out = tuple(int(l) for l in levels)
    if any(not 0 <= l <= H for l in out):
        raise ScheduleError(f"levels {list(out)} outside [0, {H}]")
    S = len(out)
    for _ in range(moves_per_child):
        pairs = [(i, j, room) for i in range(S) for j in range(S)
                 if i != j and (room := _room(out, H, w, i, j)) >= 1]
        if not pairs:
            break
        i, j, room = pairs[randint(gen, len(pairs))]
        m = 1 + randint(gen, min(max_move, room))
        out = _apply(out, w, i, j, m)
    return out


def initial_population(n: int, S: int, H: int, target: float, w: Sequence[int], gen: torch.Generator,
                       init: str = "hybrid", seeds: Iterable[Sequence[int]] = (), max_move: int = 2) -> list[Individual]:
    """n distinct budget-meeting schedules, user `seeds` first (validated; ScheduleError if unusable).

    init: "hybrid" (uniform + the 5 patterns + uniform-random ones), "uniform" (uniform + mutants of it,
    moves of ≤ `max_move`), "random", "patterned" (the 5 patterns + mutants of them). If fewer than n
    feasible schedules exist, returns all of them.
    """
    check_gen(gen)
    if init not in INITS:
        raise ValueError(f"unknown initial population {init!r}; choose one of {', '.join(INITS)}")
    w, need = _setup(S, H, target, w)

    def checked(seed: Sequence[int], index: int) -> Individual:
        _check_seed_length(seed, S, index)
        return check_seed(seed, H, target, w, index)

    out = seeded_population(n, seeds, checked)
    have: set[Individual] = set(out)

    def add(ind: Individual) -> bool:
        if ind in have or len(out) >= n:
            return False
        out.append(ind)
        have.add(ind)
        return True

    base: list[Individual] = []
    if init in ("uniform", "hybrid"):
        base.append(uniform(S, H, target, w))
    if init in ("patterned", "hybrid"):
        base += [patterned(kind, S, H, target, w) for kind in PATTERNS]
    base = [b for b in base if add(b) or b in have]

    total = int(_count_table(H, need, w)[0][need])
    attempts, limit = 0, (20 * n + 100 if total > n else 0)
    pool = list(dict.fromkeys(base))  # parents for mutants
    while len(out) < min(n, total) and attempts < limit:
        attempts += 1
        if init in ("random", "hybrid") or not pool:
            add(random_schedule(S, H, target, w, gen))
        else:
            child = mutate(pool[randint(gen, len(pool))], H, w, gen, max_move)
            if add(child):
                pool.append(child)
    if len(out) < min(n, total):
        if total > max(_ENUMERATE_LIMIT, 4 * n):  # practically unreachable: each draw is new w.p. ≥ 3/4
            raise RuntimeError(f"found only {len(out)} distinct schedules of {n} after {attempts} draws")
        rest = [ind for ind in _enumerate(H, need, w) if ind not in have]
        for idx in torch.randperm(len(rest), generator=gen).tolist():
            add(rest[idx])
    return out


def next_generation(survivors: Sequence[Sequence[int]], n_offspring: int, H: int, w: Sequence[int],
                    gen: torch.Generator, max_move: int, moves_per_child: int = 1,
                    seen: set | frozenset = frozenset(), max_retries: int = 32) -> list[tuple[Individual, Individual]]:
    """n_offspring (child, parent) pairs: parents are the survivors in turn (round robin), each child a
    `mutate` of its parent, redrawn up to `max_retries` times while it is in `seen`, a parent, or
    already made this generation (`space.offspring`)."""
    check_gen(gen)
    if not survivors:
        raise ValueError("next_generation needs at least one survivor")
    parents = [tuple(int(l) for l in p) for p in survivors]
    return offspring(parents, n_offspring, lambda parent: mutate(parent, H, w, gen, max_move, moves_per_child),
                     seen, max_retries)


def _check_seed_length(seed: Sequence[int], S: int, index: int | None) -> None:
    if len(seed) != S:
        name = "seed schedule" + (f" #{index}" if index is not None else "")
        raise ScheduleError(f"{name} {list(seed)} has {len(seed)} levels; the partition has {S} stages: give one "
                            "level per stage")


# --------------------------------------------------------------------------------------------------
# the space


@dataclass(frozen=True)
class LevelSpace:
    """A level per stage in [0, H] under the level budget: the step-weighted mean level equals
    `target_level` exactly (`schedule.budget_met`). `costs`: the MACs of one denoiser step per stage
    and level, for the search's cost meter (`caching.budget.step_cost_table`); None where nothing
    is costed (the population operators alone)."""

    H: int
    w: tuple[int, ...]
    target_level: float
    costs: StepCosts | None = None
    inits = INITS

    def __post_init__(self) -> None:
        object.__setattr__(self, "w", _setup(len(self.w), self.H, self.target_level, self.w)[0])

    @property
    def S(self) -> int:
        return len(self.w)

    def initial_population(self, n: int, gen: torch.Generator, init: str = "hybrid",
                           seeds: Iterable[Sequence[int]] = (), max_move: int = 2) -> list[Individual]:
        return initial_population(n, self.S, self.H, self.target_level, self.w, gen, init=init, seeds=seeds,
                                  max_move=max_move)

    def next_generation(self, survivors: Sequence[Individual], n_offspring: int, gen: torch.Generator,
                        max_move: int, moves_per_child: int = 1,
                        seen: set | frozenset = frozenset()) -> list[tuple[Individual, Individual]]:
        return next_generation(survivors, n_offspring, self.H, self.w, gen, max_move, moves_per_child, seen)

    def mutate(self, ind: Individual, gen: torch.Generator, max_move: int, moves_per_child: int = 1) -> Individual:
        return mutate(ind, self.H, self.w, gen, max_move, moves_per_child)

    def neighbours(self, ind: Individual, max_move: int) -> list[Individual]:
        return neighbours(ind, self.H, self.w, max_move)

    def first_changed_stage(self, parent: Individual, child: Individual) -> int:
        return first_changed_stage(parent, child)

    def stage_config(self, ind: Individual, stage: int) -> tuple[int, int]:
        return int(ind[stage]), 1

    def feasible(self, ind: Individual) -> bool:
        return is_feasible(ind, self.H, self.target_level, self.w)

    def cost(self, ind: Individual) -> int:
        if self.costs is None:
            raise ValueError("this level space has no step costs: build it with costs=StepCosts(...) "
                             "(caching.budget.step_cost_table)")
        return self.costs.trajectory_macs(ind, None, self.w)

    def schedule(self, ind: Individual, **fields: Any) -> Schedule:
        return Schedule(list(ind), self.H, self.target_level, list(self.w), **fields)

    def individual(self, schedule: Schedule) -> Individual:
        if schedule.caches:
            raise ScheduleError(f"schedule {schedule.levels} caches (cache intervals {schedule.intervals}); this "
                                "search space holds levels only")
        return self.check_seed(schedule.levels)

    def check_seed(self, seed: Sequence[int], index: int | None = None) -> Individual:
        _check_seed_length(seed, self.S, index)
        return check_seed(seed, self.H, self.target_level, self.w, index)

    def describe(self, ind: Individual) -> dict:
        return {"levels": list(ind)}

    def to_state(self, ind: Individual) -> list:
        return list(ind)

    def from_state(self, data: Any) -> Individual:
        if not isinstance(data, (list, tuple)) or len(data) != self.S or \
                any(isinstance(v, (list, tuple, bool)) or int(v) != v for v in data):
            raise ValueError(f"{data!r} is not {self.S} levels")
        return tuple(int(v) for v in data)
