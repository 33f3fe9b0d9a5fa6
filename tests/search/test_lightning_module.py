"""The search under Trainer.fit: budget on every evaluation, rollout reuse identical to full
rollouts, determinism, and kill-and-resume ending exactly like an uninterrupted run."""
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from diffes_pl.schedule import budget_met

from helpers.search_runs import ENV, evaluation_rows, fit_command


def fit(run: Path, epochs: int, *extra: str, wait: bool = True):
    cmd = fit_command(run, epochs, *extra)
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=run.parent)
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=run.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    out = fit(run, 6)
    (run / "stdout.txt").write_text(out.stdout)
    return run


def test_outputs_budget_and_bounds(straight):
    schedule = json.loads((straight / "schedule.json").read_text())
    assert schedule["extra"]["finished"] is True
    assert schedule["num_stages"] == 4 and schedule["levels_max"] == 8 and schedule["pruner"] == "wanda"
    assert schedule["partition"]["steps_per_stage"] == [2, 2, 2, 2]
    records = evaluation_rows(straight)
    assert len({tuple(r["levels"]) for r in records}) == len(records)  # no schedule evaluated twice
    for r in records:
        assert all(0 <= l <= 8 for l in r["levels"])
        assert budget_met(r["levels"], [2, 2, 2, 2], 4)
    best = max(records, key=lambda r: r["fitness"])
    assert schedule["levels"] == best["levels"] and schedule["fitness"] == best["fitness"]
    # children reuse their parent's rollout up to the first changed stage: fewer steps than full
    children = [r for r in records if r["parent"] is not None]
    assert children and sum(r["nfe"] for r in children) < 8 * len(children)
    assert (straight / "checkpoints" / "last.ckpt").exists()
    # stdout is a pipe (a batch job): the configured SearchProgress prints a line per calibration stage, the
    # search one per generation with the best fitness
    shown = (straight / "stdout.txt").read_text()
    assert "calibration, stage 3 · batches 1/1 · elapsed" in shown and "search, generation" not in shown
    assert [int(g) for g in re.findall(r"^generation (\d)/6 · best ssim", shown, flags=re.M)] == [1, 2, 3, 4, 5, 6]
    assert f"best ssim {max(r['fitness'] for r in records):.4f}" in shown
    for png in ("fitness.png", "schedule.png", "samples.png"):  # the configured callbacks' plots
        assert (straight / "plots" / png).stat().st_size > 1000


def run_until_checkpoint(run: Path, generations: int, *extra: str, at_least: int = 2):
    """Starts a search and returns (process, state) once its checkpoint holds ≥ `at_least` generations."""
    proc = fit(run, generations, *extra, wait=False)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and len(torch.load(ckpt, weights_only=False)["diffes"]["nfe_history"]) >= at_least:
            return proc, ckpt
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint with {at_least} generations before the run ended: " + proc.stdout.read().decode())


