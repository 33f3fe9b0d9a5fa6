"""The `diffes-pl` command: help for every subcommand, every shipped config parsed and instantiated
(offline, no weights loaded), and bad input refused at once with a one-line cause, no traceback and
no calibration started."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.search_runs import SMALL

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Startup (imports) takes a few seconds on a busy 2-core machine; bad input must be refused before
# any calibration, which on these configs would take far longer than this.
FAST = 60.0


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    for var in ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "diffes-pl"
    if not script.exists():
        found = shutil.which("diffes-pl")
        assert found, "the console script diffes-pl is not installed (pip install -e .)"
        script = Path(found)
    return [str(script)]


def _run(cmd: list[str], timeout: float = 80) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


# --- help -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", [[], ["fit"], ["predict"], ["test"]], ids=["top", "fit", "predict", "test"])
def test_help_console_script(sub):
    proc, _ = _run(_console_script() + sub + ["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    if not sub:
        for name in ("fit", "predict", "test"):
            assert name in proc.stdout
    else:
        assert "--model.denoiser" in proc.stdout and "--data.nsamples" in proc.stdout
        assert "--model.pruner" in proc.stdout


def test_help_python_module():
    proc, _ = _run([sys.executable, "-m", "diffes_pl.cli", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "predict" in proc.stdout


# --- every shipped config ---------------------------------------------------------------------------

def _metric_available(name: str) -> bool:
    from diffes_pl.fitness import get_metric

    try:
        get_metric(name)
        return True
    except (ImportError, FileNotFoundError):  # pyiqa or its cached weights are missing here
        return False


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_instantiates(path, tmp_path, no_network, monkeypatch):
    from diffes_pl.cli import DiffESCLI
    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.denoisers import check_name, families
    from diffes_pl.pruners.base import Pruner
    from diffes_pl.search.lightning_module import DiffES

    text = path.read_text()
    assert text.splitlines()[0] == f"# diffes-pl fit --config configs/{path.name}"
    raw = yaml.safe_load(text)
    model_name, _, pruner_name = path.stem.partition("_")
    assert model_name in families() and pruner_name  # `<family>_<pruner>.yaml`

    args = ["--config", str(path), "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    metric = raw["model"].get("metric", "ssim")
    if not _metric_available(metric):
        args.append("--model.metric=ssim")  # the config is still parsed as written; only the metric is swapped
    monkeypatch.setattr(sys, "argv", ["diffes-pl"])  # pytest's own arguments are not the CLI's
    start = time.monotonic()
    # run=False: LightningCLI builds the parser without subcommands, so no "fit" here.
    cli = DiffESCLI(args=args, run=False)
    assert time.monotonic() - start < 20, "instantiating a config must not load weights or data"

    model, dm = cli.model, cli.datamodule
    assert isinstance(model, DiffES) and isinstance(dm, CalibrationDataModule)
    assert model.context is None and model.search is None  # no weights loaded by __init__
    assert dm.adapter is None and dm._rows is None  # no data read by __init__
    hp = model.hparams
    for key in ("denoiser", "target_level", "levels", "num_stages", "steps", "sampler", "guidance", "offspring",
                "survivors"):
        if key in raw["model"]:
            assert hp[key] == raw["model"][key], key
    assert 0 < hp.target_level <= hp.levels
    assert isinstance(model.pruner, Pruner)
    pruner_name, _, granularity = pruner_name.partition("_")  # `_2of4` / `_unstructured`: single weights
    if granularity:  # level 2 of 4 is 2:4; unstructured removes target/H of each layer's weights (half)
        kind = {"2of4": "n:m", "unstructured": "unstructured"}[granularity]
        assert model.pruner.granularity.kind == kind and hp.target_level / hp.levels == 0.5
        assert granularity == "unstructured" or (model.pruner.granularity.m, hp.levels, hp.target_level) == (4, 4, 2)
    if pruner_name == "obsdiff":  # the OBS-Diff baseline: OBS, one stage, sequential timestep-weighted calibration
        assert model.pruner.passes > 1 and model.pruner.hparams.timestep_weighting and hp.num_stages == 1
        pruner_name = "obs"
    if pruner_name == "joint":  # the joint search (a level and a cache interval per stage) over OBS
        assert hp.cache_intervals and 1 in hp.cache_intervals and 0 < hp.mac_budget <= 1
        pruner_name = "obs"
    assert model.pruner.name == pruner_name + ("_sparse" if granularity else "")
    assert type(model.pruner).__name__ == raw["model"]["pruner"]["class_path"].rsplit(".", 1)[1]
    for key, value in (raw["model"]["pruner"].get("init_args") or {}).items():
        assert model.pruner.hparams[key] == value
    assert model.pruner.depth == (pruner_name == "depth")
    assert model.pruner.compensated == (pruner_name == "obs")
    family = check_name(hp.denoiser).family
    assert family.name == model_name  # the config's denoiser is of the family its name says
    assert (dm.source == "digits") == (model_name == "tiny")
    if family.conditioning == "text":  # text-conditioned: captions and probe prompts, no labels
        assert dm.caption_column and dm.label_column is None and hp.prompts
    for key, value in (raw.get("data") or {}).items():
        assert getattr(dm, key) == value, key
    assert cli.trainer.max_epochs == raw["trainer"]["max_epochs"]
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    for cb in raw["trainer"].get("callbacks") or []:
        assert cb["class_path"].rsplit(".", 1)[1] in callbacks
    assert not (tmp_path / "run").exists()  # nothing written before a subcommand runs

    if model_name == "tiny":  # the built-in weights ship with the package: the budget must be reachable
        context = model.prepare(tmp_path / "run")
        assert context.levels_max == hp.levels
        assert context.partition.num_stages == hp.num_stages


# --- bad input ---------------------------------------------------------------------------------------

BAD = {
    "unknown-model": (["--model.denoiser", "nope"], ["unknown denoiser", "nope"]),
    "missing-folder": (["--model.denoiser", "./missing-folder"], ["missing-folder", "does not exist"]),
    "target-above-H": (["--model.target_level", "9"], ["target_level", "H = 8"]),
    "unknown-metric": (["--model.metric", "foo"], ["unknown fitness metric", "foo"]),
    "infeasible-budget": (["--model.target_level", "4.33"], ["no schedule meets target level 4.33", "1/20"]),
    "no-probes": (["--model.num_probes", "0"], ["num_probes"]),
    "no-samples": (["--data.nsamples", "0"], ["nsamples"]),
}


def _assert_refused(proc, elapsed, root, causes):
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    for cause in causes:
        assert cause in proc.stderr, (cause, proc.stderr[-2000:])
    assert "Traceback" not in output, output[-3000:]
    assert elapsed < FAST, f"took {elapsed:.0f} s: bad input must be refused before any work"
    assert "calibration:" not in output
    assert not (root / "store").exists() and not (root / ".store.partial").exists()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_refused(name, tmp_path):
    extra, causes = BAD[name]
    root = tmp_path / "run"
    proc, elapsed = _run(_console_script() + ["fit", "--config", "configs/tiny_obs.yaml",
                                              "--trainer.default_root_dir", str(root)] + extra)
    _assert_refused(proc, elapsed, root, causes)


def test_unknown_config_key_refused(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "tiny_obs.yaml").read_text())
    raw["model"]["nonexistent"] = 1
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    root = tmp_path / "run"
    proc, elapsed = _run(_console_script() + ["fit", "--config", str(config), "--trainer.default_root_dir", str(root)])
    _assert_refused(proc, elapsed, root, ["nonexistent"])


@pytest.mark.parametrize("config, value, cause", [
    ("tiny_joint.yaml", "1.5", r"interval_rate must be a probability in [0, 1]"),
    ("tiny_obs.yaml", "0.2", "interval_rate belong to the joint search: set cache_intervals"),
])
def test_bad_interval_rate_refused(config, value, cause, tmp_path):
    root = tmp_path / "run"
    proc, elapsed = _run(_console_script() + ["fit", "--config", f"configs/{config}", "--trainer.default_root_dir",
                                              str(root), "--model.interval_rate", value])
    _assert_refused(proc, elapsed, root, [cause])


def test_fit_help_documents_the_interval_rate_and_its_default():
    proc, _ = _run(_console_script() + ["fit", "--help"])
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    text = text.replace("single- stage", "single-stage")  # argparse wraps at the hyphen
    assert "--model.interval_rate" in text and "None (default): every single-stage move equally likely" in text


# --- help says what diffes-pl does --------------------------------------------------------------------

HELP = {"fit": "then search for the best schedule", "predict": "Calibrate and build the trajectory store",
        "test": "Evaluate a schedule"}
LIGHTNING_HELP = ("Runs the full optimization routine", "Run inference on your data", "Perform one evaluation epoch")


def test_top_help_describes_subcommands():
    proc, _ = _run(_console_script() + ["--help"])
    assert proc.returncode == 0, proc.stderr
    for text in HELP.values():
        assert text in " ".join(proc.stdout.split()), text
    assert not any(text in proc.stdout for text in LIGHTNING_HELP)


@pytest.mark.parametrize("sub", list(HELP))
def test_subcommand_help_describes_it_and_hides_optimizers(sub):
    proc, _ = _run(_console_script() + [sub, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert HELP[sub] in " ".join(proc.stdout.split())
    assert not any(text in proc.stdout for text in LIGHTNING_HELP)
    for option in ("--optimizer", "--lr_scheduler", "--return_predictions", "--verbose"):
        assert option not in proc.stdout, option
    assert ("--ckpt_path" in proc.stdout) == (sub == "fit")  # only a search resumes from a checkpoint
    if sub == "fit":
        assert "--ckpt_path last" in proc.stdout


# --- bad input: one line naming the file, the cause and the fix ---------------------------------------

def _error_line(proc) -> str:
    """The one `diffes-pl: error:` line; no usage dump, no traceback, exit code 2."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "usage:" not in output, output[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("diffes-pl: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    lines = (ROOT / "configs" / "tiny_obs.yaml").read_text().splitlines()
    at = lines.index("  max_move: 3")
    lines[at] = "  max_move: [3"  # an unclosed flow sequence
    config = tmp_path / "broken.yaml"
    config.write_text("\n".join(lines) + "\n")
    proc, elapsed = _run(_console_script() + ["fit", "--config", str(config),
                                              "--trainer.default_root_dir", str(tmp_path / "run")])
    line = _error_line(proc)
    assert str(config) in line and "not valid YAML" in line and "<unicode string>" not in line
    assert f"line {at + 2}" in line and "fix the YAML" in line  # the error shows where the sequence broke
    assert elapsed < FAST and not (tmp_path / "run").exists()


