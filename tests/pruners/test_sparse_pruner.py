"""Unstructured and N:M pruners (pruners/sparse.py) on the built-in model: every level hits its exact
count or pattern and the masks nest; compensated values sit exactly on the kept weights; routed
sampling equals the same weights applied by hooks on the dense denoiser; level 0 is dense; block by
block equals whole-model; q/k/v (declared as sharing one input) really read one tensor."""
import lightning as L
import pytest
import torch
import torch.nn.functional as F

import diffes_pl as dp
from diffes_pl.partition import StagePartition
from diffes_pl.pruners import SparseMagnitudePruner, SparseOBSPruner, SparseWandaPruner, build_store
from diffes_pl.routing import Router
from diffes_pl.sparsity import Granularity, level_weight, removed_mask

from helpers.pruner_reference import HandNoisedDigits
from helpers.tiny_pixart import build_tiny_pixart
from helpers.tiny_sd3 import build_tiny_sd3

STEPS = 4


def _trainer(root):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root)


def _build(adapter, pruner, root, H, stages=2, calibrate_by="model"):
    partition = StagePartition.from_scheduler(adapter.make_scheduler("ddim"), STEPS, stages)
    store = build_store(_trainer(root), pruner, HandNoisedDigits(), adapter, partition, root / "store", H,
                        log=lambda *_: None, calibrate_by=calibrate_by)
    assert adapter.is_dense()
    return store, partition


@pytest.fixture(scope="module")
def wanda_store(tiny, tmp_path_factory):
    return _build(tiny, SparseWandaPruner(), tmp_path_factory.mktemp("wanda"), H=4)


@pytest.fixture(scope="module")
def obs_nm_store(tiny, tmp_path_factory):
    return _build(tiny, SparseOBSPruner(granularity="n:m", m=4), tmp_path_factory.mktemp("obs"), H=4)


def _layers(adapter):
    for name, linear in adapter.sparse_linears().items():
        yield name, linear.weight.detach()


def test_the_built_in_model_declares_every_linear_of_its_groups(tiny):
    layers = tiny.sparse_layers()
    # per block: attention (q, k, v share the hidden states; the output projection) and the MLP (2 layers)
    assert [layer.paths for layer in layers[:4]] == [("to_q", "to_k", "to_v"), ("to_out.0",), ("net.0.proj",), ("net.2",)]
    assert len(layers) == 4 * len(tiny.blocks())
    assert sum(len(layer.paths) for layer in layers) == 6 * len(tiny.blocks())


@pytest.mark.parametrize("which", ["wanda", "obs_nm"])
def test_every_level_removes_its_exact_count_or_pattern_and_masks_nest(which, wanda_store, obs_nm_store, tiny):
    store, partition = wanda_store if which == "wanda" else obs_nm_store
    granularity, H = store.granularity, store.levels_max
    assert granularity == (Granularity("unstructured") if which == "wanda" else Granularity("n:m", 4))
    for stage in range(partition.num_stages):
        for name, dense in _layers(tiny):
            level_map = store.level_map(stage, name)
            assert level_map.shape == dense.shape and level_map.dtype == torch.uint8
            assert int(level_map.min()) >= 1 and int(level_map.max()) <= H  # level H removes every weight
            for level in range(1, H + 1):
                removed = removed_mask(level_map, level)
                assert int((~removed).sum()) == granularity.kept(level, H, tuple(dense.shape))
                if which == "wanda":  # Wanda compares within each row: the same count in every row
                    assert set(removed.sum(dim=1).tolist()) == {level * dense.shape[1] // H}
                else:  # exactly `level` of every 4 consecutive inputs of every row
                    assert set(removed.reshape(-1, 4).sum(dim=1).tolist()) == {level}
                values = store.values(stage, name, level)
                if which == "wanda" or level == H:
                    assert values is None
                    continue
                weight = level_weight(dense, level_map, level, values)
                assert bool((weight[removed] == 0).all()) and torch.equal(weight[~removed], values)
                assert not torch.equal(values, dense[~removed])  # compensated: the kept weights moved


@pytest.mark.parametrize("which,levels", [("wanda", [3, 1]), ("obs_nm", [2, 0]), ("obs_nm", [1, 3])])
def test_routed_sampling_equals_masked_weights_on_the_dense_denoiser(which, levels, wanda_store, obs_nm_store, tiny):
    """The reference: forward hooks on the DENSE linear layers computing F.linear with the stage's
    weight (dense with zeros where removed, the compensated values where kept). Level 0 routes the
    dense modules themselves."""
    store, partition = wanda_store if which == "wanda" else obs_nm_store
    H = store.levels_max
    schedule = dp.Schedule(levels, H, sum(levels) / 2, partition.steps_per_stage, partition=partition.to_dict(),
                           pruner=store.pruner, store_key=store.key)
    labels = [0, 3, 7]
    dense = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, output="latents")
    with Router(tiny, store, schedule) as router:
        routed = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, router=router, output="latents")
        if 0 in levels:
            router.install(levels.index(0))
            assert tiny.is_dense()

    class Masking:
        def __init__(self):
            self.handles, self.stage = [], None

        def on_step(self, step, stage):
            if stage == self.stage:
                return
            self.clear()
            self.stage, level = stage, levels[stage]
            for name, linear in tiny.sparse_linears().items():
                w = level_weight(linear.weight, store.level_map(stage, name), level, store.values(stage, name, level))
                self.handles.append(linear.register_forward_hook(lambda m, args, out, w=w: F.linear(args[0], w, m.bias)))

        def clear(self):
            for h in self.handles:
                h.remove()
            self.handles = []

    masking = Masking()
    masked = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=0, num_stages=store.num_stages, listeners=[masking],
                       output="latents")
    masking.clear()
    torch.testing.assert_close(routed, masked, rtol=1e-5, atol=1e-6)
    assert (routed - dense).abs().max() > 1e-3
    assert tiny.is_dense()


