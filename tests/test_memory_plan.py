"""The memory plan (diffes_pl/memory_plan.py): its statistics term equals what a calibration
allocates, its rows are the code's own estimates on the meta architecture, `--dry_run true` prints it
without weights or a run folder, and a run that will not fit is refused before the denoiser loads."""
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import diffes_pl.memory as memory
from diffes_pl.denoisers import architecture
from diffes_pl.memory import GIB, gib, module_bytes
from diffes_pl.memory_plan import estimate_solver_bytes, plan_memory
from diffes_pl.partition import StagePartition
from diffes_pl.pruners import DepthPruner, OBSPruner, WandaPruner
from diffes_pl.pruners.base import estimate_stat_bytes, estimate_store_bytes
from diffes_pl.routing import estimate_prepared_bytes
from diffes_pl.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
FLUX = "black-forest-labs/FLUX.1-schnell"


def _allocated_statistics(pruner) -> int:
    """Bytes of the statistics the pruner holds at the end of a predict epoch (before they are freed)."""
    if pruner.depth:
        return pruner._cos.nbytes + pruner._tokens.nbytes
    return sum(buf.nbytes for stat in pruner._stats.values() for buf in stat.buffers.values())


@pytest.mark.parametrize("make", [OBSPruner, lambda: OBSPruner(stat_dtype="float32"), WandaPruner, DepthPruner],
                         ids=["obs", "obs-float32", "wanda", "depth"])
def test_statistics_term_is_what_a_calibration_allocates(make, tiny, tmp_path, one_thread):
    from helpers.pruner_reference import HandNoisedDigits

    pruner = make()
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 2)
    data = HandNoisedDigits(nsamples=8, batch_size=8)
    pruner.attach(tiny, 4, None)  # no store: the epoch ends at the measurement, before any trajectory
    data.attach(tiny, partition)
    measured = []

    def measure() -> None:  # the epoch ends at the measurement, its hooks off the shared `tiny`
        measured.append(_allocated_statistics(pruner))
        pruner.abandon_stage()

    pruner.on_predict_epoch_end = measure
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    pruner.begin_pass(0)
    trainer.predict(pruner, datamodule=data, return_predictions=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.denoiser.modules())

    plan = plan_memory(architecture("tiny-digits"), pruner, levels_max=4, num_stages=2, nsamples=8, batch_size=8,
                       device="cpu", target_level=2)
    name = f"statistics of one stage ({str(pruner.stat_dtype).removeprefix('torch.')})"
    assert measured == [plan.row(name, "calibration: gathering").nbytes] == [estimate_stat_bytes(tiny, pruner)]
    # tiny: 6 blocks, an attention group (in 128) and an MLP group (in 512) each; a count per group
    size = pruner.stat_dtype.itemsize
    expected = {"obs": 6 * (128 * 128 + 1 + 512 * 512 + 1), "wanda": 6 * (128 + 1 + 512 + 1), "depth": 2 * 6}
    assert measured[0] == expected[pruner.name] * size


class PeakBytes(TorchDispatchMode):
    """Peak live bytes of the storages the ops run under it allocate (a storage counts until the last
    tensor on it dies): what the CPU allocator was asked for, without its slack. LAPACK's internal
    workspaces are not seen."""

    def __init__(self, existing: tuple[torch.Tensor, ...] = ()):
        """`existing`: tensors allocated before (the weights), whose storages an op may return again
        (`module.to(device)` on their own device) without allocating: never counted."""
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {t.untyped_storage().data_ptr(): 1 for t in existing}

    def _drop(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key, nbytes)
        return out


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_solver_term_is_within_10_percent_of_what_the_solve_allocates(mode, tiny, one_thread):
    """The largest group of the tiny model (an MLP output layer, in 512 → out 128) solved at H = 8 from a
    Hessian of real activations' shape: the solve's measured peak (the normalised Hessian the pruner
    passes in included) against `estimate_solver_bytes`."""
    from diffes_pl.pruners.stats import HessianStatistic

    pruner = OBSPruner(mode=mode)
    pruner.attach(tiny, 8, None)
    group = max(tiny.unit_groups(), key=lambda g: tiny.output_layer(g).in_features)
    layer = tiny.output_layer(group)
    stat = HessianStatistic(group, layer.in_features, "cpu", torch.float64)
    stat.add_batch(torch.randn(4 * layer.in_features, layer.in_features, generator=torch.Generator().manual_seed(0)))
    with PeakBytes() as measured:
        pruner.group_trajectory(group, layer.weight.detach(), stat)
    estimate = estimate_solver_bytes(tiny, pruner, 8)
    assert (layer.in_features, layer.out_features) == (512, 128)
    assert abs(estimate - measured.peak) <= 0.1 * measured.peak, (estimate, measured.peak)


