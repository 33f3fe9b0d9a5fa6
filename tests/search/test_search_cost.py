"""Racing (children scored on a probe subset first), the cost meter, stopping when converged and
candidates batched stage by stage."""
import json
import math
import subprocess

import pytest
import torch

from diffes_pl.macs import count_macs, schedule_macs
from diffes_pl.fitness import get_metric
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from diffes_pl.search.builder import level_space
from diffes_pl.search.evolution import EvolutionarySearch
from diffes_pl.search.lightning_module import DiffES
from diffes_pl.search.racing import Racing
from diffes_pl.search.rollouts import Probes, RolloutEngine

from helpers.search_runs import ENV, calibrated_search, evaluation_rows, fit_command

SETTINGS = dict(target_level=4, levels=8, num_stages=4, steps=8, num_probes=12, offspring=6, survivors=2, max_move=2)


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """The run context of a small Wanda search (its store calibrated)."""
    root = tmp_path_factory.mktemp("racing")
    module, _ = calibrated_search(root, 1, **SETTINGS)
    return module.prepare(root)


def search(context, probes: Probes, racing: Racing | None, seed: int = 0, batch_size: int | None = None,
           batch_candidates: bool = False) -> EvolutionarySearch:
    """A level-only search on `probes`; with racing, probe batches that divide its rungs (as the builder
    makes them)."""
    if racing is not None:
        batch_size = racing.batch_divisor(batch_size or len(probes.noise))
    engine = RolloutEngine(context.adapter, context.store, context.partition, probes, sampler="ddim", guidance=2.0,
                           batch_size=batch_size)
    return EvolutionarySearch(engine, get_metric("ssim"), space=space_of(context), offspring=SETTINGS["offspring"],
                              survivors=SETTINGS["survivors"], max_move=SETTINGS["max_move"], seed=seed, racing=racing,
                              batch_candidates=batch_candidates)


_SPACES = {}


def space_of(context):
    """The run's level space (its step costs counted once per context)."""
    if id(context) not in _SPACES:
        _SPACES[id(context)] = level_space(context.adapter, context.store, context.partition, context.target_level)
    return _SPACES[id(context)]


def test_the_bound_is_the_stated_rule():
    child = torch.tensor([0.90, 0.80, 0.85, 0.95], dtype=torch.float64)
    cut = torch.tensor([0.92, 0.83, 0.84, 0.97], dtype=torch.float64)
    d = child - cut  # −0.02, −0.03, +0.01, −0.02
    mean, sd = float(d.mean()), float(d.std())
    racing = Racing(4, confidence=2.0)
    assert racing.bound(child, cut, 16) == pytest.approx(mean + 2.0 * sd / 2 * math.sqrt(1 - 4 / 16), abs=1e-15)
    assert not racing.can_reach(child, cut, 16)  # −0.015 + 2 · 0.0171 / 2 · 0.866 < 0
    assert Racing(4, confidence=4.0).can_reach(child, cut, 16)  # a wider bound lets it through
    assert Racing(4, confidence=0.0).bound(child, cut, 16) == pytest.approx(mean)
    with pytest.raises(ValueError, match="below num_probes"):
        Racing(16).check(16)
    # rungs: increasing subset sizes, every one below P; probe batches divide every rung
    rungs = Racing([4, 6])
    assert rungs.rungs == (4, 6) and rungs.bounds(12) == (0, 4, 6, 12) and rungs.batch_divisor(8) == 2
    assert Racing(8).rungs == (8,) and Racing(8).batch_divisor(3) == 2 and Racing(8).batch_divisor(64) == 8
    with pytest.raises(ValueError, match="must increase"):
        Racing([8, 4])
    with pytest.raises(ValueError, match="below num_probes"):
        Racing([4, 12]).check(12)
    with pytest.raises(ValueError, match="whole number"):
        Racing([4, 1.5])
    with pytest.raises(ValueError, match="rungs must increase"):  # refused before any work
        DiffES(race_probes=[16, 8])
    with pytest.raises(ValueError, match="cannot be raced"):
        get_metric("digits_fid").probe_values(None)


