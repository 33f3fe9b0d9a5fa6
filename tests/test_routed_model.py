"""The routed denoiser as a diffusers model: written with `save_pretrained` (or `export.save`) and
reopened with diffusers' own `from_pretrained` — `DiffusionPipeline.from_pretrained` included — it
samples bit-identically to `dp.sample` with the router, routing by the timestep hook, inside
`DiTPipeline` (which has no step callback) and `StableDiffusionXLPipeline` too."""
import json
import shutil

import pytest
import torch

import diffes_pl as dp
from diffes_pl import export
from diffes_pl.integrity import DamagedFileError
from diffes_pl.partition import StagePartition
from diffes_pl.routed_model import routed_denoiser
from diffes_pl.routing import RoutingError
from diffes_pl.schedule import Schedule
from diffes_pl.step_hook import apply_step_source

from helpers.routing_reference import MaskingListener, random_store, random_store_and_partition

STEPS, STAGES, H = 4, 2, 4
LABELS = [1, 4, 8]
KW = dict(steps=STEPS, guidance=2.0, seed=3)


def _schedule(partition, **extra):
    return Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict(), **extra)


@pytest.fixture
def tiny_routes(tiny, tmp_path):
    store, partition = random_store_and_partition(tiny, tmp_path / "store", STEPS, STAGES, H, compensated=True)
    return store, partition, _schedule(partition)


def _routed_samples(adapter, store, schedule, labels=LABELS, **kw):
    with dp.Router(adapter, store, schedule) as router:
        return dp.sample(adapter, labels, router=router, **{**KW, **kw})


def test_an_export_opens_pruned_with_diffusion_pipeline(tiny, tiny_routes, tmp_path):
    from diffusers import DiffusionPipeline, DiTPipeline

    store, _, schedule = tiny_routes
    routed, dense = _routed_samples(tiny, store, schedule), dp.sample(tiny, LABELS, **KW)
    export.save(tiny, store, schedule, tmp_path / "exported")
    shutil.rmtree(tmp_path / "store")  # the export must not need it
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    assert index["transformer"] == ["diffes_pl.routed_model", "RoutedDiTTransformer2DModel"]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exported", vae=None, local_files_only=True)
    assert isinstance(pipe, DiTPipeline) and type(pipe.transformer).__name__ == "RoutedDiTTransformer2DModel"
    again = dp.sample(pipe.transformer.routing.adapter, LABELS, **KW)  # no router passed: the model routes
    assert torch.equal(again, routed) and not torch.equal(again, dense)
    # the denoiser's folder alone, with the class diffusers recorded
    from diffes_pl.routed_model import RoutedDiTTransformer2DModel

    model = RoutedDiTTransformer2DModel.from_pretrained(tmp_path / "exported", subfolder="transformer")
    assert torch.equal(dp.sample(model.routing.adapter, LABELS, **KW), routed)


def test_save_pretrained_round_trip_and_push_to_hub(tiny, tiny_routes, tmp_path, monkeypatch):
    import huggingface_hub

    store, _, schedule = tiny_routes
    routed, dense = _routed_samples(tiny, store, schedule), dp.sample(tiny, LABELS, **KW)
    model = routed_denoiser(tiny, store, schedule)
    shared = {p.data_ptr() for p in tiny.denoiser.parameters()}
    assert all(p.data_ptr() in shared for p in model.parameters())  # the dense weights, not a copy
    assert torch.equal(dp.sample(model.routing.adapter, LABELS, **KW), routed)
    assert tiny.is_dense() and torch.equal(dp.sample(tiny, LABELS, **KW), dense)
    model.save_pretrained(tmp_path / "model")
    written = {p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "routes/manifest.json", "routes/stage_00.safetensors",
            "routes/stage_01.safetensors", "schedule.json", "routing.json"} <= written
    reopened = type(model).from_pretrained(tmp_path / "model")
    assert torch.equal(dp.sample(reopened.routing.adapter, LABELS, **KW), routed)
    # the dense weights are written even after the model routed (routing lifted for the write)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == tiny.denoiser.state_dict().keys()

    uploaded = {}
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: type("Repo", (), {"repo_id": repo_id})())
    monkeypatch.setattr(type(model), "_upload_folder", lambda self, folder, repo_id, **kw: uploaded.update(
        repo=repo_id, files={p.relative_to(folder).as_posix() for p in __import__("pathlib").Path(folder).rglob("*")}))
    model.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="me/pruned-digits")
    assert uploaded["repo"] == "me/pruned-digits" and {"routing.json", "routes/manifest.json"} <= uploaded["files"]


