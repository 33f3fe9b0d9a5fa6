"""Schedule: the level budget (units removed per level, the exact budget rule, reachable targets),
schedule files refused in one line when malformed and loaded unchanged when valid (old level-only
files included), and joint schedules (a cache interval per stage) held to their MAC budget."""
import json

import pytest

from diffes_pl.errors import ScheduleError
from diffes_pl.schedule import Schedule, budget_met, check_target, units_removed


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


def test_whole_floats_in_a_schedule_file_are_read_as_integers(tmp_path):
    """Tools that spell 4 as 4.0 (floats from numpy or pandas) write schedules that mean the same: every
    integer field takes a whole float and holds an int once loaded; written back, it reads 4."""
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({**OLD_SCHEDULE, "levels": [10.0, 6, 8.0], "levels_max": 16.0,
                                "steps_per_stage": [1.0, 1, 1],
                                "partition": {**OLD_SCHEDULE["partition"], "num_stages": 3.0, "steps_per_stage": [1.0, 1, 1]}}))
    s = Schedule.load(path)
    assert s.to_dict() == OLD_SCHEDULE
    assert all(type(v) is int for v in [*s.levels, *s.steps_per_stage, s.levels_max, s.partition["num_stages"],
                                        *s.partition["steps_per_stage"]])
    s.save(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again == OLD_SCHEDULE and all(type(v) is int for v in [*again["levels"], again["levels_max"]])  # 10, not 10.0
    costs = {"full": [100.0, 90, 80, 70, 60], "cached": [30, 28, 26.0, 24, 22]}
    s = Schedule([0.0, 1, 2], 4.0, 2, [2, 2.0, 2], cache_intervals=[2.0, 1, 1], cache_branch=1.0, mac_budget=0.8,
                 step_costs=costs)
    assert s == joint([0, 1, 2], [2, 1, 1]) and type(s.cache_branch) is int
    assert all(type(v) is int for v in [*s.cache_intervals, *s.step_costs["full"], *s.step_costs["cached"]])


@pytest.mark.parametrize("field, value, message", [
    ("levels", [4.5, 6, 8], "levels must be whole numbers; got [4.5] in [4.5, 6, 8]"),
    ("levels", [True, 6, 8], "levels must be whole numbers; got [True] in [True, 6, 8]"),
    ("steps_per_stage", [1, 1.5, 1], "steps_per_stage must be whole numbers; got [1.5] in [1, 1.5, 1]"),
    ("levels_max", 16.5, "levels_max (H) must be a whole number ≥ 1; got 16.5"),
    ("levels_max", True, "levels_max (H) must be a whole number ≥ 1; got True"),
])
def test_fractions_and_booleans_stay_refused(field, value, message, tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({**GOOD, field: value}))
    with pytest.raises(ScheduleError) as err:
        Schedule.load(path)
    assert str(err.value) == f"schedule file {path}: {message}; fix the file, or use the schedule.json a fit run wrote"


# ---------------------------------------------------------------- the cache dimension and the MAC budget

# Hand-made table: 3 stages of 2 steps, H = 4; a full step costs 100 − 10·L MACs, a cached one 30 − 2·L.
COSTS = {"full": [100, 90, 80, 70, 60], "cached": [30, 28, 26, 24, 22]}
# Written by `Schedule.to_dict()` before the cache fields existed (a level-only fit run's schedule.json).
OLD_SCHEDULE = {
    "levels": [10, 6, 8], "levels_max": 16, "target_level": 8, "steps_per_stage": [1, 1, 1],
    "partition": {"timesteps": [999.0, 500.0, 0.0], "num_stages": 3, "num_train_timesteps": 1000,
                  "steps_per_stage": [1, 1, 1]},
    "store": "runs/x/store", "pruner": "obs", "metric": "ssim", "fitness": 0.75, "extra": {"generation": 3},
    "store_key": "abc123", "num_stages": 3,
}


def joint(levels, ks, budget=0.8, **kw):
    return Schedule(levels, 4, 2, [2, 2, 2], cache_intervals=ks, cache_branch=1, mac_budget=budget,
                    step_costs=COSTS, **kw)


def test_joint_schedules_meet_the_mac_budget_within_the_tolerance():
    s = joint([2, 2, 2], [1, 1, 1])
    assert s.caches is False and s.intervals == [1, 1, 1] and s.mac_fraction() == 0.8
    s = joint([0, 1, 2], [2, 1, 1])
    assert s.caches and s.mac_fraction() == 470 / 600
    # the level budget is not what binds a joint schedule: mean level 1 here, target 2
    assert joint([0, 0, 3], [1, 2, 1]).mac_fraction() == (200 + 130 + 140) / 600
    with pytest.raises(ScheduleError, match=r"misses the MAC budget: its trajectory costs 0.750000 of the dense "
                                            r"MACs, the budget is 0.8 ± 0.016667"):
        joint([0, 1, 3], [2, 1, 1])
    with pytest.raises(ScheduleError, match="misses the MAC budget"):
        joint([1, 2, 2], None)  # level-only under a MAC budget: 500 MACs


def test_joint_schedules_are_validated_field_by_field():
    cases = [
        (dict(cache_intervals=[2, 1]), "3 levels but 2 cache_intervals"),
        (dict(cache_intervals=[2, 0, 1]), "cache_intervals must be a list of whole numbers ≥ 1"),
        (dict(cache_intervals=[2, 1.5, 1]), "cache_intervals must be a list of whole numbers ≥ 1"),
        (dict(cache_intervals=[2, 1, 1], cache_branch=-1), "cache_branch must be a whole number ≥ 0"),
        (dict(mac_budget=1.5), r"mac_budget must be a number in \(0, 1\]"),
        (dict(mac_budget=True), r"mac_budget must be a number in \(0, 1\]"),
        (dict(step_costs={"full": [100, 90]}), "step_costs.full has the wrong shape for 3 stages and H = 4"),
        (dict(step_costs={"full": [100, 90, 95, 70, 60]}), "step_costs.full increases with the level"),
        (dict(step_costs={"full": [100, 90, 80, 70, 60.5]}), "step_costs.full must hold whole MAC counts"),
        (dict(step_costs={"ful": [100] * 5}), "step_costs must be an object with 'full'"),
        (dict(step_costs={"full": [[100, 90, 80, 70, 60]] * 2 + [[99, 90, 80, 70, 60]]}), "differs between stages"),
        (dict(step_costs={"full": COSTS["full"], "cached": [100, 95, 85, 75, 65]}), "cached exceeds"),
        (dict(cache_intervals=[2, 1, 1], step_costs={"full": COSTS["full"]}), "has no 'cached' table"),
    ]
    base = dict(cache_intervals=[2, 1, 1], cache_branch=1, mac_budget=0.8, step_costs=COSTS)
    for change, message in cases:
        with pytest.raises(ScheduleError, match=message):
            Schedule([0, 1, 2], 4, 2, [2, 2, 2], **{**base, **change})
    with pytest.raises(ScheduleError, match="budgeted in MACs: give mac_budget, step_costs"):
        Schedule([2, 2, 2], 4, 2, [2, 2, 2], cache_intervals=[2, 1, 1], cache_branch=1)
    with pytest.raises(ScheduleError, match="budgeted in MACs"):
        Schedule([0, 1, 2], 4, 2, [2, 2, 2], cache_intervals=[2, 1, 1], mac_budget=0.8, step_costs=COSTS)
    with pytest.raises(ScheduleError, match="mac_budget and step_costs go together"):
        Schedule([2, 2, 2], 4, 2, [2, 2, 2], mac_budget=0.8)
    with pytest.raises(ScheduleError, match="mac_budget and step_costs go together"):
        Schedule([2, 2, 2], 4, 2, [2, 2, 2], step_costs=COSTS)
    # k = 1 everywhere without a MAC budget is the level-only schedule, level budget and all
    assert Schedule([2, 2, 2], 4, 2, [2, 2, 2], cache_intervals=[1, 1, 1]).intervals == [1, 1, 1]
    with pytest.raises(ScheduleError, match="misses the budget"):
        Schedule([2, 2, 1], 4, 2, [2, 2, 2], cache_intervals=[1, 1, 1])


def test_old_schedule_files_load_unchanged(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(OLD_SCHEDULE))
    s = Schedule.load(path)
    assert (s.cache_intervals, s.cache_branch, s.mac_budget, s.step_costs, s.costs) == (None,) * 5
    assert s.intervals == [1, 1, 1] and not s.caches and s.mac_fraction() is None
    assert s.to_dict() == OLD_SCHEDULE  # written back byte-for-byte the same fields
    s.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == OLD_SCHEDULE
    bad = dict(OLD_SCHEDULE, levels=[10, 6, 9])  # and still refused by the exact level budget
    path.write_text(json.dumps(bad))
    with pytest.raises(ScheduleError, match="misses the budget"):
        Schedule.load(path)


def test_joint_schedule_round_trips_through_save_and_load(tmp_path):
    depth_costs = {"full": [100, 90, 80, 70, 60], "cached": [[30, 28, 26, 24, 22], [30, 30, 28, 28, 26],
                                                            [30, 29, 28, 27, 26]]}
    for s in (joint([0, 1, 2], [2, 1, 1], partition=OLD_SCHEDULE["partition"] | {"steps_per_stage": [2, 2, 2]}),
              Schedule([0, 1, 2], 4, 2, [2, 2, 2], cache_intervals=[2, 1, 1], cache_branch=3, mac_budget=0.78,
                       step_costs=depth_costs)):
        s.save(tmp_path / "s.json")
        back = Schedule.load(tmp_path / "s.json")
        assert back == s and back.to_dict() == s.to_dict()
        assert back.mac_fraction() == s.mac_fraction()
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["cache_intervals"] == [2, 1, 1] and data["cache_branch"] == 3 and data["mac_budget"] == 0.78
    data["cache_intervals"] = [2, 2, 1]  # 470 − 160 + 106 = 416 of 600: off the budget
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="schedule.*s.json: schedule .* misses the MAC budget"):
        Schedule.load(tmp_path / "s.json")
