"""Reliability, parametrized by fault: every bad setting, file or combination that can be checked
without the denoiser is refused before it loads — in one line naming the cause and the fix, exit
code 2, no folder created and nothing already written changed. (Damaged files: test_integrity.py;
kills and signals: test_interrupts.py and search/test_resume.py.)

The CLI runs in this process (`diffes_pl.cli.main`) with the denoiser's loaders replaced by one that
fails the test: a refusal that comes after loading is a failure, whatever its message."""
import json
from pathlib import Path

import pytest

from helpers.search_runs import SMALL

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny_obs.yaml")


class Loaded(AssertionError):
    """The denoiser was loaded before the refusal."""


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the denoiser fails the test: the run's loader, and the built-in model's weights on any
    other path (building its architecture, as the checks do, stays allowed)."""
    import diffes_pl.denoisers.tiny as tiny
    import diffes_pl.search.builder as builder

    def refuse(*args, **kwargs):
        raise Loaded(f"the denoiser was loaded ({args[:1]}) before the refusal")

    build = tiny.build_tiny_dit
    monkeypatch.setattr(builder, "load_denoiser", refuse)
    monkeypatch.setattr(tiny, "build_tiny_dit", lambda weights=True: refuse() if weights else build(weights=False))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


def _refused(capfd, args: list[str]) -> str:
    """Runs the CLI; returns its one error line (exit code 2, no traceback)."""
    from diffes_pl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capfd.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("diffes-pl: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# name: (extra arguments, what the line says)
BAD_SETTINGS = {
    "no stages": (["--model.num_stages", "0"], "cannot cut 20 sampling steps into 0 stages"),
    "more stages than steps": (["--model.num_stages", "30"], "cannot cut 20 sampling steps into 30 stages"),
    "target above H (H from the model)": (["--model.levels", "null", "--model.target_level", "9"],
                                          "target level 9.0 outside [0, 8]"),
    "target above H (H given)": (["--model.target_level", "9"], "target_level 9.0 is above H = 8"),
    "target no schedule meets": (["--model.target_level", "4.33"], "no schedule meets target level 4.33"),
    "negative probes": (["--model.num_probes", "-1"], "num_probes must be ≥ 1 (got -1)"),
    "unknown metric": (["--model.metric", "sharpness"], "unknown fitness metric 'sharpness'"),
    "unknown sampler": (["--model.sampler", "heun9"], "heun9"),
    "cache branch outside the blocks": (["--model.cache_intervals", "[1, 2]", "--model.cache_branch", "99"],
                                        "cache_branch 99 is outside [0, "),
    "unknown model": (["--model.denoiser", "nope"], "unknown denoiser 'nope'"),
    "missing folder": (["--model.denoiser", "./missing-folder"], "missing-folder"),
    "hub id not in the local cache": (["--model.denoiser", "facebook/DiT-XL-2-512"],
                                      "could not load 'facebook/DiT-XL-2-512': it is not in the local Hugging Face cache"),
    "calibration dataset not in the cache": (["--data.source", "someone/no-such-dataset"],
                                             "could not load the Hugging Face dataset 'someone/no-such-dataset'"),
    "calibration folder missing": (["--data.source", "./no-such-images"], "calibration source ./no-such-images"),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_setting_refused_before_the_model_loads(name, tmp_path, capfd, no_loading):
    extra, cause = BAD_SETTINGS[name]
    run = tmp_path / "run"
    line = _refused(capfd, ["fit", "--config", CONFIG, "--trainer.default_root_dir", str(run), *extra])
    assert cause in line, line
    assert not run.exists()  # no run folder, no store folder


@pytest.mark.parametrize("content", ["", "\n# only a comment\n"], ids=["empty", "comment-only"])
def test_empty_config_named_as_empty(content, tmp_path, capfd, no_loading):
    config = tmp_path / "empty.yaml"
    config.write_text(content)
    line = _refused(capfd, ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert str(config) in line and "empty" in line, line
    assert not (tmp_path / "run").exists()


def test_missing_config_named(tmp_path, capfd, no_loading):
    config = tmp_path / "nope.yaml"
    line = _refused(capfd, ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert str(config) in line and "does not exist" in line, line
    assert not (tmp_path / "run").exists()


# --- a store and a finished run in the way -------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished 1-generation small search (store, schedule.json, checkpoint) to refuse runs against."""
    import subprocess

    from helpers.search_runs import ENV, fit_command

    run = tmp_path_factory.mktemp("reliability") / "run"
    out = subprocess.run(fit_command(run, 1), env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def _small(run: Path, *extra: str) -> list[str]:
    return ["fit", "--config", CONFIG, *SMALL, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run),
            *extra]


