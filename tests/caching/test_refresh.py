"""The refresh rule: the first step of every stage is full (each stage has its own pruned weights;
stage boundaries are clean cut points), then every k-th step of the stage; a stage of w steps with
interval k has ceil(w / k) full steps."""
import itertools

import pytest

from diffes_pl.caching import RefreshRule, full_steps
from diffes_pl.caching.refresh import stage_full_steps
from diffes_pl.partition import StagePartition

T, F = True, False


def test_interval_one_makes_every_step_full():
    assert full_steps([0, 0, 1, 1], 1) == [T] * 4


def test_every_kth_step_of_a_stage():
    assert full_steps([0] * 7, 3) == [T, F, F, T, F, F, T]


def test_every_stage_starts_full_whatever_its_level_and_interval():
    stages = [0, 0, 0, 1, 1, 1]
    assert full_steps(stages, 2, levels=[1, 2]) == [T, F, T, T, F, T]  # level changes at step 3
    assert full_steps(stages, [2, 3], levels=[1, 1]) == [T, F, T, T, F, F]  # k changes at step 3
    # same (level, k): the counting does NOT run on across the boundary (step 3 would be cached)
    assert full_steps(stages, 2, levels=[1, 1]) == [T, F, T, T, F, T]
    assert full_steps(stages, 2) == [T, F, T, T, F, T]
    assert full_steps([0, 0, 1, 1, 1, 2], [3, 2, 4]) == [T, F, T, F, T, T]


def test_a_stage_has_ceil_w_over_k_full_steps():
    assert [stage_full_steps(w, k) for w, k in [(1, 1), (1, 4), (2, 2), (3, 2), (7, 3), (6, 3), (5, 1)]] \
        == [1, 1, 1, 2, 3, 2, 5]
    for steps, stages in [(20, 10), (7, 3), (10, 4)]:
        partition = StagePartition(tuple(range(steps - 1, -1, -1)), stages)
        w = partition.steps_per_stage
        for ks in itertools.product([1, 2, 3, 5], repeat=stages if stages <= 4 else 1):
            ks = list(ks) * (stages // len(ks))
            full = full_steps(partition.step_to_stage, ks)
            per_stage = [sum(full[i] for i in partition.steps_of_stage(s)) for s in range(stages)]
            assert per_stage == [-(-ws // k) for ws, k in zip(w, ks)]


def test_a_new_run_starts_full():
    rule = RefreshRule(3)
    assert [rule.step(s, 0) for s in range(3)] == [T, F, F]
    assert [rule.step(s, 0) for s in (0, 1)] == [T, F]  # step 0 again: a new run
    assert rule.step(1, 0) is True  # a step that does not follow the previous one starts a new run


def test_bad_intervals_and_stages_are_refused():
    for bad in (0, [2, 0], [], 1.5):
        with pytest.raises(ValueError, match="≥ 1"):
            RefreshRule(bad)
    with pytest.raises(ValueError, match="3 cache intervals for 2 stage levels"):
        RefreshRule([1, 2, 3], levels=[0, 1])
    rule = RefreshRule([2, 2])
    rule.step(0, 0)
    with pytest.raises(ValueError, match="stage 2 has no cache interval"):
        rule.step(1, 2)
    with pytest.raises(ValueError, match="stage 2 has no level"):
        RefreshRule(2, levels=[0, 1]).step(0, 2)
