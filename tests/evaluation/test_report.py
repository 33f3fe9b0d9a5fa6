"""`diffes-pl test` and the EvaluateAtFitEnd callback on a small run of the built-in model: the
evaluation writes evaluation.json, reuses the callback's images, and a second run regenerates
nothing; the rank split gives every batch to exactly one rank."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.search_runs import ENV, ROOT, SMALL


def cli(*args: str, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "diffes_pl.cli", *args]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One generation with EvaluateAtFitEnd (30 images in batches of 10) at the end of fit."""
    run = tmp_path_factory.mktemp("eval") / "run"
    cli("fit", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL, "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", str(run), "--trainer.callbacks+", "diffes_pl.callbacks.EvaluateAtFitEnd",
        "--trainer.callbacks.num_images", "30", "--trainer.callbacks.batch_size", "10",
        "--trainer.callbacks.latency_batch_size", "4", "--trainer.callbacks.latency_repeats", "1", cwd=run.parent)
    return run


def evaluate(run: Path) -> str:
    return cli("test", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL, "--trainer.default_root_dir", str(run),
               "--schedule", str(run / "schedule.json"), "--eval.num_images", "40", "--eval.batch_size", "10",
               "--eval.latency_batch_size", "4", "--eval.latency_repeats", "1", cwd=run.parent)


def test_callback_then_cli_resumes_and_second_run_regenerates_nothing(run):
    at_fit_end = json.loads((run / "evaluation.json").read_text())
    assert set(at_fit_end["results"]) == {"dense", "searched", "uniform"}
    assert at_fit_end["config"]["num_images"] == 30

    log = evaluate(run)  # 40 images: batches 0-2 come from the callback, batch 3 is new, per set
    assert log.count("1 batches sampled now, 3 already on disk") == 3, log[-3000:]
    batches = sorted((run / "eval").glob("*/batch_*.safetensors"))
    assert len(batches) == 12
    mtimes = {p: p.stat().st_mtime_ns for p in batches}

    log = evaluate(run)
    assert log.count("0 batches sampled now, 4 already on disk") == 3, log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in sorted((run / "eval").glob("*/batch_*.safetensors"))} == mtimes

    result = json.loads((run / "evaluation.json").read_text())
    rows = result["results"]
    schedule = json.loads((run / "schedule.json").read_text())
    assert rows["searched"]["levels"] == schedule["levels"] and rows["uniform"]["levels"] == [4, 4, 4, 4]
    assert rows["dense"]["ssim"] == pytest.approx(1.0) and rows["dense"]["mac_ratio"] == 1.0
    for row in rows.values():
        for key in ("macs", "latency_s", "speedup", "fid", "is", "precision", "recall", "ssim", "class_accuracy"):
            assert row[key] is not None, key
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 1 <= row["is"] <= 10
    assert rows["uniform"]["macs"] < rows["dense"]["macs"]  # level 4 of 8 at every step
    # the fit's config.yaml is not overwritten by `test`
    saved = (run / "config.yaml").read_text()
    assert "\nschedule:" not in saved and "\neval:" not in saved and "\nmodel:" in saved
    assert (run / "eval" / "reference" / "digits-test_8px_digits-cnn.safetensors").is_file()


def test_rank_split_gives_each_batch_to_one_rank(tmp_path, monkeypatch, tiny):
    """Inside a launched run (the callback), rank r samples missing batches r, r + W, …"""
    from diffes_pl.evaluation import generate

    calls = []

    def fake_sample(adapter, cond, *, noise, **kw):
        calls.append(len(cond))
        return torch.zeros(len(noise), 1, 8, 8)

    monkeypatch.setattr(generate, "sample", fake_sample)

    class Strategy:
        def barrier(self, *_):
            pass

    class Trainer:
        world_size, strategy = 3, Strategy()

        def __init__(self, rank):
            self.global_rank = rank

    import shutil

    start = tmp_path / "start"
    generate.ImageSet(start, "dense", None, {"seed": 0, "batch_size": 2}, num_images=13).save(1, torch.zeros(2, 1, 8, 8))
    mine = {}
    for rank in range(3):  # the ranks run at once: each starts from the same files (its own copy here)
        shutil.copytree(start, tmp_path / f"rank{rank}")
        image_set = generate.ImageSet(tmp_path / f"rank{rank}", "dense", None, {"seed": 0, "batch_size": 2}, 13)
        before = set(image_set.missing())
        assert generate.ensure_images(image_set, tiny, sampler="ddim", steps=2, guidance=1.0, trainer=Trainer(rank),
                                      launched=True) == len(before - set(image_set.missing()))
        mine[rank] = before - set(image_set.missing())
    # missing 0, 2, 3, 4, 5, 6 (batch 1 exists) → rank 0: 0, 4; rank 1: 2, 5; rank 2: 3, 6
    assert mine == {0: {0, 4}, 1: {2, 5}, 2: {3, 6}}
    assert len(calls) == 6
    image_set.save(0, torch.zeros(2, 1, 8, 8))
    for b in (2, 4, 5):
        image_set.save(b, torch.ones(2, 1, 8, 8))
    assert image_set.missing() == [] and image_set.load().shape == (13, 1, 8, 8)
    assert torch.equal(image_set.conditions(3, 10), torch.tensor([6, 7]))
    assert torch.equal(image_set.noise(3, (1, 8, 8)), generate.ImageSet(start, "x", None, {"seed": 0, "batch_size": 2},
                                                                         13).noise(3, (1, 8, 8)))


