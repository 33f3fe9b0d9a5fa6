"""The OBS-Diff baseline: one stage, timestep-weighted Hessians, blocks calibrated group-wise in turn
(each group sees the earlier groups already pruned). Checked against a hand computation: the second
group's trajectory equals `prune_groups` on Hessians gathered with the first group pruned."""
import lightning as L
import pytest
import torch

from diffes_pl.denoisers.base import keep_from_order
from diffes_pl.partition import StagePartition
from diffes_pl.pruners import OBSPruner, build_store, prune_groups

from helpers.pruner_reference import HandNoisedDigits, hand_hessians, run_items

H, LEVEL = 8, 4


def _build(tiny, tmp_path, pruner, name):
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 20, 1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    return build_store(trainer, pruner, HandNoisedDigits(), tiny, partition, tmp_path / name, H,
                       log=lambda *_: None), partition


def _hessians(tiny, partition, groups):
    dm = HandNoisedDigits()
    dm.attach(tiny, partition)
    return hand_hessians(tiny, groups, run_items(tiny, dm.items(0)))


def test_sequential_groups_see_earlier_groups_pruned(tiny, tmp_path):
    seq, partition = _build(tiny, tmp_path, OBSPruner(mode="exact", sequential_groups=2, sequential_level=LEVEL), "seq")
    plain, _ = _build(tiny, tmp_path, OBSPruner(mode="exact"), "plain")
    assert tiny.is_dense()  # calibration leaves the dense denoiser behind
    first = [g for g in tiny.unit_groups() if g.block < 3]
    second = [g for g in tiny.unit_groups() if g.block >= 3]
    # the first group is calibrated on the dense model: same as one pass
    for g in first:
        assert torch.equal(seq.order(0, g.name), plain.order(0, g.name))
        torch.testing.assert_close(seq.weight(0, g.name, LEVEL), plain.weight(0, g.name, LEVEL))
    # the second group: Hessians gathered by hand with the first group pruned at LEVEL
    try:
        for g in first:
            keep = keep_from_order(seq.order(0, g.name), g.removed_at(LEVEL, H))
            tiny.install(g, tiny.sliced_module(g, keep, seq.weight(0, g.name, LEVEL)))
        hessians = _hessians(tiny, partition, second)
    finally:
        tiny.restore_dense()
    changed = 0
    for g in second:
        w = tiny.output_layer(g).weight.detach()
        milestones = [g.removed_at(level, H) for level in range(1, H + 1)]
        results = prune_groups(w, hessians[g.name], g.unit_width, milestones, mode="exact")
        expected = torch.cat([results[-1].removed, results[-1].kept])
        assert torch.equal(seq.order(0, g.name), expected), g.name
        torch.testing.assert_close(seq.weight(0, g.name, LEVEL), results[LEVEL - 1].weight.float(),
                                   rtol=1e-4, atol=1e-5)
        changed += not torch.allclose(seq.weight(0, g.name, LEVEL), plain.weight(0, g.name, LEVEL))
    assert changed == len(second)  # pruning upstream really changed what downstream layers see


def test_sequential_needs_a_level():
    with pytest.raises(ValueError, match="sequential_level"):
        OBSPruner(sequential_groups=3)
