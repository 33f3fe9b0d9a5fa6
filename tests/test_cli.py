"""The `diffes-pl` command: help for every subcommand, every shipped config parsed and instantiated
(offline, no weights loaded), and bad input refused at once with a one-line cause, no traceback and
no calibration started."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_instantiates(path, tmp_path, no_network, monkeypatch):
    from diffes_pl.cli import DiffESCLI
    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.pruners.base import Pruner
    from diffes_pl.search.module import DiffES

    text = path.read_text()
    assert text.splitlines()[0] == f"# diffes-pl fit --config configs/{path.name}"
    raw = yaml.safe_load(text)
    model_name, _, pruner_name = path.stem.partition("_")
    assert model_name in ("tiny", "dit", "sdxl", "flux") and pruner_name

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
    assert model.adapter is None  # no weights loaded by __init__
    assert dm.adapter is None and dm._rows is None  # no data read by __init__
    hp = model.hparams
    for key in ("denoiser", "target_level", "levels", "num_stages", "steps", "sampler", "guidance", "offspring",
                "survivors"):
        if key in raw["model"]:
            assert hp[key] == raw["model"][key], key
    assert 0 < hp.target_level <= hp.levels
    assert isinstance(model.pruner, Pruner)
    if pruner_name == "obsdiff":  # the OBS-Diff baseline: OBS, one stage, sequential timestep-weighted calibration
        assert model.pruner.passes > 1 and model.pruner.hparams.timestep_weighting and hp.num_stages == 1
        pruner_name = "obs"
    assert model.pruner.name == pruner_name
    assert type(model.pruner).__name__ == raw["model"]["pruner"]["class_path"].rsplit(".", 1)[1]
    for key, value in (raw["model"]["pruner"].get("init_args") or {}).items():
        assert model.pruner.hparams[key] == value
    assert model.pruner.depth == (pruner_name == "depth")
    assert model.pruner.compensated == (pruner_name == "obs")
    if model_name == "tiny":
        assert hp.denoiser == "tiny-digits" and dm.source == "digits"
    else:
        family = {"dit": "DiT", "sdxl": "stable-diffusion-xl", "flux": "FLUX"}[model_name]
        assert family in hp.denoiser and dm.source != "digits"
    if model_name in ("sdxl", "flux"):  # text-conditioned: captions and probe prompts, no labels
        assert dm.caption_column and dm.label_column is None and hp.prompts
    for key, value in (raw.get("data") or {}).items():
        assert getattr(dm, key) == value, key
    assert cli.trainer.max_epochs == raw["trainer"]["max_epochs"]
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    for cb in raw["trainer"].get("callbacks") or []:
        assert cb["class_path"].rsplit(".", 1)[1] in callbacks
    assert not (tmp_path / "run").exists()  # nothing written before a subcommand runs

    if model_name == "tiny":  # the built-in weights ship with the package: the budget must be reachable
        model.load()
        assert model.levels_max == hp.levels
        assert model.partition.num_stages == hp.num_stages


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