def test_per_probe_values_order_schedules_as_the_metric(context):
    """The mean of SSIM's per-probe values is the SSIM; PSNR's are −MSE (PSNR is monotone in their mean)."""
    probes = Probes.make(context.adapter, 8, 5)
    s = search(context, probes, Racing(4))
    scored = s._score((6, 2, 6, 2), torch.arange(8), {})
    assert float(scored.per_probe.mean()) == pytest.approx(scored.value, abs=1e-6)
    inputs = s._inputs(scored.latents, torch.arange(8))
    psnr, neg_mse = get_metric("psnr"), get_metric("psnr").probe_values(inputs)
    assert psnr(inputs) == pytest.approx(10 * math.log10(1 / float(-neg_mse.mean())), rel=1e-5)


def test_a_probe_subset_rolls_out_as_in_the_full_set(context):
    """With probe batches that divide the subset size (what a racing search sets), the subset's and
    the rest's batches are the full rollout's: a raced child that finishes has exactly the latents
    (and so the fitness) a full evaluation gives — also when the rest starts from a cached prefix."""
    probes = Probes.make(context.adapter, 12, 5)
    s = search(context, probes, Racing(5))
    assert s.engine.batch_size == 5
    engine = s.engine
    schedule = s.schedule((6, 2, 6, 2))
    full, full_entries = engine.run(schedule)
    first, first_entries = engine.run(schedule, probes=torch.arange(5))
    rest, rest_entries = engine.run(schedule, 2, [e[5:] for e in full_entries], probes=torch.arange(5, 12))
    assert torch.equal(torch.cat([first, rest]), full)
    assert all(torch.equal(torch.cat([a, b]), c) for a, b, c in zip(first_entries, rest_entries, full_entries))


def test_racing_keeps_the_survivors_when_the_subset_agrees(context):
    """Constructed case: every probe is the same noise and label, so the subset orders every pair of
    schedules exactly as the full set does. Racing must then keep the very survivors (and fitness)
    of the full evaluation, generation by generation, while scoring raced-out children on 3 of 12
    probes only."""
    one = Probes.make(context.adapter, 1, 7)
    same = Probes(one.noise.repeat(12, 1, 1, 1), one.conditions.repeat(12), 7)
    # probe batches of 3 in both: racing's batches (see above), so that fitness values compare exactly
    plain, raced = search(context, same, None, batch_size=3), search(context, same, Racing(3))
    for _ in range(4):
        plain.step()
        raced.step()
        assert raced.survivors == plain.survivors
        assert [raced.fitness[s] for s in raced.survivors] == [plain.fitness[s] for s in plain.survivors]
    out = [r for r in raced.archive if r["raced_out"]]
    assert out and all(r["probes"] == 3 and r["probe_steps"] <= 3 * 8 for r in out)
    assert all(r["fitness"] < raced.fitness[raced.survivors[-1]] for r in out)  # exact here: they were below
    assert raced.cost()["probe_steps"] < plain.cost()["probe_steps"]
    # every schedule the full search evaluated was evaluated or raced out, none twice
    assert {tuple(r["levels"]) for r in raced.archive} == {tuple(r["levels"]) for r in plain.archive}


