"""benchmarks/paper_tables.py runs end to end in its smoke mode (one width setting, 2 search seeds) and
writes every row of the table with sane values: the dense row is the reference, every pruned row meets
the same MAC budget, random search got Diff-ES's evaluations and greedy whole neighbourhoods within
them, each seed's schedule was scored on its own block of TEST probes, and every comparison carries a
decision."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.search_runs import ENV

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["dense", "uniform", "mosaicdiff heuristic", "OBS-Diff", "random search", "greedy search", "Diff-ES"]


def test_paper_tables_smoke(tmp_path):
    out = tmp_path / "tables.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/paper_tables.py"), "--tiny", "--settings", "obs-50",
           "--runs", str(tmp_path / "runs"), "--out", str(out)]
    done = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "obs-50" in done.stdout and "TINY SMOKE RUN" in done.stdout and "Diff-ES vs:" in done.stdout
    report = json.loads(out.read_text())
    assert report["tiny"] and list(report["settings"]) == ["obs-50"] and report["probe_set"] == "test"
    table = report["settings"]["obs-50"]
    assert (table["target_level"], table["levels_max"], table["sparsity"]) == (4, 8, 0.5)
    assert table["probe_seeds"] == [7_300_001, 7_300_002] and table["seeds"] == [0, 1]
    rows = table["rows"]
    assert list(rows) == ROWS
    dense = rows["dense"]
    assert dense["levels"] is None and dense["mac_fraction"] == 1.0
    assert all(abs(s["ssim"] - 1.0) < 1e-6 and math.isinf(s["psnr"]) for s in dense["per_seed"])
    uniform = rows["uniform"]["mac_fraction"]
    # width level 4 of 8 removes half of every head group and MLP: the prunable part of the MACs
    assert 1 - 4 / 8 < uniform < 1
    S, P = table["num_stages"], table["eval_probes"]
    for name, row in rows.items():
        assert [s["probe_seed"] for s in row["per_seed"]] == table["probe_seeds"], name
        assert len(row["ssim_per_probe"]) == 2 * P, name  # both blocks pooled
        # equal blocks: the pooled mean is the mean of the per-seed means
        assert row["pooled"]["ssim"] == pytest.approx(row["across_seeds"]["ssim"]["mean"], abs=1e-6), name
        assert row["pooled"]["kid_low"] <= row["pooled"]["kid_high"] and row["latency_s"] > 0, name
        for s in row["per_seed"]:
            assert 0 < s["ssim"] <= 1 + 1e-6 and 0 <= s["class_accuracy"] <= 1 and s["fid"] >= 0, name
        if name == "dense":
            continue
        assert abs(row["mac_fraction"] - uniform) < 1e-9, name  # same budget, same MACs
        levels = row["levels"] if name in ("random search", "Diff-ES") else [row["levels"]]
        for lv in levels:
            assert len(lv) == (1 if name == "OBS-Diff" else S), name
            assert sum(lv) == 4 * len(lv), name  # equal stages: mean level = target
    planned = table["planned_evaluations"]
    assert planned == 6 + 2 + 6 * (table["generations"] - 1)
    assert rows["Diff-ES"]["evaluations"] == rows["random search"]["evaluations"] == [planned, planned]
    # greedy: uniform, then whole rounds of the 4·3 one-level neighbours, never beyond the plan
    assert table["greedy_generations"] == 2 and rows["greedy search"]["evaluations"] == [1 + 12]
    for other in ROWS[1:-1]:
        for metric in ("ssim", "kid", "fid"):
            d = table["diffes_vs"][other][metric]
            assert d["decision"] in ("win", "tie", "loss") and 0 <= d["p_value"] <= 1, (other, metric)
            assert d["n"] == 2 * P

    # --rescore scores the report's schedules again without their searches: with the searches' folders
    # and the setting's cached table gone, the same statistics give the same table
    import shutil

    rescored_runs = tmp_path / "rescore"
    shutil.copytree(tmp_path / "runs_tiny" / "obs-store", rescored_runs.with_name("rescore_tiny") / "obs-store")
    cmd = [sys.executable, str(ROOT / "benchmarks/paper_tables.py"), "--tiny", "--settings", "obs-50", "--rescore",
           "--runs", str(rescored_runs), "--out", str(out)]
    done = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again = json.loads(out.read_text())["settings"]["obs-50"]
    assert not (rescored_runs.with_name("rescore_tiny") / "obs-50" / "random-0").exists()  # nothing searched
    for name, row in rows.items():
        redone = again["rows"][name]
        assert redone["levels"] == row["levels"] and redone.get("evaluations") == row.get("evaluations"), name
        for a, b in zip(redone["per_seed"], row["per_seed"]):
            for metric in ("ssim", "kid", "fid"):
                assert a[metric] == pytest.approx(b[metric], rel=1e-9, abs=1e-12), (name, metric)
    assert again["diffes_vs"] == table["diffes_vs"]

    # fitness_proxy.py reads the same archives: the Diff-ES seed-0 pick scored on the same block
    # gives paper_tables' very SSIM / KID / FID for that seed
    proxy_out = tmp_path / "proxy.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/fitness_proxy.py"), "--tiny", "--setting", "obs-50",
           "--runs", str(tmp_path / "runs"), "--out", str(proxy_out)]
    done = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    proxy = json.loads(proxy_out.read_text())
    assert proxy["probe_seed"] == table["probe_seeds"][0] and proxy["eval_probes"] == P
    picked = {tuple(s["levels"]): s for s in proxy["schedules"]}
    assert len(picked) == len(proxy["schedules"]) >= 3  # distinct
    best = picked[tuple(rows["Diff-ES"]["levels"][0])]
    for metric in ("ssim", "kid", "fid"):
        assert best[metric] == pytest.approx(rows["Diff-ES"]["per_seed"][0][metric], rel=1e-6, abs=1e-9), metric
    for c in proxy["spearman_fitness_vs"].values():
        assert -1 <= c["low"] <= c["high"] <= 1


def test_spearman_matches_scipy_with_ties():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    from fitness_proxy import spearman
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, rel=1e-12)
    assert spearman(x, -y) == pytest.approx(-spearman(x, y), rel=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))
