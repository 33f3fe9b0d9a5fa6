"""A batch job shows what it is doing: one plain line per generation where no live display can be
seen, plots and sample grids in the configured logger, config.yaml in the run folder, clean DDP
output with totals over all ranks, readable grids, and latency figures flagged when they are noise."""
import io
import re
import subprocess

import numpy as np
import torch

from diffes_pl.evaluation.grids import image_grid, labelled_rows
from diffes_pl.evaluation.latency import latency_warning, latency_warnings
from diffes_pl.evaluation.report import table_markdown
from diffes_pl.search.progress_line import GenerationTimer, clock, generation_line, wants_plain_lines
from helpers.search_runs import ENV, evaluation_rows, fit_command

STATS = {"best_fitness": 0.95123, "median_fitness": 0.90114, "evaluated": 24.0, "raced_out": 0.0,
         "probe_steps_total": 1234.0}


def test_generation_line_and_eta():
    assert clock(190) == "0:03:10" and clock(3 * 3600 + 61.4) == "3:01:01" and clock(-1) == "0:00:00"
    assert generation_line(3, 10, STATS, "ssim", 190, 340) == (
        "generation 3/10 · best ssim 0.9512 · median 0.9011 · evaluated 24 · 1,234 probe-steps · "
        "elapsed 0:03:10 · ETA 0:05:40")
    raced = generation_line(1, 2, {**STATS, "raced_out": 5.0}, "topiq", 0, None)
    assert "evaluated 24 · raced out 5 ·" in raced and raced.endswith("ETA unknown")
    now = iter([100.0, 130.0, 160.0])  # a resumed search: generations 0-3 restored, 4 and 5 run here
    timer = GenerationTimer(4, now=lambda: next(now))
    assert timer.eta(4, 10) is None  # nothing ran in this process yet (reads no clock)
    assert timer.eta(5, 10) == 30.0 * 5  # 30 s for one generation, 5 left
    assert timer.eta(6, 10) == 60.0 / 2 * 4


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_plain_lines_where_no_live_display_is_seen():
    bar = object()
    assert wants_plain_lines(bar, Stream(tty=False))  # stdout redirected: SLURM, nohup
    assert wants_plain_lines(None, Stream(tty=True))  # enable_progress_bar false
    assert not wants_plain_lines(bar, Stream(tty=True))  # the live display shows it


def test_latency_noise_rule():
    one = latency_warnings({"dense": {"latency_runs_s": [1.0]}, "searched": {"latency_runs_s": [4.5]},
                            "uniform": {"latency_runs_s": [0.5]}})
    assert len(one) == 1 and "1 timed run(s)" in one[0] and "--eval.latency_repeats" in one[0]
    # the 0.22× of a loaded machine: dense 1.0-3.0 s, pruned 0.9-1.0 s; medians differ by 0.15 < spread 2.0
    noisy = latency_warning("searched", [1.0, 1.1, 3.0], [0.9, 0.95, 1.0])
    assert noisy.startswith("searched: its latency differs from dense by 150.00 ms/image")
    assert "(2000.00 ms/image)" in noisy and "latency_repeats" in noisy
    assert latency_warning("searched", [1.0, 1.01, 1.02], [0.5, 0.51, 0.52]) is None  # 2× with 20 ms spread
    assert latency_warning("searched", [1.0, 1.2, 1.4], [0.8, 0.8, 0.8]) is not None  # spread 0.4 ≥ effect 0.4
    clean = {"dense": {"latency_runs_s": [1.0, 1.01, 1.02]}, "searched": {"latency_runs_s": [0.5, 0.51, 0.52]},
             "uniform": {"latency_runs_s": [1.0, 1.0, 1.05]}}
    assert [w.split(":")[0] for w in latency_warnings(clean)] == ["uniform"]
    assert latency_warnings({"dense": {"latency_runs_s": None}, "searched": {"latency_runs_s": None}}) == []


def test_grids_are_upscaled_and_rows_labelled():
    assert image_grid(torch.rand(16, 1, 8, 8)).shape == (1, 2 * 64 + 2 * 3, 8 * 64 + 2 * 9)  # 8 px → 64 px
    assert image_grid(torch.rand(2, 3, 100, 100)).shape == (3, 104, 206)  # large images stay as they are
    rows = [("dense", torch.ones(4, 1, 8, 8)), ("searched: levels 6 2 (50% sparse)", torch.ones(4, 1, 8, 8))]
    image = torch.from_numpy(np.array(labelled_rows(rows))).float()
    strip = 64 + 2 * 2
    assert image.shape == (2 * strip, image.shape[1], 3)
    margin = image.shape[1] - (4 * 64 + 2 * 5)
    assert margin > 100  # the longer label's width
    for r in range(2):  # each row's label is drawn (dark pixels) in the margin; the images are white
        band = image[r * strip:(r + 1) * strip]
        assert band[:, :margin].min() < 100 and band[:, margin:].min() == 255
    short = torch.from_numpy(np.array(labelled_rows(rows[:1]))).float()
    assert short.shape[1] < image.shape[1]  # the margin fits the label
    rgb = np.array(labelled_rows([("dense", torch.zeros(2, 3, 32, 32))]))  # text-to-image samples: colour
    assert rgb.shape == (64 + 4, rgb.shape[1], 3) and rgb[2:-2, -66:-2].max() == 0  # 32 px → 64 px, black