def test_rungs_judge_again_on_more_probes(context):
    """Racing in rungs (4, then 8 of 12 probes): a child that passed the bound on 4 probes and fails
    it on 8 stops there (archived with its 8-probe fitness); every finished child's fitness is the
    very value a full evaluation gives; rung by rung the rule is the stated bound against the cut."""
    probes = Probes.make(context.adapter, SETTINGS["num_probes"], 1234)
    # `plain` only scores schedules on all probes (`_score`: a full evaluation, per-probe values too)
    raced, plain = search(context, probes, Racing([4, 8], 1.0)), search(context, probes, Racing([4, 8], 1.0))
    cuts = {}  # generation → the cut's per-probe values (the worst survivor entering it)
    for generation in range(4):
        if raced.survivors:
            cuts[generation] = raced.per_probe[raced.survivors[-1]].clone()
        raced.step()
    second = [r for r in raced.archive if r["raced_out"] and r["probes"] == 8]
    assert second and any(r["raced_out"] and r["probes"] == 4 for r in raced.archive)
    full_of = {tuple(r["levels"]): plain._score(tuple(r["levels"]), torch.arange(12), {}) for r in raced.archive}
    # the first generation's cut (no survivors yet): the μ-th best newcomer on the first rung
    newcomers = [tuple(r["levels"]) for r in raced.archive if r["generation"] == 0]
    assert any(r["raced_out"] for r in raced.archive if r["generation"] == 0)
    first = sorted(newcomers, key=lambda ind: -float(full_of[ind].per_probe[:4].mean()))[SETTINGS["survivors"] - 1]
    cuts[0] = full_of[first].per_probe
    for row in raced.archive:
        full = full_of[tuple(row["levels"])]
        if not row["raced_out"]:
            assert row["probes"] == 12 and row["fitness"] == full.value  # bit for bit
            continue
        m = row["probes"]
        assert row["fitness"] == pytest.approx(float(full.per_probe[:m].mean()), abs=1e-6)
        cut = cuts[row["generation"]]
        assert not raced.racing.can_reach(full.per_probe[:m], cut[:m], 12)
        if m == 8:  # it had passed the first rung
            assert raced.racing.can_reach(full.per_probe[:4], cut[:4], 12)
    # a row's cost is what its rungs ran: at most its probes × the 8 steps (less where a prefix was reused)
    assert all(0 < r["probe_steps"] <= r["probes"] * 8 for r in raced.archive)
    assert raced.cost()["probe_steps"] == sum(r["probe_steps"] for r in raced.archive) + 12 * 8


@pytest.mark.parametrize("rungs", [4, [4, 8]])
def test_racing_state_dict_restores_the_search_exactly(context, rungs):
    probes = Probes.make(context.adapter, SETTINGS["num_probes"], 1234)
    straight = search(context, probes, Racing(rungs, 1.0))
    for _ in range(3):
        straight.step()
    first = search(context, probes, Racing(rungs, 1.0))
    first.step()
    state = first.state_dict()
    restored = search(context, probes, Racing(rungs, 1.0))
    restored.load_state_dict(state)
    restored.step()
    restored.step()
    assert any(r["raced_out"] for r in straight.archive)  # the racing path ran
    assert restored.archive == straight.archive and restored.survivors == straight.survivors
    assert restored.raced_out == straight.raced_out and restored.cost() == straight.cost()
    assert all(torch.equal(restored.per_probe[s], straight.per_probe[s]) for s in straight.survivors)
    plain = search(context, probes, None)
    plain.step()
    with pytest.raises(ValueError, match="ran without racing"):
        search(context, probes, Racing(4)).load_state_dict(plain.state_dict())


def test_the_cost_meter_counts_probe_steps_and_macs(context):
    """Probe-steps = probes × steps run; MACs = the routed stages' forwards (count_macs) × probes × 2
    (the CFG pair), for every archived schedule; the totals add the dense reference rollout."""
    probes = Probes.make(context.adapter, 6, 3)
    s = search(context, probes, None)
    s.step()
    w = context.partition.steps_per_stage
    for row in s.archive:
        assert row["probe_steps"] == 6 * row["nfe"] and row["probes"] == 6
        start = len(w) - row["nfe"] // 2  # stages of 2 steps: the rollout started at this stage
        schedule = Schedule(row["levels"], 8, 4, w, partition=context.partition.to_dict())
        with Router(context.adapter, context.store, schedule) as router:
            per_stage = []
            for stage in range(len(w)):
                router.install(stage)
                per_stage.append(count_macs(context.adapter) * w[stage])
        assert row["macs_spent"] == sum(per_stage[start:]) * 6 * 2
    dense = schedule_macs(context.adapter, None, context.partition)
    cost = s.cost()
    assert cost["reference_probe_steps"] == 6 * 8 and cost["reference_macs"] == dense * 6 * 2
    assert cost["probe_steps"] == 6 * 8 + sum(r["probe_steps"] for r in s.archive)
    assert cost["macs"] == dense * 12 + sum(r["macs_spent"] for r in s.archive)


