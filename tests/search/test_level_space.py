"""The level space's operators (uniform, patterned, repair, random, mutation, populations) and
the operators every space shares (selection, first changed stage)."""
from collections import Counter
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffes_pl.errors import ScheduleError
from diffes_pl.schedule import budget_met
from diffes_pl.search import level_space as P
from diffes_pl.search.space import first_changed_stage, select

W10 = [2] * 10  # DiT main setting: 20 DDIM steps, 10 stages, H = 16, target 8


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def feasible(levels, H, target, w):
    return (isinstance(levels, tuple) and len(levels) == len(w) and all(isinstance(l, int) for l in levels)
            and all(0 <= l <= H for l in levels) and budget_met(levels, w, target))


# ---------------------------------------------------------------- single schedules

def test_uniform_integral_and_nearest_for_fractional_target():
    assert P.uniform(10, 16, 8, W10) == (8,) * 10
    assert P.uniform(10, 16, 8.5, W10) == (8, 8, 8, 8, 8, 9, 9, 9, 9, 9)
    # 20 steps in 3 stages: 7·a + 7·b + 6·c = 170; (7, 7, 12) and (10, 10, 5) tie, lexicographic wins
    assert P.uniform(3, 16, 8.5, [7, 7, 6]) == (7, 7, 12)
    assert P.uniform(3, 16, 8, [7, 7, 6]) == (8, 8, 8)
    with pytest.raises(ScheduleError, match="no schedule meets target level 8.33"):
        P.uniform(10, 16, 8.33, W10)
    with pytest.raises(ScheduleError, match="outside"):
        P.uniform(10, 16, 17, W10)


def test_patterned_exact_values_dit_setting():
    expect = {
        "front-heavy": (12, 11, 10, 9, 8, 8, 7, 6, 5, 4),
        "back-heavy": (4, 5, 6, 7, 8, 8, 9, 10, 11, 12),
        "middle-heavy": (4, 6, 8, 10, 12, 12, 10, 8, 6, 4),
        "ends-heavy": (12, 10, 8, 6, 4, 4, 6, 8, 10, 12),
        "zig-zag": (12, 4, 12, 4, 12, 4, 12, 4, 12, 4),
    }
    for kind, levels in expect.items():
        assert P.patterned(kind, 10, 16, 8, W10) == levels
        assert feasible(levels, 16, 8, W10)
    with pytest.raises(ValueError, match="unknown pattern"):
        P.patterned("sideways", 10, 16, 8, W10)


@pytest.mark.parametrize("S,H,target,w", [(10, 16, 8, W10), (20, 28, 5, [1] * 20), (10, 10, 3, W10),
                                          (7, 16, 2, [3, 3, 3, 3, 3, 3, 2]), (5, 70, 60, [1] * 5)])
def test_patterned_shapes_point_the_right_way(S, H, target, w):
    pat = {k: P.patterned(k, S, H, target, w) for k in P.PATTERNS}
    for levels in pat.values():
        assert feasible(levels, H, target, w)
    f, b, m, e, z = (pat[k] for k in P.PATTERNS)
    assert f[0] > f[-1] and b[0] < b[-1]  # front-heavy: prunes the early stages most
    if len(set(w)) == 1:  # with unequal weights exact rounding may bend a ramp by one level
        assert all(x >= y for x, y in zip(f, f[1:])) and all(x <= y for x, y in zip(b, b[1:]))
    mid = S // 2
    assert m[mid] > m[0] and m[mid] > m[-1]
    assert e[mid] < e[0] and e[mid] < e[-1]
    assert z[0] > z[1] and z[2] > z[1]


def test_patterned_trivial_targets_collapse_to_uniform():
    for kind in P.PATTERNS:
        assert P.patterned(kind, 6, 8, 0, [1] * 6) == (0,) * 6
        assert P.patterned(kind, 6, 8, 8, [1] * 6) == (8,) * 6
        assert P.patterned(kind, 1, 8, 3, [20]) == (3,)


