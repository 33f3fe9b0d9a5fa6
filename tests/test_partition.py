import pytest

from diffes_pl.partition import (Schedule, ScheduleError, StagePartition, budget_met, check_target,
                                 split_steps, units_removed)

DDIM20 = [999, 946, 894, 841, 789, 736, 684, 631, 578, 526, 473, 421, 368, 315, 263, 210, 158, 105, 53, 0]


def test_dit_ddim20_timesteps_and_stages():
    from diffes_pl.denoisers.dit import DiTAdapter, DIT_NOISE_SCHEDULE  # noqa: F401
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**DIT_NOISE_SCHEDULE, timestep_spacing="linspace")
    p = StagePartition.from_scheduler(sched, 20, 10)
    assert [int(t) for t in p.timesteps] == DDIM20
    assert p.steps_per_stage == [2] * 10
    assert p.stage_of_step(0) == 0 and p.stage_of_step(1) == 0 and p.stage_of_step(19) == 9
    assert p.stage_interval(0) == (894.0, 999.0)
    assert p.stage_interval(9) == (-1.0, 53.0)
    # the intervals tile [0, 999]: each stage's low is the next one's high
    for s in range(9):
        assert p.stage_interval(s)[0] == p.stage_interval(s + 1)[1]


def test_split_steps_balanced_front_loaded():
    assert split_steps(20, 3) == [7, 7, 6]
    assert split_steps(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="cannot cut"):
        split_steps(3, 4)


def test_units_removed_matches_facts():
    # DiT-XL/2: level L of 16 removes L heads of 16 and 288·L of 4608 MLP channels
    for level in range(17):
        assert units_removed(level, 16, 16) == level
        assert units_removed(level, 16, 4608) == 288 * level
    # SDXL: H = 10, 20-head blocks lose 2 heads per level (same fraction everywhere)
    assert units_removed(3, 10, 20) == 6 and units_removed(3, 10, 10) == 3
    assert units_removed(0, 7, 5) == 0 and units_removed(7, 7, 5) == 5
    assert units_removed(1, 8, 4) == 1  # 0.5 rounds up


def test_budget_rule_exact():
    assert budget_met([8] * 10, [2] * 10, 8)
    assert budget_met([16, 0] * 5, [2] * 10, 8)
    assert not budget_met([9] + [8] * 9, [2] * 10, 8)
    assert budget_met([3, 2, 1], [7, 7, 6], "2.05")  # (21+14+6)/20


def test_schedule_refuses_bad_levels(tmp_path):
    with pytest.raises(ScheduleError, match="misses the budget"):
        Schedule([9, 8, 8], 16, 8, [1, 1, 1])
    with pytest.raises(ScheduleError, match="outside"):
        Schedule([17, 0, 7], 16, 8, [1, 1, 1])
    with pytest.raises(ScheduleError, match="levels but the partition has"):
        Schedule([8, 8], 16, 8, [1, 1, 1])
    s = Schedule([10, 6, 8], 16, 8, [1, 1, 1], pruner="obs")
    s.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json") == s


def test_check_target():
    check_target(8, 16, [2] * 10)
    with pytest.raises(ScheduleError, match="outside"):
        check_target(17, 16, [2] * 10)
    with pytest.raises(ScheduleError, match="no schedule meets"):
        check_target(0.33, 16, [2] * 10)  # 6.6 is no integer total
    with pytest.raises(ScheduleError, match="no schedule of levels"):
        check_target(0.25, 16, [2] * 10)  # total 5 is odd: every stage weighs 2