def test_table_markdown():
    rows = {"dense": {"levels": None, "sparsity": 0.0, "macs": 2_000_000, "latency_s": 0.01, "speedup": 1.0},
            "searched": {"levels": [6, 2], "sparsity": 0.5, "macs": 1_000_000, "latency_s": None, "speedup": None}}
    assert table_markdown(rows, "t").split("\n") == [
        "**t**", "", "| schedule | levels | sparsity | MACs | latency/img | speedup |", "| --- | --- | --- | --- | --- | --- |",
        "| dense | dense | 0.0% | 2.000 M | 0.0100s | 1.00× |", "| searched | 6 2 | 50.0% | 1.000 M |  |  |"]


def _fit(run, generations: int, *extra: str, timeout: int = 600):
    """The small search, stdout and stderr redirected to a file (as in a batch job); its text."""
    log = run.parent / f"{run.name}.log"
    with log.open("w") as out:
        done = subprocess.run(fit_command(run, generations, *extra), env=ENV, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, cwd=run.parent)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    return text


def _generation_lines(text: str, total: int) -> list[int]:
    return [int(m) for m in re.findall(rf"^generation (\d+)/{total} · best ssim \d\.\d{{4}} · median .* · ETA ",
                                       text, flags=re.M)]


def test_redirected_search_prints_each_generation_and_logs_figures_to_tensorboard(tmp_path):
    """stdout to a file, the shipped config's SearchProgress, SearchPlots and SampleGrid, EvaluateAtFitEnd
    and a TensorBoardLogger: one line per generation; the event file holds both figures, the sample
    grid and the evaluation table; config.yaml stays in the run folder."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, TENSORS, EventAccumulator

    run = tmp_path / "run"
    text = _fit(run, 2, "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                "--trainer.logger.save_dir", str(tmp_path / "tb"), "--trainer.callbacks+",
                "diffes_pl.callbacks.EvaluateAtFitEnd", "--trainer.callbacks.num_images", "10",
                "--trainer.callbacks.batch_size", "10", "--trainer.callbacks.latency_batch_size", "2",
                "--trainer.callbacks.latency_repeats", "1", "--trainer.callbacks.uniform", "false")
    assert _generation_lines(text, 2) == [1, 2], text[-3000:]
    assert "sync_dist" not in text
    folders = {event.parent for event in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    assert len(folders) == 1  # one run: the accumulator reads every event file of its folder
    accumulator = EventAccumulator(str(folders.pop()), size_guidance={IMAGES: 0, TENSORS: 0}).Reload()
    assert {"plots/fitness", "plots/schedule", "plots/samples"} <= set(accumulator.Tags()[IMAGES])
    samples = accumulator.Images("plots/samples")[-1]
    assert samples.height == 2 * (64 + 4) and samples.width > 10 * 64  # two upscaled, labelled rows of 10
    (table,) = accumulator.Tensors("eval/table/text_summary")
    markdown = table.tensor_proto.string_val[0].decode()
    assert "| schedule | levels |" in markdown and "\n| searched | " in markdown and "\n| dense | dense |" in markdown
    assert "warning: latency from 1 timed run(s)" in text  # the table's speedup is flagged
    assert (run / "config.yaml").is_file() and not list((tmp_path / "tb").rglob("config.yaml"))
    assert (run / "plots" / "samples.png").is_file()


def test_two_processes_without_a_bar(tmp_path):
    """DDP (gloo, 2 CPU processes), `enable_progress_bar false`, a CSVLogger: one line per generation
    (rank 0's), no sync_dist warning, the summary counts both ranks' evaluations, the plots' paths in
    the CSV logger's hparams.yaml, config.yaml in the run folder."""
    import yaml

    run = tmp_path / "run"
    text = _fit(run, 2, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                str(tmp_path / "csv"))
    assert _generation_lines(text, 2) == [1, 2], text[-3000:]
    assert "sync_dist" not in text, text[-3000:]
    evaluated = re.findall(r"\((\d+) restored from the checkpoint, (\d+) evaluated by this run", text)
    assert evaluated == [("0", str(len(evaluation_rows(run))))], text[-3000:]
    hparams = yaml.safe_load(next((tmp_path / "csv").rglob("hparams.yaml")).read_text())
    assert hparams["plots/fitness"] == str(run / "plots" / "fitness.png")
    assert hparams["plots/samples"] == str(run / "plots" / "samples.png")
    assert (run / "config.yaml").is_file() and not list((tmp_path / "csv").rglob("config.yaml"))