def test_repair():
    # already feasible: unchanged; out of bounds: clipped then the nearest budget-meeting schedule
    assert P.repair((12, 4, 8), 16, 8, [1, 1, 1]) == (12, 4, 8)
    assert P.repair((20, -3, 8), 16, 8, [1, 1, 1]) == (16, 0, 8)  # clipping alone suffices
    assert P.repair((20, 3, 8), 16, 8, [1, 1, 1]) == (15, 2, 7)   # clipped (16, 3, 8) is 3 over
    assert P.repair([8.4] * 10, 16, 8, W10) == (8,) * 10
    assert feasible(P.repair((16, 16, 16), 16, 8, [7, 7, 6]), 16, 8, [7, 7, 6])
    with pytest.raises(ScheduleError, match="not an integer"):
        P.repair((1, 1, 1), 16, 8.5, [1, 1, 1])
    # H = 1, weights 2 and 3: reachable totals 0, 2, 3, 5 — target 0.2·5 = 1 is not reachable
    with pytest.raises(ScheduleError, match="no schedule"):
        P.repair((1, 0), 1, 0.2, [2, 3])
    # random tie-break: x = 8.5 everywhere with target 8.5 has many nearest schedules
    draws = {P.repair([8.5] * 10, 16, 8.5, W10, gen(s)) for s in range(10)}
    assert len(draws) > 1 and all(feasible(d, 16, 8.5, W10) and set(d) == {8, 9} for d in draws)


def test_random_schedule_is_uniform_over_feasible_set():
    # 4 feasible schedules: (0,3) (1,2) (2,1) (3,0)
    g = gen(1)
    counts = Counter(P.random_schedule(2, 3, 1.5, [1, 1], g) for _ in range(800))
    assert set(counts) == {(0, 3), (1, 2), (2, 1), (3, 0)}
    assert all(140 < c < 260 for c in counts.values()), counts
    assert P.num_feasible(2, 3, 1.5, [1, 1]) == 4


def test_random_schedule_budget_and_determinism():
    for w, H, target, distinct in [(W10, 16, 8, 28), ([7, 7, 6], 16, 8, 10), ([7, 7, 6], 16, 8.5, 10),
                                   ([1] * 20, 28, 5, 28)]:
        a = [P.random_schedule(len(w), H, target, w, gen(3)) for _ in range(1)]
        g1, g2 = gen(3), gen(3)
        seq1 = [P.random_schedule(len(w), H, target, w, g1) for _ in range(30)]
        seq2 = [P.random_schedule(len(w), H, target, w, g2) for _ in range(30)]
        assert seq1 == seq2 and seq1[0] == a[0]
        assert all(feasible(x, H, target, w) for x in seq1)
        assert len(set(seq1)) >= distinct
        assert seq1 != [P.random_schedule(len(w), H, target, w, gen(4)) for _ in range(30)]


def test_no_global_rng():
    with pytest.raises(TypeError, match="explicit torch.Generator"):
        P.random_schedule(10, 16, 8, W10, None)
    with pytest.raises(TypeError, match="explicit torch.Generator"):
        P.mutate((8,) * 10, 16, W10, None, 5)
    # the global RNG is neither read nor advanced
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    P.initial_population(20, 10, 16, 8, W10, gen(0))
    P.next_generation([(8,) * 10], 16, 16, W10, gen(0), 5)
    assert torch.equal(before, torch.random.get_rng_state())


# ---------------------------------------------------------------- mutation

def test_mutate_equal_weights_is_plus_minus_m():
    g = gen(5)
    parent = (8,) * 10
    sizes = set()
    for _ in range(300):
        child = P.mutate(parent, 16, W10, g, max_move=5)
        diff = [c - p for c, p in zip(child, parent)]
        up = [d for d in diff if d > 0]
        down = [d for d in diff if d < 0]
        assert len(up) == 1 and len(down) == 1 and up[0] == -down[0] and 1 <= up[0] <= 5
        sizes.add(up[0])
        assert feasible(child, 16, 8, W10)
    assert sizes == {1, 2, 3, 4, 5}


def test_mutate_unequal_weights_keeps_budget_and_bounds():
    w = [7, 7, 6]
    g = gen(6)
    for start in [(8, 8, 8), (16, 0, 8), (0, 16, 8), (14, 2, 8)]:
        assert feasible(start, 16, 8, w)
        x = start
        for _ in range(200):
            x = P.mutate(x, 16, w, g, max_move=5, moves_per_child=2)
            assert feasible(x, 16, 8, w), x
    # stages 0 and 2 only trade in quanta of 6 levels (stage 0) against 7 (stage 2)
    assert P.neighbours((8, 8, 8), 16, w, 1) == [(9, 7, 8), (14, 8, 1), (7, 9, 8), (8, 14, 1),
                                                   (2, 8, 15), (8, 2, 15)]
    assert P.mutate((8, 8, 8), 16, w, gen(0), 5, moves_per_child=3) in P._enumerate(16, 160, (7, 7, 6))


