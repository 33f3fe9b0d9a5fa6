import dataclasses
from collections import Counter
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffes_pl.errors import ScheduleError
from diffes_pl.schedule import budget_met
from diffes_pl.search import population as P

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
    assert P.first_changed_stage((8, 8, 8, 8), (8, 8, 8, 8)) == 4
    assert P.first_changed_stage((8, 8, 8, 8), (9, 7, 8, 8)) == 0
    assert P.first_changed_stage((8, 8, 8, 8), (8, 8, 9, 7)) == 2
    with pytest.raises(ValueError):
        P.first_changed_stage((8, 8), (8, 8, 8))


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
    assert P.select(scored, 2) == [(7, 9), (9, 7)]
    assert P.select(scored, 3, higher_is_better=False) == [(6, 10), (8, 8), (7, 9)]
    assert P.select(scored, 10)[-1] == (10, 6)
    assert P.select(scored, 0) == []


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


# ---------------------------------------------------------------- joint (level, cache interval) individuals

# 3 stages of 2 steps, H = 4: a full step costs 100 − 10·L MACs, a cached one 30 − 2·L (hand-checked
# in tests/test_partition.py). Target level 2: budget 480 of 600 MACs (0.8), tolerance ±10.
HAND = {"full": [100, 90, 80, 70, 60], "cached": [30, 28, 26, 24, 22]}
# DiT-like: full cost affine in the level (n divisible by H), a cached step ~ 1/4 of a full one.
DIT = {"full": [1000 - 55 * l for l in range(17)], "cached": [260 - 11 * l for l in range(17)]}
# depth-like, 20 steps in 3 stages: costs per stage (the cached step saves other blocks per stage).
DEPTH = {"full": [[120 - 10 * l for l in range(7)]] * 3,
         "cached": [[40 - 5 * min(l, 2) for l in range(7)], [40 - 10 * min(l, 1) for l in range(7)],
                    [40 - 4 * min(l, 3) for l in range(7)]]}
SPACES = {
    "hand": lambda: P.joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1),
    "dit": lambda: P.joint_space(16, W10, DIT, 8, intervals=(1, 2, 3, 4), branch=2),
    "depth": lambda: P.joint_space(6, [7, 7, 6], DEPTH, 2.5, intervals=(1, 2, 3), branch=3),
    "explicit": lambda: P.joint_space(16, W10, DIT, 8, intervals=(1, 2, 5), branch=2, mac_budget=0.4),
}


def test_joint_space_budget_by_hand():
    space = SPACES["hand"]()
    assert (space.budget_macs, space.tolerance, space.mac_budget) == (480, 10, 0.8)
    assert space.cost(((0, 1, 2), (2, 1, 1))) == 470 and space.feasible(((0, 1, 2), (2, 1, 1)))
    assert not space.feasible(((0, 1, 3), (2, 1, 1)))  # 450
    assert not space.feasible(((2, 2, 2), (1, 1, 3)))  # interval 3 is not allowed
    dit = SPACES["dit"]()
    assert dit.budget_macs == 20 * (1000 - 55 * 8) and dit.tolerance == 55  # 2 steps × 55, halved
    with pytest.raises(ScheduleError, match="'cached' table and the cache branch"):
        P.joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2))
    with pytest.raises(ScheduleError, match="'cached' table"):
        P.joint_space(4, [2, 2, 2], {"full": HAND["full"]}, 2, intervals=(1, 2), branch=1)
    with pytest.raises(ScheduleError, match="no schedule of levels"):
        P.joint_space(4, [2, 2, 2], HAND, 2, intervals=(1,), mac_budget=0.2)  # below every level's cost


