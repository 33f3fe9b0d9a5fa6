"""PixArt-Σ adapter on a tiny random PixArtTransformer2DModel with a tiny T5 and VAE: slicing equals
masking (attn1 heads, attn2 heads, MLP channels, everything removed, blocks), level 0 is dense bit
for bit, routed sampling equals masked sampling (width and depth, DPM-Solver++ and DDIM), the T5
attention mask reaches the cross-attention, the adapter samples exactly as diffusers'
PixArtSigmaPipeline and routes inside it, an export round-trips through DiffusionPipeline, OBS
reconstructs better than Wanda, and the shipped config builds PixArt-Σ XL/2 1024 on the meta device."""
import json
import shutil

import pytest
import torch

import diffes_pl as dp
from diffes_pl import export
from diffes_pl.denoisers import ConstantOutput, TextCondition, check_name, families, family_of
from diffes_pl.denoisers.text import MissingTextEncodersError, encode_pixart
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from diffes_pl.sampling import seeded_noise
from helpers.tiny_pixart import TEXT_LEN, build_tiny_pixart
from helpers.routing_reference import mask_block, MaskingListener, dense_masked_routed, random_store, sliced_vs_masked

HUB = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
PROMPTS = ["a red cat sits on the table", "a dog runs in the street"]
STEPS, STAGES, H = 4, 2, 4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pixart(text_models):
    """Latent 4×8×8 (16 tokens), 3 blocks of 4 heads of 8 (attn1, attn2) and 128 MLP channels, T5
    width 16 with 10 tokens; no VAE (latents out)."""
    return build_tiny_pixart(text_models, vae=False)


def assert_close_at_scale(actual, expected, rel=1e-5):
    """|actual − expected| ≤ rel · max |expected|. Random weights do not predict ε ≈ x at t ≈ 999, so
    DPM-Solver++'s data prediction x0 = (x − σ·ε) / α (α ≈ 0.006 there) drives the latents to ~10³:
    float32 rounding (a different summation order when sliced) is relative to that scale, while a
    wrong unit moves the latents by a sizeable fraction of it."""
    diff, scale = float((actual - expected).abs().max()), float(expected.abs().max())
    assert diff <= rel * scale, f"max difference {diff:.3g} > {rel:g} × {scale:.3g}"


def _inputs(adapter, batch=3):
    x = torch.randn((batch, *adapter.latent_shape), generator=torch.Generator().manual_seed(1))
    cond = adapter.encode_prompts((PROMPTS + ["a photo of a blue bird"])[:batch])  # 8, 7 and 6 of 10 tokens real
    return x, torch.tensor([999, 500, 3])[:batch], cond


def _sliced_vs_masked(adapter, keeps):
    n_dense = sum(p.numel() for p in adapter.denoiser.parameters())
    for g in adapter.unit_groups():
        if g.name in keeps:
            adapter.install(g, adapter.sliced_module(g, keeps[g.name]))
    assert sum(p.numel() for p in adapter.denoiser.parameters()) < n_dense  # physically smaller
    adapter.restore_dense()
    return sliced_vs_masked(adapter, keeps, *_inputs(adapter))


def test_structure(pixart):
    groups = pixart.unit_groups()
    assert len(pixart.blocks()) == 3 and len(groups) == 9
    assert [(g.name, g.kind, g.size, g.unit_width) for g in groups if g.block == 1] == [
        ("blocks.1.attn1", "heads", 4, 8), ("blocks.1.attn2", "heads", 4, 8), ("blocks.1.ff", "channels", 128, 1)]
    assert pixart.default_levels() == 4 and pixart.default_levels("depth") == 3
    assert pixart.latent_shape == (4, 8, 8) and pixart.text_len == TEXT_LEN and pixart.latent_scale == 0.13025
    assert pixart.dense_module(groups[1]).to_k.in_features == 32  # cross-attention keys: projected T5 tokens