def test_mutate_respects_bounds_and_returns_parent_when_stuck():
    g = gen(7)
    for _ in range(200):
        child = P.mutate((16, 0, 8), 16, [1, 1, 1], g, max_move=5)
        assert feasible(child, 16, 8, [1, 1, 1])
    assert P.mutate((3,), 8, [20], g, 5) == (3,)               # one stage
    assert P.mutate((0, 0, 0), 8, [1, 1, 1], g, 5) == (0, 0, 0)  # target 0
    assert P.mutate((8, 8), 8, [1, 1], g, 5) == (8, 8)           # target H
    assert P.mutate((1, 1, 1), 16, [7, 7, 6], g, 5) in {(2, 0, 1), (0, 2, 1)}  # 0↔2 needs 6/7 levels


def test_mutate_and_children_deterministic_and_resumable():
    g1 = gen(11)
    a = [P.mutate((8,) * 10, 16, W10, g1, 5) for _ in range(10)]
    state = g1.get_state()
    cont = [P.mutate((8,) * 10, 16, W10, g1, 5) for _ in range(10)]
    g2 = gen(11)
    assert [P.mutate((8,) * 10, 16, W10, g2, 5) for _ in range(10)] == a
    g3 = torch.Generator()
    g3.set_state(state)  # resumed from a checkpointed generator state
    assert [P.mutate((8,) * 10, 16, W10, g3, 5) for _ in range(10)] == cont
    g4 = gen(12)
    assert [P.mutate((8,) * 10, 16, W10, g4, 5) for _ in range(10)] != a


def test_first_changed_stage():
    assert first_changed_stage((8, 8, 8, 8), (8, 8, 8, 8)) == 4
    assert first_changed_stage((8, 8, 8, 8), (9, 7, 8, 8)) == 0
    assert first_changed_stage((8, 8, 8, 8), (8, 8, 9, 7)) == 2
    with pytest.raises(ValueError):
        first_changed_stage((8, 8), (8, 8, 8))


# ---------------------------------------------------------------- populations

@pytest.mark.parametrize("init", P.INITS)
def test_initial_population_distinct_feasible_deterministic(init):
    popn = P.initial_population(20, 10, 16, 8, W10, gen(0), init=init)
    assert len(popn) == 20 and len(set(popn)) == 20
    assert all(feasible(x, 16, 8, W10) for x in popn)
    assert popn == P.initial_population(20, 10, 16, 8, W10, gen(0), init=init)
    assert popn != P.initial_population(20, 10, 16, 8, W10, gen(1), init=init)
    patterns = [P.patterned(k, 10, 16, 8, W10) for k in P.PATTERNS]
    if init == "hybrid":
        assert popn[:6] == [(8,) * 10] + patterns
    if init == "patterned":
        assert popn[:5] == patterns
    if init == "uniform":
        assert popn[0] == (8,) * 10
        # mutants of uniform: close to it (a few moves of ≤ 2 levels)
        assert all(max(abs(l - 8) for l in x) <= 8 for x in popn)


def test_initial_population_seeds_first_and_validated():
    seeds = [(16, 0) * 5, (8,) * 10]
    popn = P.initial_population(20, 10, 16, 8, W10, gen(0), seeds=seeds + [(16, 0) * 5])
    assert popn[:2] == seeds and len(set(popn)) == 20
    assert popn[2:7] == [P.patterned(k, 10, 16, 8, W10) for k in P.PATTERNS]  # uniform already a seed
    with pytest.raises(ScheduleError, match=r"seed schedule #0 .* misses the budget"):
        P.initial_population(20, 10, 16, 8, W10, gen(0), seeds=[(9,) * 10])
    with pytest.raises(ScheduleError, match=r"seed schedule #1 .* outside \[0, 16\]"):
        P.initial_population(20, 10, 16, 8, W10, gen(0), seeds=[(8,) * 10, (17, -1) + (8,) * 8])
    with pytest.raises(ScheduleError, match="has 3 levels"):
        P.initial_population(20, 10, 16, 8, W10, gen(0), seeds=[(8, 8, 8)])
    with pytest.raises(ScheduleError, match="integers"):
        P.initial_population(20, 10, 16, 8, W10, gen(0), seeds=[(8.5, 7.5) + (8,) * 8])
    with pytest.raises(ValueError, match="more distinct seed schedules"):
        P.initial_population(1, 10, 16, 8, W10, gen(0), seeds=seeds)