EMPTY = ("the config file is empty; write its settings in it (model:, data:, trainer:; start from "
         "configs/tiny_obs.yaml), or leave out --config")


@pytest.mark.parametrize("text, cause", [
    ("", EMPTY),
    ("# settings to come\n\n", EMPTY),
    ("- model\n- data\n", "the config file holds a YAML list, not settings (model:, data:, trainer:); write them as "
                          "a mapping, as configs/tiny_obs.yaml does"),
    (None, "the config file does not exist; check the path (the shipped configs are in configs/, e.g. "
           "configs/tiny_obs.yaml)"),
], ids=["empty", "comments-only", "a-list", "missing"])
def test_config_file_without_settings_is_one_line(text, cause, tmp_path):
    config = tmp_path / "config.yaml"
    if text is not None:
        config.write_text(text)
    proc, elapsed = _run(_console_script() + ["fit", "--config", str(config),
                                              "--trainer.default_root_dir", str(tmp_path / "run")])
    assert _error_line(proc) == f"diffes-pl: error: {config}: {cause}"
    assert elapsed < FAST and not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["command-line", "config-file"])
def test_config_value_of_wrong_type_is_one_line(where, tmp_path):
    args = ["fit", "--config", "configs/tiny_obs.yaml", "--trainer.default_root_dir", str(tmp_path / "run")]
    if where == "command-line":
        args += ["--model.levels", "8.5"]
    else:
        override = tmp_path / "levels.yaml"
        override.write_text("model:\n  levels: 8.5\n")
        args += ["--config", str(override)]
    proc, _ = _run(_console_script() + args)
    line = _error_line(proc)
    assert "model.levels: expected int or null, got 8.5" in line and "diffes-pl fit --help" in line
    if where == "config-file":
        assert str(tmp_path / "levels.yaml") in line
    assert not (tmp_path / "run").exists()


