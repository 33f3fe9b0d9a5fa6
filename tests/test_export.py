"""Export → load → sample reproduces the routed samples exactly, without the original store."""
import shutil

import pytest
import torch

import diffes_pl as dp
from diffes_pl import export
from diffes_pl.partition import Schedule

from .test_routing import STAGES, STEPS, _store


def test_export_load_sample_identical(tiny, tmp_path):
    store, partition = _store(tiny, tmp_path / "store", compensated=True)
    schedule = Schedule([3, 1], store.levels_max, 2, partition.steps_per_stage, partition=partition.to_dict())
    labels = [1, 4, 8]
    with dp.Router(tiny, store, schedule) as router:
        routed = dp.sample(tiny, labels, steps=STEPS, guidance=2.0, seed=3, router=router)
    export.save(tiny, store, schedule, tmp_path / "exported")
    shutil.rmtree(tmp_path / "store")  # the export must not need it
    adapter, router = export.load(tmp_path / "exported")
    again = dp.sample(adapter, labels, steps=STEPS, guidance=2.0, seed=3, router=router)
    assert torch.equal(again, routed)
    routes = dp.TrajectoryStore.open(tmp_path / "exported" / "routes")
    g = tiny.unit_groups()[0].name
    assert routes.weight(0, g, 3) is not None and "weight.1" not in " ".join(routes.keys(0))  # only used levels


def test_load_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffes-pl export"):
        export.load(tmp_path)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_text_to_image_export_samples_identically(text_models, tmp_path, family):
    """A text-to-image export carries the VAE, tokenizers and text encoders (and FLUX's T5 length):
    prompts in, the same images out, without the store."""
    from diffes_pl.partition import StagePartition
    from routing_reference import random_store

    if family == "sdxl":
        adapter, sampler, guidance = text_models.build_tiny_sdxl(), "euler_a", 3.0
    else:
        adapter, sampler, guidance = text_models.build_tiny_flux(), "flow_euler", 1.0
    partition = StagePartition.from_scheduler(adapter.make_scheduler(sampler), STEPS, STAGES)
    store = random_store(adapter, tmp_path / "store", 4, partition, compensated=True)
    schedule = Schedule([3, 1], 4, 2, partition.steps_per_stage, partition=partition.to_dict())
    prompts = ["a red cat sits on the table", "a dog runs in the street"]
    kw = dict(steps=STEPS, guidance=guidance, seed=1, sampler=sampler)
    with dp.Router(adapter, store, schedule) as router:
        routed = dp.sample(adapter, prompts, router=router, **kw)
    export.save(adapter, store, schedule, tmp_path / "exported")
    shutil.rmtree(tmp_path / "store")
    loaded, router = export.load(tmp_path / "exported")
    assert loaded.family == family and loaded.vae is not None
    torch.testing.assert_close(dp.sample(loaded, prompts, router=router, **kw), routed, rtol=0, atol=0)
