"""benchmarks/paper_tables.py runs end to end in its smoke mode (one width setting) and writes every row
of the table with sane values: the dense row is the reference, every pruned row meets the same MAC
budget, the baseline searches got Diff-ES's number of fitness evaluations."""
import json
import math
import subprocess
import sys
from pathlib import Path

from helpers.search_runs import ENV

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["dense", "uniform", "mosaicdiff heuristic", "OBS-Diff", "random search", "greedy search", "Diff-ES"]


def test_paper_tables_smoke(tmp_path):
    out = tmp_path / "tables.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/paper_tables.py"), "--tiny", "--settings", "obs-50",
           "--runs", str(tmp_path / "runs"), "--out", str(out)]
    done = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "obs-50" in done.stdout and "TINY SMOKE RUN" in done.stdout
    report = json.loads(out.read_text())
    assert report["tiny"] and list(report["settings"]) == ["obs-50"]
    table = report["settings"]["obs-50"]
    assert (table["target_level"], table["levels_max"], table["sparsity"]) == (4, 8, 0.5)
    rows = table["rows"]
    assert list(rows) == ROWS
    dense = rows["dense"]
    assert dense["levels"] is None and dense["mac_fraction"] == 1.0
    assert abs(dense["ssim"] - 1.0) < 1e-6 and math.isinf(dense["psnr"])
    uniform = rows["uniform"]["mac_fraction"]
    # width level 4 of 8 removes half of every head group and MLP: the prunable part of the MACs
    assert 1 - 4 / 8 < uniform < 1
    S = table["num_stages"]
    for name, row in rows.items():
        assert 0 < row["ssim"] <= 1 + 1e-6 and 0 <= row["class_accuracy"] <= 1, name
        assert math.isfinite(row["digits_fid_heldout"]) and row["digits_fid_heldout"] >= 0, name
        assert math.isfinite(row["digits_fid_train"]) and row["latency_s"] > 0, name
        if name == "dense":
            continue
        assert abs(row["mac_fraction"] - uniform) < 1e-9, name  # same budget, same MACs
        assert len(row["levels"]) == (1 if name == "OBS-Diff" else S), name
        assert sum(row["levels"]) == 4 * len(row["levels"]), name  # equal stages: mean level = target
        assert row["psnr"] < dense["psnr"] and row["search_fitness"] is not None, name
    n = table["evaluations"]
    assert n > 0 and rows["Diff-ES"]["evals_used"] == n
    for name in ("random search", "greedy search"):
        assert rows[name]["evals_budget"] == n, name
        # a search spends its whole budget unless greedy stopped at a local optimum first
        assert rows[name]["evals_used"] == n or (name == "greedy search" and rows[name]["stopped_early"]), name
