"""Block-by-block calibration (`calibrate_by="block"`), holding one block's statistics at a time: on a
stack of blocks the inputs are embedded once and each block's outputs carried to the next
(pruners/carry.py); on the SDXL UNet one predict epoch per block, the forward stopped once the block
ran. The store equals the whole-model store bit for bit (same key, same bytes) on every family, the
statistics held at once follow the largest block, not the depth (measured: bytes of the statistic
buffers allocated), and streamed weights move each block to the device for its turn only."""
import lightning as L
import pytest
import torch

from diffes_pl.partition import StagePartition
from diffes_pl.pruners import OBSPruner, WandaPruner, build_store
from diffes_pl.pruners.base import estimate_stat_bytes

from helpers.pruner_reference import HandNoisedDigits, caption_datamodule
from helpers.tiny_pixart import build_tiny_pixart

H, STEPS, STAGES = 4, 4, 2


def _trainer(root):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root)


class Measured(OBSPruner):
    """OBS recording the bytes of the statistic buffers it holds when each part (a stage, or one block
    of it) is reduced and solved: everything gathered for that part is allocated then."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[int] = []

    def _finish_part(self) -> None:
        self.held.append(sum(b.numel() * b.element_size() for s in self._stats.values() for b in s.buffers.values()))
        return super()._finish_part()


def _store_bytes(store) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.path.iterdir()) if p.is_file()}


def _both(adapter, datamodule, sampler, root, pruner_cls=OBSPruner):
    partition = StagePartition.from_scheduler(adapter.make_scheduler(sampler), STEPS, STAGES)
    stores = {}
    for mode in ("model", "block"):
        trainer = _trainer(root / mode)
        stores[mode] = build_store(trainer, pruner_cls(), datamodule(), adapter, partition, root / mode / "store", H,
                                   log=lambda *_: None, calibrate_by=mode)
    assert adapter.is_dense()
    return stores


def _assert_same(stores):
    whole, block = stores["model"], stores["block"]
    assert whole.key == block.key
    assert _store_bytes(whole) == _store_bytes(block)


def test_the_built_in_model_block_by_block_equals_whole(tiny, tmp_path):
    _assert_same(_both(tiny, HandNoisedDigits, "ddim", tmp_path))


def test_wanda_block_by_block_equals_whole(tiny, tmp_path):
    _assert_same(_both(tiny, HandNoisedDigits, "ddim", tmp_path, WandaPruner))


def test_obsdiff_sequential_groups_carried_equal_their_passes(tiny, tmp_path):
    """OBS-Diff's group-sequential calibration (3 groups of 2 blocks, earlier groups pruned at level 2,
    timestep-weighted Hessians): carried block by block — each group's blocks dense on the pruned
    earlier groups' outputs, the group then run again pruned — gives the store of its 3 predict
    passes per stage (each re-running the pruned prefix), bit for bit."""
    sequential = lambda: OBSPruner(sequential_groups=3, sequential_level=2, timestep_weighting=True)
    stores = _both(tiny, HandNoisedDigits, "ddim", tmp_path, sequential)
    _assert_same(stores)
    dense = _both(tiny, HandNoisedDigits, "ddim", tmp_path / "one", lambda: OBSPruner(timestep_weighting=True))
    shards = lambda store: {k: v for k, v in _store_bytes(store).items() if k.startswith("stage_")}
    assert shards(dense["model"]) != shards(stores["model"])  # the pruned earlier groups change the statistics


def test_timestep_weighted_hessians_block_by_block_equal_whole(tiny, tmp_path):
    """OBS-Diff's per-sample timestep weights belong to each batch: carried, every recorded call runs
    each block with its own batch's weights (an unweighted Hessian would give another store)."""
    weighted = lambda: OBSPruner(timestep_weighting=True)
    stores = _both(tiny, HandNoisedDigits, "ddim", tmp_path / "w", weighted)
    _assert_same(stores)
    plain = _both(tiny, HandNoisedDigits, "ddim", tmp_path / "p")
    shards = lambda store: {k: v for k, v in _store_bytes(store).items() if k.startswith("stage_")}
    assert shards(plain["model"]) != shards(stores["model"])  # the weights change the trajectories here