@pytest.mark.parametrize("mode", ["model", "block"])
def test_calibration_peak_is_within_10_percent_of_the_plan(mode, tmp_path, one_thread):
    """A whole calibration of the built-in model (2 stages, 64 samples in batches of 16, H = 8): the
    peak of the bytes it allocates (measured under a dispatch mode), plus the weights, against the
    plan's calibration peak on the host. A fresh model: the session's shared one carries what earlier
    tests built on it (dense copies of installed modules)."""
    from helpers.pruner_reference import HandNoisedDigits

    import diffes_pl as dp
    from diffes_pl.pruners import build_store

    tiny = dp.load_denoiser("tiny-digits")

    pruner = OBSPruner()
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    weights = tuple(tiny.denoiser.parameters()) + tuple(tiny.denoiser.buffers())
    with PeakBytes(existing=weights) as measured:
        build_store(trainer, pruner, HandNoisedDigits(nsamples=64, batch_size=16), tiny, partition,
                    tmp_path / "store", 8, log=lambda *_: None, calibrate_by=mode)
    plan = plan_memory(architecture("tiny-digits"), pruner, levels_max=8, num_stages=2, nsamples=64, batch_size=16,
                       device="cpu", target_level=4)
    planned = plan.peak("host", ["calibration: gathering", "calibration: solving"])
    peak = measured.peak + module_bytes(tiny.denoiser)
    assert abs(planned - peak) <= 0.1 * peak, (planned, peak)


def test_plan_of_flux_is_the_codes_estimates_on_the_meta_architecture():
    adapter = architecture(FLUX, dtype=torch.bfloat16)
    assert {p.device.type for p in adapter.denoiser.parameters()} == {"meta"}  # no weights
    pruner = OBSPruner(stat_dtype="float32")
    plan = plan_memory(adapter, pruner, levels_max=24, num_stages=4, nsamples=256, batch_size=4, device="cuda",
                       target_level=6, probe_rows=4)
    solving, search = "calibration: solving", "search"
    weights = module_bytes(adapter.denoiser, torch.bfloat16)
    assert plan.row("denoiser weights (bfloat16)", solving).nbytes == weights == 23_782_357_120
    assert plan.row("statistics of one stage (float32)", solving).nbytes == estimate_stat_bytes(adapter, pruner)
    assert estimate_stat_bytes(adapter, pruner) == 48_054_141_460  # the README's 48.05 GB
    trajectory = plan.row("one stage's trajectory (until its shard is written)", solving)
    assert trajectory.place == "host" and trajectory.nbytes == estimate_store_bytes(adapter, pruner, 24, 1)
    assert plan.row("trajectory store", solving).nbytes == estimate_store_bytes(adapter, pruner, 24, 4)
    assert plan.row("OBS solver temporaries, largest group (float64)", solving).nbytes == estimate_solver_bytes(adapter, pruner, 24)
    store = type("Store", (), {"depth": False, "levels_max": 24, "compensated": True, "sparse": False})()
    resident = estimate_prepared_bytes(adapter, store, Schedule.uniform(6, 24, [1] * 4), resident=True)
    assert plan.row("routed stages, uniform level 6 (resident)", search).nbytes == resident
    # the largest group is an MLP output layer, in 12288 → out 3072: Hessian (float32) + closed form (float64)
    k, o = 12288, 3072
    kept = sum(o * (12288 - round(L / 24 * 12288)) for L in range(1, 25))
    assert estimate_solver_bytes(adapter, pruner, 24) == k * k * 4 + 4 * k * k * 8 + 3 * o * k * 8 + kept * 8
    # whole-model calibration peaks while solving: weights, every group's Hessian and the largest
    # group's solver temporaries (the trajectory goes to the host group by group)
    assert plan.peak_phase("accelerator") == solving
    assert plan.peak("accelerator") == sum(r.nbytes for r in plan.rows if r.phase == solving and r.place == "accelerator")
    assert gib(plan.peak("accelerator")) == "76.0 GiB"
    text = plan.format()
    assert text.splitlines()[0] == f"memory plan: {FLUX}, obs pruner, bfloat16 on cuda"
    assert "peak: accelerator 76.0 GiB (calibration: solving)" in text
    # block by block: one block's Hessians (the largest: 1.2 GiB in float32) instead of 44.8 GiB
    assert pruner.calibrate_by("block", adapter, "cuda") == "block"
    blocks = plan_memory(adapter, pruner, levels_max=24, num_stages=4, nsamples=256, batch_size=4, device="cuda",
                         target_level=6, probe_rows=4)
    stats = blocks.row("statistics of one stage, its largest block (block by block) (float32)", solving)
    assert stats.nbytes == estimate_stat_bytes(adapter, pruner) == 1_245_708_300
    assert gib(blocks.peak("accelerator", phases=["calibration: gathering", solving])) == "32.4 GiB"


