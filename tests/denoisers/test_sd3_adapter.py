"""SD3 adapter on tiny random SD3Transformer2DModels (SD3-Medium's kind, and SD3.5-Medium's with attn2 and qk
RMSNorm): prompts encode exactly as StableDiffusion3Pipeline.encode_prompt; slicing equals masking (shared
heads of both streams, the context_pre_only last block, attn2, both MLPs, blocks); dense sampling equals the
pipeline's; routed sampling equals masked sampling (width and depth, CFG with the encoded empty prompt), in
dp.sample and inside the pipeline via the router's step callback; level 0 is dense; OBS reconstructs better
than Wanda; an export round-trips and opens with DiffusionPipeline.from_pretrained; the shipped configs build
SD3-Medium, SD3.5-Medium and SD3.5-Large on the meta device, and SD3-Medium's MACs at 1024² are counted with
77 + 256 text tokens."""
import json
import shutil

import pytest
import torch

import diffes_pl as dp
from diffes_pl import export
from diffes_pl.data.calibration import is_flow
from diffes_pl.denoisers import TextCondition, check_name
from diffes_pl.denoisers.sd3 import SD3Adapter, SkippedJointBlock
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from helpers.pruner_reference import obs_and_wanda_on_captions
from helpers.routing_reference import (mask_block, MaskingListener, dense_masked_routed, masking_callback, mixed_keeps,
                                       random_store, sliced_vs_masked)
from helpers.tiny_sd3 import CLIP_TOKENS, T5_TOKENS, build_tiny_sd3, pipeline, save_sd3_folder

STEPS, STAGES, H = 4, 2, 4
PROMPTS = ["a red cat sits on the table", "a dog runs in the street"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3(text_models):
    return build_tiny_sd3(text_models)


@pytest.fixture(scope="module")
def sd35(text_models):
    return build_tiny_sd3(text_models, dual=True, vae=False, text=False)


@pytest.fixture
def tiny_sd3(text_models):
    """SD3.5-Medium's kind (attn2, qk RMSNorm) with the VAE and text encoders: for the pruner comparison."""
    return build_tiny_sd3(text_models, dual=True)


def _cond(batch=3, seed=0, negatives=False):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, CLIP_TOKENS + T5_TOKENS, 32)
    cond, pooled = torch.randn(shape, generator=g), torch.randn(batch, 24, generator=g)
    if not negatives:
        return TextCondition(cond, pooled)
    return TextCondition(cond, pooled, negative_prompt_embeds=torch.randn(shape, generator=g),
                         negative_pooled_embeds=torch.randn(batch, 24, generator=g))