@pytest.mark.parametrize("family", ["sdxl", "flux", "pixart"])
def test_text_families_block_by_block_equal_whole(family, text_models, caption_folder, tmp_path, hf_cache, one_thread):
    """The SDXL UNet runs its blocks down, mid, up (the forward stops once the pass's block ran,
    whatever its place); FLUX has double- then single-stream blocks; PixArt cross-attends to T5."""
    adapter = {"sdxl": lambda: text_models.build_tiny_sdxl(), "flux": lambda: text_models.build_tiny_flux(),
               "pixart": lambda: build_tiny_pixart(text_models)}[family]()
    sampler = {"sdxl": "euler_a", "flux": "flow_euler", "pixart": "dpm"}[family]
    _assert_same(_both(adapter, lambda: caption_datamodule(caption_folder), sampler, tmp_path))


def test_the_sd3_joint_blocks_block_by_block_equal_whole(text_models, caption_folder, tmp_path, hf_cache, one_thread):
    from helpers.tiny_sd3 import build_tiny_sd3

    _assert_same(_both(build_tiny_sd3(text_models), lambda: caption_datamodule(caption_folder), "flow_euler", tmp_path))


def _flux_blocks(text_models, double: int, single: int):
    """The tiny FLUX adapter's builder with `double` + `single` blocks."""
    from diffusers import FluxTransformer2DModel

    from diffes_pl.denoisers.flux import FluxAdapter

    base = text_models.build_tiny_flux()
    config = {k: v for k, v in base.denoiser.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**config, "num_layers": double, "num_single_layers": single})
    adapter = FluxAdapter(model, "tiny-flux", vae=base.vae, text_encoders=base.text_encoders())
    adapter.text_len = base.text_len
    return adapter


def test_peak_statistics_follow_the_largest_block_not_the_depth(text_models, caption_folder, tmp_path, hf_cache,
                                                                 one_thread):
    """FLUX-shaped tiny models of 2 and 8 blocks: block by block, the statistics held at once (the
    buffers allocated, measured) are the same for both — the largest block's, as estimated; whole-model
    calibration holds 4× more for the deeper one."""
    peaks = {}
    for depth in (1, 4):
        adapter = _flux_blocks(text_models, depth, depth)
        partition = StagePartition.from_scheduler(adapter.make_scheduler("flow_euler"), STEPS, 1)
        for mode in ("model", "block"):
            pruner = Measured()
            build_store(_trainer(tmp_path), pruner, caption_datamodule(caption_folder), adapter, partition,
                        tmp_path / f"{depth}-{mode}", H, log=lambda *_: None, calibrate_by=mode)
            peaks[depth, mode] = max(pruner.held)
            assert peaks[depth, mode] == estimate_stat_bytes(adapter, pruner)  # the plan's figure, measured
            assert len(pruner.held) == (1 if mode == "model" else 2 * depth)  # solved parts: one per block
    assert peaks[1, "block"] == peaks[4, "block"]
    assert peaks[4, "model"] == 4 * peaks[1, "model"] > peaks[4, "block"]