@pytest.fixture(scope="module")
def raced_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("raced") / "run"
    out = subprocess.run(fit_command(run, 4, "--model.num_probes", "12", "--model.race_probes", "4",
                                     "--model.race_confidence", "1.0"),
                         env=ENV, capture_output=True, text=True, timeout=600, cwd=run.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run


def _lines(run):
    return evaluation_rows(run)


def test_racing_cli_resume_and_two_processes_equal_the_straight_run(raced_run, tmp_path):
    records = _lines(raced_run)
    assert any(r["raced_out"] for r in records)
    schedule = json.loads((raced_run / "schedule.json").read_text())
    assert schedule["extra"]["racing"] == {"probes": 4, "of": 12, "confidence": 1.0}
    assert schedule["extra"]["cost"]["probe_steps"] == 12 * 8 + sum(r["probe_steps"] for r in records)
    common = ("--model.num_probes", "12", "--model.race_probes", "4", "--model.race_confidence", "1.0")
    resumed = tmp_path / "resumed"
    for epochs, extra in ((2, ()), (4, ("--ckpt_path", "last"))):
        out = subprocess.run(fit_command(resumed, epochs, *common, *extra), env=ENV, capture_output=True, text=True,
                             timeout=600, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        if epochs == 2:  # the stop struck after generation 2 of 4: the checkpoint holds exactly that
            state = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)["diffes"]
            assert len(state["nfe_history"]) == 2 and len(state["cost_history"]) == 2
    assert _lines(resumed) == records
    two = tmp_path / "two"
    out = subprocess.run(fit_command(two, 4, *common, "--trainer.devices", "2", "--trainer.strategy", "ddp"),
                         env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    key = lambda r: (r["levels"], r["fitness"], r["raced_out"], r["probes"])  # noqa: E731
    assert [key(r) for r in _lines(two)] == [key(r) for r in records]
    assert json.loads((two / "schedule.json").read_text())["levels"] == schedule["levels"]


def test_stop_when_converged_records_why(tmp_path):
    """stop_patience 2 with a delta no search can beat: generation 1 sets the best, generations 2 and
    3 do not improve it by 1.0, so the search stops after generation 3 of 10, finished, and says why."""
    run = tmp_path / "run"
    out = subprocess.run(fit_command(run, 10, "--model.stop_patience", "2", "--model.stop_delta", "1.0"),
                         env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert len(checkpoint["diffes"]["nfe_history"]) == 3
    assert checkpoint["diffes"]["stopped"].startswith("converged: best ssim improved by no more than 1")
    schedule = json.loads((run / "schedule.json").read_text())
    assert schedule["extra"]["finished"] is True and schedule["extra"]["generations"] == 3
    assert schedule["extra"]["stopped"] == checkpoint["diffes"]["stopped"]
    with pytest.raises(ValueError, match="stop_patience must be"):
        DiffES(stop_patience=0)


def test_batched_candidates_equal_one_by_one(context, monkeypatch):
    """Children evaluated together, stage by stage (shared stage configurations in one denoiser call,
    shared prefixes once) get the fitness one-by-one evaluation gives (float rounding: a kernel's last
    bits may depend on the batch), the same survivors, fewer and larger denoiser calls, and no more
    probe-steps; with racing too."""
    probes = Probes.make(context.adapter, 6, 3)
    calls = {"one": [], "many": []}
    forward = context.adapter.predict_noise
    for racing in (None, Racing(3, 1.0)):
        one, many = search(context, probes, racing), search(context, probes, racing, batch_candidates=True)
        for _ in range(3):
            for name, s in (("one", one), ("many", many)):
                monkeypatch.setattr(context.adapter, "predict_noise",
                                    lambda x, *a, _n=name: calls[_n].append(len(x)) or forward(x, *a))
                s.step()
                monkeypatch.undo()
            assert many.survivors == one.survivors
            assert [r["levels"] for r in many.archive] == [r["levels"] for r in one.archive]
        for r, q in zip(many.archive, one.archive):
            assert r["fitness"] == pytest.approx(q["fitness"], abs=1e-5) and r["probes"] == q["probes"]
        assert many.cost()["probe_steps"] <= one.cost()["probe_steps"]
    assert len(calls["many"]) < len(calls["one"]) and max(calls["many"]) > max(calls["one"])