@pytest.mark.parametrize("logger", [None, "csv"])
def test_kill_and_resume_matches_uninterrupted(straight, tmp_path, logger):
    """SIGKILL after generation k < N: the checkpoint holds k generations; `--ckpt_path last` says it
    resumes at k + 1, evaluates only what generations > k need (the archive of 1..k is restored, not
    recomputed) and ends with the uninterrupted run's schedule.json and evaluations.jsonl — also with
    a logger configured (Lightning would look for "last" in the logger's folder)."""
    run = tmp_path / "run"
    extra = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
             str(tmp_path / "logs")] if logger else []
    proc, ckpt = run_until_checkpoint(run, 6, *extra)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, weights_only=False)["diffes"]
    done, restored = len(state["nfe_history"]), len(state["archive"])
    assert 2 <= done < 6, "the kill must strike mid-search"
    assert {r["generation"] for r in state["archive"]} == set(range(done))
    out = fit(run, 6, "--ckpt_path", "last", *extra)
    assert f"{done} of 6 generations done, continuing at generation {done + 1}" in out.stdout
    total = len(evaluation_rows(straight))
    assert f"{total} schedules evaluated ({restored} restored from the checkpoint, {total - restored} evaluated " \
           "by this run)" in out.stdout
    assert json.loads((run / "schedule.json").read_text()) | {"store": None} == \
        json.loads((straight / "schedule.json").read_text()) | {"store": None}
    assert [(r["levels"], r["fitness"], r["nfe"]) for r in evaluation_rows(run)] == \
        [(r["levels"], r["fitness"], r["nfe"]) for r in evaluation_rows(straight)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no Lightning extras
    if logger:  # the logger saw the generations' statistics, resumed ones included
        metrics = (tmp_path / "logs").rglob("metrics.csv")
        header = next(metrics).read_text().splitlines()[0]
        assert {"best_fitness", "median_fitness", "evaluated", "nfe", "nfe_total"} <= set(header.split(","))


def test_reuse_equals_full_rollout(tmp_path):
    """A child's fitness from the parent's cached stage-entry latents equals a full rollout's."""
    import lightning as L

    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.pruners import WandaPruner
    from diffes_pl.search.lightning_module import DiffES

    module = DiffES(pruner=WandaPruner(), target_level=4, levels=8, num_stages=4, steps=8, num_probes=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    module.ensure_store(trainer, CalibrationDataModule(nsamples=4, batch_size=4), log=lambda *_: None)
    module.trainer = trainer
    module.setup("fit")
    search, adapter = module.search, module.context.adapter
    parent, child = (4, 4, 4, 4), (4, 4, 6, 2)
    search.evaluate(parent, None)
    cached, nfe_reused = search.evaluate(child, parent)
    assert nfe_reused == 4  # stages 2 and 3 only: 2 steps each
    latents, _ = search.engine.run(search.schedule(child))  # full rollout
    images = adapter.decode(latents)
    from diffes_pl.fitness import FitnessInputs

    full = search.metric(FitnessInputs(images, latents, search.reference_images, search.reference_latents,
                                       search.engine.probes.conditions))
    assert cached == full
    # another cached schedule sharing a longer prefix than the parent serves it instead
    other, grandchild = (6, 2, 4, 4), (6, 2, 2, 6)
    search.evaluate(other)
    value, nfe = search.evaluate(grandchild, parent)
    assert nfe == 4  # from `other`'s latents entering stage 2, not the parent's (stage 0)
    latents, _ = search.engine.run(search.schedule(grandchild))
    assert value == search.metric(FitnessInputs(adapter.decode(latents), latents, search.reference_images,
                                                search.reference_latents, search.engine.probes.conditions))


def test_two_processes_equal_one(straight, tmp_path):
    """devices=2 (gloo, CPU): offspring split across ranks, fitness gathered; same search result."""
    run = tmp_path / "run"
    fit(run, 6, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    two, one = (json.loads((r / "schedule.json").read_text()) | {"store": None} for r in (run, straight))
    # the cost differs: each process reuses only the stage prefixes it computed itself
    assert two["extra"].pop("cost")["probe_steps"] >= one["extra"].pop("cost")["probe_steps"]
    assert two == one
    assert [(r["levels"], r["fitness"]) for r in evaluation_rows(run)] == [(r["levels"], r["fitness"]) for r in evaluation_rows(straight)]


@pytest.mark.parametrize("sampler", ["euler_a", "dpm"])
def test_reuse_equals_full_rollout_for_other_samplers(tiny, tmp_path, sampler):
    """Euler ancestral (noise a pure function of probe and step) reuses stage-entry latents with
    results identical to a full rollout; DPM-Solver++ (multistep history) never starts mid-way."""
    from diffes_pl.partition import StagePartition
    from diffes_pl.search.level_space import LevelSpace
    from diffes_pl.search.rollouts import Probes, RolloutEngine
    from diffes_pl.trajectory import TrajectoryStore, make_key

    partition = StagePartition.from_scheduler(tiny.make_scheduler(sampler), 6, 3)
    g = torch.Generator().manual_seed(0)
    stages = [{f"{grp.name}.order": torch.randperm(grp.size, generator=g) for grp in tiny.unit_groups()}
              for _ in range(3)]
    fields = {"denoiser": tiny.identity()}
    store = TrajectoryStore.write(tmp_path / "store", {"key": make_key(fields), "key_fields": fields,
                                                       "pruner": "test", "levels_max": 8, "num_stages": 3}, stages)
    engine = RolloutEngine(tiny, store, partition, Probes.make(tiny, 3, 5), sampler=sampler, guidance=2.0,
                           batch_size=2)
    space = LevelSpace(8, tuple(partition.steps_per_stage), 2)
    parent, child = (space.schedule(levels, partition=partition.to_dict()) for levels in [(2, 2, 2), (2, 4, 0)])
    _, entries = engine.run(parent)
    full, _ = engine.run(child)
    resumed, _ = engine.run(child, 1, entries)
    assert engine.resumable == (sampler != "dpm")
    if engine.resumable:
        torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    small = RolloutEngine(tiny, store, partition, Probes.make(tiny, 3, 5), sampler=sampler, guidance=2.0,
                          batch_size=1)
    torch.testing.assert_close(small.run(child)[0], full, rtol=1e-5, atol=1e-5)  # batch size does not matter


def test_shared_buffer_routing_gives_the_same_fitness_rollouts(tiny, tmp_path):
    """resident_routing=False (the search's low-memory mode) rolls out what resident routing does,
    including a child resumed from its parent's stage-entry latents."""
    from diffes_pl.partition import StagePartition
    from diffes_pl.search.level_space import LevelSpace
    from diffes_pl.search.rollouts import Probes, RolloutEngine
    from helpers.routing_reference import random_store

    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 6, 3)
    store = random_store(tiny, tmp_path / "store", 8, partition, compensated=True)
    engines = [RolloutEngine(tiny, store, partition, Probes.make(tiny, 5, 3), sampler="ddim", guidance=2.0,
                             batch_size=2, resident=resident) for resident in (True, False)]
    space = LevelSpace(8, tuple(partition.steps_per_stage), 3)
    parent, child = (space.schedule(levels, partition=partition.to_dict()) for levels in [(3, 3, 3), (3, 6, 0)])
    (full, entries), (shared, shared_entries) = (e.run(parent) for e in engines)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    resumed = [e.run(child, 1, entries)[0] for e in engines]
    torch.testing.assert_close(resumed[1], resumed[0], rtol=1e-5, atol=1e-6)
    assert tiny.is_dense()