STORE_IN_THE_WAY = {
    # another partition on the same store: refused from its manifest
    "other stages": (["--model.num_stages", "2"], "has H = 8 and 4 stages; this run needs H = 8 and 2 stages"),
    # same stages and H, other calibration: the key differs
    "other calibration": (["--data.seed", "7"], "was built for other settings"),
}


@pytest.mark.parametrize("name", list(STORE_IN_THE_WAY))
def test_store_in_the_way_refused_before_the_model_loads(name, small_run, tmp_path, capfd, no_loading):
    extra, cause = STORE_IN_THE_WAY[name]
    run = tmp_path / "new"
    before = _snapshot(small_run)
    line = _refused(capfd, _small(run, "--model.store", str(small_run / "store"), *extra))
    assert cause in line, line
    assert not run.exists() and _snapshot(small_run) == before


def test_overwrite_refused_keeps_the_old_search(small_run, capfd, no_loading):
    """--overwrite true with settings the store refuses: refused before the old search is removed."""
    before = _snapshot(small_run)
    line = _refused(capfd, _small(small_run, "--overwrite", "true", "--data.seed", "7"))
    assert "was built for other settings" in line, line
    assert _snapshot(small_run) == before


def test_resume_with_changed_settings_refused_before_the_model_loads(small_run, capfd, no_loading):
    before = _snapshot(small_run)
    line = _refused(capfd, _small(small_run, "--ckpt_path", "last", "--trainer.max_epochs", "2",
                                   "--model.offspring", "5"))
    assert "search settings changed" in line and "offspring: 6 → 5" in line, line
    assert _snapshot(small_run) == before


# --- `diffes-pl test`: the schedule against the run's partition and store -------------------------------

def _schedule(run: Path, **changes) -> dict:
    return {**json.loads((run / "schedule.json").read_text()), **changes}


BAD_SCHEDULES = {
    "another partition": (lambda s: {"levels": [4] * 5, "steps_per_stage": [4] * 5, "partition": None,
                                     "store": None, "store_key": None},
                          "the schedule has 5 stages but the store at"),
    "another store": (lambda s: {"store": None, "store_key": "0" * 64}, "which is gone; the configured store"),
    "another H": (lambda s: {"levels_max": 16, "levels": [2 * level for level in s["levels"]],
                             "target_level": 2 * s["target_level"]}, "differs from the store's H = 8"),
    "another pruner": (lambda s: {"pruner": "obs"}, "searched with the 'obs' pruner"),
    "levels above H": (lambda s: {"levels": [9] + s["levels"][1:]}, "outside [0, 8]"),
}


@pytest.mark.parametrize("name", list(BAD_SCHEDULES))
def test_schedule_refused_by_test_before_the_model_loads(name, small_run, tmp_path, capfd, no_loading):
    change, cause = BAD_SCHEDULES[name]
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    path = folder / "schedule.json"
    original = json.loads((small_run / "schedule.json").read_text())
    path.write_text(json.dumps({**original, **change(original)}))
    before = _snapshot(small_run)
    line = _refused(capfd, ["test", "--config", CONFIG, *SMALL, "--trainer.default_root_dir", str(small_run),
                             "--schedule", str(path), "--model.store", str(small_run / "store")])
    assert cause in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["schedule.json"]  # no eval/, no evaluation.json
    assert _snapshot(small_run) == before
