"""The search as a plain object: driven without a Trainer it makes the same generations as DiffES
under Trainer.fit, and its state_dict restores it exactly."""
import pytest
import torch

from diffes_pl.fitness import get_metric
from diffes_pl.schedule import budget_met
from diffes_pl.search.builder import level_space
from diffes_pl.search.evolution import EvolutionarySearch
from diffes_pl.search.resume import GenerationCheckpoint
from diffes_pl.search.rollouts import Probes, RolloutEngine

from helpers.search_runs import calibrated_search

SETTINGS = dict(target_level=4, levels=8, num_stages=4, steps=8, num_probes=6, offspring=6, survivors=2, max_move=2)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """DiffES under Trainer.fit for 2 generations (its store calibrated first, as `diffes-pl fit` does)."""
    module, trainer = calibrated_search(tmp_path_factory.mktemp("fit"), 2, [GenerationCheckpoint()], **SETTINGS)
    trainer.fit(module)
    return module, trainer


def plain_search(context) -> EvolutionarySearch:
    """The same search built from its parts, no LightningModule involved."""
    probes = Probes.make(context.adapter, SETTINGS["num_probes"], 1234)
    engine = RolloutEngine(context.adapter, context.store, context.partition, probes, sampler="ddim", guidance=2.0)
    space = level_space(context.adapter, context.store, context.partition, context.target_level)
    return EvolutionarySearch(engine, get_metric("ssim"), space=space, offspring=SETTINGS["offspring"],
                              survivors=SETTINGS["survivors"], max_move=SETTINGS["max_move"], seed=0)


def test_plain_search_equals_the_lightning_run(fitted):
    module, trainer = fitted
    search = plain_search(module.context)
    statistics = [search.step() for _ in range(2)]
    assert search.generation == 2 == module.search.generation == trainer.global_step  # one step per generation
    assert search.archive == module.search.archive
    assert search.survivors == module.search.survivors and search.fitness == module.search.fitness
    assert torch.equal(search.generator.get_state(), module.search.generator.get_state())
    assert statistics[-1]["nfe_total"] == sum(r["nfe"] for r in search.archive)
    assert statistics[1]["evaluated"] == sum(r["generation"] == 1 for r in search.archive)
    for record in search.archive:
        assert budget_met(record["levels"], [2, 2, 2, 2], 4)
    assert module.best_schedule().levels == list(search.best)


def test_state_dict_restores_the_search_exactly(fitted):
    module, _ = fitted
    straight = plain_search(module.context)
    straight.step()
    restored = plain_search(module.context)
    restored.load_state_dict(straight.state_dict())
    assert restored.generation == 1 and restored.archive == straight.archive
    straight.step()
    restored.step()
    assert restored.archive == straight.archive and restored.survivors == straight.survivors
    assert restored.state_dict()["nfe_history"] == straight.state_dict()["nfe_history"]


def test_the_checkpoint_holds_the_search_and_counts_generations_as_steps(fitted):
    """The module's only parameter is the no-op optimizer's placeholder (see DiffES.configure_optimizers);
    the search is the checkpoint's `diffes` entry; `global_step` counts generations."""
    module, _ = fitted
    assert [name for name, _ in module.named_parameters()] == ["_tick"]
    checkpoint = torch.load(module.context.root_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 and list(checkpoint["state_dict"]) == ["_tick"]
    assert set(checkpoint["diffes"]) == {"survivors", "fitness", "archive", "entries", "generator", "nfe_history",
                                         "cost_history", "per_probe", "raced_out", "store_key", "stopped"}
    assert checkpoint["diffes"]["stopped"] is None and checkpoint["diffes"]["raced_out"] == []
    assert [c["probe_steps"] for c in checkpoint["diffes"]["cost_history"]] == \
        [sum(r["probe_steps"] for r in module.search.archive if r["generation"] == g) for g in range(2)]
    assert checkpoint["diffes"]["archive"] == module.search.archive


def proposal_search(context, proposal: str, racing=None) -> EvolutionarySearch:
    probes = Probes.make(context.adapter, SETTINGS["num_probes"], 1234)
    engine = RolloutEngine(context.adapter, context.store, context.partition, probes, sampler="ddim", guidance=2.0)
    space = level_space(context.adapter, context.store, context.partition, context.target_level)
    return EvolutionarySearch(engine, get_metric("ssim"), space=space, offspring=SETTINGS["offspring"],
                              survivors=SETTINGS["survivors"], max_move=SETTINGS["max_move"], seed=0,
                              proposal=proposal, racing=racing)


def test_random_proposal_evaluates_as_many_fresh_random_schedules(fitted):
    """Random search by the same loop: 6 + 2 random budget-meeting schedules, then 6 new ones per
    generation, none a mutant (no parent), as many evaluations per generation as the evolution's."""
    module, _ = fitted
    evolution, random_ = plain_search(module.context), proposal_search(module.context, "random")
    for _ in range(3):
        evolution.step(), random_.step()
    per_generation = lambda s: [sum(r["generation"] == g for r in s.archive) for g in range(3)]  # noqa: E731
    assert per_generation(random_) == [8, 6, 6] == per_generation(evolution)
    assert all(r["parent"] is None for r in random_.archive)
    assert len({tuple(r["levels"]) for r in random_.archive}) == 20
    for record in random_.archive:
        assert budget_met(record["levels"], [2, 2, 2, 2], 4)
    ranked = sorted(random_.fitness.items(), key=lambda kv: -kv[1])
    assert random_.best == ranked[0][0]  # the best of everything drawn


def test_greedy_proposal_is_best_improvement_hill_climbing(fitted):
    """Greedy by the same loop, against a brute-force climb on the search's own fitness values: round 0
    is the uniform schedule, each round evaluates the whole one-level neighbourhood of the best not yet
    evaluated and moves to its best only if it improves; at a local optimum a round evaluates nothing
    and costs nothing."""
    from diffes_pl.search import level_space as ls

    module, _ = fitted
    search = proposal_search(module.context, "greedy")
    search.step()
    current = (4, 4, 4, 4)
    assert [tuple(r["levels"]) for r in search.archive] == [current]
    seen = {current}
    for _ in range(8):
        statistics = search.step()
        round_ = [tuple(r["levels"]) for r in search.archive if r["generation"] == search.generation - 1]
        expected = [n for n in ls.neighbours(current, 8, [2, 2, 2, 2], 1) if n not in seen]
        assert round_ == expected
        seen |= set(expected)
        best = max([current, *expected], key=lambda ind: (search.fitness[ind], tuple(-x for x in ind)))
        assert search.best == best
        if best == current:  # local optimum: the next round has nothing new
            statistics = search.step()
            assert statistics["evaluated"] == 0 and statistics["probe_steps"] == 0
            break
        current = best
    else:
        pytest.fail("greedy did not reach a local optimum in 8 rounds of a 4-stage space")


def test_proposal_settings_are_refused_with_the_reason():
    from diffes_pl.search.lightning_module import DiffES

    with pytest.raises(ValueError, match="proposal must be one of evolution, random, greedy"):
        DiffES(proposal="annealing")
    with pytest.raises(ValueError, match="proposal greedy .* level-only search"):
        DiffES(proposal="greedy", cache_intervals=[1, 2])
