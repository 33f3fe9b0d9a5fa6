"""Memory is checked before it is allocated: building or loading a denoiser, calibration statistics
and a router's prepared stages each refuse in one line (the figure and the way out) instead of
being killed; the messages that send a user to the hub name the `hf` command."""
from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import psutil
import pytest
import torch

import diffes_pl as dp
from diffes_pl import memory
from diffes_pl.memory import GIB, InsufficientMemoryError, available_bytes, check_fits, gib
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.pruners import OBSPruner, build_store
from diffes_pl.pruners.base import estimate_stat_bytes
from diffes_pl.routing import Router, estimate_prepared_bytes
from helpers.routing_reference import random_store

ROOT = Path(__file__).resolve().parents[1]
FLUX = "black-forest-labs/FLUX.1-schnell"
FLUX_PARAMS = 11_891_178_560  # FluxTransformer2DModel from the shipped schnell config


def _limit(monkeypatch, nbytes):
    """Every device reports `nbytes` available."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: float(nbytes))


# --- the check itself ---------------------------------------------------------------------------

def test_check_fits_one_line_with_figure_device_and_way_out(monkeypatch):
    _limit(monkeypatch, 1.5 * GIB)
    check_fits(GIB, "cpu", "anything", "nothing to do")  # fits: no error
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits(3 * GIB, "cpu", "building X", "pass device=\"meta\"")
    assert str(err.value) == 'building X needs 3.0 GiB but cpu has 1.5 GiB available; pass device="meta"'
    assert isinstance(err.value, MemoryError)
    check_fits(10**18, "meta", "anything", "nothing")  # the meta device allocates nothing
    assert gib(3 * 2**20) == "3.0 MiB"  # small figures stay readable


def test_available_bytes_per_device():
    cpu = available_bytes("cpu")
    assert 0 < cpu <= psutil.virtual_memory().total
    assert available_bytes("meta") == math.inf


# --- (a) building a denoiser with random weights -------------------------------------------------

def test_flux_random_weights_refused_in_a_second_without_allocating(monkeypatch):
    need = FLUX_PARAMS * 4
    if available_bytes("cpu") >= need:  # a machine with the memory: pretend it has 16 GiB
        _limit(monkeypatch, 16 * GIB)
    dp.load_denoiser("tiny-digits", weights=False, device="meta")  # imports paid before timing
    rss = psutil.Process().memory_info().rss
    start = time.monotonic()
    with pytest.raises(InsufficientMemoryError) as err:
        dp.load_denoiser(FLUX, weights=False)
    assert time.monotonic() - start < 5
    assert psutil.Process().memory_info().rss - rss < GIB  # nothing of the 44 GiB was allocated
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"building (random weights) {FLUX}'s denoiser (11.89 B parameters in float32) "
                              f"needs {need / GIB:.1f} GiB but cpu has ")
    assert 'pass device="meta" to count MACs without allocating' in message
    assert f"dtype=torch.bfloat16 ({FLUX_PARAMS * 2 / GIB:.1f} GiB)" in message


def test_flux_on_meta_still_builds():
    adapter = dp.load_denoiser(FLUX, weights=False, device="meta")
    assert sum(p.numel() for p in adapter.denoiser.parameters()) == FLUX_PARAMS
    assert adapter.denoiser.device.type == "meta"


def test_lower_dtype_is_a_real_way_out(monkeypatch):
    """DiT-XL/2 random weights: 2.8 GiB in float32 refused under 2 GiB; bfloat16 is BUILT in bfloat16
    (1.4 GiB, never a float32 copy first) and accepted."""
    name = "facebook/DiT-XL-2-256"
    _limit(monkeypatch, 2 * GIB)
    with pytest.raises(InsufficientMemoryError, match=r"\(749\.8 M parameters in float32\) needs 2\.8 GiB but cpu "
                                                      r"has 2\.0 GiB available; .*dtype=torch\.bfloat16 \(1\.4 GiB\)"):
        dp.load_denoiser(name, weights=False)
    built = []
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: built.append((self.weight.device.type, self.weight.dtype)))
    adapter = dp.load_denoiser(name, weights=False, dtype=torch.bfloat16)
    assert adapter.dtype == torch.bfloat16
    assert {dtype for device, dtype in built if device == "cpu"} == {torch.bfloat16}  # (the size check ran on meta)
    assert torch.get_default_dtype() == torch.float32  # restored


def test_tiny_refused_when_nothing_is_available(monkeypatch):
    params = sum(p.numel() for p in dp.load_denoiser("tiny-digits", device="meta").denoiser.parameters())
    _limit(monkeypatch, 1000)
    with pytest.raises(InsufficientMemoryError) as err:
        dp.load_denoiser("tiny-digits")
    assert str(err.value).startswith(f"loading tiny-digits's denoiser ({params / 1e6:.1f} M parameters in float32) "
                                     f"needs {gib(params * 4)} but cpu has 0.0 MiB available; dtype=torch.bfloat16")


# --- (b) loading real weights ---------------------------------------------------------------------

@pytest.fixture
def dit_folder(random_dit, tmp_path):
    path = tmp_path / "dit"
    random_dit.denoiser.save_pretrained(path / "transformer")
    return path


def test_loading_a_folder_refused_before_reading(dit_folder, random_dit, monkeypatch):
    from diffusers import DiTTransformer2DModel

    _limit(monkeypatch, 1000)
    read = []
    monkeypatch.setattr(DiTTransformer2DModel, "from_pretrained", lambda *a, **k: read.append(a))
    with pytest.raises(InsufficientMemoryError) as err:
        dp.load_denoiser(str(dit_folder))
    params = sum(p.numel() for p in random_dit.denoiser.parameters())
    assert str(err.value).startswith(f"loading {dit_folder}'s denoiser ({params / 1e6:.1f} M parameters in float32) "
                                     f"needs {gib(params * 4)} but cpu has 0.0 MiB available; dtype=torch.bfloat16")
    assert "device=\"meta\"" not in str(err.value)  # loading real weights: meta is no way out
    assert read == []


def test_loading_a_folder_needs_no_accelerate_hint(dit_folder, random_dit, capfd, caplog):
    """accelerate is a dependency: diffusers reads the weights into an empty model (no random build
    first) and prints no `pip install accelerate`."""
    import accelerate  # noqa: F401  a default dependency

    capfd.readouterr()
    with caplog.at_level("WARNING"):
        adapter = dp.load_denoiser(str(dit_folder))
    out, err = capfd.readouterr()
    shown = out + err + caplog.text
    assert "accelerate" not in shown and "low cpu memory" not in shown
    for a, b in zip(adapter.denoiser.state_dict().values(), random_dit.denoiser.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- (c) calibration statistics -------------------------------------------------------------------

def test_calibration_refused_before_the_first_predict_epoch(tiny, tmp_path, monkeypatch):
    from helpers.pruner_reference import HandNoisedDigits

    pruner = OBSPruner()
    needed = estimate_stat_bytes(tiny, pruner)
    _limit(monkeypatch, needed - 1)
    epochs = []
    monkeypatch.setattr(L.Trainer, "predict", lambda *a, **k: epochs.append(1))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 2)
    with pytest.raises(InsufficientMemoryError) as err:
        build_store(trainer, pruner, HandNoisedDigits(nsamples=4, batch_size=4), tiny, partition, tmp_path / "store",
                    4, log=lambda *_: None)
    assert str(err.value) == (
        f"calibration statistics of the obs pruner (one stage, float64) needs {gib(needed)} but cpu has "
        f"{gib(needed - 1)} available; set model.pruner.init_args.stat_dtype: float32, prune fewer or "
        "smaller unit groups, use a pruner without Hessians (Wanda), or calibrate on a device with more memory")
    assert epochs == [] and not (tmp_path / "store").exists()


# --- (d) routing ----------------------------------------------------------------------------------

def _routing(tiny, tmp_path, compensated=True):
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 2)
    store = random_store(tiny, tmp_path / "store", 4, partition, compensated=compensated)
    return store, Schedule([3, 1], 4, 2, partition.steps_per_stage, partition=partition.to_dict())


@pytest.mark.parametrize("compensated", [False, True], ids=["orders", "compensated"])
def test_prepared_bytes_estimate_matches_the_router(tiny, tmp_path, compensated):
    store, schedule = _routing(tiny, tmp_path, compensated)
    for resident in (True, False):
        estimate = estimate_prepared_bytes(tiny, store, schedule, resident)
        with Router(tiny, store, schedule, resident=resident) as router:
            assert abs(estimate - router.resident_bytes()) <= 0.01 * router.resident_bytes()
    assert estimate_prepared_bytes(tiny, store, schedule, False) < estimate_prepared_bytes(tiny, store, schedule, True)


def test_router_refused_before_preparing_and_resident_false_is_the_way_out(tiny, tmp_path, monkeypatch):
    store, schedule = _routing(tiny, tmp_path)
    resident = estimate_prepared_bytes(tiny, store, schedule, True)
    shared = estimate_prepared_bytes(tiny, store, schedule, False)
    _limit(monkeypatch, (resident + shared) / 2)
    prepared = []
    monkeypatch.setattr(Router, "_prepare", lambda self, *a: prepared.append(a))
    with pytest.raises(InsufficientMemoryError) as err:
        Router(tiny, store, schedule)
    assert str(err.value) == (
        f"routing 2 stages (resident, float32) needs {gib(resident)} but cpu has "
        f"{gib((resident + shared) / 2)} available; pass resident=False (one shared buffer per layer: "
        f"{gib(shared)}), search with fewer stages, or load the denoiser in a lower dtype (dtype=torch.bfloat16)")
    assert prepared == [] and tiny.is_dense()
    monkeypatch.undo()
    _limit(monkeypatch, (resident + shared) / 2)
    with Router(tiny, store, schedule, resident=False) as router:  # fits
        router.install(0)
    assert tiny.is_dense()


# --- the command line and the hub hints -----------------------------------------------------------

def test_cli_turns_a_memory_refusal_into_one_line(tmp_path, monkeypatch, capsys):
    from diffes_pl.cli import main

    _limit(monkeypatch, 1000)
    monkeypatch.setattr("sys.argv", ["diffes-pl"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs" / "tiny_obs.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the run's memory plan refuses first, before the denoiser loads (tests/test_memory_plan.py)
    assert len(err) == 1 and err[0].startswith("diffes-pl: error: InsufficientMemoryError: search of tiny-digits, "
                                               "obs pruner, float32 on cpu (host) needs ")
    assert not (tmp_path / "run" / "store").exists()


@pytest.mark.parametrize("name", ["facebook/DiT-XL-2-256", FLUX])
def test_hub_hint_names_hf_download(name, monkeypatch):
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

    def not_cached(*args, **kwargs):
        raise OSError("not in the cache and offline")

    for cls in (DiTTransformer2DModel, FluxTransformer2DModel):
        monkeypatch.setattr(cls, "from_pretrained", not_cached)
    # the loader's own hint: with the hub offline, `check_available` refuses before any loader runs
    # (tests/denoisers/test_registry.py)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _limit(monkeypatch, math.inf)
    with pytest.raises(OSError, match=rf"download it first \(`hf download {name}`\)"):
        dp.load_denoiser(name)


def test_dataset_hint_names_hf_auth_login(monkeypatch):
    import datasets

    from diffes_pl.data.sources import SourceError, SourceSpec, open_source

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def gated(*args, **kwargs):
        raise FileNotFoundError("gated dataset")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(SourceError, match=r"log in \(`hf auth login`\)"):
        open_source(SourceSpec("hub", "someone/gated", "someone/gated"), "train")
