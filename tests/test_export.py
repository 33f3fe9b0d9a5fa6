"""Export → load → sample reproduces the routed samples exactly, without the original store."""
import shutil

import pytest
import torch

import diffes_pl as dp
from diffes_pl import export
from diffes_pl.schedule import Schedule
from diffes_pl.step_costs import StepCosts

from helpers.routing_reference import random_store_and_partition

STEPS, STAGES = 4, 2  # the routing tests' trajectory: 4 steps in 2 stages, H = 4


def _store(adapter, path, compensated=False):
    return random_store_and_partition(adapter, path, STEPS, STAGES, 4, compensated=compensated)


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
    routes = dp.TrajectoryStore.open(tmp_path / "exported" / "transformer" / "routes")
    g = tiny.unit_groups()[0].name
    assert routes.weight(0, g, 3) is not None and "weight.1" not in " ".join(routes.keys(0))  # only used levels


def test_a_joint_schedule_exports_with_its_cache(tiny, tmp_path):
    """A schedule with cache intervals exports its cache settings (schedule.json): `load_cached`
    samples exactly what routed + cached sampling did; `load` refuses it (the router alone would
    run every step in full)."""
    from diffes_pl.caching import schedule_cache
    from diffes_pl.caching.budget import step_cost_table

    store, partition = _store(tiny, tmp_path / "store", compensated=True)
    table = step_cost_table(tiny, store, partition, branch=2)
    w = partition.steps_per_stage
    costs = StepCosts.parse(table, len(w), store.levels_max)
    levels, ks = [3, 1], [2, 1]
    schedule = Schedule(levels, store.levels_max, 2, w, partition=partition.to_dict(), cache_intervals=ks,
                        cache_branch=2, step_costs=table,
                        mac_budget=costs.trajectory_macs(levels, ks, w) / costs.dense_macs(w))
    labels = [1, 4, 8]
    kw = dict(steps=STEPS, guidance=2.0, seed=3)
    with dp.Router(tiny, store, schedule) as router, schedule_cache(tiny, schedule) as cache:
        routed = dp.sample(tiny, labels, router=router, cache=cache, **kw)
    export.save(tiny, store, schedule, tmp_path / "exported")
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(ValueError, match="schedule caches .*load_cached"):
        export.load(tmp_path / "exported")
    adapter, router, cache = export.load_cached(tmp_path / "exported")
    assert cache is not None and cache.rule.intervals == (2, 1) and cache.branch == 2
    assert torch.equal(dp.sample(adapter, labels, router=router, cache=cache, **kw), routed)
    assert not torch.equal(dp.sample(adapter, labels, router=router, **kw), routed)  # uncached differs
    cache.remove()
    router.remove()


def test_load_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffes-pl export"):
        export.load(tmp_path)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_text_to_image_export_samples_identically(text_models, tmp_path, family):
    """A text-to-image export carries the VAE, tokenizers and text encoders (and FLUX's T5 length):
    prompts in, the same images out, without the store."""
    from diffes_pl.partition import StagePartition
    from helpers.routing_reference import random_store

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


def _same_weights(module, dense):
    got, want = module.state_dict(), dense.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _open_with_diffusers(folder, **missing):
    """The export through diffusers' own loader, components the export lacks passed as None."""
    import json

    from diffusers import DiffusionPipeline

    info = json.loads((folder / "export.json").read_text())
    assert sorted(missing) == info["pipeline_missing"]
    return DiffusionPipeline.from_pretrained(folder, local_files_only=True, **missing), json.loads(
        (folder / "model_index.json").read_text())


def test_dit_export_opens_with_diffusers(random_dit, text_models, tmp_path):
    """A latent DiT export is a complete DiTPipeline folder: transformer, VAE and the adapter's DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline

    random_dit.vae = text_models.tiny_vae(0.18215)
    store, partition = _store(random_dit, tmp_path / "store", compensated=True)
    schedule = Schedule([3, 1], store.levels_max, 2, partition.steps_per_stage, partition=partition.to_dict())
    export.save(random_dit, store, schedule, tmp_path / "exported")
    pipe, index = _open_with_diffusers(tmp_path / "exported")
    assert index["transformer"] == ["diffes_pl.routed_model", "RoutedDiTTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert isinstance(pipe, DiTPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.scheduler.config) == public(random_dit.make_scheduler("ddim").config)
    _same_weights(pipe.transformer, random_dit.denoiser)
    _same_weights(pipe.vae, random_dit.vae)


def test_pixel_space_export_opens_with_diffusers_without_vae(tiny, tmp_path):
    """The built-in model has no VAE (pixel space): model_index records vae as [null, null] and
    export.json says to pass vae=None; transformer and scheduler load with diffusers' loader."""
    store, partition = _store(tiny, tmp_path / "store")
    schedule = Schedule([3, 1], store.levels_max, 2, partition.steps_per_stage, partition=partition.to_dict())
    export.save(tiny, store, schedule, tmp_path / "exported")
    pipe, index = _open_with_diffusers(tmp_path / "exported", vae=None)
    assert index["vae"] == [None, None] and pipe.vae is None
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.beta_end == 0.02
    _same_weights(pipe.transformer, tiny.denoiser)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_text_to_image_export_opens_with_diffusers(text_models, tmp_path, family):
    """SDXL / FLUX exports hold every component a pipeline needs: denoiser, VAE, scheduler, both text
    encoders and tokenizers, and they load with DiffusionPipeline.from_pretrained."""
    from diffusers import (EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           StableDiffusionXLPipeline)
    from helpers.routing_reference import random_store
    from diffes_pl.partition import StagePartition

    adapter = text_models.build_tiny_sdxl() if family == "sdxl" else text_models.build_tiny_flux()
    partition = StagePartition.from_scheduler(adapter.make_scheduler(), STEPS, STAGES)
    store = random_store(adapter, tmp_path / "store", 4, partition, compensated=False)
    schedule = Schedule([3, 1], 4, 2, partition.steps_per_stage, partition=partition.to_dict())
    export.save(adapter, store, schedule, tmp_path / "exported")
    pipe, index = _open_with_diffusers(tmp_path / "exported")
    cls, scheduler, sub = ((StableDiffusionXLPipeline, EulerAncestralDiscreteScheduler, "unet") if family == "sdxl" else
                           (FluxPipeline, FlowMatchEulerDiscreteScheduler, "transformer"))
    assert type(pipe) is cls and type(pipe.scheduler) is scheduler
    encoders = adapter.text_encoders()
    assert index["text_encoder"] == ["transformers", type(encoders.encoders[0]).__name__]
    assert index["text_encoder_2"] == ["transformers", type(encoders.encoders[1]).__name__]
    _same_weights(getattr(pipe, sub), adapter.denoiser)
    _same_weights(pipe.text_encoder_2, encoders.encoders[1])
    ids = pipe.tokenizer("a red cat", padding="max_length", max_length=8).input_ids
    assert ids == encoders.tokenizers[0]("a red cat", padding="max_length", max_length=8).input_ids