def test_repair_levels_walks_into_the_band_by_hand():
    space = SPACES["hand"]()  # 480 ± 10
    # from (4, 4, 4) at k = 1 (360 MACs) levels come down one at a time, nearest-first, stages in
    # turn: 380, 400, 420 (3, 3, 3), 440, 460, 480 → (2, 2, 2); from (0, 0, 0) (600) they go up alike
    assert P.repair_levels(space, (4, 4, 4), (1, 1, 1)) == (2, 2, 2)
    assert P.repair_levels(space, (0, 0, 0), (1, 1, 1)) == (2, 2, 2)
    assert P.repair_levels(space, (0, 0, 0), (1, 1, 1), frozen=(0,)) == (0, 3, 3)  # 200 + 140 + 140
    assert P.repair_levels(space, (0, 0, 0), (1, 1, 1), frozen=(0, 1)) is None  # stage 2 alone: ≥ 520
    assert P.repair_levels(space, (0, 0, 0), (2, 2, 2)) is None  # 390: only lower levels would help
    # k = 2 on stage 0 at (2, 2, 2): 106 + 160 + 160 = 426; lowering stage 0 (+12: 118), then 1 and 2 (+20
    # each) reaches 478
    assert P.repair_levels(space, (2, 2, 2), (2, 1, 1)) == (1, 1, 1)
    assert P.repair_levels(space, (1, 1, 1), (2, 1, 1)) == (1, 1, 1)  # already in the band: unchanged
def test_joint_hybrid_population_holds_level_only_and_cache_only_schedules():
    space = P.joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1, mac_budget=0.65)  # 390 ± 10
    pop = P.initial_joint_population(12, space, gen(0))
    assert ((0, 0, 0), (2, 2, 2)) in pop  # cache-only: level 0, k = 2 everywhere costs 3·130 = 390
    assert all(space.feasible(ind) for ind in pop) and len(set(pop)) == len(pop) == 12
    dit = SPACES["dit"]()
    pop = P.initial_joint_population(30, dit, gen(1))
    assert all(dit.feasible(ind) for ind in pop) and len(set(pop)) == 30
    ones = (1,) * 10
    assert pop[0] == (P.uniform(10, 16, 8, W10), ones)  # level-only uniform first …
    # … then cache-only: 2-step stages make k = 2, 3, 4 one choice (one full step, one cached); level 0
    # with k = 2 costs 10·(1000 + 260) = 12600 MACs, above 11200 + 55: 21 levels (66 MACs each) → 11214
    assert pop[1] == ((3,) + (2,) * 9, (2,) * 10) and dit.cost(pop[1]) - dit.budget_macs == 14
    for kind in P.PATTERNS:  # today's patterned schedules, unchanged (affine costs: on budget exactly)
        assert (P.patterned(kind, 10, 16, 8, W10), ones) in pop
    assert any(max(ks) > 1 and max(levels) > 0 for levels, ks in pop[7:])  # random mixes
    assert all(max(ks) <= 2 for _, ks in pop)  # k capped at the 2 steps of a stage
    level_only = [levels for levels, ks in pop if ks == ones]
    assert all(budget_met(levels, W10, 8) for levels in level_only)  # affine costs: the exact level budget


@pytest.mark.parametrize("mac_budget, ks", [(0.5, (2, 3)), (0.35, (2, 3, 4))])
def test_joint_hybrid_population_starts_from_every_stacking_search_start(mac_budget, ks):
    # 5 stages of 4 steps: k = 2, 3, 4 are different choices (1, 2 or 3 cached steps of 4); k = 4 at
    # level 0 costs (1000 + 3·260) / 4000 = 44.5 % of dense, so no k = 4 schedule meets 50 %
    w, H = [4] * 5, 16
    space = P.joint_space(H, w, DIT, 8, intervals=(1, 2, 3, 4), branch=2, mac_budget=mac_budget)
    pop = P.initial_joint_population(40, space, gen(0))
    assert all(space.feasible(ind) for ind in pop) and len(set(pop)) == len(pop)
    assert {k for _, (k, *rest) in pop if set(rest) <= {k}} - {1} == set(ks)
    for k in ks:
        fixed = [levels for levels, ks in pop if ks == (k,) * 5]
        # the uniform start and the 5 patterned starts, each repaired to the MAC budget with k fixed
        assert len(fixed) >= 5, (k, fixed)
        assert max(fixed[0]) - min(fixed[0]) <= 1  # uniform levels (to the budget's resolution)
        stacking = P.joint_space(H, w, DIT, 8, intervals=(k,), branch=2, mac_budget=mac_budget)
        stack_pop = P.initial_joint_population(40, stacking, gen(0))
        assert all(space.feasible(ind) for ind in stack_pop)  # same budget: the joint space contains them
        assert set(P._joint_bases(stacking)) <= set(pop)  # … and starts from every deterministic start
    assert P.initial_joint_population(40, space, gen(0)) == pop  # deterministic


