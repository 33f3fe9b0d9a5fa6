"""Ctrl-C (SIGINT) stops a run as SIGTERM (a cluster's preemption) does: the search between two
rollouts with the checkpoint of its last finished generation, calibration at the next batch keeping its
finished stages, one line on stderr saying where the checkpoint (or the kept stages) is and how to resume
(or that nothing is resumable), exit code 128 + the signal (130, 143); the resumed search ends byte for
byte as an uninterrupted one (a resumed calibration too: tests/pruners/test_calibration_resume.py)."""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.search_runs import ENV, ROOT, SMALL, fit_command

GENERATIONS = 8
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted search; its store (beside it) serves every run here, so schedule.json, which
    names the store, is the same file in all of them."""
    root = tmp_path_factory.mktemp("interrupts")
    out = subprocess.run(fit_command(root / "straight", GENERATIONS, "--model.store", str(root / "store")),
                         check=False, env=ENV, capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return root / "straight"


def start(cmd: list[str], folder: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Runs `cmd` with its output in files (a pipe nobody reads could fill and stall it)."""
    folder.mkdir(parents=True, exist_ok=True)
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    with out.open("w") as o, err.open("w") as e:
        return subprocess.Popen(cmd, env=ENV, stdout=o, stderr=e, cwd=folder), out, err


def signal_when(proc: subprocess.Popen, ready: Path, sig: signal.Signals) -> None:
    deadline = time.time() + 300
    while not ready.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {ready} existed"
        assert time.time() < deadline, f"no {ready} after 300 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=120)


def stop_line(err: Path) -> str:
    text = err.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "Received SIGTERM: 2" not in text, text[-3000:]  # Lightning's log of the handler SIGINT goes through
    return text.strip().splitlines()[-1]


@SIGNALS
def test_a_stopped_search_resumes_exactly(straight, tmp_path, sig):
    """Stopped once a checkpoint exists and before the last generation: exit 128 + signal, the line
    naming the checkpoint; `--ckpt_path last` then ends with the uninterrupted run's files, byte for byte."""
    run = tmp_path / "run"
    store = ["--model.store", str(straight.parent / "store")]
    proc, out, err = start(fit_command(run, GENERATIONS, *store), tmp_path / "logs")
    ckpt = run / "checkpoints" / "last.ckpt"
    signal_when(proc, ckpt, sig)
    assert proc.returncode == 128 + sig, err.read_text()[-3000:]
    done = len(torch.load(ckpt, weights_only=False)["diffes"]["nfe_history"])
    assert 1 <= done <= GENERATIONS - 1, "the signal must strike mid-search"
    assert stop_line(err) == (f"diffes-pl: stopped by {sig.name} after generation {done}; {ckpt} holds it: "
                              "resume with --ckpt_path last")
    assert "reusing it" in out.read_text()  # the prebuilt store: the signal struck the search
    resumed = subprocess.run(fit_command(run, GENERATIONS, *store, "--ckpt_path", "last"), env=ENV,
                             check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"{done} of {GENERATIONS} generations done, continuing at generation {done + 1}" in resumed.stdout
    for name in ("schedule.json", "evaluations.jsonl"):
        assert (run / name).read_bytes() == (straight / name).read_bytes(), name


@SIGNALS
def test_calibration_stops_at_the_next_batch_keeping_finished_stages(tmp_path, sig):
    """`diffes-pl predict` signalled once stage 0 is recorded stops at the next calibration batch of stage 1
    (abandoned): stage 0 kept in the partial folder, no store, exit 128 + signal, the line saying where a
    rerun resumes."""
    run = tmp_path / "run"
    # 128 calibration batches per stage: a stage lasts long enough to be signalled in
    cmd = [sys.executable, "-m", "diffes_pl.cli", "predict", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL,
           "--data.nsamples", "512", "--trainer.default_root_dir", str(run)]
    proc, out, err = start(cmd, tmp_path / "logs")
    partial = run / ".store.partial"
    signal_when(proc, partial / "progress.json", sig)  # stage 0 written and recorded
    assert proc.returncode == 128 + sig, err.read_text()[-3000:]
    assert stop_line(err) == (f"diffes-pl: stopped by {sig.name} during `predict`; calibration stage 0 of 4 kept in "
                              f"{partial}: run the command again to resume at stage 1")
    assert sorted(p.name for p in run.iterdir()) == [".store.partial", "config.yaml"]  # no store, no lock
    assert sorted(p.name for p in partial.iterdir()) == ["progress.json", "stage_00.safetensors"]
    stages = re.findall(r"calibration, stage (\d+) .* (\d+)/(\d+)", out.read_text())
    assert stages == [("0", "128", "128")], stages  # stage 0 finished; stage 1 abandoned before its end
