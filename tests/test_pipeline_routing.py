"""A routed UNet dropped into diffusers' own StableDiffusionXLPipeline (tiny random components,
Euler ancestral): the router's timestep hook gives the same latents as the masked dense UNet driven
by the pipeline's step callback, and refuses a pipeline that runs other timesteps."""
import pytest
import torch

from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router, RoutingError
from helpers.routing_reference import MaskingListener, random_store

PROMPTS = ["a red cat sits on the table", "a dog runs in the street"]
STEPS, STAGES, H = 4, 2, 4


@pytest.fixture(scope="module")
def pipe_and_adapter(text_models):
    from diffusers import StableDiffusionXLPipeline

    adapter = text_models.build_tiny_sdxl()
    enc = adapter.text_encoders()
    pipe = StableDiffusionXLPipeline(vae=adapter.vae, text_encoder=enc.encoders[0], text_encoder_2=enc.encoders[1],
                                     tokenizer=enc.tokenizers[0], tokenizer_2=enc.tokenizers[1], unet=adapter.denoiser,
                                     scheduler=adapter.make_scheduler("euler_a"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter


def _run(pipe, callback, steps=STEPS):
    return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), callback_on_step_end=callback).images


def test_routed_unet_in_sdxl_pipeline_equals_masked(pipe_and_adapter, tmp_path):
    pipe, adapter = pipe_and_adapter
    partition = StagePartition.from_scheduler(adapter.make_scheduler("euler_a"), STEPS, STAGES)
    store = random_store(adapter, tmp_path / "store", H, partition, compensated=True)
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    dense = _run(pipe, None)
    masker = MaskingListener(adapter, store, schedule)
    masker.on_step(0, 0)

    def masked_callback(_pipe, step, _t, _kw):
        if step + 1 < STEPS:
            masker.on_step(step + 1, partition.step_to_stage[step + 1])
        return {}

    masked = _run(pipe, masked_callback)
    masker.clear()
    with Router(adapter, store, schedule) as router, router.attach():
        routed = _run(pipe, None)
    assert adapter.is_dense() and not hasattr(adapter.denoiser, "_diffusers_hook")
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    assert (routed - dense).abs().max() > 1e-3


def test_pipeline_with_other_timesteps_is_refused(pipe_and_adapter, tmp_path):
    pipe, adapter = pipe_and_adapter
    partition = StagePartition.from_scheduler(adapter.make_scheduler("euler_a"), STEPS, STAGES)
    store = random_store(adapter, tmp_path / "store", H, partition)
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    with Router(adapter, store, schedule) as router, router.attach(), \
            pytest.raises(RoutingError, match="off the trajectory .* 4 steps"):
        _run(pipe, None, steps=STEPS + 2)
    assert adapter.is_dense()
