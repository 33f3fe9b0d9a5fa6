"""The MAC cost model of joint schedules (`caching.budget.step_cost_table`) against counts of what
routing + caching run, and exact stage-prefix reuse with caching: a rollout resumed at a stage
boundary from the parent's latents equals the child's full rollout bit for bit (every stage starts
with an empty cache, so nothing but the latents crosses a boundary)."""
import pytest
import torch

import diffes_pl as dp
from diffes_pl.caching import BlockCache, feature_cache, step_macs
from diffes_pl.caching.budget import step_cost_table, width_step_cost_table
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.step_costs import StepCosts
from diffes_pl.routing import Router
from diffes_pl.sampling import prepare_scheduler, rollout, seeded_noise
from diffes_pl.search.joint_space import joint_space
from diffes_pl.search.space import first_changed_stage
from helpers.routing_reference import random_store

H = 4
LABELS = torch.tensor([0, 3, 7])


def _partition(tiny, steps, stages):
    return StagePartition.from_scheduler(tiny.make_scheduler("ddim"), steps, stages)


def test_width_table_is_the_routed_and_cached_count_at_every_level(tiny, tmp_path, one_thread):
    partition = _partition(tiny, 6, 2)
    store = random_store(tiny, tmp_path / "store", H, partition, compensated=True)
    table = step_cost_table(tiny, store, partition, branch=2)
    full, cached = table["full"], table["cached"]
    assert len(full) == len(cached) == H + 1 and isinstance(full[0], int)  # one row: stages cost alike
    assert full[0] == dp.count_macs(tiny) and all(a > b for a, b in zip(full, full[1:]))
    assert all(c < f for c, f in zip(cached, full)) and all(a >= b for a, b in zip(cached, cached[1:]))
    for level in (1, 3):
        schedule = Schedule.uniform(level, H, partition.steps_per_stage, partition=partition.to_dict())
        with Router(tiny, store, schedule) as router:
            for stage in (0, 1):
                router.install(stage)
                assert dp.count_macs(tiny) == full[level]
                with BlockCache(tiny, 2, 2) as cache:
                    assert step_macs(tiny, cache, stage=stage) == (full[level], cached[level])
    assert tiny.is_dense()
    assert step_cost_table(tiny, store, partition) == {"full": full, "cached": None}


@pytest.mark.parametrize("family", ["tiny", "sdxl"])
def test_the_store_less_width_table_is_the_routed_count(family, tiny, text_models, tmp_path, one_thread):
    """Width MACs depend on how many units each group keeps, not which: the table counted with the
    first units kept (no store: how benchmarks/table7.py counts SDXL on the meta device) equals the
    routed one, for block caching (tiny DiT) and DeepCache (a tiny SDXL UNet, 2 and 4 heads: H = 2
    keeps every group divisible, so a full step's cost is affine in the level and any schedule costs
    what the uniform one of the same mean level costs — the paper's "30 %" has one MAC figure)."""
    adapter, levels, branch = (tiny, H, 2) if family == "tiny" else (text_models.build_tiny_sdxl(vae=False, text=False), 2, 0)
    partition = StagePartition.from_scheduler(adapter.make_scheduler(), 4, 2)
    store = random_store(adapter, tmp_path / "store", levels, partition, compensated=True)
    table = width_step_cost_table(adapter, levels, branch=branch)
    assert table == step_cost_table(adapter, store, partition, branch=branch) and adapter.is_dense()
    assert table["full"][0] == dp.count_macs(adapter) and all(c < f for c, f in zip(table["cached"], table["full"]))
    assert width_step_cost_table(adapter, levels) == {"full": table["full"], "cached": None}
    if family == "sdxl":
        costs = StepCosts.parse(table, 2, levels)
        assert costs.trajectory_macs([0, 2], None, [2, 2]) == costs.trajectory_macs([1, 1], None, [2, 2])
        assert costs.trajectory_macs([1, 1], [2, 2], [2, 2]) == 2 * (table["full"][1] + table["cached"][1])


def test_depth_table_has_a_row_per_stage(tiny, tmp_path, one_thread):
    """6 equal blocks, b = 3: a full step at level L skips L blocks; a cached step runs blocks [0, 3)
    minus the stage's skipped ones among them (random orders per stage), so the rows differ."""
    partition = _partition(tiny, 6, 2)
    store = random_store(tiny, tmp_path / "store", 6, partition, depth=True)
    table = step_cost_table(tiny, store, partition, branch=3)
    dense = dp.count_macs(tiny)
    for i in range(6):
        tiny.install_block(i, tiny.skipped_block(i))
    rest = dp.count_macs(tiny)  # embedding and output layers
    tiny.restore_dense()
    block = (dense - rest) // 6
    for s in range(2):
        order = store.block_order(s).tolist()
        assert table["full"][s] == [dense - level * block for level in range(7)]
        assert table["cached"][s] == [rest + block * sum(1 for i in range(3) if i not in order[:level])
                                      for level in range(7)]
    assert table["cached"][0] != table["cached"][1]
    costs = StepCosts.parse(table, 2, 6)
    assert costs.stage_macs(1, 3, 2, 2) == 2 * table["full"][1][2] + table["cached"][1][2]