@pytest.mark.parametrize("name", list(SPACES))
def test_every_joint_individual_and_every_mutation_meets_the_mac_budget(name):
    space = SPACES[name]()
    g = gen(3)
    pop = P.initial_joint_population(20, space, g) + P.initial_joint_population(10, space, g, init="random")
    assert pop and all(space.feasible(ind) for ind in pop)
    moved = 0
    for parent in pop:
        for _ in range(10):
            child = P.mutate_joint(parent, space, g, max_move=3, moves_per_child=1 + _ % 2)
            assert space.feasible(child), (parent, child, space.cost(child), space.budget_macs)
            moved += child != parent
            space.schedule(child)  # a valid Schedule too
            parent = child
    assert moved >= 0.9 * 10 * len(pop)
    kinds = Counter()
    for child, parent in P.next_joint_generation(pop[:4], 40, space, g, max_move=2):
        assert space.feasible(child)
        kinds["levels" if child[1] == parent[1] else "intervals"] += 1
    assert kinds["levels"] > 5 and (kinds["intervals"] > 5 or len(space.intervals) == 1)


def mutations(space, seed, n=300, max_move=3):
    """n successive mutate_joint children (each the next one's parent), and the generator after them."""
    g, pop = gen(seed), P.initial_joint_population(8, space, gen(seed))
    out, parent = [], pop[-1]
    for _ in range(n):
        child = P.mutate_joint(parent, space, g, max_move=max_move)
        out.append((child, parent))
        parent = child
    return out, g


@pytest.mark.parametrize("name", list(SPACES))
def test_interval_rate_zero_never_changes_an_interval_and_one_always_does(name):
    space = dataclasses.replace(SPACES[name](), interval_rate=0.0)
    pairs, _ = mutations(space, 5)
    assert all(space.feasible(c) for c, _ in pairs)
    assert all(c[1] == p[1] for c, p in pairs) and sum(c != p for c, p in pairs) >= 0.9 * len(pairs)
    space = dataclasses.replace(space, interval_rate=1.0)
    pairs, _ = mutations(space, 5)
    assert all(space.feasible(c) for c, _ in pairs)
    # every move changes a stage's interval (and repairs levels): never the levels alone
    assert all(c[1] != p[1] for c, p in pairs if c != p) and sum(c != p for c, p in pairs) >= 0.9 * len(pairs)


def test_default_interval_rate_weighs_every_single_stage_move_alike():
    """Default (None): a drawn stage's other intervals and its level steps ±1..max_move are equally
    likely. 2-step stages: k ∈ {1, 2}, one interval move against up to 6 level moves (max_move 3)."""
    space = SPACES["dit"]()  # k = 2, 3, 4 act as k = 2 in 2-step stages
    assert space.interval_rate is None
    pairs, _ = mutations(space, 11, n=700)
    share = sum(c[1] != p[1] for c, p in pairs) / sum(c != p for c, p in pairs)
    assert 1 / 10 < share < 0.22  # 1/7 of the drawn moves, more near the bounds 0 and 16 (fewer level steps)
    half = dataclasses.replace(space, interval_rate=0.5)  # what joint searches did before the setting
    pairs, _ = mutations(half, 11, n=700)
    assert 0.4 < sum(c[1] != p[1] for c, p in pairs) / sum(c != p for c, p in pairs) < 0.6
    # every k in 4-step stages: 3 other intervals against 6 level moves, about 1/3
    wide = P.joint_space(16, [4] * 5, DIT, 8, intervals=(1, 2, 3, 4), branch=2, mac_budget=0.5)
    pairs, _ = mutations(wide, 11, n=700)
    assert 0.25 < sum(c[1] != p[1] for c, p in pairs) / sum(c != p for c, p in pairs) < 0.42


def test_a_fixed_interval_space_draws_the_same_mutations_whatever_the_rate():
    """With one interval (the paper's stacking, a level-only search in MACs) there is no interval move
    to weigh: the default and every rate draw the same random numbers, so such searches run as before."""
    w, H = [2] * 10, 16
    for k in (1, 2):
        base = P.joint_space(H, w, DIT, 8, intervals=(k,), branch=2, mac_budget=0.4)
        runs = [mutations(dataclasses.replace(base, interval_rate=r), 2) for r in (None, 0.0, 0.5, 1.0)]
        assert all(pairs == runs[0][0] for pairs, _ in runs)
        assert all(torch.equal(g.get_state(), runs[0][1].get_state()) for _, g in runs)
        assert all(c[1] == (k,) * 10 for c, _ in runs[0][0])


