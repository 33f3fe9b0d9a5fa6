"""The search under Trainer.fit: budget on every evaluation, rollout reuse identical to full
rollouts, determinism, and kill-and-resume ending exactly like an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffes_pl.partition import budget_met

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--model.pruner", "diffes_pl.pruners.WandaPruner", "--model.num_stages", "4", "--model.steps", "8",
         "--model.num_probes", "6", "--model.offspring", "6", "--model.survivors", "2", "--model.max_move", "2",
         "--data.nsamples", "4", "--data.batch_size", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def fit(run: Path, epochs: int, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "diffes_pl.cli", "fit", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL,
           "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(run), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=run.parent)
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=run.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def lines(run: Path):
    return [json.loads(l) for l in (run / "evaluations.jsonl").read_text().splitlines()]


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
    records = lines(straight)
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
    # the configured SearchProgress: calibration per stage, then generations with the best fitness
    shown = (straight / "stdout.txt").read_text()
    assert "calibration, stage 3" in shown and "search, generation" in shown and "6/6" in shown
    assert f"best ssim {max(r['fitness'] for r in records):.4f}" in shown
    for png in ("fitness.png", "schedule.png", "samples.png"):  # the configured callbacks' plots
        assert (straight / "plots" / png).stat().st_size > 1000


def test_kill_and_resume_matches_uninterrupted(straight, tmp_path):
    run = tmp_path / "run"
    proc = fit(run, 6, wait=False)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once generation ≥ 2 has been saved
        if ckpt.exists() and len({r["generation"] for r in lines(run)}) >= 3 if (run / "evaluations.jsonl").exists() else False:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fit(run, 6, "--ckpt_path", "last")
    assert json.loads((run / "schedule.json").read_text()) | {"store": None} == \
        json.loads((straight / "schedule.json").read_text()) | {"store": None}
    assert [(r["levels"], r["fitness"], r["nfe"]) for r in lines(run)] == \
        [(r["levels"], r["fitness"], r["nfe"]) for r in lines(straight)]


def test_reuse_equals_full_rollout(tmp_path):
    """A child's fitness from the parent's cached stage-entry latents equals a full rollout's."""
    import lightning as L

    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.pruners import WandaPruner
    from diffes_pl.search.module import DiffES

    module = DiffES(pruner=WandaPruner(), target_level=4, levels=8, num_stages=4, steps=8, num_probes=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    module.ensure_store(trainer, CalibrationDataModule(nsamples=4, batch_size=4), log=lambda *_: None)
    module.trainer = trainer
    module.setup("fit")
    parent, child = (4, 4, 4, 4), (4, 4, 6, 2)
    module.evaluate(parent, None)
    cached, nfe_reused = module.evaluate(child, parent)
    assert nfe_reused == 4  # stages 2 and 3 only: 2 steps each
    latents, _ = module.engine.run(child)  # full rollout
    images = module.adapter.decode(latents)
    from diffes_pl.fitness import FitnessInputs

    full = module.metric(FitnessInputs(images, latents, module.reference_images, module.reference_latents,
                                       module.probes.conditions))
    assert cached == full
    # another cached schedule sharing a longer prefix than the parent serves it instead
    other, grandchild = (6, 2, 4, 4), (6, 2, 2, 6)
    module.evaluate(other)
    value, nfe = module.evaluate(grandchild, parent)
    assert nfe == 4  # from `other`'s latents entering stage 2, not the parent's (stage 0)
    latents, _ = module.engine.run(grandchild)
    assert value == module.metric(FitnessInputs(module.adapter.decode(latents), latents, module.reference_images,
                                                module.reference_latents, module.probes.conditions))


def test_two_processes_equal_one(straight, tmp_path):
    """devices=2 (gloo, CPU): offspring split across ranks, fitness gathered; same search result."""
    run = tmp_path / "run"
    fit(run, 6, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert json.loads((run / "schedule.json").read_text()) | {"store": None} == \
        json.loads((straight / "schedule.json").read_text()) | {"store": None}
    assert [(r["levels"], r["fitness"]) for r in lines(run)] == [(r["levels"], r["fitness"]) for r in lines(straight)]


@pytest.mark.parametrize("sampler", ["euler_a", "dpm"])
def test_reuse_equals_full_rollout_for_other_samplers(tiny, tmp_path, sampler):
    """Euler ancestral (noise a pure function of probe and step) reuses stage-entry latents with
    results identical to a full rollout; DPM-Solver++ (multistep history) never starts mid-way."""
    from diffes_pl.partition import StagePartition
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
                           batch_size=2, levels_max=8, target_level=2)
    parent, child = (2, 2, 2), (2, 4, 0)
    _, entries = engine.run(parent)
    full, _ = engine.run(child)
    resumed, _ = engine.run(child, 1, entries)
    assert engine.resumable == (sampler != "dpm")
    if engine.resumable:
        torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    small = RolloutEngine(tiny, store, partition, Probes.make(tiny, 3, 5), sampler=sampler, guidance=2.0,
                          batch_size=1, levels_max=8, target_level=2)
    torch.testing.assert_close(small.run(child)[0], full, rtol=1e-5, atol=1e-5)  # batch size does not matter


def test_shared_buffer_routing_gives_the_same_fitness_rollouts(tiny, tmp_path):
    """resident_routing=False (the search's low-memory mode) rolls out what resident routing does,
    including a child resumed from its parent's stage-entry latents."""
    from diffes_pl.partition import StagePartition
    from diffes_pl.search.rollouts import Probes, RolloutEngine
    from routing_reference import random_store

    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 6, 3)
    store = random_store(tiny, tmp_path / "store", 8, partition, compensated=True)
    engines = [RolloutEngine(tiny, store, partition, Probes.make(tiny, 5, 3), sampler="ddim", guidance=2.0,
                             batch_size=2, levels_max=8, target_level=3, resident=resident) for resident in (True, False)]
    parent, child = (3, 3, 3), (3, 6, 0)
    (full, entries), (shared, shared_entries) = (e.run(parent) for e in engines)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    resumed = [e.run(child, 1, entries)[0] for e in engines]
    torch.testing.assert_close(resumed[1], resumed[0], rtol=1e-5, atol=1e-6)
    assert tiny.is_dense()
