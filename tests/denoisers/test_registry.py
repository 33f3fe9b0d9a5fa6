"""The family registry resolves every name it lists, and each adapter's declarations agree with what
sampling does with them."""
import json

import pytest
import torch

import diffes_pl as dp
from diffes_pl.denoisers import UnknownDenoiserError, check_name, families, family_of
from diffes_pl.denoisers.registry import Family, family_titles, register
from diffes_pl.denoisers.samplers import FLOW_MATCHING, Sampler, is_flow_matching
from diffes_pl.sampling import prepare_scheduler


def test_builtin_families_are_registered_in_order():
    assert list(families())[:4] == ["tiny", "dit", "sdxl", "flux"]
    for name, family in families().items():
        assert family.name == name and family_of(name) is family
    with pytest.raises(KeyError, match="no denoiser family 'nope'"):
        family_of("nope")


def test_messages_name_the_families_that_declare_a_capability():
    """Messages list families through `family_titles`, so a new family appears in them unasked."""
    titles = {c: family_titles(conditioning=c).split(", ") for c in ("class", "text")}
    assert titles["class"] == ["tiny-digits", "DiT"] and titles["text"][:2] == ["SDXL", "FLUX"]
    assert sorted(titles["class"] + titles["text"]) == sorted(f.title for f in families().values())
    assert family_titles() == ", ".join(f.title for f in families().values())


@pytest.mark.parametrize("family", ["tiny", "dit", "sdxl", "flux"])
def test_hub_names_resolve_to_their_family(family):
    record = family_of(family)
    assert record.hub_names
    for name in record.hub_names:
        resolved = check_name(name)
        assert resolved.family is record
        assert resolved.source == ("builtin" if record.builtin else "hub")
        assert str(resolved) == (family if record.builtin else f"{family}-hub")


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_folder_class_names_resolve(family, tmp_path):
    record = family_of(family)
    assert record.folder_classes
    for i, cls in enumerate(record.folder_classes):
        for config in ("model_index.json", "config.json", f"{record.denoiser_subfolder}/config.json"):
            folder = tmp_path / f"{cls}-{i}-{config.replace('/', '-')}"
            (folder / config).parent.mkdir(parents=True)
            (folder / config).write_text(json.dumps({"_class_name": cls}))
            resolved = check_name(str(folder))
            assert (resolved.family, resolved.source) == (record, "folder")
            assert str(resolved) == f"{family}-folder"