def test_plan_of_flux_streamed_block_by_block_fits_a_24_gib_accelerator():
    """FLUX.1-schnell OBS, bf16, calibrated block by block with streamed weights: the accelerator holds
    the weights outside the blocks and the largest block (not 22.1 GiB), one block's Hessians, one
    batch's call and the largest group's solver temporaries; the host the weights, the stage's carried
    calls and one block's trajectory (not the stage's 73 GiB)."""
    adapter = architecture(FLUX, dtype=torch.bfloat16)
    pruner = OBSPruner(stat_dtype="float32")
    assert pruner.calibrate_by("block", adapter, "cuda", stream=True) == "block" and pruner.carry and pruner.stream
    plan = plan_memory(adapter, pruner, levels_max=24, num_stages=4, nsamples=256, batch_size=4, device="cuda",
                       target_level=6, probe_rows=4)
    calibration = ["loading", "calibration: gathering", "calibration: solving"]
    solving = "calibration: solving"
    blocks = [module_bytes(b, torch.bfloat16) for b in adapter.blocks()]
    outside = module_bytes(adapter.denoiser, torch.bfloat16) - sum(blocks)
    assert plan.row("weights outside the blocks + the largest block, streamed (bfloat16)", solving).nbytes == \
        outside + max(blocks)
    assert not any(r.place == "accelerator" for r in plan.rows if r.phase == "loading")  # loads on the host
    trajectory = plan.row("one block's trajectory (until its shard is written)", solving)
    assert trajectory.nbytes == max(estimate_store_bytes(adapter, pruner, 24, 1, block=b) for b in range(len(blocks)))
    assert trajectory.nbytes * 30 < estimate_store_bytes(adapter, pruner, 24, 1)
    peak = plan.peak("accelerator", calibration)
    assert peak < 24 * GIB and gib(peak) == "11.0 GiB"
    assert plan.peak_phase("accelerator", calibration) == solving


class CarriedSizes(OBSPruner):
    """OBS recording the bytes of the carried calls before each block runs (the host term)."""

    def __init__(self) -> None:
        super().__init__()
        self.carried: list[int] = []

    def _carry_block(self, index: int, advance: bool) -> dict:
        self.carried.append(self._calls.nbytes)
        return super()._carry_block(index, advance)


@pytest.mark.parametrize("family", ["tiny", "flux"])
def test_carried_calls_term_is_what_a_carried_calibration_records(family, tiny, text_models, caption_folder,
                                                                   tmp_path, hf_cache, one_thread):
    """The plan's carried-calls row (one sample's first-block call on the meta device × the stage's
    samples) equals the bytes a carried calibration keeps before each block, exactly: the tiny DiT (the
    hidden states, timestep and class embeddings) and FLUX (two streams, temb, rotary embeddings)."""
    from diffes_pl.pruners import build_store

    from helpers.pruner_reference import HandNoisedDigits, caption_datamodule

    adapter = tiny if family == "tiny" else text_models.build_tiny_flux()
    data = HandNoisedDigits() if family == "tiny" else caption_datamodule(caption_folder)
    partition = StagePartition.from_scheduler(adapter.make_scheduler("ddim" if family == "tiny" else "flow_euler"), 4, 1)
    pruner = CarriedSizes()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    build_store(trainer, pruner, data, adapter, partition, tmp_path / "store", 4, log=lambda *_: None,
                calibrate_by="block")
    assert pruner.carry and len(pruner.carried) == len(adapter.blocks())
    meta = architecture("tiny-digits") if family == "tiny" else _meta_copy(adapter)
    pruner.calibrate_by("block", meta, "cpu")
    plan = plan_memory(meta, pruner, levels_max=4, num_stages=1, nsamples=data.nsamples, batch_size=data.batch_size,
                       device="cpu", target_level=2)
    row = plan.row(f"carried block calls of the stage's {data.nsamples} samples", "calibration: gathering")
    assert row.nbytes == max(pruner.carried) == pruner.carried[0]


def _meta_copy(flux):
    """The tiny FLUX adapter over its architecture on the meta device (no weights)."""
    from diffes_pl.denoisers.flux import FluxAdapter

    with torch.device("meta"):
        denoiser = type(flux.denoiser).from_config(flux.denoiser.config)
    meta = FluxAdapter(denoiser, flux.name, vae=flux.vae, text_encoders=flux.text_encoders())
    meta.text_len = flux.text_len
    return meta