def test_auto_chooses_block_by_block_only_when_the_whole_model_does_not_fit(tiny, monkeypatch):
    import diffes_pl.memory as memory

    pruner = OBSPruner()
    whole = estimate_stat_bytes(tiny, pruner)
    monkeypatch.setattr(memory, "available_bytes", lambda device: whole + 1)
    assert pruner.calibrate_by("auto", tiny, "cpu") == "model" and pruner.num_parts == 1
    monkeypatch.setattr(memory, "available_bytes", lambda device: whole - 1)
    assert pruner.calibrate_by("auto", tiny, "cpu") == "block" and pruner.carry and pruner.num_parts == 1
    assert estimate_stat_bytes(tiny, pruner) < whole
    with pytest.raises(ValueError, match="calibrate_by must be one of auto, model, block; got 'layer'"):
        pruner.calibrate_by("layer", tiny, "cpu")
    sequential = OBSPruner(sequential_groups=2, sequential_level=4)
    assert sequential.calibrate_by("model", tiny, "cpu") == "model" and sequential.num_parts == 2  # its own passes
    assert sequential.calibrate_by("block", tiny, "cpu") == "block" and sequential.carry and sequential.num_parts == 1


@pytest.mark.parametrize("carried", [True, False])
def test_each_block_runs_as_often_as_whole_model_calibration_runs_it(tiny, tmp_path, monkeypatch, carried):
    """Carried (a stack of blocks), every block runs once per batch, as in a whole-model calibration.
    Re-running the forward per block (a UNet's way; forced here on the built-in model), pass b runs
    blocks 0..b only: the first block runs once per pass (6×), the last once per stage."""
    calls = {}
    blocks = tiny.blocks()
    for mode in ("model", "block"):
        counts = [0] * len(blocks)
        handles = [b.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
                   for i, b in enumerate(blocks)]
        monkeypatch.setattr(tiny, "carries_blocks", carried)
        partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), STEPS, STAGES)
        stores = build_store(_trainer(tmp_path / mode), OBSPruner(), HandNoisedDigits(), tiny, partition,
                             tmp_path / mode / "store", H, log=lambda *_: None, calibrate_by=mode)
        for h in handles:
            h.remove()
        calls[mode] = counts
    n = len(blocks)
    assert calls["block"] == (calls["model"] if carried else [calls["model"][0] * (n - i) for i in range(n)])
    assert calls["model"] == [calls["model"][0]] * n and calls["model"][0] > 0
    assert stores.key  # the forced re-running path builds the same store too (test_*_equals_whole: bytes)


def test_streamed_weights_move_each_block_to_the_device_for_its_turn(tiny, tmp_path, monkeypatch):
    """Streamed, every block goes to the host at a stage's start, then to the device right before its
    turn and back right after, one at a time; the store is the whole-model store. (On the CPU both
    places are the CPU: the moves are recorded, the memory saving is measured on a GPU.)"""
    moves = []
    for i, block in enumerate(tiny.blocks()):
        original = block.to
        monkeypatch.setattr(block, "to", lambda device, i=i, original=original: (moves.append((i, str(device))),
                                                                                  original(device))[1])
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), STEPS, STAGES)
    pruner = OBSPruner()
    streamed = build_store(_trainer(tmp_path / "s"), pruner, HandNoisedDigits(), tiny, partition,
                           tmp_path / "s" / "store", H, log=lambda *_: None, calibrate_by="block", stream=True)
    assert pruner.stream
    n = len(tiny.blocks())
    one_stage = [(i, "cpu") for i in range(n)] + [m for i in range(n) for m in ((i, "cpu"), (i, "cpu"))]
    assert moves == one_stage * STAGES
    monkeypatch.undo()
    whole = build_store(_trainer(tmp_path / "w"), OBSPruner(), HandNoisedDigits(), tiny, partition,
                        tmp_path / "w" / "store", H, log=lambda *_: None, calibrate_by="model")
    assert _store_bytes(streamed) == _store_bytes(whole)


def test_streamed_weights_need_a_stack_of_blocks(text_models):
    pruner = OBSPruner()
    with pytest.raises(ValueError, match="stream_weights needs block-by-block calibration on a stack of blocks"):
        pruner.calibrate_by("model", text_models.build_tiny_sdxl(), "cpu", stream=True)
    with pytest.raises(ValueError, match="do not run one after another"):
        pruner.calibrate_by("block", text_models.build_tiny_sdxl(), "cpu", stream=True)
