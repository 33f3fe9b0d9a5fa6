"""The seeded comparison benchmarks (issue 26): their shared statistics (benchmarks/_evidence.py), the
stacking frontier's interpolation, and smoke runs of search_cost.py, fitness_ablation.py and
cache_frontier.py that check what each report must hold (per-seed rows on their own TEST probe
blocks, the 30-generation row as the default run's prefix, decisions with their test)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.search_runs import ENV

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--tiny", "--runs", str(tmp_path / "runs"),
           "--out", str(out), *extra]
    done = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "TINY SMOKE RUN" in done.stdout
    return json.loads(out.read_text())


def test_frontier_interpolation_is_linear_between_the_bracketing_points():
    from cache_frontier import interpolate

    points = [(0.6, [0.9, 1.0]), (0.4, [0.7, 0.6])]  # unsorted on purpose
    assert interpolate(points, 0.5) == pytest.approx([0.8, 0.8])
    assert interpolate(points, 0.45) == pytest.approx([0.75, 0.7])
    assert interpolate(points, 0.6) == pytest.approx([0.9, 1.0])
    assert interpolate(points, 0.39) is None and interpolate(points, 0.61) is None


def test_frontier_reference_outside_the_range_counts_one_way_only():
    from cache_frontier import frontier_reference, position

    points = [(0.6, [0.9, 1.0]), (0.4, [0.7, 0.6])]
    assert frontier_reference(points, 0.5) == (pytest.approx([0.8, 0.8]), "inside")
    assert frontier_reference(points, 0.35) == ([0.7, 0.6], "cheaper")
    assert frontier_reference(points, 0.65) == ([0.9, 1.0], "dearer")
    # better at fewer MACs than the cheapest point: above; worse there proves nothing
    assert position("win", ["inside", "cheaper"]) == "above" and position("loss", ["cheaper"]) == "outside"
    # worse at more MACs than the dearest point: below; better there proves nothing
    assert position("loss", ["dearer", "inside"]) == "below" and position("win", ["dearer"]) == "outside"
    assert position("tie", ["inside", "inside"]) == "on" and position("tie", ["inside", "cheaper"]) == "outside"


def test_kid_on_standardised_features_separates_real_from_blurred_digits():
    """Two draws of real digits score ≈ 0 and far below blurred digits; the raw-feature KID of the same
    draws is hundreds of times noisier (why `_evidence.kid` standardises)."""
    from _evidence import features, heldout_features, kid

    from diffes_pl.data.digits import load_digits_split
    from diffes_pl.evaluation.intervals import kid_from_features

    real = heldout_features()
    train = (load_digits_split("train")[0] + 1) / 2
    same = kid(real, features(train[:600]))
    blurred = torch.nn.functional.avg_pool2d(train[:600], 3, stride=1, padding=1, count_include_pad=False)
    assert abs(same) < 0.05 and kid(real, features(blurred)) > 5
    raw_same = kid_from_features(real, features(train[:600]), subset_size=100, subsets=20)[0]
    assert abs(raw_same) > 20 * abs(same)


def test_search_cost_rows_over_seeds(tmp_path):
    report = _run("search_cost", tmp_path)
    rows = report["rows"]
    names = list(rows)
    assert names[0] == "default (3 generations)" and names[1] == "shipped config (2 generations)"
    assert report["probe_seeds"] == [7_300_001, 7_300_002] and len(names) == 7
    assert set(names[-2:]) == {"stop when converged (patience 2, delta 0.0001), replayed",
                               "racing 4 probes, z = 1 + stop when converged (patience 2, delta 0.0001), replayed"}
    # both measured stop rows (alone, with racing), both seeds: the replay ends where the run did
    checks = report["replay_checks"]
    assert len(checks) == 4 and all(c["replayed"] == c["measured"] for c in checks)
    runs = tmp_path / "runs_tiny"
    for b, seed in enumerate(report["seeds"]):
        # the shipped row is the default run's first 2 generations: its cost is theirs plus the reference
        lines = [json.loads(x) for x in (runs / f"seed{seed}" / "default" / "evaluations.jsonl").read_text().splitlines()]
        default = rows[names[0]]["searches"][b]
        shipped = rows[names[1]]["searches"][b]
        first = [r for r in lines if r["generation"] < 2]
        reference = default["cost"]["probe_steps"] - sum(r["probe_steps"] for r in lines)
        assert shipped["cost"]["probe_steps"] == reference + sum(r["probe_steps"] for r in first)
        assert shipped["levels"] == max((r for r in first if not r.get("raced_out")), key=lambda r: r["fitness"])["levels"]
        assert shipped["generations_run"] == 2 and default["generations_run"] == 3
    for name, row in rows.items():
        assert [s["probe_seed"] for s in row["per_seed"]] == report["probe_seeds"], name
        f = row["fewer_probe_steps_than_default"]
        assert f["n"] == 2 and f["mean"] > 0, name
        if name == names[0]:
            assert f["mean"] == 1.0 and row["vs_default"] is None
        else:
            assert row["vs_default"]["ssim"]["decision"] in ("win", "tie", "loss"), name
    both = "racing 4 probes, z = 1 + stop when converged (patience 1, delta 0.0001)"
    assert rows[both]["fewer_probe_steps_than_default"]["mean"] > 1  # racing + stop saves


def test_replayed_stop_is_lightnings_early_stopping():
    """`replay_stop` against Lightning's EarlyStopping fed the same best-so-far fitness each epoch, on
    random archives (raced-out children carry higher fitness on purpose: never the best)."""
    from lightning.pytorch.callbacks import EarlyStopping
    from search_cost import replay_stop

    gen, stopped_early = torch.Generator().manual_seed(0), 0
    for trial in range(40):
        generations, patience, delta = 30, 1 + trial % 6, [0.0, 1e-3, 1e-2][trial % 3]
        records = [{"generation": g, "fitness": float(torch.rand((), generator=gen)) * (0.5 + g / 60),
                    "raced_out": bool(torch.rand((), generator=gen) < 0.3)} for g in range(generations) for _ in range(3)]
        records += [{"generation": g, "fitness": 5.0, "raced_out": True} for g in range(0, generations, 7)]
        stopper, best, expected = EarlyStopping("fitness", mode="max", patience=patience, min_delta=delta), -1.0, generations
        for g in range(generations):
            best = max([best, *(r["fitness"] for r in records if r["generation"] == g and not r["raced_out"])])
            if stopper._evaluate_stopping_criteria(torch.tensor(best))[0]:
                expected = g + 1
                break
        assert replay_stop(records, generations, patience, delta) == expected, trial
        stopped_early += expected < generations
    assert 10 < stopped_early < 40  # both outcomes exercised


def test_fitness_ablation_smoke(tmp_path):
    report = _run("fitness_ablation", tmp_path, "--setting", "wanda-50", "--metrics", "ssim", "class_confidence",
                  "digits_kid")
    assert report["setting"] == "wanda-50"
    baselines = ["uniform", "mosaicdiff heuristic", "random search"]
    assert list(report["rows"]) == ["dense", *baselines, "fitness ssim", "fitness class_confidence",
                                    "fitness digits_kid"]
    assert set(report["decisions"]["ssim"]) == set(baselines)
    assert set(report["decisions"]["digits_kid"]) == {*baselines, "fitness ssim"}
    for name, row in report["rows"].items():
        assert len(row["per_seed"]) == 2 and row["pooled"]["kid_low"] <= row["pooled"]["kid_high"], name
    rows = report["rows"]
    assert all(0 < f <= 1 for f in rows["fitness class_confidence"]["search_fitness"])
    # the KID fitness is a set statistic: no racing, so every child is scored on all probes
    config = (tmp_path / "runs_tiny" / "wanda-50" / "evolution-digits_kid-0" / "config.yaml").read_text()
    assert "race_probes: null" in config and "metric: digits_kid" in config

    # fitness_proxy.py on the KID fitness's archive: its pick is the search's schedule, oriented (−KID,
    # higher is better) as selection saw it, and scored on block 0 as the ablation scored it
    proxy = _run("fitness_proxy", tmp_path, "--setting", "wanda-50", "--metric", "digits_kid")
    kid_row = rows["fitness digits_kid"]
    curse = proxy["winners_curse"]
    assert proxy["metric"] == "digits_kid" and {s["source"] for s in proxy["schedules"]} == {"evolution"}
    assert curse["pick_levels"] == kid_row["levels"][0]
    assert curse["pick_search_fitness"] == pytest.approx(-kid_row["search_fitness"][0], rel=1e-9)
    pick = next(s for s in proxy["schedules"] if s["levels"] == curse["pick_levels"])
    for metric in ("ssim", "kid", "fid"):
        assert pick[metric] == pytest.approx(kid_row["per_seed"][0][metric], rel=1e-6, abs=1e-9), metric
    assert curse["pick_drop"] == pytest.approx(curse["pick_search_fitness"] - curse["pick_retest"])
    assert 1 <= curse["retest_rank_of_pick"] <= len(proxy["schedules"])

    # --rescore: the report's schedules scored again (its metrics and seeds, no search): the same table
    again = _run("fitness_ablation", tmp_path, "--setting", "wanda-50", "--rescore")
    assert list(again["rows"]) == list(rows) and again["decisions"] == report["decisions"]
    for name, row in rows.items():
        assert again["rows"][name]["levels"] == row["levels"], name
        assert again["rows"][name].get("search_fitness") == row.get("search_fitness"), name
        for a, b in zip(again["rows"][name]["per_seed"], row["per_seed"]):
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), name


def test_cache_frontier_smoke(tmp_path):
    report = _run("cache_frontier", tmp_path)
    rows = report["rows"]
    assert "cache-only k=2" in rows and "joint @ 0.45" in rows and "stacking k=2 @ 0.75" in rows
    for budget in report["budgets"]:
        for curve in ("level-only", "stacking k=2", "joint"):
            for fraction in rows[f"{curve} @ {budget:g}"]["mac_fraction"]:
                assert fraction <= budget + 0.02, (curve, budget)  # the MAC budget (its stated band)
        d = report["joint_vs_stacking_frontier"][f"{budget:g}"]
        assert d["decision"] in ("win", "tie", "loss") and d["n"] == 2 * report["eval_probes"]
        assert len(d["sides"]) == 2 and set(d["sides"]) <= {"inside", "cheaper", "dearer"}
        if set(d["sides"]) == {"inside"}:
            assert d["position"] == {"win": "above", "tie": "on", "loss": "below"}[d["decision"]]
        same = report["joint_vs_stacking_same_budget"][f"{budget:g}"]
        assert all(same[m]["decision"] in ("win", "tie", "loss") for m in ("ssim", "kid", "fid"))
        assert same["joint_mac_fraction"] == rows[f"joint @ {budget:g}"]["mac_fraction"]
