"""The joint search over a level AND a cache interval per stage (model.cache_intervals), on the
built-in model: every evaluated schedule meets the MAC budget, the best schedule file reproduces its
fitness when sampled routed + cached, prefix reuse equals full rollouts, a stopped and resumed joint
search equals an uninterrupted one, and the settings are refused in one line before any work."""
import json

import lightning as L
import pytest
import torch

import diffes_pl as dp
from diffes_pl.caching.installed import install_schedule
from diffes_pl.data.calibration import CalibrationDataModule
from diffes_pl.errors import ScheduleError
from diffes_pl.fitness import FitnessInputs, get_metric
from diffes_pl.pruners import WandaPruner
from diffes_pl.schedule import Schedule
from diffes_pl.step_costs import mac_budget_met
from diffes_pl.search.archive_file import read_evaluations
from diffes_pl.search.builder import level_space
from diffes_pl.search.evolution import EvolutionarySearch
from diffes_pl.search.joint_space import JointSpace
from diffes_pl.search.lightning_module import DiffES
from diffes_pl.search.resume import GenerationCheckpoint, ResumeError, check_resumable
from diffes_pl.search.rollouts import Probes, RolloutEngine

SETTINGS = dict(target_level=4, levels=8, num_stages=4, steps=8, num_probes=4, offspring=4, survivors=2, max_move=2,
                cache_intervals=[1, 2, 3], mac_budget=0.5)
W = [2, 2, 2, 2]