def test_joint_space_refuses_an_interval_rate_outside_0_1():
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"interval_rate must be a probability in \[0, 1\]"):
            P.joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1, interval_rate=bad)
    assert P.joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1, interval_rate=0).interval_rate == 0.0


def test_joint_operators_are_deterministic_from_the_generator():
    space = SPACES["depth"]()
    a = P.initial_joint_population(16, space, gen(7))
    b = P.initial_joint_population(16, space, gen(7))
    assert a == b and a != P.initial_joint_population(16, space, gen(8))
    assert P.next_joint_generation(a[:4], 8, space, gen(1), 2) == P.next_joint_generation(b[:4], 8, space, gen(1), 2)


def test_joint_next_generation_avoids_seen_and_reports_the_first_changed_stage():
    space = SPACES["dit"]()
    pop = P.initial_joint_population(6, space, gen(0))
    seen = set(pop)
    pairs = P.next_joint_generation(pop[:2], 12, space, gen(2), max_move=2, seen=seen)
    children = [c for c, _ in pairs]
    assert not set(children) & seen and len(set(children)) == 12
    assert [p for _, p in pairs] == [pop[0], pop[1]] * 6
    p = ((8,) * 10, (1,) * 10)
    assert P.first_changed_joint_stage(p, p) == 10
    assert P.first_changed_joint_stage(p, ((8,) * 10, (1,) * 3 + (2,) + (1,) * 6)) == 3  # an interval change
    assert P.first_changed_joint_stage(p, ((8, 8, 9, 7) + (8,) * 6, (1,) * 10)) == 2  # a level change


def test_joint_seeds_are_validated_and_kept_first():
    space = SPACES["hand"]()
    pop = P.initial_joint_population(5, space, gen(0), seeds=[([0, 1, 2], [2, 1, 1])])
    assert pop[0] == ((0, 1, 2), (2, 1, 1)) and len(pop) == 5
    with pytest.raises(ScheduleError, match=r"seed schedule #0 \[\[0, 1, 3\], \[2, 1, 1\]\] is not usable"):
        P.initial_joint_population(5, space, gen(0), seeds=[([0, 1, 3], [2, 1, 1])])
    with pytest.raises(ScheduleError, match="two lists of whole numbers"):
        P.initial_joint_population(5, space, gen(0), seeds=[[0, 1, 2]])
    schedule = space.schedule(pop[0], pruner="obs")
    assert schedule.cache_intervals == [2, 1, 1] and schedule.mac_budget == 0.8 and schedule.cache_branch == 1


@st.composite
def joint_spaces(draw):
    S = draw(st.integers(1, 5))
    H = draw(st.integers(1, 8))
    w = draw(st.lists(st.integers(1, 5), min_size=S, max_size=S))
    drops = draw(st.lists(st.integers(0, 30), min_size=H, max_size=H))
    full = [1000 - sum(drops[:l]) for l in range(H + 1)]
    cached = [[min(f, 200 + draw(st.integers(0, 20)) - 3 * l) for l, f in enumerate(full)] for _ in range(S)]
    cached = [[min(row[: l + 1]) for l in range(H + 1)] for row in cached]  # non-increasing
    levels = draw(st.lists(st.integers(0, H), min_size=S, max_size=S))
    target = Fraction(sum(l * x for l, x in zip(levels, w)), sum(w))  # a level budget some schedule meets
    ks = draw(st.sets(st.integers(1, 6), min_size=1, max_size=3)) | {1}
    return H, w, {"full": full, "cached": cached}, target, ks, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(joint_spaces())
def test_every_joint_individual_meets_the_budget_on_random_spaces(case):
    H, w, costs, target, ks, seed = case
    space = P.joint_space(H, w, costs, target, intervals=ks, branch=0)
    g = gen(seed)
    pop = P.initial_joint_population(8, space, g)
    assert pop and len(set(pop)) == len(pop) and all(space.feasible(ind) for ind in pop)
    for child, parent in P.next_joint_generation(pop[:3], 10, space, g, max_move=2, moves_per_child=2):
        assert space.feasible(child), (child, parent)
        space.schedule(child)