def _run(tiny, store, partition, levels, ks, x, steps=None, states=None):
    """Routed + cached rollout (DDIM, CFG 2) of the schedule (levels, ks) from latents x."""
    schedule = Schedule(list(levels), H, sum(levels) / len(levels), partition.steps_per_stage,
                        partition=partition.to_dict())
    scheduler = prepare_scheduler(tiny, "ddim", partition.num_steps)
    on_latents = None if states is None else (lambda step, z: states.__setitem__(step, z.clone()))
    with Router(tiny, store, schedule) as router, feature_cache(tiny, list(ks), 2, levels=schedule.levels) as cache:
        return rollout(tiny, scheduler, x, LABELS, guidance=2.0, partition=partition, steps=steps,
                       listeners=[router, cache], on_latents=on_latents)


@pytest.mark.parametrize("child", [((2, 2, 2), (2, 2, 1)),  # an interval change; stage 1 = stage 0's (2, 2)
                                   ((2, 3, 1), (2, 1, 1))])  # a level change
def test_prefix_reuse_with_caching_equals_the_full_rollout(tiny, tmp_path, one_thread, child):
    """9 steps in 3 stages of 3, k = 2: a stage runs full, cached, full. The resumed child starts at
    the first stage whose (level, k) differs from the parent's; had the count of steps since the last
    refresh run on across a boundary with the same (level, k) (the first case), the full rollout's
    step 3 would reuse stage 0's features and no resumed rollout could equal it."""
    partition = _partition(tiny, 9, 3)
    store = random_store(tiny, tmp_path / "store", H, partition, compensated=True)
    parent = ((2, 2, 2), (2, 1, 1))
    x0 = seeded_noise((3, *tiny.latent_shape), 0)
    states = {}
    parent_out = _run(tiny, store, partition, *parent, x0, states=states)
    stage = first_changed_stage(list(zip(*parent)), list(zip(*child)))  # the first (level, k) that differs
    assert stage == 1
    start = partition.steps_of_stage(stage).start
    full = _run(tiny, store, partition, *child, x0)
    resumed = _run(tiny, store, partition, *child, states[start], steps=range(start, partition.num_steps))
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    assert (full - parent_out).abs().max() > 1e-4
    assert tiny.is_dense()


def test_a_joint_schedule_builds_its_cache_and_checks_its_own_budget(tiny, tmp_path, one_thread):
    """The search's path end to end on the built-in model: the cost table, a joint space at target
    level 2 of 4, a hybrid population whose schedules route + cache; a level-only one builds none."""
    from diffes_pl.caching import schedule_cache

    partition = _partition(tiny, 6, 3)
    store = random_store(tiny, tmp_path / "store", H, partition)
    table = step_cost_table(tiny, store, partition, branch=2)
    space = joint_space(H, partition.steps_per_stage, table, 2, intervals=(1, 2), branch=2)
    pop = space.initial_population(6, torch.Generator().manual_seed(0))
    assert pop[0] == ((2, 2, 2), (1, 1, 1)) and pop[1][1] == (2, 2, 2)  # level-only, then cache-only
    for ind in pop[:2]:
        schedule = space.schedule(ind, partition=partition.to_dict(), pruner=store.pruner)
        path = tmp_path / "schedule.json"
        schedule.save(path)
        schedule = Schedule.load(path)
        assert schedule.mac_fraction() == pytest.approx(space.cost(ind) / (table["full"][0] * 6))
        cache = schedule_cache(tiny, schedule)
        assert (cache is None) == (not schedule.caches)
        with Router(tiny, store, schedule) as router:
            dp.sample(tiny, LABELS.tolist(), steps=6, router=router, cache=cache, output="latents")
        if cache is not None:
            assert cache.rule.intervals == tuple(ind[1]) and cache.branch == 2
            cache.remove()
    assert tiny.is_dense()


def test_trajectory_macs_from_the_table_or_counted_on_the_router(tiny, tmp_path, one_thread):
    """A joint schedule's MACs are its table's; a level-only one's are counted on its routed
    denoiser, the same whether its router is given or built on the store; with neither, refused."""
    from diffes_pl.caching.budget import trajectory_macs
    from diffes_pl.macs import count_macs

    partition = _partition(tiny, 6, 3)
    store = random_store(tiny, tmp_path / "store", H, partition)
    level = Schedule([3, 2, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    with Router(tiny, store, level) as router:
        counted = trajectory_macs(tiny, level, partition, router=router)
        by_hand = 0
        for stage in range(3):
            router.install(stage)
            by_hand += 2 * count_macs(tiny)
    assert counted == by_hand == trajectory_macs(tiny, level, partition, store=store)
    assert trajectory_macs(tiny, None, partition) == 6 * count_macs(tiny) > counted
    with pytest.raises(ValueError, match="pass its router or the trajectory store"):
        trajectory_macs(tiny, level, partition)
    table = step_cost_table(tiny, store, partition, branch=2)
    space = joint_space(H, partition.steps_per_stage, table, 2, intervals=(1, 2), branch=2)
    ind = space.initial_population(2, torch.Generator().manual_seed(0))[1]
    joint = space.schedule(ind, partition=partition.to_dict())
    assert trajectory_macs(tiny, joint, partition) == space.cost(ind)  # no router, no store: the table
