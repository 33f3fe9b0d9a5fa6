"""The joint space: a level AND a cache interval per stage under a MAC budget — its budget by hand,
its populations, mutation, repair and seeds."""
import dataclasses
from collections import Counter
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffes_pl.errors import ScheduleError
from diffes_pl.schedule import budget_met
from diffes_pl.search import level_space as P
from diffes_pl.search.joint_space import joint_space

W10 = [2] * 10


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


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
    "hand": lambda: joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1),
    "dit": lambda: joint_space(16, W10, DIT, 8, intervals=(1, 2, 3, 4), branch=2),
    "depth": lambda: joint_space(6, [7, 7, 6], DEPTH, 2.5, intervals=(1, 2, 3), branch=3),
    "explicit": lambda: joint_space(16, W10, DIT, 8, intervals=(1, 2, 5), branch=2, mac_budget=0.4),
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
        joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2))
    with pytest.raises(ScheduleError, match="'cached' table"):
        joint_space(4, [2, 2, 2], {"full": HAND["full"]}, 2, intervals=(1, 2), branch=1)
    with pytest.raises(ScheduleError, match="no schedule of levels"):
        joint_space(4, [2, 2, 2], HAND, 2, intervals=(1,), mac_budget=0.2)  # below every level's cost


def test_repair_levels_walks_into_the_band_by_hand():
    space = SPACES["hand"]()  # 480 ± 10
    # from (4, 4, 4) at k = 1 (360 MACs) levels come down one at a time, nearest-first, stages in
    # turn: 380, 400, 420 (3, 3, 3), 440, 460, 480 → (2, 2, 2); from (0, 0, 0) (600) they go up alike
    assert space.repair_levels((4, 4, 4), (1, 1, 1)) == (2, 2, 2)
    assert space.repair_levels((0, 0, 0), (1, 1, 1)) == (2, 2, 2)
    assert space.repair_levels((0, 0, 0), (1, 1, 1), frozen=(0,)) == (0, 3, 3)  # 200 + 140 + 140
    assert space.repair_levels((0, 0, 0), (1, 1, 1), frozen=(0, 1)) is None  # stage 2 alone: ≥ 520
    assert space.repair_levels((0, 0, 0), (2, 2, 2)) is None  # 390: only lower levels would help
    # k = 2 on stage 0 at (2, 2, 2): 106 + 160 + 160 = 426; lowering stage 0 (+12: 118), then 1 and 2 (+20
    # each) reaches 478
    assert space.repair_levels((2, 2, 2), (2, 1, 1)) == (1, 1, 1)
    assert space.repair_levels((1, 1, 1), (2, 1, 1)) == (1, 1, 1)  # already in the band: unchanged
def test_joint_hybrid_population_holds_level_only_and_cache_only_schedules():
    space = joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1, mac_budget=0.65)  # 390 ± 10
    pop = space.initial_population(12, gen(0))
    assert ((0, 0, 0), (2, 2, 2)) in pop  # cache-only: level 0, k = 2 everywhere costs 3·130 = 390
    assert all(space.feasible(ind) for ind in pop) and len(set(pop)) == len(pop) == 12
    dit = SPACES["dit"]()
    pop = dit.initial_population(30, gen(1))
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
    space = joint_space(H, w, DIT, 8, intervals=(1, 2, 3, 4), branch=2, mac_budget=mac_budget)
    pop = space.initial_population(40, gen(0))
    assert all(space.feasible(ind) for ind in pop) and len(set(pop)) == len(pop)
    assert {k for _, (k, *rest) in pop if set(rest) <= {k}} - {1} == set(ks)
    for k in ks:
        fixed = [levels for levels, ks in pop if ks == (k,) * 5]
        # the uniform start and the 5 patterned starts, each repaired to the MAC budget with k fixed
        assert len(fixed) >= 5, (k, fixed)
        assert max(fixed[0]) - min(fixed[0]) <= 1  # uniform levels (to the budget's resolution)
        stacking = joint_space(H, w, DIT, 8, intervals=(k,), branch=2, mac_budget=mac_budget)
        stack_pop = stacking.initial_population(40, gen(0))
        assert all(space.feasible(ind) for ind in stack_pop)  # same budget: the joint space contains them
        assert set(stacking.bases()) <= set(pop)  # … and starts from every deterministic start
    assert space.initial_population(40, gen(0)) == pop  # deterministic


@pytest.mark.parametrize("name", list(SPACES))
def test_every_joint_individual_and_every_mutation_meets_the_mac_budget(name):
    space = SPACES[name]()
    g = gen(3)
    pop = space.initial_population(20, g) + space.initial_population(10, g, init="random")
    assert pop and all(space.feasible(ind) for ind in pop)
    moved = 0
    for parent in pop:
        for _ in range(10):
            child = space.mutate(parent, g, max_move=3, moves_per_child=1 + _ % 2)
            assert space.feasible(child), (parent, child, space.cost(child), space.budget_macs)
            moved += child != parent
            space.schedule(child)  # a valid Schedule too
            parent = child
    assert moved >= 0.9 * 10 * len(pop)
    kinds = Counter()
    for child, parent in space.next_generation(pop[:4], 40, g, max_move=2):
        assert space.feasible(child)
        kinds["levels" if child[1] == parent[1] else "intervals"] += 1
    assert kinds["levels"] > 5 and (kinds["intervals"] > 5 or len(space.intervals) == 1)


