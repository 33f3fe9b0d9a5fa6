"""Pruners on the tiny text-to-image models, calibrated on captions: OBS beats Wanda on layer
reconstruction error for SDXL and FLUX at every stage and level; depth pruning handles FLUX's two-stream
blocks (cosine over the image and text tokens) and SDXL's transformer blocks."""
import pytest
import torch
import torch.nn.functional as F

import diffes_pl as dp
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.pruners import DepthPruner, build_store

from helpers.pruner_reference import (caption_datamodule as _datamodule, caption_trainer as _trainer,
                                      obs_and_wanda_on_captions)

H, STAGES = 4, 2

pytestmark = pytest.mark.usefixtures("one_thread", "hf_cache")


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_obs_beats_wanda_on_reconstruction(family, request, caption_folder, tmp_path):
    """Every stage, group and level: OBS's compensated layer error ≤ Wanda's (FLUX: heads of both
    streams, single-block heads and channels around one proj_out)."""
    adapter = request.getfixturevalue(f"tiny_{family}")
    stores, compared = obs_and_wanda_on_captions(adapter, "euler_a" if family == "sdxl" else "flow_euler",
                                                 caption_folder, tmp_path, 4, STAGES, H)
    assert compared > (100 if family == "sdxl" else 30)
    if family == "sdxl":
        assert stores["obs"].weight(0, adapter.unit_groups()[2].name, 1).shape == (32, 96)  # GEGLU ff: 128 → 96 kept


def test_depth_on_flux_counts_both_streams(tiny_flux, caption_folder, tmp_path):
    partition = StagePartition.from_scheduler(tiny_flux.make_scheduler(), 4, STAGES)
    blocks = len(tiny_flux.blocks())
    store = build_store(_trainer(tmp_path), DepthPruner(), _datamodule(caption_folder, 4), tiny_flux, partition,
                        tmp_path / "depth", blocks, log=lambda *_: None)
    dm = _datamodule(caption_folder, 4)
    dm.attach(tiny_flux, partition)
    for stage in range(STAGES):
        cos = torch.zeros(blocks, dtype=torch.float64)
        count = torch.zeros(blocks, dtype=torch.float64)
        handles = []
        for i in range(blocks):
            def hook(_m, args, kwargs, out, i=i):
                assert isinstance(out, tuple) and len(out) == 2  # (text, image) streams
                for x, y in ((kwargs["hidden_states"], out[1]), (kwargs["encoder_hidden_states"], out[0])):
                    c = F.cosine_similarity(x.double(), y.double(), dim=-1)
                    cos[i] += c.sum()
                    count[i] += c.numel()
            handles.append(tiny_flux.dense_block(i).register_forward_hook(hook, with_kwargs=True))
        ds = dm.stage_dataset(stage)
        with torch.no_grad():
            tiny_flux.predict_noise(ds.latents, ds.timesteps, ds.cond)
        for h in handles:
            h.remove()
        expected = torch.sort(-(cos / count), stable=True).indices
        assert store.block_order(stage).tolist() == expected.tolist()
    # the store routes: a depth schedule skips blocks of both kinds and changes the samples
    cond = tiny_flux.encode_prompts(["a red cat", "a dog"])
    schedule = Schedule([2, 1], blocks, 1.5, partition.steps_per_stage, partition=partition.to_dict())
    kw = dict(steps=4, guidance=1.0, sampler="flow_euler", output="latents")
    routed = dp.sample(tiny_flux, cond, router=dp.Router(tiny_flux, store, schedule), **kw)
    dense = dp.sample(tiny_flux, cond, **kw)
    assert torch.isfinite(routed).all() and (routed - dense).abs().max() > 1e-4 and tiny_flux.is_dense()


def test_depth_on_sdxl(tiny_sdxl, caption_folder, tmp_path):
    partition = StagePartition.from_scheduler(tiny_sdxl.make_scheduler("euler_a"), 4, STAGES)
    store = build_store(_trainer(tmp_path), DepthPruner(), _datamodule(caption_folder, 4), tiny_sdxl, partition,
                        tmp_path / "depth", len(tiny_sdxl.blocks()), log=lambda *_: None)
    assert sorted(store.block_order(1).tolist()) == list(range(11))
