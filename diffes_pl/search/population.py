"""Population operators of the evolutionary search, on integer level vectors.

An individual is a tuple of S integer levels in [0, H]. Every individual made here meets the budget
exactly: Σ levels[s]·w[s] == target·Σ w, with w the (integer) sampling steps per stage (see
`diffes_pl.schedule.budget_met`). All randomness comes from an explicit CPU `torch.Generator`
passed in (never the global RNG), so that a search can be checkpointed and resumed bit for bit.

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
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ScheduleError
from ..schedule import Schedule, check_target
from ..step_costs import StepCosts

Individual = tuple[int, ...]

PATTERNS = ("front-heavy", "back-heavy", "middle-heavy", "ends-heavy", "zig-zag")
INITS = ("hybrid", "uniform", "random", "patterned")

# When the feasible set is this small (or ≤ 4·n), filling a population enumerates it instead of
# drawing at random, so a population never loops forever looking for schedules that do not exist.
_ENUMERATE_LIMIT = 4096


# --------------------------------------------------------------------------------------------------
# helpers


def _check_gen(gen: torch.Generator | None, optional: bool = False) -> None:
    if gen is None and optional:
        return
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"pass an explicit torch.Generator (got {type(gen).__name__}); the search never uses "
                        "the global RNG, so that it can be resumed exactly")
    if gen.device.type != "cpu":
        raise TypeError(f"the search generator must live on the CPU (got {gen.device})")


def _randint(gen: torch.Generator, n: int) -> int:
    """Uniform integer in [0, n) from `gen`."""
    return int(torch.randint(n, (1,), generator=gen).item())


def _rand(gen: torch.Generator) -> float:
    """Uniform float in [0, 1) from `gen`."""
    return float(torch.rand((), generator=gen, dtype=torch.float64).item())


def _weights(S: int, w: Sequence[int]) -> tuple[int, ...]:
    w = tuple(int(x) for x in w)
    if len(w) != S:
        raise ScheduleError(f"{len(w)} step weights for {S} stages: give one weight (steps) per stage")
    if any(x < 1 for x in w):
        raise ScheduleError(f"step weights {list(w)} must be positive integers")
    return w


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
    w = _weights(S, w)
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
        level = ties[0] if gen is None or len(ties) == 1 else ties[_randint(gen, len(ties))]
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
    _check_gen(gen, optional=True)
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
    _check_gen(gen)
    w, need = _setup(S, H, target, w)
    table = _count_table(H, need, w)
    out, r = [], need
    for s in range(S):
        top = min(H, r // w[s])
        ways = table[s + 1][r - np.arange(top + 1) * w[s]]
        cum = np.cumsum(ways)
        level = int(np.searchsorted(cum, _rand(gen) * cum[-1], side="right"))
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
    _check_gen(gen)
    w = _weights(len(levels), w)
    if max_move < 1 or moves_per_child < 1:
        raise ValueError(f"max_move and moves_per_child must be ≥ 1 (got {max_move}, {moves_per_child})")
    out = tuple(int(l) for l in levels)
    if any(not 0 <= l <= H for l in out):
        raise ScheduleError(f"levels {list(out)} outside [0, {H}]")
    S = len(out)
    for _ in range(moves_per_child):
        pairs = [(i, j, room) for i in range(S) for j in range(S)
                 if i != j and (room := _room(out, H, w, i, j)) >= 1]
        if not pairs:
            break
        i, j, room = pairs[_randint(gen, len(pairs))]
        m = 1 + _randint(gen, min(max_move, room))
        out = _apply(out, w, i, j, m)
    return out


def first_changed_stage(parent: Sequence[int], child: Sequence[int]) -> int:
    """The first stage where the two schedules differ (len if identical): the child's rollout can reuse
    the parent's cached latents up to that stage."""
    if len(parent) != len(child):
        raise ValueError(f"schedules of different lengths: {len(parent)} and {len(child)}")
    for s, (a, b) in enumerate(zip(parent, child)):
        if a != b:
            return s
    return len(parent)


