"""A run folder is protected: a finished search is not overwritten by accident, two runs never
share a folder, a resume starts only from a readable checkpoint of the same search — each refusal
one line, exit code 2, before any work, and the folder left as it was."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from diffes_pl.locks import exclusive

from helpers.search_runs import ENV, fit_command


def run_fit(run: Path, *extra: str, epochs: int = 2) -> subprocess.CompletedProcess:
    run.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(fit_command(run, epochs, *extra), env=ENV, capture_output=True, text=True, timeout=600,
                          cwd=run.parent)


def refused(out: subprocess.CompletedProcess, *phrases: str) -> str:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("diffes-pl: error:"), out.stderr[-2000:]
    for phrase in phrases:
        assert phrase in line, line
    return line


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and ".diffes-pl.lock" not in p.name}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    out = run_fit(run)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_a_new_fit_over_a_finished_search_is_refused(copy):
    before = snapshot(copy)
    line = refused(run_fit(copy), "already holds a finished search (2 generations)", "--ckpt_path last",
                   "--overwrite true")
    assert str(copy) in line
    assert snapshot(copy) == before  # nothing replaced, nothing added


def test_overwrite_starts_over(copy):
    old = json.loads((copy / "schedule.json").read_text())
    out = run_fit(copy, "--overwrite", "true", epochs=1)
    assert out.returncode == 0, out.stderr[-3000:]
    schedule = json.loads((copy / "schedule.json").read_text())
    assert old["extra"]["generations"] == 2 and schedule["extra"]["generations"] == 1
    assert {r["generation"] for r in map(json.loads, (copy / "evaluations.jsonl").read_text().splitlines())} == {0}
    assert "reusing it" in out.stdout  # the matching store was kept


def test_resume_needs_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    refused(run_fit(run, "--ckpt_path", "last"), "no checkpoint to resume", "start a new search without --ckpt_path")
    assert not (run / "store").exists()  # refused before calibration


def test_truncated_checkpoint_is_refused(copy):
    ckpt = copy / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = snapshot(copy)
    refused(run_fit(copy, "--ckpt_path", "last", epochs=3), f"checkpoint {ckpt} is truncated or corrupt",
            "--overwrite true")
    assert snapshot(copy) == before


def test_resume_with_changed_search_settings_is_refused(copy):
    before = snapshot(copy)
    refused(run_fit(copy, "--ckpt_path", "last", "--model.num_probes", "7", epochs=3),
            "search settings changed", "num_probes: 6 → 7", "--overwrite true")
    assert snapshot(copy) == before


def test_resume_of_a_finished_search_extends_it(copy):
    """Resuming with a larger max_epochs continues a finished search (generation 3 only)."""
    out = run_fit(copy, "--ckpt_path", "last", epochs=3)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 of 3 generations done, continuing at generation 3" in out.stdout
    records = [json.loads(l) for l in (copy / "evaluations.jsonl").read_text().splitlines()]
    assert {r["generation"] for r in records} == {0, 1, 2}
    extra = json.loads((copy / "schedule.json").read_text())["extra"]
    assert extra["generations"] == 3 and extra["finished"] is True


def test_two_runs_never_share_a_folder(copy):
    """A second fit in a folder whose search is running (its lock held) refuses at once, naming the pid."""
    before = snapshot(copy)
    with exclusive(copy / ".diffes-pl.lock", "testing"):
        line = refused(run_fit(copy, "--ckpt_path", "last", epochs=3), "another diffes-pl run")
    assert f"pid {os.getpid()}" in line
    assert snapshot(copy) == before


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    """The lock dies with its process: after SIGKILL the folder resumes without any clean-up."""
    run = tmp_path / "run"
    proc = subprocess.Popen(fit_command(run, 50), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / ".diffes-pl.lock").exists() and (run / "checkpoints" / "last.ckpt").exists()
    out = run_fit(run, "--ckpt_path", "last", epochs=2)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_users_model_checkpoint_is_kept(tmp_path):
    """A ModelCheckpoint configured by the user saves as configured, beside the search's own."""
    run, mine = tmp_path / "run", tmp_path / "mine"
    out = run_fit(run, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.dirpath", str(mine), "--trainer.callbacks.save_top_k", "-1",
                  "--trainer.callbacks.monitor", "best_fitness", "--trainer.callbacks.mode", "max")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in mine.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=1-step=2.ckpt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert "override" not in out.stdout + out.stderr
