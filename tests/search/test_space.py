"""The SearchSpace protocol: both spaces implement it, and the search-facing operations round-trip
(individual ↔ schedule ↔ checkpoint form), cost and describe individuals consistently, and give
neighbours one move away that meet the budget."""
import ast
import json
from pathlib import Path

import pytest
import torch

from diffes_pl.errors import ScheduleError
from diffes_pl.schedule import Schedule, budget_met
from diffes_pl.search.joint_space import joint_space
from diffes_pl.search.level_space import LevelSpace
from diffes_pl.search.space import SearchSpace, first_changed_stage, offspring, select
from diffes_pl.step_costs import StepCosts

# 3 stages of 2 steps, H = 4: a full step costs 100 − 10·L MACs, a cached one 30 − 2·L (by hand)
HAND = {"full": [100, 90, 80, 70, 60], "cached": [30, 28, 26, 24, 22]}
PARTITION = {"timesteps": [999, 833, 666, 500, 333, 166], "num_stages": 3, "num_train_timesteps": 1000,
             "steps_per_stage": [2, 2, 2]}


def level():
    return LevelSpace(4, (2, 2, 2), 2, StepCosts.parse(HAND, 3, 4))


def joint():
    return joint_space(4, [2, 2, 2], HAND, 2, intervals=(1, 2), branch=1)


SPACES = {"level": level, "joint": joint}


@pytest.mark.parametrize("name", list(SPACES))
def test_both_spaces_are_search_spaces_and_round_trip(name):
    space = SPACES[name]()
    assert isinstance(space, SearchSpace) and space.S == 3
    pop = space.initial_population(6, torch.Generator().manual_seed(0))
    assert len(set(pop)) == len(pop) == 6 and all(space.feasible(ind) for ind in pop)
    for ind in pop:
        schedule = space.schedule(ind, partition=PARTITION, pruner="obs")
        assert space.individual(Schedule.from_dict(json.loads(json.dumps(schedule.to_dict())))) == ind
        state = json.loads(json.dumps(space.to_state(ind)))  # the checkpoint and JSON form
        assert space.from_state(state) == ind and hash(space.from_state(state)) == hash(ind)
        row = space.describe(ind)
        assert row["levels"] == schedule.levels
        assert [space.stage_config(ind, s) for s in range(3)] == list(zip(schedule.levels, schedule.intervals))
        # the cost is the schedule's trajectory MACs, counted by hand from the table
        by_hand = sum(2 * HAND["full"][l] if k == 1 else HAND["full"][l] + HAND["cached"][l]  # 2 steps a stage
                      for l, k in space_configs(space, ind))
        assert space.cost(ind) == by_hand
        assert space.first_changed_stage(ind, ind) == 3


def space_configs(space, ind):
    return [space.stage_config(ind, s) for s in range(space.S)]


def test_the_archive_rows_of_the_two_spaces():
    assert level().describe((1, 2, 3)) == {"levels": [1, 2, 3]}
    assert joint().describe(((0, 1, 2), (2, 1, 1))) == {"levels": [0, 1, 2], "intervals": [2, 1, 1],
                                                        "macs": 470 / 600}
    assert level().to_state((1, 2, 3)) == [1, 2, 3]
    assert joint().to_state(((0, 1, 2), (2, 1, 1))) == [[0, 1, 2], [2, 1, 1]]


def test_a_space_refuses_the_other_spaces_individuals():
    with pytest.raises(ValueError, match="is not 3 levels"):
        level().from_state([[0, 1, 2], [2, 1, 1]])
    with pytest.raises(ValueError, match=r"not a \[levels, cache intervals\] pair"):
        joint().from_state([1, 2, 3])
    cached = joint().schedule(((0, 1, 2), (2, 1, 1)), partition=PARTITION)
    with pytest.raises(ScheduleError, match="caches"):
        level().individual(cached)


@pytest.mark.parametrize("name", list(SPACES))
def test_neighbours_are_one_move_away_and_meet_the_budget(name):
    space = SPACES[name]()
    start = space.initial_population(1, torch.Generator().manual_seed(0))[0]
    near = space.neighbours(start, 1)
    assert near and len(set(near)) == len(near) and start not in near
    assert all(space.feasible(ind) for ind in near)
    assert space.neighbours(start, 1) == near  # deterministic
    assert set(near) <= set(space.neighbours(start, 2))
    if isinstance(space, LevelSpace):  # a level-switch move: one stage +1, another −1
        assert all(sorted(a - b for a, b in zip(ind, start)) == [-1, 0, 1] for ind in near)
    else:  # one stage's interval or level moved, the others repaired
        assert any(ind[1] != start[1] for ind in near) and any(ind[1] == start[1] for ind in near)


def test_the_level_space_reproduces_the_level_budget():
    space = LevelSpace(16, (2,) * 10, 8)
    pop = space.initial_population(20, torch.Generator().manual_seed(0))
    assert pop[0] == (8,) * 10 and all(budget_met(ind, [2] * 10, 8) for ind in pop)
    with pytest.raises(ValueError, match="no step costs"):
        space.cost(pop[0])
    with pytest.raises(ScheduleError, match="has 3 levels"):
        space.check_seed([8, 8, 8])


def test_shared_operators():
    assert first_changed_stage((1, 2, 3), (1, 2, 4)) == 2 and first_changed_stage((1, 2), (1, 2)) == 2
    assert select({(1, 2): 0.5, (0, 3): 0.5, (2, 1): 0.9, (3, 0): float("nan")}, 3) == [(2, 1), (0, 3), (1, 2)]
    # parents in turn; a child already seen, a parent or made this generation is redrawn
    made = iter([(5,), (2,), (6,), (7,), (6,), (8,)])
    pairs = offspring([(1,), (2,)], 3, lambda parent: next(made), seen={(5,)})
    assert pairs == [((6,), (1,)), ((7,), (2,)), ((8,), (1,))]
    with pytest.raises(ValueError, match="at least one survivor"):
        offspring([], 3, lambda parent: parent, seen=set())


KIND_NAMES = {"cache_intervals", "intervals", "mac_budget", "caches", "cache_branch", "joint", "LevelSpace",
              "JointSpace", "level_space", "joint_space"}
HOLDERS = ["lightning_module", "rollouts", "evolution", "holdout"]  # each holds one space, never asks which


def kind_tests(source: str) -> list[str]:
    """Conditions (if, ternary, while, assert, boolean operands, comparisons, isinstance) that read a
    name of a space's kind, and imports of a particular space's module."""
    found = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        tests = []
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests.append(node.test)
        elif isinstance(node, (ast.Compare, ast.BoolOp)):
            tests.append(node)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance":
            tests.append(node)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in KIND_NAMES:
            found.add((node.lineno, f"imports {node.module}"))
        for test in tests:
            names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)}
            if names & KIND_NAMES:
                found.add((test.lineno, ast.unparse(test)))
    return sorted(found)


def test_the_search_never_asks_which_space_it_holds():
    root = Path(__file__).resolve().parents[2] / "diffes_pl" / "search"
    found = {name: kind_tests((root / f"{name}.py").read_text()) for name in HOLDERS}
    assert not any(found.values()), found
    # the check itself catches a branch on the kind, and lets a dense/None test pass
    bad = ("if schedule.mac_budget is not None:\n    pass\nx = 1 if self.space.joint else 2\n"
           "from .joint_space import JointSpace\ny = dense if schedule is None else run(schedule)\n")
    assert kind_tests(bad) == [(1, "schedule.mac_budget is not None"), (3, "self.space.joint"),
                               (4, "imports joint_space")]
