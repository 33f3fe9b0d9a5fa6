"""The built-in model's OBS-Diff configs at the single-weight granularities run end to end in demo size:
`diffes-pl fit` (calibration with timestep weights and sequential groups, the 1-stage search) then
`diffes-pl test`, whose report says 50 % of the prunable weights are gone and what a 2:4 kernel runs."""
import json
import subprocess
import sys

import pytest

from helpers.search_runs import ENV, ROOT

DEMO = ["--model.steps", "4", "--model.num_probes", "4", "--data.nsamples", "4", "--data.batch_size", "4"]


def _cli(sub, config, run, *extra):
    cmd = [sys.executable, "-m", "diffes_pl.cli", sub, "--config", str(ROOT / "configs" / config), *DEMO,
           "--trainer.default_root_dir", str(run), *extra]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=run.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("config,levels,two_of_four", [("tiny_obsdiff_unstructured.yaml", 8, False),
                                                       ("tiny_obsdiff_2of4.yaml", 4, True)])
def test_obsdiff_sparse_configs_fit_and_test(config, levels, two_of_four, tmp_path):
    run = tmp_path / "run"
    log = _cli("fit", config, run)
    assert "stage 0: OBS solve" in log
    schedule = json.loads((run / "schedule.json").read_text())
    assert schedule["pruner"] == "obs_sparse" and schedule["levels"] == [levels // 2]
    store = json.loads((run / "store" / "manifest.json").read_text())
    assert store["sparse"]["kind"] == ("n:m" if two_of_four else "unstructured")
    _cli("test", config, run, "--schedule", str(run / "schedule.json"), "--eval.num_images", "8",
         "--eval.batch_size", "8", "--eval.latency_batch_size", "0")
    rows = json.loads((run / "evaluation.json").read_text())["results"]
    assert rows["searched"]["sparsity"] == 0.5 and rows["searched"]["macs"] == rows["dense"]["macs"]
    assert 0.5 < rows["searched"]["ssim"] < 1.0
    kernel = rows["searched"]["macs_2of4_kernel"]
    # 2:4 weights run at half their MACs on a 2:4 kernel; 50 % unstructured holds no 2:4 pattern
    assert (kernel < 0.7 * rows["dense"]["macs"]) if two_of_four else (kernel == rows["dense"]["macs"])
