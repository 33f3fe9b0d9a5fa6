import json

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


GOOD = {"levels": [10, 6, 8], "levels_max": 16, "target_level": 8, "steps_per_stage": [1, 1, 1]}
BAD_SCHEDULES = {
    "float-level": ({"levels": [6.9, 9, 8]}, "whole numbers"),  # was truncated to 6 (and then missed the budget)
    "whole-float-level": ({"levels": [10.0, 6, 8]}, "whole numbers"),  # was evaluated as 10
    "string-level": ({"levels": ["10", 6, 8]}, "whole numbers"),  # was coerced
    "bool-level": ({"levels": [True, 6, 8]}, "whole numbers"),
    "null-levels": ({"levels": None}, "levels must be a list"),  # was a TypeError traceback
    "string-levels": ({"levels": "10,6,8"}, "levels must be a list"),
    "string-levels-max": ({"levels_max": "16"}, "levels_max (H) must be a whole number"),  # was a TypeError
    "float-levels-max": ({"levels_max": 16.5}, "levels_max (H) must be a whole number"),
    "float-steps": ({"steps_per_stage": [1.5, 1, 1]}, "steps_per_stage must be whole numbers"),
    "zero-steps": ({"steps_per_stage": [0, 1, 2]}, "steps_per_stage must be ≥ 1"),
    "string-target": ({"target_level": "8"}, "target_level must be a number"),
    "null-target": ({"target_level": None}, "target_level must be a number"),
    "missing-levels": ({"levels": "<drop>"}, "missing schedule fields ['levels']"),
    "bad-partition": ({"partition": [2, 2]}, "partition must be an object"),
}


@pytest.mark.parametrize("name", list(BAD_SCHEDULES))
def test_schedule_file_with_wrong_types_refused(name, tmp_path):
    change, cause = BAD_SCHEDULES[name]
    data = {**GOOD, **change}
    data = {k: v for k, v in data.items() if v != "<drop>"}
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError) as err:
        Schedule.load(path)
    message = str(err.value)
    assert cause in message and str(path) in message and "\n" not in message


def test_schedule_file_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text('{\n  "levels": [10, 6, 8],\n  "levels_max": 16,,\n}\n')
    with pytest.raises(ScheduleError, match=r"schedule\.json is not valid JSON .*line 3") as err:
        Schedule.load(path)
    assert str(path) in str(err.value)
    path.write_text("[10, 6, 8]")
    with pytest.raises(ScheduleError, match="holds a JSON list, not an object"):
        Schedule.load(path)
    path.write_bytes(b"\x80\x81\xff")
    with pytest.raises(ScheduleError, match="not a text"):
        Schedule.load(path)


def test_valid_schedule_files_load_unchanged(tmp_path):
    import numpy as np

    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({**GOOD, "target_level": 8.0, "num_stages": 3, "pruner": "obs"}))
    s = Schedule.load(path)
    assert s.levels == [10, 6, 8] and s.target_level == 8.0 and s.pruner == "obs"
    # the search builds schedules from numpy integers; those stay accepted and become ints
    s = Schedule([np.int64(10), np.int64(6), 8], np.int64(16), 8, [1, 1, 1])
    assert s.levels == [10, 6, 8] and all(type(l) is int for l in s.levels)
    # steps_per_stage may come from the partition, as older schedules store it
    data = {k: v for k, v in GOOD.items() if k != "steps_per_stage"}
    path.write_text(json.dumps({**data, "partition": {"steps_per_stage": [1, 1, 1]}}))
    assert Schedule.load(path).steps_per_stage == [1, 1, 1]
