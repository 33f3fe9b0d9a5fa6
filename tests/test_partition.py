"""StagePartition: a sampler's timesteps cut into stages of whole steps (front-loaded when uneven)."""
import pytest

from diffes_pl.partition import StagePartition, split_steps

DDIM20 = [999, 946, 894, 841, 789, 736, 684, 631, 578, 526, 473, 421, 368, 315, 263, 210, 158, 105, 53, 0]


def test_dit_ddim20_timesteps_and_stages():
    from diffes_pl.denoisers.dit_adapter import DiTAdapter, DIT_NOISE_SCHEDULE  # noqa: F401
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
