"""install_schedule: one context manager installs a schedule's router and, when a stage caches, its
feature cache; it removes both on exit and on failure, and installs nothing for the dense model."""
import pytest
import torch

from diffes_pl.caching.installed import install_schedule
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule

from helpers.routing_reference import random_store

H = 4


def dense_output(adapter):
    x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(0))
    return adapter.predict_noise(x, torch.full((2,), 500.0), torch.tensor([1, 2]))


def test_router_and_cache_installed_and_removed(tiny, tmp_path):
    before = dense_output(tiny)
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 6, 3)
    store = random_store(tiny, tmp_path / "store", H, partition)
    full, cached = [100, 90, 80, 70, 60], [30, 28, 26, 24, 22]
    joint = Schedule([2, 2, 2], H, 2, [2, 2, 2], partition=partition.to_dict(), cache_intervals=[2, 1, 1],
                     cache_branch=2, mac_budget=(full[2] + cached[2] + 4 * full[2]) / 600,
                     step_costs={"full": full, "cached": cached})
    level = Schedule([3, 2, 1], H, 2, [2, 2, 2], partition=partition.to_dict())
    with install_schedule(tiny, store, joint) as installed:
        assert installed.listeners == [installed.router, installed.cache]  # router first
        assert installed.cache.rule.intervals == (2, 1, 1) and installed.cache.branch == 2
        installed.router.install(0)
        assert not tiny.is_dense()
    assert tiny.is_dense()
    with install_schedule(tiny, store, level) as installed:
        assert installed.cache is None and installed.listeners == [installed.router]
    assert tiny.is_dense()
    with install_schedule(tiny, store, None) as installed:  # dense: nothing installed
        assert installed.router is None and installed.listeners == []
    with pytest.raises(RuntimeError, match="boom"):
        with install_schedule(tiny, store, joint) as installed:
            installed.router.install(1)
            raise RuntimeError("boom")
    assert tiny.is_dense()
    bad = Schedule([2, 2, 2], H, 2, [2, 2, 2], partition=partition.to_dict(), cache_intervals=[2, 1, 1],
                   cache_branch=99, mac_budget=joint.mac_budget, step_costs=joint.step_costs)
    with pytest.raises(Exception, match="99"):  # the cache cannot be built: the router is removed too
        with install_schedule(tiny, store, bad):
            pass
    assert tiny.is_dense()
    torch.testing.assert_close(dense_output(tiny), before, rtol=0, atol=0)  # the dense denoiser, bit for bit