def test_a_joint_schedule_opens_with_its_cache(tiny, tmp_path):
    from diffusers import DiffusionPipeline

    from diffes_pl.caching import schedule_cache
    from diffes_pl.caching.budget import step_cost_table
    from diffes_pl.step_costs import StepCosts

    store, partition = random_store_and_partition(tiny, tmp_path / "store", STEPS, STAGES, H, compensated=True)
    table = step_cost_table(tiny, store, partition, branch=2)
    w = partition.steps_per_stage
    costs = StepCosts.parse(table, len(w), H)
    schedule = _schedule(partition, cache_intervals=[2, 1], cache_branch=2, step_costs=table,
                         mac_budget=costs.trajectory_macs([3, 1], [2, 1], w) / costs.dense_macs(w))
    with dp.Router(tiny, store, schedule) as router, schedule_cache(tiny, schedule) as cache:
        cached = dp.sample(tiny, LABELS, router=router, cache=cache, **KW)
    uncached = _routed_samples(tiny, store, schedule)
    export.save(tiny, store, schedule, tmp_path / "exported")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exported", vae=None, local_files_only=True)
    assert pipe.transformer.routing.cache is not None
    again = dp.sample(pipe.transformer.routing.adapter, LABELS, **KW)
    assert torch.equal(again, cached) and not torch.equal(again, uncached)


@pytest.fixture
def imagenet_dit(text_models):
    """A tiny random DiT with DiT-XL/2's label table (1000 classes + null 1000, which DiTPipeline's
    classifier-free guidance uses) and a tiny VAE: what diffusers' DiTPipeline can run."""
    return text_models.build_random_dit(1000, vae=text_models.tiny_vae(0.18215))


