"""`model.sparsity`: the budget as the fraction of prunable units removed, target_level / H — the
same run as the equivalent target_level, refused when both are given and disagree, or out of [0, 1]."""
import logging
import sys
from pathlib import Path

import pytest

from diffes_pl.errors import ScheduleError
from diffes_pl.search.builder import plan_run
from diffes_pl.search.lightning_module import DiffES
from diffes_pl.search.settings import DEFAULT_TARGET_LEVEL, SearchSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/tiny_obs.yaml")


@pytest.mark.parametrize("sparsity, levels, level", [(0.5, 8, 4), (0.25, 8, 2), (0.3, 16, 4.8), (0, 8, 0), (1, 10, 10)])
def test_sparsity_is_target_level_over_H(sparsity, levels, level):
    assert SearchSettings(sparsity=sparsity, levels=levels).target_level_for(levels) == level
    assert SearchSettings(sparsity=sparsity, target_level=level, levels=levels).target_level_for(levels) == level


def test_neither_given_is_the_old_default_and_is_recorded_as_such():
    """Checkpoints written before `sparsity` existed hold target_level 4: a run with neither records
    the same, so it resumes them."""
    assert SearchSettings().target_level_for(8) == DEFAULT_TARGET_LEVEL == 4
    module = DiffES(levels=8, num_stages=4, steps=8, num_probes=4)
    assert module.hparams.target_level == 4 and module.hparams.sparsity is None
    module = DiffES(sparsity=0.5, levels=8, num_stages=4, steps=8, num_probes=4)
    assert module.hparams.target_level is None and module.hparams.sparsity == 0.5


@pytest.mark.parametrize("depth, H", [(False, 8), (True, 6)])
def test_sparsity_resolves_to_the_same_plan_as_target_level_with_H_from_the_model(depth, H):
    """With `levels` unset H comes from the denoiser's config (8 heads, or 6 blocks for depth pruning):
    the sparsity is converted where the target is checked, before anything loads."""
    by_level = plan_run(SearchSettings(target_level=H / 2, levels=None), depth=depth)
    by_sparsity = plan_run(SearchSettings(sparsity=0.5, levels=None), depth=depth)
    assert by_level.levels_max == by_sparsity.levels_max == H
    assert by_level.target_level == by_sparsity.target_level == H / 2
    assert by_level.partition.steps_per_stage == by_sparsity.partition.steps_per_stage


def test_run_context_carries_the_resolved_level(tmp_path):
    module = DiffES(sparsity=0.25, levels=None, num_stages=4, steps=8, num_probes=4)
    context = module.prepare(tmp_path / "run")
    assert (context.levels_max, context.target_level) == (8, 2.0)


def test_disagreement_refused_at_once_when_H_is_given():
    with pytest.raises(ValueError) as err:
        SearchSettings(sparsity=0.25, target_level=4, levels=8)
    message = str(err.value)
    assert "model.sparsity 0.25 is target_level 2 of H = 8" in message
    assert "model.target_level is 4 (sparsity 0.5)" in message and "--model.target_level null" in message


def test_disagreement_refused_at_the_plan_when_H_comes_from_the_model():
    settings = SearchSettings(sparsity=0.25, target_level=4, levels=None)  # H unknown: nothing to compare yet
    with pytest.raises(ValueError, match="model.sparsity 0.25 is target_level 2 of H = 8"):
        plan_run(settings)


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "half"])
def test_sparsity_outside_zero_one_refused(bad):
    with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\]"):
        SearchSettings(sparsity=bad)


def test_sparsity_no_schedule_meets_names_the_nearest_that_work():
    """0.333 of H = 8 over 10 stages of 2 steps asks Σ levels·steps = 53.28; schedules reach the even
    totals only (every stage has 2 steps): 52 and 54, sparsity 0.325 and 0.3375, are named — and work."""
    with pytest.raises(ScheduleError) as err:
        plan_run(SearchSettings(sparsity=0.333, levels=None))
    assert "model.sparsity 0.333 is target level 2.664 of H = 8" in str(err.value)
    assert "choose sparsity 0.325 or sparsity 0.3375" in str(err.value)
    assert plan_run(SearchSettings(sparsity=0.325, levels=None)).target_level == 2.6
    assert plan_run(SearchSettings(sparsity=0.3375, levels=None)).target_level == 2.7
    with pytest.raises(ScheduleError, match="choose sparsity 0.325 or sparsity 0.3375"):
        plan_run(SearchSettings(sparsity=0.33125, levels=None))  # 53: a multiple of 1/160, yet odd


def test_nearest_budget_is_named_as_a_target_level_when_its_sparsity_has_no_exact_decimal():
    """H = 6 blocks (depth), 20 steps in 10 stages: 1/3 is typed 0.333; the nearest totals are 38 and 40,
    sparsity 19/60 (no exact decimal: named as target_level 1.9) and 1/3 (target_level 2)."""
    with pytest.raises(ScheduleError) as err:
        plan_run(SearchSettings(sparsity=0.333, levels=None), depth=True)
    assert "choose target_level 1.9 (sparsity 0.3167) or target_level 2.0 (sparsity 0.3333)" in str(err.value)


def _cli_error(capfd, args: list[str]) -> str:
    """Runs the CLI in this process; returns its one error line (exit code 2)."""
    from diffes_pl.cli import main

    for logger in [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                          if isinstance(v, logging.Logger))]:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # bound to an earlier test's captured stream
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capfd.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("diffes-pl: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_cli_accepts_sparsity_in_place_of_target_level(tmp_path):
    from diffes_pl.cli import DiffESCLI

    cli = DiffESCLI(args=["--config", CONFIG, "--model.target_level", "null", "--model.sparsity", "0.5",
                          "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    assert cli.model.check_run(tmp_path / "run").target_level == 4.0
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, says", [
    (["--model.sparsity", "0.25"], "model.sparsity 0.25 is target_level 2 of H = 8, but model.target_level is 4"),
    (["--model.target_level", "null", "--model.sparsity", "1.5"], "sparsity must be a fraction in [0, 1]"),
])
def test_cli_refuses_in_one_line_before_any_folder(extra, says, tmp_path, capfd):
    run = tmp_path / "run"
    line = _cli_error(capfd, ["fit", "--config", CONFIG, "--trainer.default_root_dir", str(run), *extra])
    assert says in line, line
    assert not run.exists()
