"""Pruners under Lightning on the built-in model: stores, orders, and OBS beating the order-only
pruners on layer reconstruction error at every stage and level."""
import lightning as L
import pytest
import torch

from diffes_pl.partition import StagePartition
from diffes_pl.pruners import (ActivationPruner, DepthPruner, MagnitudePruner, OBSPruner, WandaPruner,
                               build_store)
from diffes_pl.pruners.base import store_key_fields
from diffes_pl.trajectory import StoreMismatchError, TrajectoryStore

from helpers.pruner_reference import HandNoisedDigits, hand_hessians, run_items

H, STAGES = 8, 2


def _trainer(tmp_path):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path)


@pytest.fixture(scope="module")
def stores(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stores")
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 20, STAGES)
    out = {}
    for pruner in [OBSPruner(), WandaPruner(), MagnitudePruner(), ActivationPruner(), DepthPruner()]:
        levels = len(tiny.blocks()) if pruner.depth else H
        dm = HandNoisedDigits()
        out[pruner.name] = build_store(_trainer(tmp), pruner, dm, tiny, partition, tmp / pruner.name, levels,
                                       log=lambda *_: None)
    return out, partition


def _stage_hessians(tiny, partition):
    """Σ x xᵀ / tokens of every output layer's inputs, per stage, gathered by hand."""
    dm = HandNoisedDigits()
    dm.attach(tiny, partition)
    return [hand_hessians(tiny, tiny.unit_groups(), run_items(tiny, dm.items(stage))) for stage in range(STAGES)]


def _error(weight, pruned, hessian):
    delta = (weight.double() - pruned.double())
    return float(torch.trace(delta @ hessian @ delta.T))


def test_obs_beats_order_only_pruners_on_reconstruction(tiny, stores):
    store_map, partition = stores
    hessians = _stage_hessians(tiny, partition)
    for stage in range(STAGES):
        for g in tiny.unit_groups():
            w = tiny.output_layer(g).weight.detach()
            hess = hessians[stage][g.name]
            for level in range(1, H + 1):
                removed = g.removed_at(level, H)
                if removed == g.size:
                    continue  # everything removed: every pruner gives the same empty layer
                errors = {}
                for name in ("obs", "wanda", "magnitude", "activation"):
                    store = store_map[name]
                    keep = torch.sort(store.order(stage, g.name)[removed:]).values
                    cols = g.columns(keep)
                    pruned = torch.zeros_like(w)
                    comp = store.weight(stage, g.name, level)
                    pruned[:, cols] = w[:, cols] if comp is None else comp.to(w.dtype)
                    errors[name] = _error(w, pruned, hess)
                assert errors["obs"] <= errors["wanda"] * (1 + 1e-6), (stage, g.name, level, errors)
                assert errors["obs"] <= errors["magnitude"] * (1 + 1e-6), (stage, g.name, level, errors)


def test_store_contents(tiny, stores):
    store_map, _ = stores
    obs = store_map["obs"]
    assert obs.compensated and obs.levels_max == H and obs.num_stages == STAGES
    g = tiny.unit_groups()[0]
    order = obs.order(0, g.name)
    assert sorted(order.tolist()) == list(range(g.size))
    assert obs.weight(0, g.name, 3).shape == (128, (8 - 3) * 16)
    assert obs.weight(0, g.name, 3).dtype == torch.float32  # the denoiser's dtype by default
    assert obs.weight(0, g.name, 0) is None
    assert store_map["wanda"].weight(0, g.name, 3) is None
    mag = store_map["magnitude"]
    assert torch.equal(mag.order(0, g.name), mag.order(1, g.name))  # data-free: same every stage
    depth = store_map["depth"]
    assert sorted(depth.block_order(0).tolist()) == list(range(6)) and depth.depth


def test_wanda_scores_live_on_input_columns(tiny, stores):
    """A head whose output-projection input columns are zeroed must be removed first by Wanda and
    magnitude (heads live on the INPUT columns of to_out, not on its output rows)."""
    store_map, partition = stores
    g = tiny.unit_groups()[0]
    layer = tiny.output_layer(g)
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight[:, 5 * 16:6 * 16] = 0
        from diffes_pl.pruners.scores import MagnitudePruner

        order, _ = MagnitudePruner().group_trajectory(g, layer.weight, None)
        assert order[0] == 5
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


def test_depth_order_matches_cosines(tiny, stores):
    """Block order from the store equals the order of 1 − cos(in, out) measured by hand."""
    store_map, partition = stores
    dm = HandNoisedDigits()
    dm.attach(tiny, partition)
    cos = torch.zeros(6, dtype=torch.float64)
    count = torch.zeros(6, dtype=torch.float64)
    handles = []
    for i, block in enumerate(tiny.blocks()):
        def hook(_m, args, kwargs, out, i=i):
            c = torch.nn.functional.cosine_similarity(args[0].double(), out.double(), dim=-1)
            cos[i] += c.sum()
            count[i] += c.numel()
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for batch in dm.items(1):
            tiny.predict_noise(batch["latents"][None], batch["timesteps"][None], batch["cond"][None])
    for h in handles:
        h.remove()
    expected = torch.sort(-(cos / count), stable=True).indices
    assert store_map["depth"].block_order(1).tolist() == expected.tolist()


def test_mismatched_store_is_refused(tiny, stores, tmp_path):
    store_map, partition = stores
    obs = store_map["obs"]
    fields = store_key_fields(tiny, partition, HandNoisedDigits(seed=1).settings(), OBSPruner(), H)
    with pytest.raises(StoreMismatchError, match="calibration.seed"):
        TrajectoryStore.open(obs.path, key_fields=fields)
    fields = store_key_fields(tiny, partition, HandNoisedDigits().settings(), OBSPruner(damp=0.1), H)
    with pytest.raises(StoreMismatchError, match="pruner.damp"):
        TrajectoryStore.open(obs.path, key_fields=fields)


def test_timestep_weight_formula():
    from diffes_pl.pruners.obs import timestep_weight

    assert timestep_weight(0, 20, 0.1, 1.0) == pytest.approx(1.0)  # first sampling step weighs most
    assert timestep_weight(19, 20, 0.1, 1.0) == pytest.approx(0.1)  # ln(1) = 0 → w_min
    import math

    assert timestep_weight(10, 20, 0.1, 1.0) == pytest.approx(0.1 + 0.9 * math.log(10) / math.log(20))


def test_weighted_hessian_equals_hand_sum(tiny):
    """Σ_b w_b Σ_tokens x xᵀ with per-sample weights, against a direct computation."""
    from diffes_pl.pruners.stats import HessianStatistic

    g = tiny.unit_groups()[0]
    x = torch.randn(3, 16, 128, dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    stat = HessianStatistic(g, 128, "cpu", torch.float64, weights=lambda: w)
    stat.add_batch(x)
    expected = sum(w[b] * x[b].T @ x[b] for b in range(3))
    torch.testing.assert_close(stat.buffers["hessian"], expected)