def test_initial_population_small_feasible_set_returns_all():
    for init in P.INITS:
        popn = P.initial_population(50, 2, 3, 1.5, [1, 1], gen(0), init=init)
        assert sorted(popn) == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert P.initial_population(20, 1, 16, 5, [20], gen(0)) == [(5,)]
    # just enough: 16 of the 17 schedules with S=2, H=16, target 8
    popn = P.initial_population(16, 2, 16, 8, [1, 1], gen(0), init="uniform")
    assert len(set(popn)) == 16 and all(feasible(x, 16, 8, [1, 1]) for x in popn)


def test_select():
    scored = {(8, 8): 0.5, (9, 7): 0.9, (7, 9): 0.9, (10, 6): float("nan"), (6, 10): 0.1}
    assert select(scored, 2) == [(7, 9), (9, 7)]
    assert select(scored, 3, higher_is_better=False) == [(6, 10), (8, 8), (7, 9)]
    assert select(scored, 10)[-1] == (10, 6)
    assert select(scored, 0) == []


def test_next_generation():
    survivors = P.initial_population(4, 10, 16, 8, W10, gen(0))
    seen = set(survivors) | {P.mutate(survivors[0], 16, W10, gen(s), 5) for s in range(20)}
    seen_copy = set(seen)
    kids = P.next_generation(survivors, 16, 16, W10, gen(1), 5, 1, seen)
    assert seen == seen_copy
    assert [p for _, p in kids] == [tuple(s) for s in survivors] * 4
    children = [c for c, _ in kids]
    assert len(set(children)) == 16 and not set(children) & seen
    for child, parent in kids:
        assert feasible(child, 16, 8, W10)
        diff = [c - p for c, p in zip(child, parent)]
        assert sum(diff) == 0 and sum(d for d in diff if d > 0) <= 5
    assert kids == P.next_generation(survivors, 16, 16, W10, gen(1), 5, 1, seen)
    assert kids != P.next_generation(survivors, 16, 16, W10, gen(2), 5, 1, seen)
    # tiny space: everything seen → repeats are allowed after the retries, no hang
    everything = {(0, 3), (1, 2), (2, 1), (3, 0)}
    kids = P.next_generation([(1, 2)], 6, 3, [1, 1], gen(0), 3, 1, everything)
    assert len(kids) == 6 and all(c in everything for c, _ in kids)


# ---------------------------------------------------------------- invariant over random spaces

@st.composite
def spaces(draw):
    S = draw(st.integers(1, 6))
    H = draw(st.integers(0, 9))
    w = draw(st.lists(st.integers(1, 4), min_size=S, max_size=S))
    levels = draw(st.lists(st.integers(0, H), min_size=S, max_size=S))
    target = Fraction(sum(l * x for l, x in zip(levels, w)), sum(w))  # a reachable target
    return S, H, w, target, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(spaces())
def test_every_produced_individual_meets_bounds_and_budget(space):
    S, H, w, target, seed = space
    g = gen(seed)
    made = [P.uniform(S, H, target, w)] + [P.patterned(k, S, H, target, w) for k in P.PATTERNS]
    made += [P.random_schedule(S, H, target, w, g) for _ in range(5)]
    made += [P.repair([H] * S, H, target, w, g), P.repair([0] * S, H, target, w)]
    popn = P.initial_population(8, S, H, target, w, g)
    assert len(set(popn)) == len(popn) == min(8, P.num_feasible(S, H, target, w))
    made += popn
    x = popn[0]
    for _ in range(10):
        x = P.mutate(x, H, w, g, max_move=3, moves_per_child=2)
        made.append(x)
    made += [c for c, _ in P.next_generation(popn[:2], 6, H, w, g, 3, 1, set(popn))]
    for levels in made:
        assert feasible(levels, H, target, w), (levels, H, target, w)