def _inputs(adapter, batch=3):
    x = torch.randn((batch, *adapter.latent_shape), generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([1000.0, 500.0, 250.0])[:batch], _cond(batch)


def _sliced_vs_masked(adapter, keeps):
    return sliced_vs_masked(adapter, keeps, *_inputs(adapter))


def test_structure(sd3, sd35):
    names = lambda a, i: [(g.attr, g.size, g.unit_width) for g in a.unit_groups() if g.block == i]  # noqa: E731
    assert len(sd3.blocks()) == 3 and sd3.latent_shape == (16, 8, 8) and sd3.default_levels() == 4
    assert names(sd3, 0) == [("attn", 4, 8), ("ff", 128, 1), ("ff_context", 128, 1)]
    last = sd3.dense_block(2)
    assert last.context_pre_only and last.ff_context is None and last.attn.to_add_out is None
    assert names(sd3, 2) == [("attn", 4, 8), ("ff", 128, 1)]  # the pre-only text stream has no MLP
    assert names(sd35, 0) == [("attn", 4, 8), ("attn2", 4, 8), ("ff", 128, 1), ("ff_context", 128, 1)]
    assert names(sd35, 2) == [("attn", 4, 8), ("ff", 128, 1)]
    assert sd3.prediction_type == "flow_prediction" and sd3.noise_schedule["shift"] == 3.0
    assert (sd3.latent_scale, sd3.latent_shift) == (1.5305, 0.0609)
    assert (sd3.pipeline_steps, sd3.pipeline_guidance) == (28, 7.0)
    assert type(sd3.make_scheduler()).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_prompts_encode_as_the_pipeline(sd3):
    """Prompt, pooled and (null condition) empty-prompt embeddings are the pipeline's encode_prompt's."""
    cond = sd3.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (2, CLIP_TOKENS + T5_TOKENS, 32) and cond.pooled_embeds.shape == (2, 24)
    pe, npe, pp, npp = pipeline(sd3).encode_prompt(PROMPTS, None, None, max_sequence_length=T5_TOKENS)
    assert torch.equal(cond.prompt_embeds, pe) and torch.equal(cond.pooled_embeds, pp)
    assert cond.prompt_embeds[:, :CLIP_TOKENS, 24:].abs().max() == 0  # CLIP 8 + 16 zero-padded to T5's 32
    null = sd3.null_condition(cond)
    torch.testing.assert_close(null.prompt_embeds, npe, rtol=0, atol=1e-6)  # "" encoded (batch 1, cached)
    torch.testing.assert_close(null.pooled_embeds, npp, rtol=0, atol=1e-6)
    given = _cond(2, negatives=True)
    assert torch.equal(sd3.null_condition(given).prompt_embeds, given.negative_prompt_embeds)
    without = SD3Adapter(sd3.denoiser, "no-encoders", image_size=64)  # no encoders: zeros, as SDXL / FLUX
    assert without.null_condition(cond).prompt_embeds.abs().max() == 0


@pytest.mark.parametrize("dual", [False, True])
def test_all_groups_sliced_equal_masked(sd3, sd35, dual):
    """Every group at once, keeping half, one, none or all of its units (the pre-only block and attn2
    included)."""
    adapter = sd35 if dual else sd3
    keeps = mixed_keeps(adapter)
    n_dense = sum(p.numel() for p in adapter.denoiser.parameters())
    dense, masked, sliced = _sliced_vs_masked(adapter, keeps)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert (sliced - dense).abs().max() > 1e-3
    for grp in adapter.unit_groups():
        adapter.install(grp, adapter.sliced_module(grp, keeps[grp.name]))
    assert sum(p.numel() for p in adapter.denoiser.parameters()) < n_dense  # physically smaller
    adapter.restore_dense()


@pytest.mark.parametrize("which", ["attn", "attn2", "last-attn", "last-attn-none", "ff_context"])
def test_each_kind_of_group_sliced_equals_masked(sd35, which):
    group = {"attn": "transformer_blocks.0.attn", "attn2": "transformer_blocks.1.attn2",
             "last-attn": "transformer_blocks.2.attn", "last-attn-none": "transformer_blocks.2.attn",
             "ff_context": "transformer_blocks.1.ff_context"}[which]
    keep = {"ff_context": torch.arange(0, 128, 3), "last-attn-none": torch.tensor([], dtype=torch.long)}.get(
        which, torch.tensor([1, 3]))
    dense, masked, sliced = _sliced_vs_masked(sd35, {group: keep})
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert (sliced - dense).abs().max() > 1e-4


def test_joint_heads_slice_both_streams(sd3, sd35):
    group = sd3.unit_groups()[0]
    attn, dense = sd3.sliced_module(group, torch.tensor([1, 3])), sd3.dense_module(group)
    rows = list(range(8, 16)) + list(range(24, 32))
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        torch.testing.assert_close(getattr(attn, name).weight, getattr(dense, name).weight[rows])
    assert attn.heads == 2 and attn.to_out[0].weight.shape == (32, 16) and attn.to_add_out.weight.shape == (32, 16)
    last = next(g for g in sd3.unit_groups() if g.block == 2 and g.kind == "heads")
    pre_only = sd3.sliced_module(last, torch.tensor([0]))
    assert pre_only.to_add_out is None and pre_only.add_q_proj.weight.shape == (8, 32)
    qk = sd35.sliced_module(sd35.unit_groups()[0], torch.tensor([2]))  # qk RMSNorm over head_dim: shared
    assert qk.norm_q is sd35.dense_module(sd35.unit_groups()[0]).norm_q and qk.norm_added_k is not None
    w = torch.randn(32, 16)
    assert torch.equal(sd3.sliced_module(group, torch.tensor([0, 2]), out_weight=w).to_out[0].weight, w)


@pytest.mark.parametrize("dual", [False, True])
def test_skipped_blocks_equal_masked(sd3, sd35, dual):
    adapter = sd35 if dual else sd3
    x, t, c = _inputs(adapter)
    skip = [0, 2]  # a full joint block and the context_pre_only last one
    handles = [mask_block(adapter, i) for i in skip]
    masked = adapter.predict_noise(x, t, c)
    for h in handles:
        h.remove()
    for i in skip:
        adapter.install_block(i, adapter.skipped_block(i))
    assert isinstance(adapter.blocks()[2], SkippedJointBlock) and adapter.blocks()[2].context_pre_only
    sliced = adapter.predict_noise(x, t, c)
    adapter.restore_dense()
    torch.testing.assert_close(sliced, masked, rtol=1e-6, atol=1e-6)
    assert (sliced - adapter.predict_noise(x, t, c)).abs().max() > 1e-3


def test_block_streams_skip_the_pre_only_text_stream(sd3):
    seen = []
    handles = [b.register_forward_hook(lambda m, a, kw, out: seen.append(len(sd3.block_streams(a, kw, out))),
                                       with_kwargs=True) for b in sd3.blocks()]
    sd3.predict_noise(*_inputs(sd3, 1))
    for h in handles:
        h.remove()
    assert seen == [2, 2, 1]


def _store(adapter, path, levels_max=H, depth=False, compensated=False):
    partition = StagePartition.from_scheduler(adapter.make_scheduler(), STEPS, STAGES)
    return random_store(adapter, path, levels_max, partition, depth=depth, compensated=compensated), partition


@pytest.mark.parametrize("depth", [False, True])
def test_routed_sampling_equals_masked(sd3, tmp_path, depth):
    """CFG 7 with the encoded empty prompt as the null condition; width (compensated) and depth."""
    levels = len(sd3.blocks()) if depth else H
    store, partition = _store(sd3, tmp_path / "store", levels, depth=depth, compensated=not depth)
    assert is_flow(sd3.noise_schedule) and partition.timesteps[0] == 1000.0
    schedule = Schedule([2, 1] if depth else [3, 1], levels, 1.5 if depth else 2, partition.steps_per_stage,
                        partition=partition.to_dict())
    dense, masked, routed = dense_masked_routed(sd3, store, schedule, PROMPTS, steps=STEPS, guidance=7.0, seed=0,
                                                sampler="flow_euler")
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    assert (routed - dense).abs().max() > 1e-3 and sd3.is_dense()


def test_level_zero_is_dense_and_dense_sampling_is_the_pipelines(sd3, tmp_path):
    store, partition = _store(sd3, tmp_path / "store", compensated=True)
    cond = sd3.encode_prompts(PROMPTS)
    kw = dict(steps=STEPS, guidance=7.0, sampler="flow_euler", output="latents")
    dense = dp.sample(sd3, cond, seed=0, **kw)
    zero = Schedule([0, 0], H, 0, partition.steps_per_stage, partition=partition.to_dict())
    routed = dp.sample(sd3, cond, seed=0, router=Router(sd3, store, zero), **kw)
    torch.testing.assert_close(routed, dense, rtol=0, atol=0)
    torch.testing.assert_close(dp.sample(sd3, cond, seed=0, **kw), dense, rtol=0, atol=0)
    # the pipeline itself, from the same noise, with its own negative prompt "" and CFG
    noise = dp.sampling.seeded_noise((2, *sd3.latent_shape), 0)
    theirs = pipeline(sd3)(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=7.0, max_sequence_length=T5_TOKENS,
                           latents=noise, output_type="latent").images
    torch.testing.assert_close(dense, theirs, rtol=1e-4, atol=1e-4)
    images = sd3.decode(dense)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_routed_transformer_in_sd3_pipeline_equals_masked(sd3, tmp_path):
    pipe = pipeline(sd3)
    store, partition = _store(sd3, tmp_path / "store", compensated=True)
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())

    def run(callback):
        return pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=7.0, max_sequence_length=T5_TOKENS,
                    output_type="latent", generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=callback).images

    dense = run(None)
    masker = MaskingListener(sd3, store, schedule)
    masked = run(masking_callback(masker, partition))
    masker.clear()
    with Router(sd3, store, schedule) as router, router.attach():
        routed = run(None)
    assert sd3.is_dense()
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    assert (routed - dense).abs().max() > 1e-3