@pytest.mark.parametrize("which", ["wanda", "obs_nm"])
def test_shared_buffers_route_like_resident_weights(which, wanda_store, obs_nm_store, tiny):
    """resident=False (one buffer per linear, refilled at stage boundaries from the stage's packed mask
    and values) samples exactly what resident routing samples, twice in a row, and holds less."""
    store, partition = wanda_store if which == "wanda" else obs_nm_store
    schedule = dp.Schedule([1, 3], store.levels_max, 2, partition.steps_per_stage, partition=partition.to_dict())
    labels = [1, 6]
    kw = dict(steps=STEPS, guidance=2.0, seed=0, output="latents")
    with Router(tiny, store, schedule) as resident:
        expected = dp.sample(tiny, labels, router=resident, **kw)
        resident_bytes = resident.resident_bytes()
    with Router(tiny, store, schedule, resident=False) as shared:
        for _ in range(2):  # the second run refills buffers last filled by the other stage
            assert torch.equal(dp.sample(tiny, labels, router=shared, **kw), expected)
        shared_bytes = shared.resident_bytes()
    dense = sum(lin.weight.numel() * 4 for lin in tiny.sparse_linears().values())
    assert resident_bytes == 2 * dense and shared_bytes == dense  # two stages' weights vs one buffer
    from diffes_pl.routing import estimate_prepared_bytes

    assert estimate_prepared_bytes(tiny, store, schedule, resident=True) == resident_bytes
    assert estimate_prepared_bytes(tiny, store, schedule, resident=False) > shared_bytes  # + masks and values
    assert tiny.is_dense()


@pytest.mark.parametrize("pruner", [lambda: SparseOBSPruner(granularity="n:m", m=4),
                                    lambda: SparseMagnitudePruner(granularity="unstructured")])
def test_block_by_block_store_equals_the_whole_model_store(pruner, tiny, tmp_path):
    stores = {mode: _build(tiny, pruner(), tmp_path / mode, H=4, stages=1, calibrate_by=mode)[0]
              for mode in ("model", "block")}
    assert stores["model"].key == stores["block"].key
    files = {mode: {p.name: p.read_bytes() for p in sorted(s.path.iterdir()) if p.is_file()} for mode, s in stores.items()}
    assert files["model"] == files["block"]


def test_obsdiff_sequential_groups_calibrate_on_the_earlier_groups_pruned(tiny, tmp_path):
    """OBS-Diff's group-sequential mode with timestep weights: the later groups' statistics see the
    earlier groups pruned, so their stored weights differ from a one-pass calibration's while the
    first group's are equal; the denoiser is dense after the build."""
    one = _build(tiny, SparseOBSPruner(granularity="n:m", timestep_weighting=True), tmp_path / "one", H=4, stages=1)[0]
    seq = _build(tiny, SparseOBSPruner(granularity="n:m", timestep_weighting=True, sequential_groups=2,
                                       sequential_level=2), tmp_path / "seq", H=4, stages=1)[0]
    first, last = "blocks.0.attn1.to_q", f"blocks.{len(tiny.blocks()) - 1}.ff.net.2"
    assert torch.equal(one.level_map(0, first), seq.level_map(0, first))
    assert torch.equal(one.values(0, first, 2), seq.values(0, first, 2))
    assert not torch.equal(one.values(0, last, 2), seq.values(0, last, 2))
    assert tiny.is_dense()