def trainer_for(root, generations):
    return L.Trainer(accelerator="cpu", max_epochs=generations, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, callbacks=[GenerationCheckpoint()])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A joint DiffES under Trainer.fit for 2 generations (store calibrated first, as `fit` does)."""
    root = tmp_path_factory.mktemp("joint")
    module = DiffES(pruner=WandaPruner(), **SETTINGS)
    trainer = trainer_for(root, 2)
    module.ensure_store(trainer, CalibrationDataModule(nsamples=4, batch_size=4), log=lambda *_: None)
    trainer.fit(module)
    return module, trainer


def rows(module):
    return read_evaluations(module.context.root_dir / "evaluations.jsonl")


def test_every_evaluated_schedule_meets_the_mac_budget(fitted):
    module, _ = fitted
    space = module.space
    assert isinstance(space, JointSpace) and module.search.space is space
    assert space.intervals == (1, 2, 3) and space.mac_budget == 0.5 and space.branch == module.context.adapter.cache_points().num_blocks // 2  # the middle block
    records = rows(module)
    assert records == module.search.archive and len(records) > 6
    assert len({(tuple(r["levels"]), tuple(r["intervals"])) for r in records}) == len(records)  # none twice
    for r in records:
        ind = (tuple(r["levels"]), tuple(r["intervals"]))
        assert space.feasible(ind)
        assert mac_budget_met(r["levels"], r["intervals"], W, space.costs, 0.5)
        assert r["macs"] == pytest.approx(space.cost(ind) / space.costs.dense_macs(W))
        assert abs(r["macs"] - 0.5) <= float(space.tolerance) / space.costs.dense_macs(W)
    assert any(k > 1 for r in records for k in r["intervals"])  # the search does cache
    children = [r for r in records if r["parent"] is not None]
    assert children and sum(r["nfe"] for r in children) < 8 * len(children)  # prefix reuse at work


def test_the_best_schedule_file_reproduces_its_fitness_routed_and_cached(fitted):
    module, _ = fitted
    search, context = module.search, module.context
    schedule = Schedule.load(context.root_dir / "schedule.json")  # checks its own MAC budget on load
    assert [schedule.levels, schedule.intervals] == [list(p) for p in search.best]
    assert schedule.mac_budget == 0.5 and schedule.cache_branch == module.space.branch
    assert schedule.step_costs == module.space.costs.to_dict() and schedule.fitness == search.best_fitness
    assert schedule.extra == {"generations": 2, "finished": True, "cost": search.cost()}
    assert schedule.extra["cost"]["probe_steps"] == \
        schedule.extra["cost"]["reference_probe_steps"] + sum(r["probe_steps"] for r in search.archive)
    best = max(rows(module), key=lambda r: r["fitness"])
    assert [schedule.levels, schedule.intervals] == [best["levels"], best["intervals"]]
    assert schedule.mac_fraction() == pytest.approx(best["macs"])
    adapter = context.adapter
    probes = Probes.make(adapter, SETTINGS["num_probes"], 1234)
    with install_schedule(adapter, context.store, schedule) as installed:
        assert installed.cache is not None and installed.cache.rule.intervals == tuple(schedule.intervals)
        latents = dp.sample(adapter, probes.conditions, steps=8, guidance=2.0, sampler="ddim", noise=probes.noise,
                            router=installed.router, cache=installed.cache, output="latents")
    assert adapter.is_dense()
    value = get_metric("ssim")(FitnessInputs(adapter.decode(latents), latents, search.reference_images,
                                             search.reference_latents, probes.conditions))
    assert value == pytest.approx(schedule.fitness, abs=1e-6)


def plain_search(module, seeds=(), space=None) -> EvolutionarySearch:
    context = module.context
    probes = Probes.make(context.adapter, SETTINGS["num_probes"], 1234)
    engine = RolloutEngine(context.adapter, context.store, context.partition, probes, sampler="ddim", guidance=2.0)
    return EvolutionarySearch(engine, get_metric("ssim"), space=space or module.space, offspring=SETTINGS["offspring"],
                              survivors=SETTINGS["survivors"], max_move=SETTINGS["max_move"], seeds=seeds, seed=0)


def test_prefix_reuse_equals_full_rollouts_for_joint_individuals(fitted):
    module, _ = fitted
    search = plain_search(module)
    space, gen = module.space, torch.Generator().manual_seed(3)
    parent = next(ind for ind in space.initial_population(8, gen) if any(k > 1 for k in ind[1]))
    search.evaluate(parent)
    tried = 0
    for _ in range(200):
        child = space.mutate(parent, gen, max_move=2)
        stage = space.first_changed_stage(parent, child)
        if stage < 2 or child in search.fitness:
            continue
        value, nfe = search.evaluate(child, parent)
        assert nfe == 8 - 2 * stage  # resumed at the first changed stage
        latents, _ = search.engine.run(search.schedule(child))  # full rollout
        full = search.metric(FitnessInputs(search._decode(latents), latents, search.reference_images,
                                           search.reference_latents, search.engine.probes.conditions))
        assert value == full
        tried += 1
        if tried == 2:
            break
    assert tried == 2
    assert module.context.adapter.is_dense()


def test_stopped_and_resumed_joint_search_equals_the_uninterrupted_one(fitted, tmp_path):
    module, _ = fitted
    store = str(module.context.store_path)
    first = DiffES(pruner=WandaPruner(), store=store, **SETTINGS)
    first_trainer = trainer_for(tmp_path, 1)
    first_trainer.fit(first)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert len(state["diffes"]["nfe_history"]) == 1  # the checkpoint holds generation 1 only
    assert {r["generation"] for r in state["diffes"]["archive"]} == {0}
    assert all(len(s) == 2 and len(s[1]) == 4 for s in state["diffes"]["survivors"])  # joint individuals
    check_resumable(state, str(ckpt), dict(first.hparams), None, 2)  # same settings: resumable
    for name, value in (("cache_intervals", [1, 2]), ("mac_budget", 0.4), ("cache_branch", 1), ("interval_rate", 0.5)):
        with pytest.raises(ResumeError, match=name):
            check_resumable(state, str(ckpt), {**first.hparams, name: value}, None, 2)
    # a joint checkpoint written before interval_rate existed ran with rate 0.5: it resumes only so
    legacy = {**state, "hyper_parameters": {k: v for k, v in state["hyper_parameters"].items() if k != "interval_rate"}}
    with pytest.raises(ResumeError, match=r"interval_rate: 0\.5 → None"):
        check_resumable(legacy, str(ckpt), dict(first.hparams), None, 2)
    check_resumable(legacy, str(ckpt), {**first.hparams, "interval_rate": 0.5}, None, 2)
    # … while a fixed-interval one (no interval move to weigh) resumes under the default
    fixed = {**legacy, "hyper_parameters": {**legacy["hyper_parameters"], "cache_intervals": [2]}}
    check_resumable(fixed, str(ckpt), {**first.hparams, "cache_intervals": [2]}, None, 2)
    resumed = DiffES(pruner=WandaPruner(), store=store, **SETTINGS)
    trainer_for(tmp_path, 2).fit(resumed, ckpt_path=str(ckpt))
    assert resumed.search.archive == module.search.archive
    assert resumed.search.survivors == module.search.survivors
    assert resumed.search.evaluated_here == len(module.search.archive) - len(state["diffes"]["archive"])
    assert json.loads((tmp_path / "schedule.json").read_text()) | {"store": None} == \
        json.loads((module.context.root_dir / "schedule.json").read_text()) | {"store": None}
    # a level-only search refuses a joint checkpoint (and the other way round)
    context = module.context
    levels = plain_search(module, space=level_space(context.adapter, context.store, context.partition, 4))
    with pytest.raises(ValueError, match="another search space .*model.cache_intervals differs"):
        levels.load_state_dict(state["diffes"])
    # and the plain search object, driven without a Trainer, makes the same generations
    plain = plain_search(module)
    plain.load_state_dict(state["diffes"])
    plain.step()
    assert plain.archive == module.search.archive and plain.survivors == module.search.survivors


@pytest.mark.parametrize("settings, message", [
    (dict(cache_intervals=[0, 2]), "cache_intervals must be a non-empty list of whole numbers ≥ 1"),
    (dict(cache_intervals=[]), "cache_intervals must be a non-empty list"),
    (dict(cache_intervals=[2, 2]), "repeats a value"),
    (dict(cache_intervals=[1, 2], mac_budget=1.5), "mac_budget must be a fraction in"),
    (dict(cache_intervals=[1, 2], cache_branch=-1), "cache_branch must be a whole number ≥ 0"),
    (dict(cache_intervals=[1, 2], init="patterned"), "takes init hybrid or random"),
    (dict(mac_budget=0.5), "set cache_intervals"),
    (dict(cache_branch=2), "set cache_intervals"),
    (dict(interval_rate=0.2), "interval_rate belong to the joint search: set cache_intervals"),
    (dict(cache_intervals=[1, 2], interval_rate=1.5), r"interval_rate must be a probability in \[0, 1\]"),
    (dict(cache_intervals=[1, 2], interval_rate=-0.1), r"interval_rate must be a probability in \[0, 1\]"),
    (dict(cache_intervals=[1, 2], interval_rate=True), r"interval_rate must be a probability in \[0, 1\]"),
])
def test_cache_settings_are_refused_before_any_work(settings, message):
    with pytest.raises(ValueError, match=message) as err:
        DiffES(pruner=WandaPruner(), **settings)
    assert "\n" not in str(err.value)


def test_a_branch_outside_the_denoiser_is_refused_when_it_loads(tmp_path):
    module = DiffES(pruner=WandaPruner(), levels=8, num_stages=4, steps=8, cache_intervals=[1, 2], cache_branch=99)
    with pytest.raises(ValueError, match=r"cache_branch 99 is outside \[0, \d+\)"):
        module.prepare(tmp_path)


def test_level_only_is_the_default():
    module = DiffES(pruner=WandaPruner())
    assert module.hparams.cache_intervals is None and module.hparams.mac_budget is None
    assert module.hparams.interval_rate is None  # a joint search's default: every single-stage move alike
    assert module.space is None and module.settings.cache_intervals is None


def test_joint_seeds_lead_the_initial_population(fitted):
    """A seed is [levels, intervals] (plain levels: interval 1 everywhere); one missing the MAC budget
    is refused naming it."""
    module, _ = fitted
    best = [list(p) for p in module.search.best]
    assert plain_search(module, seeds=[best]).candidates()[0] == (module.search.best, None)
    uniform = next(r for r in module.search.archive if r["intervals"] == [1, 1, 1, 1])["levels"]
    assert plain_search(module, seeds=[uniform]).candidates()[0] == ((tuple(uniform), (1, 1, 1, 1)), None)
    with pytest.raises(ScheduleError, match="seed schedule #0"):
        plain_search(module, seeds=[[[0, 0, 0, 0], [1, 1, 1, 1]]]).candidates()


def test_holdout_per_probe_values_average_to_the_metric(fitted):
    """evaluate_schedules' per-probe SSIM (what compare_cache pairs joint against stacking with): one
    value per unseen probe, their mean the SSIM column, the dense row all 1."""
    from diffes_pl.search.holdout import evaluate_schedules

    module, _ = fitted
    schedule = Schedule.load(module.context.root_dir / "schedule.json")
    rows_ = evaluate_schedules(module.context, {"best": schedule}, num_probes=5, probe_seed=7, per_probe=("ssim",))
    for name in ("dense", "best"):
        values = rows_[name]["ssim_per_probe"]
        assert len(values) == 5 and sum(values) / 5 == pytest.approx(rows_[name]["ssim"], abs=1e-6)
    assert rows_["dense"]["ssim_per_probe"] == pytest.approx([1.0] * 5, abs=1e-6)
    assert min(rows_["best"]["ssim_per_probe"]) < 1 - 1e-4  # the pruned + cached schedule differs from dense
    assert "psnr_per_probe" not in rows_["best"]