def test_pngs_hold_exactly_the_evaluated_pixels(tmp_path):
    """write_pngs: one PNG per image (the first num_images, also from a truncated last batch), decoded
    by PIL to the batch files' uint8 pixels; later runs write only what is missing and drop PNGs past
    num_images; grid.png shows the first images."""
    import numpy as np
    from PIL import Image

    from diffes_pl.evaluation.generate import ImageSet

    def image_set(n):
        return ImageSet(tmp_path, "searched", [1, 2], {"seed": 0, "batch_size": 4}, num_images=n)

    g = torch.Generator().manual_seed(0)
    for channels, name in ((1, "gray"), (3, "rgb")):
        small = ImageSet(tmp_path / name, "dense", None, {"seed": 0, "batch_size": 4}, num_images=10)
        for b in range(small.num_batches):  # 3 batches, the last one holds 2 images past num_images
            small.save(b, torch.rand(4, channels, 8, 8, generator=g))
        assert small.write_pngs() == 10
        pngs = sorted(small.png_folder.glob("*.png"))
        assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
        expected = (small.load() * 255).round().to(torch.uint8)
        for i, p in enumerate(pngs):
            decoded = np.asarray(Image.open(p))
            decoded = decoded[:, :, None] if decoded.ndim == 2 else decoded
            assert np.array_equal(decoded, expected[i].permute(1, 2, 0).numpy()), p
        assert Image.open(small.folder / "grid.png").size == (8 * 64 + 2 * 9, 2 * 64 + 2 * 3)  # 8 px shown as 64
    grow = image_set(6)
    for b in range(2):
        grow.save(b, torch.rand(4, 1, 8, 8, generator=g))
    assert grow.write_pngs() == 6 and image_set(8).write_pngs() == 2 and image_set(8).write_pngs() == 0
    assert image_set(5).write_pngs() == 0 and len(list(grow.png_folder.glob("*.png"))) == 5


def test_cli_logs_evaluation_to_the_trainers_logger(run):
    """`diffes-pl test --trainer.logger CSVLogger`: metrics.csv holds every number of evaluation.json
    (eval/<row>/<metric>); the evaluated images are PNG files equal to the stored batches."""
    import csv

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    log = cli("test", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL, "--trainer.default_root_dir", str(run),
              "--schedule", str(run / "schedule.json"), "--eval.num_images", "40", "--eval.batch_size", "10",
              "--eval.latency_batch_size", "4", "--eval.latency_repeats", "1",
              "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run / "logs"),
              cwd=run.parent)
    result = json.loads((run / "evaluation.json").read_text())
    # one timed run: the speedups are flagged as noise, in the output and in evaluation.json
    assert len(result["warnings"]) == 1 and f"warning: {result['warnings'][0]}" in log
    assert "1 timed run(s)" in result["warnings"][0] and "--eval.latency_repeats" in result["warnings"][0]
    (metrics_csv,) = (run / "logs").glob("**/metrics.csv")
    logged = {}
    for line in csv.DictReader(metrics_csv.open()):
        logged.update({k: float(v) for k, v in line.items() if v not in ("", None) and k != "step"})
    expected = {f"eval/{name}/{key}": value for name, row in result["results"].items() for key, value in row.items()
                if isinstance(value, (int, float))}
    assert {"eval/searched/fid", "eval/dense/ssim", "eval/uniform/is", "eval/searched/precision"} <= set(expected)
    assert set(logged) == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key
    hparams = (metrics_csv.parent / "hparams.yaml").read_text()
    assert "eval/pruner" in hparams and f"eval/table: {run / 'evaluation.json'}" in hparams  # the table's file
    for folder in sorted((run / "eval").glob("*-*")):
        if folder.name.startswith("reference"):
            continue
        pngs = sorted((folder / "png").glob("*.png"))
        assert len(pngs) == 40 and (folder / "grid.png").is_file()
        pixels = torch.cat([load_file(str(p))["images"] for p in sorted(folder.glob("batch_*.safetensors"))])
        for i, p in enumerate(pngs):
            assert np.array_equal(np.asarray(Image.open(p)), pixels[i, 0].numpy()), p