def _shared_inputs_hold(adapter, call):
    """Runs `call` with pre-hooks on every linear of every declared set; each set's inputs are one tensor."""
    seen, handles = {}, []
    linears = adapter.sparse_linears()
    for layer in adapter.sparse_layers():
        for name in layer.names():
            handles.append(linears[name].register_forward_pre_hook(
                lambda _m, args, k=layer.key, n=name: seen.setdefault(k, {}).setdefault(n, args[0])))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    shared = [layer for layer in adapter.sparse_layers() if len(layer.paths) > 1]
    assert shared
    for layer in shared:
        inputs = list(seen[layer.key].values())
        assert len(inputs) == len(layer.paths)
        for x in inputs[1:]:
            assert torch.equal(x, inputs[0]), layer
    return shared


def _call(adapter):
    latents = torch.randn(2, *adapter.latent_shape)
    return lambda: adapter.predict_noise(latents, torch.tensor([500.0, 20.0]), adapter.example_condition(2))


def test_declared_shared_inputs_are_one_tensor_on_every_family_built(tiny, text_models):
    assert {layer.paths for layer in _shared_inputs_hold(tiny, _call(tiny))} == {("to_q", "to_k", "to_v")}
    pixart = build_tiny_pixart(text_models, vae=False, text=False)
    # PixArt's cross-attention: k and v read the text, q the image stream
    assert ("to_k", "to_v") in {layer.paths for layer in _shared_inputs_hold(pixart, _call(pixart))}
    sd3 = build_tiny_sd3(text_models, vae=False, text=False)
    assert ("add_q_proj", "add_k_proj", "add_v_proj") in {layer.paths for layer in _shared_inputs_hold(sd3, _call(sd3))}
    sdxl = text_models.build_tiny_sdxl(vae=False, text=False)
    _shared_inputs_hold(sdxl, _call(sdxl))


def test_flux_is_refused_with_the_reason(text_models):
    with pytest.raises(ValueError, match="share one proj_out"):
        SparseOBSPruner().check_denoiser(text_models.build_tiny_flux(vae=False, text=False), 4)


def test_n_m_refuses_inputs_it_cannot_group(tiny):
    with pytest.raises(ValueError, match="divisible by 3"):
        SparseOBSPruner(granularity="n:m", m=3).check_denoiser(tiny, 3)
    with pytest.raises(ValueError, match="granularity must be one of"):
        SparseOBSPruner(granularity="2:4")


def test_an_export_holds_the_routed_masks_packed_and_samples_exactly(obs_nm_store, tiny, tmp_path):
    """export.save → load → sample equals routed sampling, without the store; the routes hold each
    stage's mask at its level only, packed 8 weights to a byte, and that level's compensated values."""
    import shutil

    from diffes_pl import export

    store, partition = obs_nm_store
    schedule = dp.Schedule([3, 1], store.levels_max, 2, partition.steps_per_stage, partition=partition.to_dict(),
                           pruner=store.pruner, store_key=store.key)
    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    store = dp.TrajectoryStore.open(copy)
    labels = [2, 5]
    with Router(tiny, store, schedule) as router:
        routed = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=1, router=router, output="latents")
    export.save(tiny, store, schedule, tmp_path / "exported")
    shutil.rmtree(copy)
    adapter, router = export.load(tmp_path / "exported")
    again = dp.sample(adapter, labels, steps=STEPS, guidance=2.0, seed=1, router=router, output="latents")
    assert torch.equal(again, routed)
    routes = dp.TrajectoryStore.open(tmp_path / "exported" / "transformer" / "routes")
    name, dense = next(iter(_layers(tiny)))
    assert sorted(k for k in routes.keys(0) if k.startswith(name + ".")) == [f"{name}.removed.3", f"{name}.values.3"]
    packed = routes.tensor(0, f"{name}.removed.3")
    assert packed.dtype == torch.uint8 and packed.shape == (dense.shape[0], dense.shape[1] // 8)
    assert routes.values(0, name, 3).numel() == dense.numel() // 4  # 1 of every 4 kept at level 3