def test_routing_inside_dit_pipeline(imagenet_dit, tmp_path):
    """DiTPipeline (CFG halves in one batch, learned sigma, no step callback): the reopened export
    equals the dense pipeline routed by `router.attach()`, bit for bit, and the masked dense model
    driven by the same timestep hook; another step count is refused."""
    from diffusers import DiffusionPipeline, DiTPipeline

    adapter = imagenet_dit
    store, partition = random_store_and_partition(adapter, tmp_path / "store", STEPS, STAGES, H, compensated=True)
    schedule = _schedule(partition)
    export.save(adapter, store, schedule, tmp_path / "exported")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    # the reopened VAE: weights read from safetensors sit at another alignment and may round differently
    dense = DiTPipeline(transformer=adapter.denoiser, vae=loaded.vae, scheduler=adapter.make_scheduler("ddim"))
    for pipe in (loaded, dense):
        pipe.set_progress_bar_config(disable=True)

    def run(pipe, steps=STEPS):
        return pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    plain = run(dense)
    with dp.Router(adapter, store, schedule) as router, router.attach():
        routed = run(dense)
    masker = MaskingListener(adapter, store, schedule)
    with apply_step_source(adapter, partition, [masker]):
        masked = run(dense)
    masker.clear()
    assert adapter.is_dense() and not hasattr(adapter.denoiser, "_diffusers_hook")
    ours = run(loaded)
    assert torch.equal(ours, routed)
    torch.testing.assert_close(ours, masked, rtol=1e-4, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-3
    with pytest.raises(RoutingError, match="off the trajectory"):
        run(loaded, steps=STEPS + 3)


def test_sdxl_export_in_its_pipeline_and_dp_sample(text_models, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    from diffes_pl.denoisers.sdxl import SDXLAdapter

    adapter = text_models.build_tiny_sdxl()
    partition = StagePartition.from_scheduler(adapter.make_scheduler("euler_a"), STEPS, STAGES)
    store = random_store(adapter, tmp_path / "store", H, partition, compensated=True)
    schedule = _schedule(partition)
    prompts = ["a red cat sits on the table", "a dog runs in the street"]
    kw = dict(steps=STEPS, guidance=3.0, seed=1, sampler="euler_a", output="latents")
    with dp.Router(adapter, store, schedule) as router:
        routed = dp.sample(adapter, prompts, router=router, **kw)
    export.save(adapter, store, schedule, tmp_path / "exported", sampler="euler_a")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert isinstance(loaded, StableDiffusionXLPipeline)
    enc = adapter.text_encoders()
    dense = StableDiffusionXLPipeline(vae=adapter.vae, unet=adapter.denoiser, scheduler=adapter.make_scheduler("euler_a"),
                                      text_encoder=enc.encoders[0], text_encoder_2=enc.encoders[1],
                                      tokenizer=enc.tokenizers[0], tokenizer_2=enc.tokenizers[1])

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    plain = run(dense)
    with dp.Router(adapter, store, schedule) as router, router.attach():
        attached = run(dense)
    ours = run(loaded)
    assert torch.equal(ours, attached) and (ours - plain).abs().max() > 1e-3
    # dp.sample on the reopened UNet (with the pipeline's VAE and the encoders): routed without a router
    reopened = SDXLAdapter(loaded.unet, "tiny-sdxl", vae=loaded.vae, text_encoders=enc)
    assert torch.equal(dp.sample(reopened, prompts, **kw), routed)


def test_a_damaged_routed_model_is_refused_before_loading(tiny, tiny_routes, tmp_path):
    store, _, schedule = tiny_routes
    routed_denoiser(tiny, store, schedule, start=False).save_pretrained(tmp_path / "model")
    from diffes_pl.routed_model import RoutedDiTTransformer2DModel

    shard = tmp_path / "model" / "routes" / "stage_01.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"model: routes/stage_01.safetensors is damaged \(checksum mismatch\)"):
        RoutedDiTTransformer2DModel.from_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="not a routed model folder"):
        RoutedDiTTransformer2DModel.from_pretrained(tmp_path / "store")


def test_moving_the_model_prepares_the_stages_again(tiny, tiny_routes):
    store, _, schedule = tiny_routes
    model = routed_denoiser(tiny, store, schedule)
    model.to(torch.float64)
    prepared = [p for stage in model.routing.router._stages for m in stage["groups"].values() for p in m.parameters()]
    assert prepared and all(p.dtype == torch.float64 for p in prepared)
    images = dp.sample(model.routing.adapter, LABELS, **KW)  # float64 latents through float64 stages
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


def test_the_hook_keys_flux_on_sigma(text_models, tmp_path):
    """FluxPipeline passes the transformer σ = t / 1000 (`adapter.denoiser_timestep`): routed by the
    hook, it equals the masked dense transformer driven by the pipeline's own step callback."""
    from diffusers import FluxPipeline

    from helpers.routing_reference import masking_callback

    adapter = text_models.build_tiny_flux()
    partition = StagePartition.from_scheduler(adapter.make_scheduler("flow_euler"), STEPS, STAGES)
    # uncompensated: the masking reference replaces a layer's output per group, which cannot express the
    # single blocks' fused proj_out compensated for two groups (heads and MLP) at once
    store = random_store(adapter, tmp_path / "store", H, partition)
    schedule = _schedule(partition)
    enc = adapter.text_encoders()
    pipe = FluxPipeline(scheduler=adapter.make_scheduler("flow_euler"), vae=adapter.vae, transformer=adapter.denoiser,
                        text_encoder=enc.encoders[0], text_encoder_2=enc.encoders[1], tokenizer=enc.tokenizers[0],
                        tokenizer_2=enc.tokenizers[1])
    pipe.set_progress_bar_config(disable=True)

    def run(callback=None):
        return pipe(prompt=["a red cat", "a dog"], num_inference_steps=STEPS, guidance_scale=1.0, output_type="latent",
                    height=16, width=16, max_sequence_length=adapter.text_len, callback_on_step_end=callback,
                    generator=torch.Generator().manual_seed(0)).images

    plain = run()
    masker = MaskingListener(adapter, store, schedule)
    masked = run(masking_callback(masker, partition))
    masker.clear()
    with dp.Router(adapter, store, schedule) as router, router.attach():
        routed = run()
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    assert (routed - plain).abs().max() > 1e-2