SCHEDULE = {"levels": [4, 4, 4, 4], "levels_max": 8, "target_level": 4, "steps_per_stage": [2, 2, 2, 2]}


@pytest.mark.parametrize("name,text,cause", [
    ("float-levels", json.dumps({**SCHEDULE, "levels": [6.9, 1.1, 4, 4]}), "levels must be whole numbers"),
    ("null-levels", json.dumps({**SCHEDULE, "levels": None}), "levels must be a list"),
    ("string-H", json.dumps({**SCHEDULE, "levels_max": "8"}), "levels_max (H) must be a whole number"),
    ("not-json", '{\n  "levels": [4, 4, 4, 4],\n  oops\n}\n', "is not valid JSON"),
])
def test_bad_schedule_file_refused_by_test(name, text, cause, tmp_path):
    schedule = tmp_path / "schedule.json"
    schedule.write_text(text)
    proc, elapsed = _run(_console_script() + ["test", "--config", "configs/tiny_obs.yaml", "--schedule", str(schedule),
                                              "--trainer.default_root_dir", str(tmp_path / "run")])
    line = _error_line(proc)
    assert str(schedule) in line and cause in line, line
    if name == "not-json":
        assert "line 3" in line
    assert elapsed < FAST and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("option", ["--trainer.default_root_dir", "--model.store"])