def test_unrecognised_folder_is_dit_and_unknown_names_are_refused(tmp_path):
    assert str(check_name(str(tmp_path))) == "dit-folder" and check_name(str(tmp_path)).family is family_of("dit")
    with pytest.raises(UnknownDenoiserError, match="unknown denoiser 'nope'"):
        check_name("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_name(str(tmp_path / "missing"))


# --- hub ids and folders -----------------------------------------------------------------------------

def _no_loading(monkeypatch) -> None:
    """Every loader of the dit family raises: a refusal must come before any of them runs."""
    import dataclasses

    from diffes_pl.denoisers import registry

    def loader(*_args, **_kwargs):
        raise AssertionError("a loader was called")

    dit = family_of("dit")
    monkeypatch.setitem(registry._FAMILIES, "dit", dataclasses.replace(dit, load_hub=loader, load_folder=loader))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache, the hub offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_an_uncached_hub_id_offline_is_refused_before_any_loading(offline_cache, monkeypatch):
    """`org/name` is a hub id, not a missing folder: offline and not in the cache it is refused at once,
    naming the cache and both ways out, and no loader runs."""
    from diffes_pl.denoisers import DenoiserUnavailableError, check_available

    _no_loading(monkeypatch)
    for name, kwargs in (("facebook/DiT-XL-2-512", {}), ("facebook/DiT-XL-2-512", {"weights": False}),
                         ("facebook/DiT-XL-2-256", {})):  # claimed; claimed without a shipped config; shipped
        assert str(check_name(name)) == "dit-hub"
        with pytest.raises(DenoiserUnavailableError) as err:
            dp.load_denoiser(name, device="meta", **kwargs)
        assert str(err.value) == (f"could not load '{name}': it is not in the local Hugging Face cache "
                                  f"({offline_cache}) and the hub is offline; download it first (hf download "
                                  f"{name}), or pass a local folder")
        with pytest.raises(DenoiserUnavailableError):
            check_available(name, **kwargs)
    # the shipped architecture needs no cache: random weights, offline
    assert check_available("facebook/DiT-XL-2-256", weights=False).source == "hub"
    monkeypatch.undo()
    assert type(dp.load_denoiser("facebook/DiT-XL-2-256", weights=False, device="meta").denoiser).__name__ == \
        "DiTTransformer2DModel"


def test_a_cached_hub_id_goes_on_to_its_loader(offline_cache, monkeypatch):
    from diffes_pl.denoisers import check_available

    _no_loading(monkeypatch)
    repo = offline_cache / "models--facebook--DiT-XL-2-512"
    config = repo / "snapshots" / "0123abcd" / "transformer" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert str(check_available("facebook/DiT-XL-2-512")) == "dit-hub"
    with pytest.raises(AssertionError, match="a loader was called"):
        dp.load_denoiser("facebook/DiT-XL-2-512", device="meta")


def test_an_unknown_hub_id_lists_what_is_accepted(offline_cache, monkeypatch):
    from diffes_pl.denoisers.registry import known_names

    _no_loading(monkeypatch)
    with pytest.raises(UnknownDenoiserError) as err:
        dp.load_denoiser("someorg/unet-model", device="meta")
    assert str(err.value) == (f"unknown hub id 'someorg/unet-model': no denoiser family serves it, and no folder "
                              f"someorg/unet-model exists: use one of {known_names()}, a DiT hub id, or a local "
                              "folder (e.g. ./models/DiT-XL-2-256)")


@pytest.mark.parametrize("name", ["./models/DiT-XL-2-512", "../DiT-XL-2-512", "~/no-such-diffes-model",
                                  "models/dit/DiT-XL-2-512", "/no/such/DiT"])
def test_names_that_look_like_paths_are_missing_folders(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _no_loading(monkeypatch)
    with pytest.raises(FileNotFoundError) as err:
        dp.load_denoiser(name, device="meta")
    assert str(err.value) == f"local checkpoint {name} does not exist; pass an existing folder or a hub id"


def test_an_existing_folder_named_like_a_hub_id_is_a_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "facebook" / "DiT-XL-2-512").mkdir(parents=True)
    assert str(check_name("facebook/DiT-XL-2-512")) == "dit-folder"
    home = tmp_path / "home"
    (home / "models" / "dit").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert str(check_name("~/models/dit")) == "dit-folder"


def test_a_name_is_served_by_one_family():
    taken = {name: family.name for family in families().values() for name in family.hub_names}
    dit = family_of("dit")
    with pytest.raises(ValueError, match="already served"):
        register(Family("copy", dit.adapter, dit.denoiser_class, None, "transformer",
                        {"facebook/DiT-XL-2-256": "x.json"}))
    assert "copy" not in families() and len(taken) == sum(len(f.hub_names) for f in families().values())


def test_text_encoder_specs():
    assert family_of("tiny").text_encoders == () and family_of("dit").text_encoders == ()
    sdxl, flux = family_of("sdxl").text_encoders, family_of("flux").text_encoders
    assert [s.encoder for s in sdxl] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert [s.pooled for s in sdxl] == [False, True] and all(s.hidden_states for s in sdxl)
    assert [s.encoder for s in flux] == ["CLIPTextModel", "T5EncoderModel"]
    assert [s.pooled for s in flux] == [True, False] and [s.hidden_states for s in flux] == [False, True]
    assert not any(s.attention_mask for s in sdxl + flux)


def _adapters(tiny, random_dit, text_models):
    return {"tiny": tiny, "dit": random_dit, "sdxl": text_models.build_tiny_sdxl(vae=False, text=False),
            "flux": text_models.build_tiny_flux(vae=False, text=False)}


def test_adapters_declare_what_sampling_does(tiny, random_dit, text_models):
    for name, adapter in _adapters(tiny, random_dit, text_models).items():
        record = family_of(adapter.family)
        assert record.adapter is type(adapter), name
        assert adapter.conditioning == record.conditioning == ("text" if name in ("sdxl", "flux") else "class")
        assert (adapter.num_classes is not None) == (adapter.conditioning == "class")
        assert adapter.samplers and adapter.sampler() is adapter.samplers[0]
        assert isinstance(adapter.make_scheduler(), adapter.samplers[0].scheduler_class)
        flow = is_flow_matching(adapter.noise_schedule)
        assert adapter.noise_schedule["_class_name"] == (FLOW_MATCHING if flow else "DDPMScheduler")
        assert adapter.prediction_type == ("flow_prediction" if flow else "epsilon")
        for sampler in adapter.samplers:
            assert isinstance(sampler, Sampler)
            for alias in (sampler.name, *sampler.aliases):
                assert adapter.sampler(alias) is sampler
                scheduler = prepare_scheduler(adapter, alias, 4)
                assert type(scheduler) is sampler.scheduler_class
                assert int(scheduler.config.num_train_timesteps) == adapter.noise_schedule["num_train_timesteps"]
                if not flow:
                    assert scheduler.config.prediction_type == adapter.prediction_type
            # the declarations the rollout reuse rule and the step noise read
            assert sampler.multistep == (sampler.name == "dpm")
            assert sampler.stochastic == (sampler.name == "euler_a")
        with pytest.raises(ValueError, match="unknown sampler 'nope'"):
            adapter.make_scheduler("nope")


def test_conditioning_is_refused_by_declaration(tiny, text_models):
    with pytest.raises(ValueError, match="class-conditional"):
        dp.sample(tiny, ["a cat"], steps=2)
    with pytest.raises(ValueError, match="class-conditional"):
        tiny.encode_prompts(["a cat"])
    sdxl = text_models.build_tiny_sdxl(vae=False, text=True)
    cond = dp.sample(sdxl, ["a cat"], steps=1, guidance=1.0, output="latents")
    assert cond.shape == (1, *sdxl.latent_shape) and bool(torch.isfinite(cond).all())