def select(scored: dict[Individual, float], k: int, higher_is_better: bool = True) -> list[Individual]:
    """The k best individuals, best first. Ties: lexicographically smallest levels first; NaN is worst."""
    def key(item):
        levels, f = item
        f = float(f)
        nan = math.isnan(f)
        return (nan, 0.0 if nan else (-f if higher_is_better else f), tuple(levels))

    return [tuple(levels) for levels, _ in sorted(scored.items(), key=key)[: max(0, k)]]


def initial_population(n: int, S: int, H: int, target: float, w: Sequence[int], gen: torch.Generator,
                       init: str = "hybrid", seeds: Iterable[Sequence[int]] = (), max_move: int = 2) -> list[Individual]:
    """n distinct budget-meeting schedules, user `seeds` first (validated; ScheduleError if unusable).

    init: "hybrid" (uniform + the 5 patterns + uniform-random ones), "uniform" (uniform + mutants of it,
    moves of ≤ `max_move`), "random", "patterned" (the 5 patterns + mutants of them). If fewer than n
    feasible schedules exist, returns all of them.
    """
    _check_gen(gen)
    if init not in INITS:
        raise ValueError(f"unknown initial population {init!r}; choose one of {', '.join(INITS)}")
    if n < 1:
        raise ValueError(f"population size must be ≥ 1 (got {n})")
    w, need = _setup(S, H, target, w)
    out: list[Individual] = []
    have: set[Individual] = set()

    def add(ind: Individual) -> bool:
        if ind in have or len(out) >= n:
            return False
        out.append(ind)
        have.add(ind)
        return True

    for k, seed in enumerate(seeds):
        if len(seed) != S:
            raise ScheduleError(f"seed schedule #{k} {list(seed)} has {len(seed)} levels; the partition has "
                                f"{S} stages: give one level per stage")
        ind = check_seed(seed, H, target, w, k)
        if ind not in have:
            if len(out) >= n:
                raise ValueError(f"more distinct seed schedules than the population holds ({n}); "
                                 "give fewer seeds or a larger population")
            add(ind)

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
            child = mutate(pool[_randint(gen, len(pool))], H, w, gen, max_move)
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
    already made this generation. After that a repeat is kept (it will be a cache hit). `seen` is not
    modified."""
    _check_gen(gen)
    if not survivors:
        raise ValueError("next_generation needs at least one survivor")
    parents = [tuple(int(l) for l in p) for p in survivors]
    return _offspring(parents, n_offspring, lambda parent: mutate(parent, H, w, gen, max_move, moves_per_child),
                      seen, max_retries)


def _offspring(parents: list, n_offspring: int, make_child, seen: set | frozenset, max_retries: int) -> list:
    """(child, parent) pairs, parents in turn, each child `make_child(parent)` redrawn up to
    `max_retries` times while it is in `seen`, a parent, or already made (then kept)."""
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


# --------------------------------------------------------------------------------------------------
# joint individuals: a level AND a cache interval per stage, under a MAC budget
#
# A joint individual is (levels, intervals): two tuples of S integers. Its budget is the trajectory's
# MACs (`step_costs.StepCosts`, `step_costs.mac_budget_met`): within the tolerance T ± τ/2 of the
# budget, τ being the largest change one level of one stage can make. Every joint operator keeps
# that band by a level REPAIR: after a move, levels of other stages step one at a time towards the
# band (raised while the trajectory costs too much, lowered while too little) until inside. A step
# never jumps over the band (its width is τ ≥ any one-level step), so a repair moves the cost
# monotonically and ends in the band, or finds no stage left to move (the move is then refused).
# The level-only operators above are untouched (their random numbers included).

JointIndividual = tuple[Individual, Individual]
JOINT_INITS = ("hybrid", "random")


@dataclass(frozen=True)
class JointSpace:
    """The joint search space: H, steps per stage w, the MAC table, the allowed cache intervals (the
    search draws k from them, capped at the stage's step count; 1 = no caching), the budget, and how
    `mutate_joint` splits its moves between intervals and levels (`interval_rate`; it lives here, with
    the move set it weighs, so every caller of the mutation uses the run's value). Build it with
    `joint_space`."""

    H: int
    w: tuple[int, ...]
    costs: StepCosts
    intervals: tuple[int, ...]
    target_level: float
    mac_budget: float
    branch: int | None = None
    interval_rate: float | None = None

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

    def cost(self, ind: JointIndividual) -> int:
        return self.costs.trajectory_macs(ind[0], ind[1], self.w)

    def feasible(self, ind: JointIndividual) -> bool:
        levels, ks = ind
        if len(levels) != self.S or len(ks) != self.S or any(not 0 <= l <= self.H for l in levels) \
                or any(k not in self.stage_intervals(s) for s, k in enumerate(ks)):
            return False
        return abs(self.cost(ind) - self.budget_macs) <= self.tolerance

    def schedule(self, ind: JointIndividual, **kw) -> Schedule:
        """The `Schedule` of a joint individual (kw: partition, store, pruner, metric, fitness, …)."""
        return Schedule(list(ind[0]), self.H, self.target_level, list(self.w), cache_intervals=list(ind[1]),
                        cache_branch=self.branch, mac_budget=self.mac_budget, step_costs=self.costs.to_dict(), **kw)


def interval_rate_problem(rate) -> str | None:
    """Why `rate` is not a valid `interval_rate` (None when it is): the one check that `joint_space`
    raises and `DiffES` reports with the other settings before any work."""
    if rate is None or (not isinstance(rate, bool) and isinstance(rate, (int, float)) and 0 <= rate <= 1):
        return None
    return (f"interval_rate must be a probability in [0, 1] (the share of mutation moves that change a stage's "
            f"cache interval) or null/None (every single-stage move equally likely); got {rate!r}")


def joint_space(H: int, w: Sequence[int], step_costs: dict | StepCosts, target_level: float,
                intervals: Sequence[int] = (1, 2, 3), branch: int | None = None,
                mac_budget: float | None = None, interval_rate: float | None = None) -> JointSpace:
    """The joint space. The MAC budget is `mac_budget` (a fraction of the dense trajectory's MACs) or,
    by default, what the level-only uniform schedule at `target_level` costs (`uniform`), so that
    the level-only schedules meeting today's level budget meet it too (exactly when the full-step
    cost is affine in the level and the same in every stage, as for width pruning with n divisible
    by H). `interval_rate`: see `mutate_joint` (None: every single-stage move equally likely).
    Raises ScheduleError when no individual meets the budget, ValueError for a rate outside [0, 1]."""
    problem = interval_rate_problem(interval_rate)
    if problem:
        raise ValueError(problem)
    w = _weights(len(w), w)
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
    if not _joint_bases(space):
        raise ScheduleError(f"no schedule of levels in [0, {H}] and cache intervals {list(ks)} meets the MAC budget "
                            f"{mac_budget} with steps per stage {list(w)}")
    return space


def _stage_cost(space: JointSpace, s: int, level: int, k: int) -> int:
    return space.costs.stage_macs(s, space.w[s], level, k)


def repair_levels(space: JointSpace, levels: Sequence[int], intervals: Sequence[int],
                  x: Sequence[Fraction] | None = None, frozen: Iterable[int] = (),
                  gen: torch.Generator | None = None) -> Individual | None:
    """Levels meeting the MAC budget with `intervals`, reached from `levels` one level of one stage
    at a time (module note above); stages in `frozen` keep their level. The stage to move: drawn
    from `gen`, or (gen None) the one whose move adds least to Σ w[s]·(level[s] − x[s])² (x: the
    starting levels by default), ties to the lowest stage. None if no stage can move further."""
    S, H, w = space.S, space.H, space.w
    out = [int(l) for l in levels]
    ks = [int(k) for k in intervals]
    x = [Fraction(v) for v in (out if x is None else x)]
    frozen = set(frozen)
    stage = [_stage_cost(space, s, out[s], ks[s]) for s in range(S)]
    cost, target, tol = sum(stage), space.budget_macs, space.tolerance
    while abs(cost - target) > tol:
        step = 1 if cost > target else -1  # too many MACs: prune more
        cands = []
        for s in range(S):
            new = out[s] + step
            if s in frozen or not 0 <= new <= H:
                continue
            delta = _stage_cost(space, s, new, ks[s]) - stage[s]
            if delta != 0:
                cands.append((w[s] * ((new - x[s]) ** 2 - (out[s] - x[s]) ** 2), s, delta))
        if not cands:
            return None
        _, s, delta = cands[_randint(gen, len(cands))] if gen is not None else min(cands)
        out[s] += step
        stage[s] += delta
        cost += delta
    return tuple(out)


def _joint_bases(space: JointSpace) -> list[JointIndividual]:
    """The deterministic part of a hybrid population, in this order: the level-only uniform schedule
    (k = 1), one cache-only schedule per cache interval k > 1 (level 0, k everywhere — capped at each
    stage's steps —; where caching
    alone saves more than the budget asks, k is lowered stage by stage, finest cost step first, and
    where it saves less, levels are repaired up from 0), then the level-only patterned schedules,
    then for every k > 1 the STACKING schedules: k fixed in every stage (capped at its steps) with the
    uniform and each patterned level schedule repaired to the MAC budget (levels lowered, nearest
    first, since caching already saves MACs) — what a search with `intervals=(k,)` starts from, so
    the joint search's start contains the paper's stacking search's.
    Level-only ones are today's `uniform` / `patterned` schedules (exact level budget), repaired to
    the MAC budget where their MACs miss it (stage-dependent costs)."""
    S, H, w, t = space.S, space.H, space.w, space.target_level
    out: list[JointIndividual] = []
    ones = (1,) * S

    def level_only(make) -> None:
        if 1 not in space.intervals:
            return
        try:
            levels = make()
        except ScheduleError:  # an explicit mac_budget with a target no level schedule meets exactly
            return
        levels = repair_levels(space, levels, ones)
        if levels is not None:
            out.append((levels, ones))

    level_only(lambda: uniform(S, H, t, w))
    if not out and 1 in space.intervals:  # the target level cannot be met exactly: round it
        level_only(lambda: (min(H, max(0, round(t))),) * S)
    for k in space.intervals:
        if k == 1:
            continue
        options = [space.stage_intervals(s) for s in range(S)]
        ks = [min(k, w[s]) for s in range(S)]
        lowest = space.budget_macs - space.tolerance
        while sum(_stage_cost(space, s, 0, ks[s]) for s in range(S)) < lowest:
            lower = [(_stage_cost(space, s, 0, options[s][options[s].index(ks[s]) - 1])
                      - _stage_cost(space, s, 0, ks[s]), s) for s in range(S) if ks[s] > options[s][0]]
            if not lower:
                break
            s = min(lower)[1]
            ks[s] = options[s][options[s].index(ks[s]) - 1]
        levels = repair_levels(space, (0,) * S, ks)
        if levels is not None:
            out.append((levels, tuple(ks)))
    for kind in PATTERNS:
        level_only(lambda kind=kind: patterned(kind, S, H, t, w))
    for k in space.intervals:  # the stacking schedules: k fixed in every stage, levels level-only-style
        if k == 1:
            continue
        ks = tuple(min(k, w[s]) for s in range(S))
        starts = [(min(H, max(0, round(t))),) * S]  # used when the target level cannot be met exactly
        for make in [lambda: uniform(S, H, t, w)] + [lambda kind=kind: patterned(kind, S, H, t, w) for kind in PATTERNS]:
            try:
                starts.append(make())
            except ScheduleError:
                pass
        for start in starts[1:] or starts:
            levels = repair_levels(space, start, ks)
            if levels is not None:
                out.append((levels, ks))
    return list(dict.fromkeys(out))


def _nearest_levels(x: Sequence[Fraction], H: int) -> list[int]:
    """x rounded (halves down) and clipped to [0, H]."""
    return [min(H, max(0, math.ceil(v - Fraction(1, 2)))) for v in x]


def random_joint(space: JointSpace, gen: torch.Generator, max_tries: int = 64) -> JointIndividual | None:
    """A random joint individual: k per stage uniform from the allowed intervals, a real level per
    stage uniform in [0, H], then the nearest-first level repair. None if `max_tries` draws all fail."""
    _check_gen(gen)
    for _ in range(max_tries):
        options = [space.stage_intervals(s) for s in range(space.S)]
        ks = tuple(o[_randint(gen, len(o))] for o in options)
        x = [Fraction(str(_rand(gen))) * space.H for _ in range(space.S)]
        levels = repair_levels(space, _nearest_levels(x, space.H), ks, x=x)
        if levels is not None:
            return levels, ks
    return None


def check_joint_seed(seed: Sequence[Sequence[int]], space: JointSpace, index: int | None = None) -> JointIndividual:
    """Validates a user (levels, intervals) pair; returns it as tuples or raises ScheduleError."""
    name = "seed schedule" + (f" #{index}" if index is not None else "")
    try:
        levels, ks = seed
        ind = (tuple(int(l) for l in levels), tuple(int(k) for k in ks))
        if any(int(v) != v for v in (*levels, *ks)):
            raise ValueError
    except (TypeError, ValueError):
        raise ScheduleError(f"{name} must be (levels, cache intervals): two lists of whole numbers; got {seed!r}") from None
    if not space.feasible(ind):
        raise ScheduleError(f"{name} {[list(p) for p in ind]} is not usable: it must have {space.S} levels in "
                            f"[0, {space.H}], cache intervals in {list(space.intervals)} and meet the MAC budget "
                            f"{space.mac_budget}")
    return ind


def initial_joint_population(n: int, space: JointSpace, gen: torch.Generator, init: str = "hybrid",
                             seeds: Iterable[Sequence[Sequence[int]]] = ()) -> list[JointIndividual]:
    """Up to n distinct joint individuals meeting the MAC budget, user `seeds` first.

    init "hybrid": `_joint_bases` (level-only uniform at k = 1, cache-only at level 0 per k > 1, the
    level-only patterns, the fixed-k stacking schedules per k > 1), then `random_joint` mixes; "random": mixes only. Deterministic from `gen`.
    Fewer than n only when 20·n + 100 random draws find no new individual (a tiny space)."""
    _check_gen(gen)
    if init not in JOINT_INITS:
        raise ValueError(f"unknown joint initial population {init!r}; choose one of {', '.join(JOINT_INITS)}")
    if n < 1:
        raise ValueError(f"population size must be ≥ 1 (got {n})")
    out: list[JointIndividual] = []
    for k, seed in enumerate(seeds):
        ind = check_joint_seed(seed, space, k)
        if ind not in out:
            if len(out) >= n:
                raise ValueError(f"more distinct seed schedules than the population holds ({n}); "
                                 "give fewer seeds or a larger population")
            out.append(ind)
    for ind in _joint_bases(space) if init == "hybrid" else ():
        if len(out) < n and ind not in out:
            out.append(ind)
    have = set(out)
    for _ in range(20 * n + 100):
        if len(out) >= n:
            break
        ind = random_joint(space, gen)
        if ind is not None and ind not in have:
            out.append(ind)
            have.add(ind)
    return out


def mutate_joint(ind: JointIndividual, space: JointSpace, gen: torch.Generator, max_move: int,
                 moves_per_child: int = 1, max_tries: int = 16) -> JointIndividual:
    """`moves_per_child` moves. A move draws a stage i uniformly, then either an INTERVAL move — stage
    i takes another allowed k — or a LEVEL move — stage i moves by ±m levels, m in [1, max_move]
    within [0, H]; then the other stages' levels are repaired to the MAC budget (stages drawn from
    `gen`; stage i kept unless it is the only one). Which kind, by `space.interval_rate`:
    - None (default): every move of stage i is equally likely (each other interval, each ±m), as
      `mutate` draws level-switch moves uniformly. With 2-step stages (k ∈ {1, 2}) and max_move 3
      about one move in seven changes an interval; the more intervals a stage may take, the more.
      A space with one interval draws exactly the random numbers of the fixed-interval search.
    - a rate r: an interval move with probability r (when more than one interval is allowed; the
      behaviour before the setting existed is r = 0.5), else a level move.
    An interval move shifts a whole stage's cost at once and the repair spreads the difference over
    other stages' levels, so it disturbs a schedule far more than a level move: spending a fixed half
    of the moves on it slowed the level search (the joint search ended below the fixed-interval
    search it contains, at the same number of evaluations).
    A move whose repair fails, or that returns the individual unchanged, is redrawn up to
    `max_tries` times; the result always meets the budget (the parent if no move works)."""
    _check_gen(gen)
    if max_move < 1 or moves_per_child < 1:
        raise ValueError(f"max_move and moves_per_child must be ≥ 1 (got {max_move}, {moves_per_child})")
    levels, ks = (tuple(int(l) for l in ind[0]), tuple(int(k) for k in ind[1]))
    if not space.feasible((levels, ks)):
        raise ScheduleError(f"parent {[list(levels), list(ks)]} does not meet the joint search space's budget")
    S, H, rate = space.S, space.H, space.interval_rate
    for _ in range(moves_per_child):
        for _ in range(max_tries):
            i = _randint(gen, S)
            new_l, new_k = list(levels), list(ks)
            others = [k for k in space.stage_intervals(i) if k != ks[i]]
            steps = [d for d in range(-max_move, max_move + 1) if d and 0 <= levels[i] + d <= H]
            if rate is None:  # uniform over stage i's moves; interval moves first, then the level steps
                moves = [(True, k) for k in others] + [(False, d) for d in steps]
                if not moves:
                    continue
                is_interval, value = moves[_randint(gen, len(moves))]
            elif len(space.intervals) > 1 and _rand(gen) < rate:
                if not others:
                    continue
                is_interval, value = True, others[_randint(gen, len(others))]
            else:
                if not steps:
                    continue
                is_interval, value = False, steps[_randint(gen, len(steps))]
            if is_interval:
                new_k[i] = value
            else:
                new_l[i] += value
            repaired = repair_levels(space, new_l, new_k, frozen=(i,) if S > 1 else (), gen=gen)
            if repaired is not None and (repaired, tuple(new_k)) != (levels, ks):
                levels, ks = repaired, tuple(new_k)
                break
    return levels, ks


def first_changed_joint_stage(parent: JointIndividual, child: JointIndividual) -> int:
    """The first stage whose (level, k) differs: every stage starts with an empty cache (the refresh
    rule), so the child's rollout can reuse the parent's latents up to that stage's first step."""
    return first_changed_stage(list(zip(*parent)), list(zip(*child)))


def next_joint_generation(survivors: Sequence[JointIndividual], n_offspring: int, space: JointSpace,
                          gen: torch.Generator, max_move: int, moves_per_child: int = 1,
                          seen: set | frozenset = frozenset(), max_retries: int = 32
                          ) -> list[tuple[JointIndividual, JointIndividual]]:
    """`next_generation` for joint individuals: n_offspring (child, parent) pairs, parents in turn,
    each child a `mutate_joint` of its parent, redrawn while it repeats (see `next_generation`)."""
    _check_gen(gen)
    if not survivors:
        raise ValueError("next_joint_generation needs at least one survivor")
    parents = [(tuple(int(l) for l in p[0]), tuple(int(k) for k in p[1])) for p in survivors]
    return _offspring(parents, n_offspring,
                      lambda parent: mutate_joint(parent, space, gen, max_move, moves_per_child),
                      seen, max_retries)