def test_unwritable_folder_refused_before_work(option, tmp_path):
    # root ignores permission bits, so the folder cannot be created because its parent is a file
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["fit", "--config", "configs/tiny_obs.yaml", option, str(blocker / "run")]
    if option == "--model.store":
        args += ["--trainer.default_root_dir", str(tmp_path / "run")]
    proc, elapsed = _run(_console_script() + args)
    line = _error_line(proc)
    assert str(blocker / "run") in line and "is a file, not a folder" in line and f"choose another {option}" in line
    assert elapsed < FAST and "Seed set" not in proc.stderr  # refused before anything was built
    assert not (tmp_path / "run").exists()


def test_read_only_folder_refused(tmp_path, monkeypatch):
    from diffes_pl import io

    monkeypatch.setattr(io.os, "access", lambda path, mode: False)  # what a non-root user meets on 0o555
    with pytest.raises(io.FolderNotWritable, match=r"run folder .*/run cannot be created: .* is not writable; "
                                                   r"make it writable or choose another --trainer"):
        io.check_writable(tmp_path / "run", "run folder", "--trainer.default_root_dir")
    with pytest.raises(io.FolderNotWritable, match="is not writable; make it writable"):
        io.check_writable(tmp_path, "run folder", "--trainer.default_root_dir")
    monkeypatch.undo()
    io.check_writable(tmp_path / "new" / "run", "run folder", "--trainer.default_root_dir")
    assert not (tmp_path / "new").exists()  # checking creates nothing


# --- progress display off -------------------------------------------------------------------------------

def test_progress_bar_can_be_disabled(tmp_path):
    root = tmp_path / "run"
    proc, _ = _run(_console_script() + ["fit", "--config", "configs/tiny_obs.yaml", *SMALL, "--trainer.max_epochs", "1",
                                        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
                                        "false"], timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert (root / "schedule.json").is_file()
    assert "━" not in output and "search, generation" not in output and "calibration, stage" not in output