@pytest.mark.parametrize("which", ["attn1", "attn2", "ff", "mixed", "all-removed"])
def test_sliced_equal_masked(pixart, which):
    """One kind of group at a time (half its units kept), all kinds with kept sets of every size from
    empty to full, and every unit of every group removed (constant outputs)."""
    g = torch.Generator().manual_seed(0)
    groups = pixart.unit_groups()
    if which in ("attn1", "attn2", "ff"):
        keeps = {grp.name: torch.sort(torch.randperm(grp.size, generator=g)[:grp.size // 2]).values
                 for grp in groups if grp.attr == which}
    elif which == "mixed":
        keeps = {grp.name: torch.sort(torch.randperm(grp.size, generator=g)[:[grp.size // 2, 1, 0, grp.size][i % 4]]).values
                 for i, grp in enumerate(groups)}
    else:
        keeps = {grp.name: torch.tensor([], dtype=torch.long) for grp in groups}
    dense, masked, sliced = _sliced_vs_masked(pixart, keeps)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert (sliced - dense).abs().max() > 1e-3


def test_cross_attention_slices_key_value_rows(pixart):
    group = next(g for g in pixart.unit_groups() if g.attr == "attn2")
    dense = pixart.dense_module(group)
    attn = pixart.sliced_module(group, torch.tensor([0, 3]))
    assert attn.heads == 2 and dense.heads == 4
    assert attn.to_k.weight.shape == (16, 32) and attn.to_v.weight.shape == (16, 32)  # 2 heads of 8 from width 32
    torch.testing.assert_close(attn.to_v.weight, torch.cat([dense.to_v.weight[:8], dense.to_v.weight[24:]]))
    assert attn.to_out[0].weight.shape == (32, 16) and attn.to_out[0].bias is dense.to_out[0].bias
    assert isinstance(pixart.sliced_module(group, torch.tensor([], dtype=torch.long)), ConstantOutput)
    w = torch.randn(32, 16)
    assert torch.equal(pixart.sliced_module(group, torch.tensor([1, 2]), out_weight=w).to_out[0].weight, w)


def test_skipped_blocks_equal_masked(pixart):
    x, t, c = _inputs(pixart)
    dense = pixart.predict_noise(x, t, c)
    handles = [mask_block(pixart, i) for i in (0, 2)]
    masked = pixart.predict_noise(x, t, c)
    for h in handles:
        h.remove()
    for i in (0, 2):
        pixart.install_block(i, pixart.skipped_block(i))
    sliced = pixart.predict_noise(x, t, c)
    pixart.restore_dense()
    torch.testing.assert_close(sliced, masked, rtol=1e-6, atol=1e-6)
    assert (sliced - dense).abs().max() > 1e-3


def _store(adapter, path, sampler, levels_max, compensated=False, depth=False):
    partition = StagePartition.from_scheduler(adapter.make_scheduler(sampler), STEPS, STAGES)
    return random_store(adapter, path, levels_max, partition, compensated=compensated, depth=depth), partition


@pytest.mark.parametrize("sampler,kind", [("dpm", "compensated"), ("ddim", "orders"), ("dpm", "depth"),
                                          ("ddim", "depth")])
def test_routed_sampling_equals_masked(pixart, tmp_path, sampler, kind):
    """CFG 4.5 with the encoded empty prompt as the unconditional half; DPM-Solver++ carries the last
    model output across the stage boundary, DDIM does not."""
    levels_max = len(pixart.blocks()) if kind == "depth" else H
    store, partition = _store(pixart, tmp_path / "store", sampler, levels_max, compensated=kind == "compensated",
                              depth=kind == "depth")
    levels = [2, 0] if kind == "depth" else [3, 1]
    schedule = Schedule(levels, levels_max, sum(levels) / 2, partition.steps_per_stage, partition=partition.to_dict())
    dense, masked, routed = dense_masked_routed(pixart, store, schedule, PROMPTS, steps=STEPS, guidance=4.5, seed=0,
                                                sampler=sampler)
    assert_close_at_scale(routed, masked)
    assert (routed - dense).abs().max() > 1e-2 * dense.abs().max()
    assert pixart.is_dense()


def test_level_zero_is_dense_bit_for_bit(pixart, tmp_path):
    store, partition = _store(pixart, tmp_path / "store", "dpm", H, compensated=True)
    kw = dict(steps=STEPS, guidance=4.5, sampler="dpm", output="latents")
    dense = dp.sample(pixart, PROMPTS, seed=0, **kw)
    zero = Schedule([0, 0], H, 0, partition.steps_per_stage, partition=partition.to_dict())
    torch.testing.assert_close(dp.sample(pixart, PROMPTS, seed=0, router=Router(pixart, store, zero), **kw), dense,
                               rtol=0, atol=0)
    assert pixart.is_dense() and (dp.sample(pixart, PROMPTS, seed=1, **kw) - dense).abs().max() > 1e-2


def test_attention_mask_reaches_the_cross_attention(pixart):
    """Padding tokens (mask 0) changed: the output does not move. The same change without the mask
    moves it, and so does a change of a real token: the mask is passed and it is what hides padding."""
    x, t, c = _inputs(pixart)
    pad = c.attention_mask == 0  # [B, L]
    assert pad.any() and (~pad).any() and c.attention_mask.dtype == torch.int64
    noise = 3 * torch.randn(c.prompt_embeds.shape, generator=torch.Generator().manual_seed(2))
    padded = TextCondition(c.prompt_embeds + noise * pad[..., None], attention_mask=c.attention_mask)
    base = pixart.predict_noise(x, t, c)
    torch.testing.assert_close(pixart.predict_noise(x, t, padded), base, rtol=0, atol=1e-6)
    ones = torch.ones_like(c.attention_mask)
    unmasked = pixart.predict_noise(x, t, TextCondition(c.prompt_embeds, attention_mask=ones))
    assert (pixart.predict_noise(x, t, TextCondition(padded.prompt_embeds, attention_mask=ones)) - unmasked).abs().max() > 1e-3
    assert (unmasked - base).abs().max() > 1e-3
    real = TextCondition(c.prompt_embeds + noise * (~pad)[..., None], attention_mask=c.attention_mask)
    assert (pixart.predict_noise(x, t, real) - base).abs().max() > 1e-3


def test_null_condition_is_the_encoded_empty_prompt(pixart, text_models):
    c = pixart.encode_prompts(PROMPTS)
    assert c.prompt_embeds.shape == (2, TEXT_LEN, 16) and c.pooled_embeds is None
    assert c.attention_mask.tolist()[1] == [1] * 7 + [0] * 3  # 6 words + EOS, padded to 10
    null = pixart.null_condition(c)
    embeds, mask = encode_pixart(pixart.text_encoders(), [""])
    assert mask.tolist() == [[1] + [0] * (TEXT_LEN - 1)]  # EOS only, as PixArtSigmaPipeline's negative prompt ""
    torch.testing.assert_close(null.prompt_embeds, embeds.expand(2, -1, -1), rtol=0, atol=0)
    assert torch.equal(null.attention_mask, mask.expand(2, -1))
    # given negative embeddings (and their mask) are the unconditional half
    neg = TextCondition(c.prompt_embeds, attention_mask=c.attention_mask, negative_prompt_embeds=c.prompt_embeds + 1,
                        negative_attention_mask=torch.ones_like(c.attention_mask))
    assert torch.equal(pixart.null_condition(neg).prompt_embeds, c.prompt_embeds + 1)
    assert pixart.null_condition(neg).attention_mask.min() == 1
    # without text encoders the empty prompt cannot be encoded: negatives are needed, and named
    bare = build_tiny_pixart(text_models, vae=False, text=False)
    with pytest.raises(MissingTextEncodersError, match="negative_prompt_embeds and negative_attention_mask"):
        bare.null_condition(TextCondition(c.prompt_embeds, attention_mask=c.attention_mask))
    out = dp.sample(bare, neg, steps=2, guidance=4.5, sampler="dpm", output="latents")
    assert out.shape == (2, 4, 8, 8) and bool(torch.isfinite(out).all())


def test_condition_validation(pixart):
    embeds, mask = torch.zeros(1, 5, 16), torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(TypeError, match="TextCondition"):
        dp.sample(pixart, torch.tensor([1, 2]), steps=2)
    with pytest.raises(ValueError, match="width 15 but the transformer's caption_channels is 16"):
        dp.sample(pixart, TextCondition(torch.zeros(1, 5, 15), attention_mask=mask), steps=2)
    with pytest.raises(ValueError, match="need attention_mask"):
        dp.sample(pixart, TextCondition(embeds), steps=2)
    with pytest.raises(ValueError, match=r"also carries \['pooled_embeds'\]"):
        dp.sample(pixart, TextCondition(embeds, torch.zeros(1, 8), attention_mask=mask), steps=2)
    with pytest.raises(ValueError, match="unknown sampler 'euler_a'"):
        pixart.make_scheduler("euler_a")


def test_additional_conditions_when_the_config_asks(text_models):
    """A transformer with micro-conditions (PixArt-α 1024) gets resolution and aspect ratio, as
    PixArtAlphaPipeline gives them; PixArt-Σ gets None (and refuses nothing)."""
    # width 24: the size embedders take a third of it each (width // 3 · 3 must be the width)
    adapter = build_tiny_pixart(text_models, vae=True, use_additional_conditions=True, attention_head_dim=6,
                                cross_attention_dim=24)
    x, t, c = _inputs(adapter, 2)
    added = adapter.added_conditions(x)
    assert added["resolution"].tolist() == [[16.0, 16.0]] * 2 and added["aspect_ratio"].tolist() == [[1.0]] * 2
    out = adapter.predict_noise(x, t, c)
    embedder = adapter.denoiser.adaln_single.emb.resolution_embedder
    with torch.no_grad():
        embedder.linear_1.bias.add_(1.0)  # the resolution embedding matters only if it is passed
    assert (adapter.predict_noise(x, t, c) - out).abs().max() > 1e-4


# --- inside diffusers' PixArtSigmaPipeline ------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe_and_adapter(text_models):
    from diffusers import PixArtSigmaPipeline

    adapter = build_tiny_pixart(text_models)
    enc = adapter.text_encoders()
    pipe = PixArtSigmaPipeline(tokenizer=enc.tokenizers[0], text_encoder=enc.encoders[0], vae=adapter.vae,
                               transformer=adapter.denoiser, scheduler=adapter.make_scheduler("dpm"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter


def _run_pipeline(pipe, noise, callback=None, steps=STEPS):
    """The pipeline's own prompt encoding (T5 + mask, "" as negative), CFG 4.5, learned-sigma split and
    DPM-Solver++ steps; its legacy `callback(step, t, latents)` runs after every step."""
    return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=4.5, latents=noise.clone(),
                output_type="latent", use_resolution_binning=False, clean_caption=False, max_sequence_length=TEXT_LEN,
                callback=callback, callback_steps=1).images


def test_adapter_samples_as_the_pipeline(pipe_and_adapter):
    pipe, adapter = pipe_and_adapter
    noise = seeded_noise((2, *adapter.latent_shape), 0)
    ours = dp.sample(adapter, PROMPTS, steps=STEPS, guidance=4.5, sampler="dpm", noise=noise, output="latents")
    assert_close_at_scale(ours, _run_pipeline(pipe, noise))


def test_routed_transformer_in_pixart_pipeline_equals_masked(pipe_and_adapter, tmp_path):
    pipe, adapter = pipe_and_adapter
    store, partition = _store(adapter, tmp_path / "store", "dpm", H, compensated=True)
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    noise = seeded_noise((2, *adapter.latent_shape), 0)
    dense = _run_pipeline(pipe, noise)
    masker = MaskingListener(adapter, store, schedule)
    masker.on_step(0, 0)

    def masked_callback(step, _t, _latents):
        if step + 1 < STEPS:
            masker.on_step(step + 1, partition.step_to_stage[step + 1])

    masked = _run_pipeline(pipe, noise, masked_callback)
    masker.clear()
    with Router(adapter, store, schedule) as router, router.attach():
        routed = _run_pipeline(pipe, noise)
    assert adapter.is_dense()
    assert_close_at_scale(routed, masked)
    assert (routed - dense).abs().max() > 1e-2 * dense.abs().max()
    with Router(adapter, store, schedule) as router:
        ours = dp.sample(adapter, PROMPTS, steps=STEPS, guidance=4.5, sampler="dpm", noise=noise, router=router,
                         output="latents")
    assert_close_at_scale(ours, routed)


def test_export_round_trip_opens_with_diffusers(text_models, tmp_path):
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, PixArtSigmaPipeline

    adapter = build_tiny_pixart(text_models)
    store, partition = _store(adapter, tmp_path / "store", "dpm", H, compensated=True)
    schedule = Schedule([3, 1], H, 2, partition.steps_per_stage, partition=partition.to_dict())
    kw = dict(steps=STEPS, guidance=4.5, seed=1, sampler="dpm")
    with dp.Router(adapter, store, schedule) as router:
        routed = dp.sample(adapter, PROMPTS, router=router, **kw)
    export.save(adapter, store, schedule, tmp_path / "exported")
    shutil.rmtree(tmp_path / "store")  # the export must not need it
    info = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert info["family"] == "pixart" and info["text_len"] == TEXT_LEN and info["pipeline_missing"] == []
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert type(pipe) is PixArtSigmaPipeline and type(pipe.scheduler) is DPMSolverMultistepScheduler
    for module, dense in ((pipe.transformer, adapter.denoiser), (pipe.text_encoder, adapter.text_encoders().encoders[0]),
                          (pipe.vae, adapter.vae)):
        got, want = module.state_dict(), dense.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    loaded, router = export.load(tmp_path / "exported")
    assert loaded.family == "pixart" and loaded.vae is not None and loaded.text_len == TEXT_LEN
    torch.testing.assert_close(dp.sample(loaded, PROMPTS, router=router, **kw), routed, rtol=0, atol=0)


def test_obs_beats_wanda_on_reconstruction(text_models, caption_folder, tmp_path, monkeypatch):
    """Calibrated on captions (T5 embeddings and masks): at every stage, group (attn1, attn2, ff) and
    level, OBS's compensated layer error ≤ Wanda's."""
    import datasets
    import lightning as L

    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.pruners import OBSPruner, WandaPruner, build_store
    from helpers.pruner_reference import assert_obs_beats_wanda, hand_hessians

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    adapter = build_tiny_pixart(text_models)
    partition = StagePartition.from_scheduler(adapter.make_scheduler("dpm"), STEPS, STAGES)

    def datamodule():
        return CalibrationDataModule(source=str(caption_folder), label_column=None, caption_column="text",
                                     nsamples=6, batch_size=3, seed=0)

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    stores = {p.name: build_store(trainer, p, datamodule(), adapter, partition, tmp_path / p.name, H,
                                  log=lambda *_: None) for p in (OBSPruner(), WandaPruner())}
    dm = datamodule()
    dm.attach(adapter, partition)
    compared = 0
    for stage in range(STAGES):
        ds = dm.stage_dataset(stage)
        assert ds.cond.attention_mask is not None and (ds.cond.attention_mask == 0).any()  # padded captions
        hessians = hand_hessians(adapter, adapter.unit_groups(), lambda: adapter.predict_noise(ds.latents, ds.timesteps, ds.cond))
        compared += assert_obs_beats_wanda(adapter, stores, stage, hessians, H)
    assert compared == STAGES * 9 * (H - 1)  # level H removes every unit (the same empty layer for both)


# --- the real architecture, names, registry ---------------------------------------------------------
def test_pixart_sigma_architecture_without_download():
    adapter = dp.load_denoiser(HUB, weights=False, device="meta")
    assert type(adapter).__name__ == "PixArtAdapter" and adapter.family == "pixart"
    heads = [g for g in adapter.unit_groups() if g.kind == "heads"]
    mlps = [g for g in adapter.unit_groups() if g.kind == "channels"]
    assert len(adapter.blocks()) == 28 and len(heads) == 56 and len(mlps) == 28
    assert {(g.size, g.unit_width) for g in heads} == {(16, 72)} and {g.size for g in mlps} == {4608}
    assert [g.attr for g in heads[:2]] == ["attn1", "attn2"]
    assert adapter.default_levels() == 16 and adapter.default_levels("depth") == 28
    cfg = adapter.denoiser.config
    assert adapter.latent_shape == (4, 128, 128) and cfg.out_channels == 8 and cfg.caption_channels == 4096
    assert cfg.cross_attention_dim == 1152 and adapter.denoiser.use_additional_conditions is False
    assert adapter.dense_module(heads[1]).to_k.in_features == 1152  # cross-attention over projected T5 tokens
    assert 0.60e9 < sum(p.numel() for p in adapter.denoiser.parameters()) < 0.62e9  # "0.6B parameters"
    assert adapter.text_len == 300 and adapter.latent_scale == 0.13025 and adapter.prediction_type == "epsilon"
    assert adapter.make_scheduler().__class__.__name__ == "DPMSolverMultistepScheduler"
    assert adapter.make_scheduler().config.algorithm_type == "dpmsolver++"
    assert {k: adapter.noise_schedule[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")} == \
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}
    # one forward at 1024² (128² latent = 4096 tokens), 300 T5 tokens, by hand: per block attn1 q/k/v/out,
    # attn2 q/out on the image tokens and k/v on the text tokens, MLP ×4, QKᵀ + AV of both attentions;
    # plus patch embedding, caption projection, adaLN-single and the final projection
    n, d, text = 4096, 1152, 300
    block = n * d * d * (4 + 2 + 8) + 2 * text * d * d + 2 * n * n * d + 2 * n * text * d
    head = n * 16 * d + text * (4096 * d + d * d) + (256 * d + d * d) + 6 * d * d + n * d * 32
    assert dp.count_macs(adapter) == 28 * block + head == 3_316_789_886_976


def test_names_and_registry(tmp_path):
    record = family_of("pixart")
    assert str(check_name(HUB)) == "pixart-hub" and check_name(HUB).family is record
    for cls, config in (("PixArtSigmaPipeline", "model_index.json"), ("PixArtTransformer2DModel", "config.json"),
                        ("PixArtTransformer2DModel", "transformer/config.json")):
        folder = tmp_path / config.replace("/", "-")
        (folder / config).parent.mkdir(parents=True)
        (folder / config).write_text(json.dumps({"_class_name": cls}))
        assert str(check_name(str(folder))) == "pixart-folder"
    assert [f.name for f in families().values() if "PixArtTransformer2DModel" in f.folder_classes] == ["pixart"]
    (spec,) = record.text_encoders
    assert (spec.encoder, spec.subfolder, spec.tokenizer, spec.pooled, spec.attention_mask, spec.max_length) == \
        ("T5EncoderModel", "text_encoder", "tokenizer", False, True, "text_len")
    assert record.pipeline_class == "PixArtSigmaPipeline" and record.denoiser_subfolder == "transformer"
    assert [s.name for s in record.adapter.samplers] == ["dpm", "ddim"] and record.conditioning == "text"


def test_declarations_are_what_sampling_does(pixart):
    from diffes_pl.sampling import prepare_scheduler

    assert pixart.sampler() is pixart.samplers[0] and pixart.num_classes is None and pixart.prediction_type == "epsilon"
    for sampler in pixart.samplers:
        assert sampler.multistep == (sampler.name == "dpm") and not sampler.stochastic
        for alias in (sampler.name, *sampler.aliases):
            scheduler = prepare_scheduler(pixart, alias, 4)
            assert type(scheduler) is sampler.scheduler_class and scheduler.config.prediction_type == "epsilon"
            assert scheduler.config.beta_schedule == "linear" and scheduler.config.num_train_timesteps == 1000