def test_on_the_cpu_every_row_is_host_memory(tiny):
    plan = plan_memory(architecture("tiny-digits"), OBSPruner(), levels_max=8, num_stages=10, nsamples=64,
                       batch_size=64, device="cpu", target_level=4, probe_rows=64, guidance=2.0)
    assert {r.place for r in plan.rows} == {"host", "disk"}
    assert plan.row("calibration latents (clean, noise, noised; float32)").nbytes == 3 * 64 * 1 * 8 * 8 * 4
    # the tiny DiT's largest hidden state at batch 1: its MLP's 4·128 channels over 16 tokens (float32)
    assert plan.row("activations of one batch of 64 (≈3× largest hidden state)").nbytes == 3 * 64 * 16 * 512 * 4
    assert plan.row("activations of one call, 128 rows (≈3× largest hidden state)").nbytes == 3 * 128 * 16 * 512 * 4


@pytest.fixture
def no_loading(monkeypatch):
    """Loading weights fails the test (the plan needs the architecture only)."""
    import diffes_pl.denoisers.tiny as tiny
    import diffes_pl.search.builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("the denoiser's weights were loaded")

    build = tiny.build_tiny_dit
    monkeypatch.setattr(builder, "load_denoiser", refuse)
    monkeypatch.setattr(tiny, "build_tiny_dit", lambda weights=True: refuse() if weights else build(weights=False))


@pytest.mark.parametrize("subcommand", ["predict", "fit"])
@pytest.mark.parametrize("config", ["flux_obs.yaml", "tiny_obs.yaml"])
def test_dry_run_prints_the_plan_and_exits_without_weights_or_folder(config, subcommand, tmp_path, capfd, no_loading):
    from diffes_pl.cli import main

    run = tmp_path / "run"
    main([subcommand, "--config", str(ROOT / "configs" / config), "--dry_run", "true",
          "--trainer.default_root_dir", str(run)])  # returns: exit code 0
    out = capfd.readouterr().out
    assert not run.exists()
    assert out.startswith("memory plan: ")
    if config == "flux_obs.yaml":
        assert f"memory plan: {FLUX}, obs pruner, bfloat16 on cuda" in out
        assert "statistics of one stage (float32)                                44.8 GiB" in out
        assert "peak: accelerator 76.0 GiB (calibration: solving)" in out
    else:
        assert "memory plan: tiny-digits, obs pruner, float32 on cpu" in out and "host: fits in the memory free here" in out


def test_dry_run_of_flux_streamed_block_by_block(tmp_path, capfd, no_loading):
    from diffes_pl.cli import main

    main(["predict", "--config", str(ROOT / "configs" / "flux_obs.yaml"), "--dry_run", "true",
          "--model.calibrate_by", "block", "--model.stream_weights", "true",
          "--trainer.default_root_dir", str(tmp_path / "run")])
    out = capfd.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    solving = lines[lines.index("calibration: solving"):lines.index("search")]
    assert "weights outside the blocks + the largest block, streamed (bfloat16)        751.0 MiB" in solving
    assert solving[-1].split() == ["total", "11.0", "GiB", "32.4", "GiB"]  # accelerator, host


def test_a_run_that_will_not_fit_is_refused_before_loading(tmp_path, capfd, monkeypatch, no_loading):
    from diffes_pl.cli import main

    plan = plan_memory(architecture("tiny-digits"), OBSPruner(), levels_max=8, num_stages=10, nsamples=64,
                       batch_size=64, device="cpu", target_level=4, probe_rows=64, guidance=2.0)
    phase = plan.peak_phase("host", ["loading", "calibration: gathering", "calibration: solving"])
    need = plan.total(phase, "host")
    monkeypatch.setattr(memory, "available_bytes", lambda device: float(need - 1))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--config", str(ROOT / "configs/tiny_obs.yaml"), "--trainer.default_root_dir", str(run)])
    err = capfd.readouterr().err
    assert exit_.value.code == 2 and not run.exists()
    big = plan.biggest(phase, "host")
    assert err.strip() == (f"diffes-pl: error: InsufficientMemoryError: {phase} of tiny-digits, obs pruner, float32 "
                           f"on cpu (host) needs {gib(need)} but cpu has {gib(need - 1)} available; its biggest term "
                           f"is {big.name} ({gib(big.nbytes)}): {big.fix}")
    assert need < GIB  # the tiny model's plan (MiB) is printed as MiB