def mutations(space, seed, n=300, max_move=3):
    """n successive mutate_joint children (each the next one's parent), and the generator after them."""
    g, pop = gen(seed), space.initial_population(8, gen(seed))
    out, parent = [], pop[-1]
    for _ in range(n):
        child = space.mutate(parent, g, max_move=max_move)
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
    wide = joint_space(16, [4] * 5, DIT, 8, intervals=(1, 2, 3, 4), branch=2, mac_budget=0.5)
    pairs, _ = mutations(wide, 11, n=700)
    assert 0.25 < sum(c[1] != p[1] for c, p in pairs) / sum(c != p for c, p in pairs) < 0.42


def test_a_fixed_interval_space_draws_the_same_mutations_whatever_the_rate():
    """With one interval (the paper's stacking, a level-only search in MACs) there is no interval move
    to weigh: the default and every rate draw the same random numbers, so such searches run as before."""
    w, H = [2] * 10, 16
    for k in (1, 2):
        base = joint_space(H, w, DIT, 8, intervals=(k,), branch=2, mac_budget=0.4)
        runs = [mutations(dataclasses.replace(base, interval_rate=r), 2) for r in (None, 0.0, 0.5, 1.0)]
        assert all(pairs == runs[0][0] for pairs, _ in runs)
        assert all(torch.equal(g.get_state(), runs[0][1].get_state()) for _, g in runs)
        assert all(c[1] == (k,) * 10 for c, _ in runs[0][0])


def test_joint_space_refuses_an_interval_rate_outside_0_1():
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"interval_rate must be a probability in \[0, 1\]"):
            joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1, interval_rate=bad)
    assert joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1, interval_rate=0).interval_rate == 0.0


def test_joint_operators_are_deterministic_from_the_generator():
    space = SPACES["depth"]()
    a = space.initial_population(16, gen(7))
    b = space.initial_population(16, gen(7))
    assert a == b and a != space.initial_population(16, gen(8))
    assert space.next_generation(a[:4], 8, gen(1), 2) == space.next_generation(b[:4], 8, gen(1), 2)


def test_joint_next_generation_avoids_seen_and_reports_the_first_changed_stage():
    space = SPACES["dit"]()
    pop = space.initial_population(6, gen(0))
    seen = set(pop)
    pairs = space.next_generation(pop[:2], 12, gen(2), max_move=2, seen=seen)
    children = [c for c, _ in pairs]
    assert not set(children) & seen and len(set(children)) == 12
    assert [p for _, p in pairs] == [pop[0], pop[1]] * 6
    p = ((8,) * 10, (1,) * 10)
    assert space.first_changed_stage(p, p) == 10
    assert space.first_changed_stage(p, ((8,) * 10, (1,) * 3 + (2,) + (1,) * 6)) == 3  # an interval change
    assert space.first_changed_stage(p, ((8, 8, 9, 7) + (8,) * 6, (1,) * 10)) == 2  # a level change


def test_joint_seeds_are_validated_and_kept_first():
    space = SPACES["hand"]()
    pop = space.initial_population(5, gen(0), seeds=[([0, 1, 2], [2, 1, 1])])
    assert pop[0] == ((0, 1, 2), (2, 1, 1)) and len(pop) == 5
    with pytest.raises(ScheduleError, match=r"seed schedule #0 \[\[0, 1, 3\], \[2, 1, 1\]\] is not usable"):
        space.initial_population(5, gen(0), seeds=[([0, 1, 3], [2, 1, 1])])
    # plain levels are a seed too: cache interval 1 in every stage
    assert space.check_seed([2, 2, 2]) == ((2, 2, 2), (1, 1, 1))
    with pytest.raises(ScheduleError, match=r"seed schedule #0 \[\[0, 1, 2\], \[1, 1, 1\]\] is not usable"):
        space.initial_population(5, gen(0), seeds=[[0, 1, 2]])
    with pytest.raises(ScheduleError, match="two lists of whole numbers"):
        space.initial_population(5, gen(0), seeds=[[[0, 1, 2]]])
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
    space = joint_space(H, w, costs, target, intervals=ks, branch=0)
    g = gen(seed)
    pop = space.initial_population(8, g)
    assert pop and len(set(pop)) == len(pop) and all(space.feasible(ind) for ind in pop)
    for child, parent in space.next_generation(pop[:3], 10, g, max_move=2, moves_per_child=2):
        assert space.feasible(child), (child, parent)
        space.schedule(child)
