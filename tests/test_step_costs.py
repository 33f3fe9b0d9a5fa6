"""StepCosts: the MAC cost of a stage's full and cached steps at each level, the trajectory's MACs,
the budget's tolerance and the MAC budget rule, by hand."""
from diffes_pl.step_costs import StepCosts, mac_budget_met, stage_full_steps

# Hand-made table: 3 stages of 2 steps, H = 4; a full step costs 100 − 10·L MACs, a cached one 30 − 2·L.
COSTS = {"full": [100, 90, 80, 70, 60], "cached": [30, 28, 26, 24, 22]}


def test_stage_costs_and_tolerance_by_hand():
    costs = StepCosts.parse(COSTS, 3, 4)
    assert costs.dense == 100 and costs.dense_macs([2, 2, 2]) == 600
    assert [stage_full_steps(w, k) for w, k in [(2, 1), (2, 2), (2, 5), (7, 3), (6, 3)]] == [2, 1, 1, 3, 2]
    assert costs.stage_macs(0, 2, 2, 1) == 160  # 2 full steps at level 2: 2·80
    assert costs.stage_macs(0, 2, 2, 2) == 80 + 26  # 1 full + 1 cached
    assert costs.stage_macs(0, 7, 1, 3) == 3 * 90 + 4 * 28  # full at steps 0, 3, 6 of the stage
    assert costs.trajectory_macs([2, 2, 2], None, [2, 2, 2]) == 480
    assert costs.trajectory_macs([0, 1, 2], [2, 1, 1], [2, 2, 2]) == (100 + 30) + 180 + 160 == 470
    assert costs.tolerance([2, 2, 2]) == 10  # one level of one 2-step stage moves 2·10 MACs: half of it
    assert costs.tolerance([1, 3, 1]) == 15
    assert costs.budget_macs(0.8, [2, 2, 2]) == 480
    assert mac_budget_met([0, 1, 2], [2, 1, 1], [2, 2, 2], costs, 0.8)  # 470: 480 − 10, the edge is in
    assert not mac_budget_met([0, 1, 3], [2, 1, 1], [2, 2, 2], costs, 0.8)  # 450
    assert not mac_budget_met([2, 2, 1], None, [2, 2, 2], costs, 0.8)  # 500
    assert mac_budget_met([0, 1, 3], [2, 1, 1], [2, 2, 2], costs, 0.75)  # 450 of 600
    # per-stage rows (depth pruning): the cached cost differs by stage
    per_stage = StepCosts.parse({"full": [[10, 8, 6]] * 2, "cached": [[4, 4, 3], [4, 2, 2]]}, 2, 2)
    assert per_stage.stage_macs(0, 3, 1, 2) == 2 * 8 + 4 and per_stage.stage_macs(1, 3, 1, 2) == 2 * 8 + 2
    assert per_stage.tolerance([3, 3]) == 3  # 3 steps × the largest drop (2), halved
    assert per_stage.to_dict() == {"full": [10, 8, 6], "cached": [[4, 4, 3], [4, 2, 2]]}
