"""A stage-wise search over N:M sparsity (configs/tiny_obs_2of4.yaml, Wanda at 2:4 for speed) killed
mid-search resumes to exactly the uninterrupted run's schedule and evaluations; `diffes-pl test`
then reports the MACs a 2:4 kernel executes beside the dense-equivalent MACs."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffes_pl.schedule import budget_met

from helpers.search_runs import ENV, ROOT, evaluation_rows

SMALL = ["--model.pruner", "diffes_pl.pruners.SparseWandaPruner", "--model.pruner.granularity", "n:m",
         "--model.num_stages", "4", "--model.steps", "8", "--model.num_probes", "6", "--model.offspring", "6",
         "--model.survivors", "2", "--data.nsamples", "4", "--data.batch_size", "4"]


def _cmd(run: Path, generations: int, *extra: str, sub: str = "fit") -> list[str]:
    return [sys.executable, "-m", "diffes_pl.cli", sub, "--config", str(ROOT / "configs/tiny_obs_2of4.yaml"), *SMALL,
            "--trainer.max_epochs", str(generations), "--trainer.default_root_dir", str(run), *extra]


def _fit(run: Path, generations: int, *extra: str) -> str:
    out = subprocess.run(_cmd(run, generations, *extra), env=ENV, capture_output=True, text=True, timeout=600,
                         cwd=run.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_a_killed_sparse_search_resumes_exactly_and_reports_kernel_macs(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    _fit(straight, 6)
    schedule = json.loads((straight / "schedule.json").read_text())
    assert schedule["pruner"] == "wanda_sparse" and schedule["levels_max"] == 4
    rows = evaluation_rows(straight)
    assert all(budget_met(r["levels"], [2, 2, 2, 2], 2) for r in rows)
    assert len({tuple(r["levels"]) for r in rows}) > 1  # the search moved off the uniform 2:4 schedule

    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen(_cmd(run, 6), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=run.parent)
    ckpt, deadline = run / "checkpoints" / "last.ckpt", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and len(torch.load(ckpt, weights_only=False)["diffes"]["nfe_history"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(torch.load(ckpt, weights_only=False)["diffes"]["nfe_history"])
    assert 2 <= done < 6, "the kill must strike mid-search"
    out = _fit(run, 6, "--ckpt_path", "last")
    assert f"{done} of 6 generations done, continuing at generation {done + 1}" in out
    assert json.loads((run / "schedule.json").read_text()) | {"store": None} == schedule | {"store": None}
    assert [(r["levels"], r["fitness"]) for r in evaluation_rows(run)] == [(r["levels"], r["fitness"]) for r in rows]

    report = subprocess.run(_cmd(straight, 6, "--schedule", str(straight / "schedule.json"), "--eval.num_images", "8",
                                 "--eval.batch_size", "8", "--eval.latency_batch_size", "0", sub="test"),
                            env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    result = json.loads((straight / "evaluation.json").read_text())["results"]
    dense, uniform = result["dense"], result["uniform"]
    assert dense["macs_2of4_kernel"] == dense["macs"]
    assert uniform["levels"] == [2, 2, 2, 2] and uniform["macs"] == dense["macs"]  # dense-equivalent: unchanged
    # every attention and MLP linear runs half its MACs on a 2:4 kernel; the rest (embeddings, adaLN,
    # attention products, final layer) is unchanged
    linear = dense["macs"] - uniform["macs_2of4_kernel"]
    assert 0.3 * dense["macs"] < linear < 0.5 * dense["macs"]
    searched = result["searched"]
    assert searched["macs_2of4_kernel"] >= uniform["macs_2of4_kernel"]  # 3:4 stages gain nothing on a 2:4 kernel
