"""benchmarks/rehearsal.py on its smallest setting (the built-in model, 1 stage, 2 steps, 1 generation):
every phase runs in its own process and the JSON records what the benchmark reports."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "rehearsal.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_rehearsal_records_every_phase(tmp_path):
    out = tmp_path / "rehearsal.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--stages", "1", "--steps", "2", "--nsamples", "2",
           "--images", "4", "--probes", "2", "--generations", "1", "--eval-images", "2",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["device"] == "cpu" and result["pruner"] == "OBSPruner"
    assert set(result["phases"]) == {"predict", "fit", "test"}  # tiny is built in: no build phase
    for name, phase in result["phases"].items():
        assert phase["returncode"] == phase["exit_code"] == 0, name
        assert phase["seconds"] > 0
        assert 100 * 2**20 < phase["peak_host_bytes"] < 16 * 2**30, name  # torch alone is over 100 MiB
        assert "peak_gpu_allocated_bytes" not in phase
    assert result["peak_host_bytes"] == max(p["peak_host_bytes"] for p in result["phases"].values())
    assert result["total_seconds"] == pytest.approx(sum(p["seconds"] for p in result["phases"].values()), abs=0.05)
    solves = result["phases"]["predict"]["obs_solve_lines"]
    assert len(solves) == 1 and solves[0].startswith("stage 0: OBS solve ") and "(6 blocks, 12 groups;" in solves[0]
    assert len(result["schedule_levels"]) == 1
    assert set(result["evaluation"]) == {"dense", "uniform", "searched"}
    assert "CPU only" in result["machine"]["note"]
    for name in ("predict", "fit", "test"):  # each phase's full output is kept beside the figures
        assert (tmp_path / "work" / f"{name}.log").is_file()


def test_text_families_are_refused_with_the_reason(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rehearsal", SCRIPT)
    rehearsal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rehearsal)
    sys_argv = sys.argv
    sys.argv = [str(SCRIPT), "--model", "sd3", "--out", str(tmp_path / "r.json")]
    try:
        with pytest.raises(SystemExit, match="text encoders"):
            rehearsal.main()
    finally:
        sys.argv = sys_argv
    assert not (tmp_path / "r.json").exists()
