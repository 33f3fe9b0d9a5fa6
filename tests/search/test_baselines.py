import pytest
import torch

from diffes_pl.errors import ScheduleError
from diffes_pl.partition import split_steps
from diffes_pl.schedule import budget_met
from diffes_pl.search import level_space as P
from diffes_pl.search.space import select
from diffes_pl.search.baselines import greedy_search, mosaicdiff_schedule, random_search


def feasible(levels, H, target, w):
    return len(levels) == len(w) and all(0 <= l <= H for l in levels) and budget_met(levels, w, target)


class Counting:
    """A toy fitness −Σ(levels − optimum)² that counts its calls."""

    def __init__(self, optimum):
        self.optimum, self.calls = tuple(optimum), []

    def __call__(self, levels):
        self.calls.append(tuple(levels))
        return -float(sum((a - b) ** 2 for a, b in zip(levels, self.optimum)))


def test_mosaicdiff_dit_setting():
    levels = mosaicdiff_schedule(10, 16, 8, [2] * 10)
    assert levels == (5, 5, 5, 5, 12, 12, 12, 8, 8, 8)
    begin, middle, end = levels[:4], levels[4:7], levels[7:]
    assert max(begin) < min(end) and max(end) < min(middle)
    assert feasible(levels, 16, 8, [2] * 10)


@pytest.mark.parametrize("S,H,target,w", [(20, 16, 8, [1] * 20), (10, 10, 3, [2] * 10), (20, 28, 5, [1] * 20),
                                          (7, 16, 6, [3, 3, 3, 3, 3, 3, 2]), (4, 16, 8, [5] * 4)])
def test_mosaicdiff_phase_order_and_budget(S, H, target, w):
    levels = mosaicdiff_schedule(S, H, target, w)
    assert feasible(levels, H, target, w)
    a, b, _ = split_steps(S, 3)
    begin, middle, end = levels[:a], levels[a:a + b], levels[a + b:]
    assert max(begin) < min(end) and max(end) < min(middle), levels
    assert levels == mosaicdiff_schedule(S, H, target, w)  # deterministic


def test_mosaicdiff_short_and_infeasible():
    assert mosaicdiff_schedule(1, 16, 8, [20]) == (8,)
    two = mosaicdiff_schedule(2, 16, 8, [10, 10])
    assert two[0] < two[1] and feasible(two, 16, 8, [10, 10])
    with pytest.raises(ScheduleError, match="not an integer"):
        mosaicdiff_schedule(10, 16, 8.01, [2] * 10)


def test_random_search_respects_n_evals():
    w, optimum = [2] * 10, (12, 11, 10, 9, 8, 8, 7, 6, 5, 4)
    f = Counting(optimum)
    best, fit, history = random_search(f, 25, 10, 16, 8, w, torch.Generator().manual_seed(0))
    assert len(f.calls) == 25 == len(set(f.calls)) == len(history)
    assert all(feasible(x, 16, 8, w) for x, _ in history)
    assert fit == max(v for _, v in history) and (best, fit) in history
    again = random_search(Counting(optimum), 25, 10, 16, 8, w, torch.Generator().manual_seed(0))
    assert again.history == history and again.evals_unused == 0
    other = random_search(Counting(optimum), 25, 10, 16, 8, w, torch.Generator().manual_seed(1))
    assert other.history != history
    # fewer feasible schedules than evaluations: each evaluated once, the rest of the budget unused
    f = Counting((1, 2))
    res = random_search(f, 10, 2, 3, 1.5, [1, 1], torch.Generator().manual_seed(0))
    assert sorted(f.calls) == [(0, 3), (1, 2), (2, 1), (3, 0)] and res.evals_unused == 6
    assert res.best_levels == (1, 2) and res.best_fitness == 0.0


def test_greedy_reaches_optimum_and_stops_early():
    optimum = (6, 2, 5, 3)  # Σ = 16 = 4 · 4
    f = Counting(optimum)
    res = greedy_search(f, 500, 4, 8, 4, [1, 1, 1, 1], max_move=2)
    best, fit, history = res
    assert best == optimum and fit == 0.0
    assert res.stopped_early and res.evals_unused > 0
    assert len(f.calls) == len(set(f.calls)) == len(history) == res.evals_used <= 500
    assert history[0] == ((4, 4, 4, 4), -10.0)
    # 3 rounds: (4,4,4,4) → (6,2,4,4) → (6,2,5,3) → no better neighbour; each round ≤ 4·3·2 = 24 new
    assert res.evals_used <= 1 + 3 * 24
    assert res == greedy_search(Counting(optimum), 500, 4, 8, 4, [1, 1, 1, 1], max_move=2)


@pytest.mark.parametrize("n_evals", [1, 2, 10, 30])
def test_greedy_never_exceeds_n_evals(n_evals):
    f = Counting((16, 0, 16, 0, 16, 0, 16, 0, 16, 0))
    best, fit, history = res = greedy_search(f, n_evals, 10, 16, 8, [2] * 10, max_move=5)
    assert len(f.calls) == len(history) == n_evals and res.evals_unused == 0 and not res.stopped_early
    assert fit == max(v for _, v in history) and feasible(best, 16, 8, [2] * 10)


def test_greedy_unequal_weights():
    w = [7, 7, 6]  # 20 steps in 3 stages
    optimum = (14, 2, 8)
    f = Counting(optimum)
    best, fit, history = greedy_search(f, 200, 3, 16, 8, w, max_move=3)
    assert best == optimum and fit == 0.0
    assert all(feasible(x, 16, 8, w) for x, _ in history)
    assert len(history) == len(set(f.calls)) == len(f.calls)


def test_same_budget_as_evolution():
    """The three searches can be given the evolutionary search's evaluation count (16 + 4) × generations."""
    w, n = [2] * 10, 20 * 3
    f = Counting((12, 11, 10, 9, 8, 8, 7, 6, 5, 4))
    g = torch.Generator().manual_seed(0)
    evaluated = set(P.initial_population(20, 10, 16, 8, w, g))
    survivors = sorted(evaluated, key=lambda x: -f(x))[:4]
    for _ in range(2):
        kids = P.next_generation(survivors, 20, 16, w, g, 5, 1, evaluated)
        evaluated |= {c for c, _ in kids}
        survivors = select({x: f(x) for x in {*survivors, *(c for c, _ in kids)}}, 4)
    assert len(evaluated) == n
    assert random_search(Counting(f.optimum), n, 10, 16, 8, w, g).evals_used == n
    assert greedy_search(Counting(f.optimum), n, 10, 16, 8, w, 5).evals_used == n