def test_obs_beats_wanda_on_reconstruction(tiny_sd3, caption_folder, tmp_path, hf_cache):
    """Every stage, group and level: OBS's compensated layer error ≤ Wanda's (joint heads, attn2, both
    MLPs, the pre-only block), calibrated on captions with flow-matching noise — the SDXL / FLUX check
    (tests/pruners/test_text_pruners.py), on `tiny_sd3`."""
    _, compared = obs_and_wanda_on_captions(tiny_sd3, "flow_euler", caption_folder, tmp_path, STEPS, STAGES, H)
    assert compared > 30


def test_export_round_trip_and_diffusers_loader(sd3, tmp_path):
    """The export is a StableDiffusion3Pipeline folder (transformer, VAE, scheduler, 3 tokenizers + encoders):
    DiffusionPipeline.from_pretrained opens it, and export.load samples the routed images again."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    store, partition = _store(sd3, tmp_path / "store", compensated=True)
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    kw = dict(steps=STEPS, guidance=7.0, seed=1, sampler="flow_euler")
    cond = sd3.encode_prompts(PROMPTS)
    null = sd3.null_condition(cond)
    cond = TextCondition(cond.prompt_embeds, cond.pooled_embeds, negative_prompt_embeds=null.prompt_embeds.clone(),
                         negative_pooled_embeds=null.pooled_embeds.clone())
    with dp.Router(sd3, store, schedule) as router:
        routed = dp.sample(sd3, PROMPTS, router=router, **kw)
        routed_cond = dp.sample(sd3, cond, router=router, **kw)
    export.save(sd3, store, schedule, tmp_path / "exported")
    shutil.rmtree(tmp_path / "store")
    info = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert info["family"] == "sd3" and info["text_len"] == T5_TOKENS and info["pipeline_missing"] == []
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert type(pipe) is StableDiffusion3Pipeline and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipe.scheduler.config.shift == 3.0 and type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    for key, value in sd3.denoiser.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[key], value), key
    loaded, router = export.load(tmp_path / "exported")
    assert isinstance(loaded, SD3Adapter) and loaded.vae is not None and loaded.text_len == T5_TOKENS
    torch.testing.assert_close(dp.sample(loaded, cond, router=router, **kw), routed_cond, rtol=0, atol=0)
    # prompts in: the loaded encoders give the same embeddings, but the empty prompt's batch-1 projection
    # runs on weights read from safetensors at another memory alignment, which rounds differently (~1e-7)
    torch.testing.assert_close(dp.sample(loaded, PROMPTS, router=router, **kw), routed, rtol=0, atol=1e-5)


def test_local_pipeline_folder_loads(sd3, tmp_path):
    folder = save_sd3_folder(sd3, tmp_path / "tiny-sd3")
    assert str(check_name(str(folder))) == "sd3-folder"
    adapter = dp.load_denoiser(str(folder))
    assert isinstance(adapter, SD3Adapter) and adapter.has_text_encoders and adapter.latent_shift == 0.0609
    adapter.text_len = T5_TOKENS  # a pipeline folder does not say the T5 length (the export records it)
    torch.testing.assert_close(adapter.encode_prompts(PROMPTS).prompt_embeds, sd3.encode_prompts(PROMPTS).prompt_embeds)


@pytest.mark.parametrize("name, blocks, heads, dual, params", [
    ("stabilityai/stable-diffusion-3-medium-diffusers", 24, 24, 0, (2.0e9, 2.1e9)),
    ("stabilityai/stable-diffusion-3.5-medium", 24, 24, 13, (2.2e9, 2.3e9)),
    ("stabilityai/stable-diffusion-3.5-large", 38, 38, 0, (8.0e9, 8.2e9)),
])
def test_architectures_without_download(name, blocks, heads, dual, params):
    assert str(check_name(name)) == "sd3-hub"
    adapter = dp.load_denoiser(name, weights=False, device="meta")
    assert isinstance(adapter, SD3Adapter) and len(adapter.blocks()) == blocks
    assert adapter.latent_shape == (16, 128, 128)
    groups = adapter.unit_groups()
    assert {(g.size, g.unit_width) for g in groups if g.kind == "heads"} == {(heads, 64)}
    assert sum(g.attr == "attn2" for g in groups) == dual and sum(g.attr == "attn" for g in groups) == blocks
    assert {g.size for g in groups if g.kind == "channels"} == {4 * heads * 64}
    assert sum(g.attr == "ff_context" for g in groups) == blocks - 1  # the last block is context_pre_only
    assert adapter.default_levels() == heads and adapter.default_levels("depth") == blocks
    assert params[0] < sum(p.numel() for p in adapter.denoiser.parameters()) < params[1]


def test_sd3_medium_macs_at_1024():
    """One forward at 1024² (latent 16×128×128: 4096 image tokens) with 77 + 256 = 333 text tokens."""
    adapter = dp.load_denoiser("stabilityai/stable-diffusion-3-medium-diffusers", weights=False, device="meta")
    assert adapter.example_condition(1).prompt_embeds.shape == (1, 333, 4096)
    macs = dp.count_macs(adapter)
    assert abs(macs / 4.452e12 - 1) < 0.001, macs  # 4,452,168,769,536 measured (the README's MACs table)
    assert dp.count_macs(adapter, batch_size=2) == 2 * macs


def test_errors(sd3):
    with pytest.raises(TypeError, match="TextCondition"):
        dp.sample(sd3, [1], steps=2, sampler="flow_euler")
    with pytest.raises(ValueError, match="joint_attention_dim 32 / pooled_projection_dim 24"):
        dp.sample(sd3, TextCondition(torch.zeros(1, 14, 16), torch.zeros(1, 24)), steps=2, sampler="flow_euler")
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        sd3.validate_condition(TextCondition(torch.zeros(1, 14, 32), torch.zeros(1, 12)))
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        sd3.validate_condition(TextCondition(torch.zeros(1, 14, 32)))  # no pooled embedding
    with pytest.raises(ValueError, match="empty prompt encodes to"):
        sd3.null_condition(TextCondition(torch.zeros(1, 5, 32), torch.zeros(1, 24)))
    with pytest.raises(ValueError, match="flow_euler"):
        sd3.make_scheduler("ddim")
    with pytest.raises(ValueError, match="patch size"):
        SD3Adapter(sd3.denoiser, "odd", image_size=24)
    with pytest.raises(dp.denoisers.UnknownDenoiserError, match="stable-diffusion-3-medium-diffusers"):
        check_name("sd3-medium")
