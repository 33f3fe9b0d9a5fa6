"""Issue 23: hand-written pieces replaced by their library equivalents, each against the old
implementation (kept verbatim in tests/helpers/reference_library_equivalence.py) on real inputs.

- DDPM calibration noising → `DDPMScheduler.add_noise` of the training schedule: equal to float32
  rounding only (diffusers keeps ᾱ in float32, the old code in float64); bounds below.
- flow-matching noising stays hand-written: `FlowMatchEulerDiscreteScheduler.scale_noise` cannot
  take continuous timesteps (shown here); on its own table it equals ours bit for bit.
- seeded noise → diffusers' `randn_tensor`: bit for bit.
- locks → `filelock.FileLock`: same refusals, and the old and new locks exclude each other.
- improved precision/recall → torch-fidelity's `prc`: bit for bit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

import diffes_pl as dp
from diffes_pl.data.calibration import (CalibrationDataModule, draw_timesteps, noise_ddpm, noise_flow, stage_generator,
                                        training_scheduler)
from diffes_pl.evaluation import metrics as M
from diffes_pl.locks import LockedError, exclusive
from diffes_pl.partition import StagePartition
from diffes_pl.sampling import seeded_noise
from helpers import reference_library_equivalence as ref

# The training schedules of the shipped denoisers' kinds: DiT / tiny-digits (linear), SD / SDXL /
# PixArt (scaled_linear), improved DDPM (squaredcos_cap_v2), zero-terminal-SNR rescaling.
SCHEDULES = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000},
    "scaled_linear": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                      "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000},
    "squaredcos": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
    "zero_snr": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "num_train_timesteps": 1000, "rescale_betas_zero_snr": True},
}


@pytest.fixture(scope="module")
def digits():
    """Real inputs: the tiny-digits denoiser's calibration set (clean digit images in [-1, 1])."""
    adapter = dp.load_denoiser("tiny-digits", weights=False)
    sched = adapter.make_scheduler("ddim")
    partition = StagePartition.from_scheduler(sched, 20, 10)
    dm = CalibrationDataModule(nsamples=64, batch_size=32, seed=0)
    dm.attach(adapter, partition)
    return adapter, partition, dm


# --- DDPM noising ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_ddpm_noising_is_add_noise_and_equals_the_old_to_float32_rounding(digits, name):
    """add_noise of the training DDPMScheduler vs the old float64-ᾱ formula, every training timestep.

    Not bit for bit: diffusers' ᾱ is a float32 cumprod (relative error ≤ 2e-6 here, the old one is
    float64), and sqrt(1 − ᾱ) near t = 0 amplifies ᾱ's absolute error (float32 spacing 6e-8 on
    1 − ᾱ_0 ≈ 1e-4): |Δ| ≤ 4e-6 · (|x0| + |ε|) elementwise. Both are within that bound of the exact
    float64 value; the float32 one is what diffusers' training scripts feed the denoiser."""
    _, _, dm = digits
    schedule = SCHEDULES[name]
    x0 = dm.clean().latents.repeat(16, 1, 1, 1)[:1000]  # [1000, 1, 8, 8]
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.arange(1000)  # every training timestep, once
    scheduler = training_scheduler(schedule)
    new = noise_ddpm(x0, eps, t, scheduler)
    old = ref.noise_ddpm(x0, eps, t, ref.alphas_cumprod(schedule))
    assert new.dtype == old.dtype == torch.float32
    # the library call itself, bit for bit (a fresh scheduler of the same config)
    config = {k: v for k, v in schedule.items() if not k.startswith("_")}
    assert torch.equal(new, DDPMScheduler(**config).add_noise(x0, eps, t))
    bound = 4e-6 * (x0.abs() + eps.abs())
    assert bool(((new - old).abs() <= bound).all()), float(((new - old).abs() / bound).max())
    assert not torch.equal(new, old)  # the reason this is a tolerance, not equality
    a = ref.alphas_cumprod(schedule)[t].view(-1, 1, 1, 1)
    exact = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    assert bool(((new.double() - exact).abs() <= bound).all())
    # ᾱ: diffusers' float32 cumprod vs the old float64 one
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ref.alphas_cumprod(schedule), rtol=2e-6, atol=1e-9)


def test_the_training_scheduler_has_no_resampled_table():
    """The old docstring's reason (a sampler's add_noise indexes its own resampled sigma table) does not
    apply: the training DDPMScheduler indexes ᾱ by the native timestep, before and after
    set_timesteps, so an off-trajectory timestep gets its own ᾱ."""
    scheduler = training_scheduler(SCHEDULES["linear"])
    x0, eps = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    t = torch.tensor([0, 517, 999])  # 517 lies on no 20-step trajectory
    before = noise_ddpm(x0, eps, t, scheduler)
    scheduler.set_timesteps(20)
    assert torch.equal(noise_ddpm(x0, eps, t, scheduler), before)
    torch.testing.assert_close(before[:, 0, 0, 0].double(), (1 - ref.alphas_cumprod(SCHEDULES["linear"])[t]).sqrt(),
                               rtol=3e-4, atol=0)


def test_calibration_stages_equal_the_old_noising(digits):
    """Every stage of the digits calibration set: the same timesteps bit for bit, latents equal to the
    old path (torch.randn + float64 formula) within the float32 bound above."""
    adapter, partition, dm = digits
    x0 = dm.clean().latents
    abar = ref.alphas_cumprod(adapter.noise_schedule)
    for stage in range(partition.num_stages):
        g = stage_generator(0, stage)
        t = draw_timesteps(partition.stage_interval(stage), len(x0), g, 1000)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
        got = dm.stage_dataset(stage)
        assert torch.equal(got.timesteps, t)
        old = ref.noise_ddpm(x0, eps, t, abar)
        assert bool(((got.latents - old).abs() <= 4e-6 * (x0.abs() + eps.abs())).all())


# --- flow-matching noising (kept) -------------------------------------------------------------------
def test_scale_noise_cannot_take_continuous_timesteps():
    """Why noise_flow stays hand-written: scale_noise looks σ up by exact equality in its table of
    num_train_timesteps entries, so the continuous timesteps calibration draws raise IndexError."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with pytest.raises(IndexError):
        sched.scale_noise(x0, torch.tensor([523.77, 12.5]), eps)
    # on its own table (every integer 1 … 1000, shift 1) the two agree bit for bit
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1000, 4, 8, 8, generator=g), torch.randn(1000, 4, 8, 8, generator=g)
    t = sched.timesteps.clone()
    assert torch.equal(noise_flow(x0, eps, t, 1000), sched.scale_noise(x0, t, eps))


# --- seeded noise -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,seed,dtype", [((4, 1, 8, 8), 0, torch.float32), ((3, 4, 32, 32), 1234, torch.float32),
                                              ((2, 16, 128, 128), 7, torch.bfloat16), ((5, 4, 16, 16), 2**40, torch.float16),
                                              ((1, 3, 7, 5), 3, torch.float64)])
def test_seeded_noise_is_randn_tensor_bit_for_bit(shape, seed, dtype):
    new, old = seeded_noise(shape, seed, dtype), ref.seeded_noise(shape, seed, dtype)
    assert new.dtype == old.dtype == dtype and torch.equal(new, old)


def test_randn_tensor_with_generator_lists_draws_row_by_row():
    """diffusers' randn_tensor with a list of generators draws each row from its own generator — what
    the schedulers do with `step_generators` (kept: it only makes the per-sample generators)."""
    from diffusers.utils.torch_utils import randn_tensor

    from diffes_pl.sampling import step_generators

    rows = randn_tensor((3, 4, 8, 8), generator=step_generators([5, 6, 7], 2), device=torch.device("cpu"))
    for i, seed in enumerate([5, 6, 7]):
        alone = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed * 1_000_003 + 2))
        assert torch.equal(rows[i:i + 1], alone)


# --- locks ------------------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from {module} import exclusive
    with exclusive(sys.argv[1], "testing"):
        print("held", flush=True)
        time.sleep(60)
""")


def _holder(lock, module: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(module=module), str(lock)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.skipif(sys.platform == "win32", reason="the reference lock is flock-based")
@pytest.mark.parametrize("holder_module,taker", [("diffes_pl.locks", exclusive), ("diffes_pl.locks", ref.exclusive),
                                                 ("helpers.reference_library_equivalence", exclusive)])
def test_lock_refuses_a_live_holder_and_survives_its_sigkill(tmp_path, holder_module, taker):
    """filelock vs the old flock code: the same refusal naming the holder's pid, both directions (an
    upgrade in the middle of a run still excludes), a SIGKILLed holder's file never blocks, and the
    file is gone after a normal release."""
    lock = tmp_path / "run" / ".diffes-pl.lock"
    holder = _holder(lock, holder_module)
    try:
        assert lock.read_text().strip() == str(holder.pid)
        with pytest.raises(LockedError, match=rf"^another diffes-pl run \(pid {holder.pid}\) is building it "
                                              rf"\(lock {lock}\); wait for it to finish$"):
            with taker(lock, "building it"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.exists()  # left behind by the killed holder …
    with taker(lock, "x") as held:  # … and not in the way
        assert held == lock and lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_lock_in_the_same_process_is_refused_too(tmp_path):
    lock = tmp_path / ".store.lock"
    with exclusive(lock, "checking"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with exclusive(lock, "checking"):
                pass
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):  # and by the old code
            with ref.exclusive(lock, "checking"):
                pass
    assert not lock.exists()
    with exclusive(lock, "again"):  # released: free for the next one
        pass


STRESS = textwrap.dedent("""
    import os, sys, time
    from diffes_pl.locks import LockedError, exclusive
    lock, marker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    got = 0
    while got < rounds:
        try:
            with exclusive(lock, "stress"):
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
                time.sleep(0.001)
                os.close(fd)
                os.unlink(marker)
                got += 1
        except LockedError:
            time.sleep(0.0005)
    print("ok", flush=True)
""")


def test_lock_never_has_two_holders_across_unlink_on_release(tmp_path):
    """The release unlinks the file while holding it; processes that opened the old inode in between
    must neither both hold a lock nor be refused by a lock nobody holds any more (they retry)."""
    lock, marker = tmp_path / ".x.lock", tmp_path / "inside"
    procs = [subprocess.Popen([sys.executable, "-c", STRESS, str(lock), str(marker), "40"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert not lock.exists() and not marker.exists()


# --- improved precision / recall --------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_precision_recall_is_torch_fidelity_bit_for_bit(k, chunk):
    g = torch.Generator().manual_seed(100 * k + chunk)
    real = torch.randn(300, 16, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(200, 16, generator=g, dtype=torch.float64) + 0.5
    new, old = M.precision_recall(real, fake, k=k, chunk=chunk), ref.precision_recall(real, fake, k=k, chunk=chunk)
    assert new == old and 0.05 < new[0] < 0.95 and 0.05 < new[1] < 0.95


def test_precision_recall_on_inception_sized_float32_features():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(257, 2048, generator=g)
    fake = 1.05 * torch.randn(131, 2048, generator=g) + 0.02
    for k in (3, 10):
        new, old = M.precision_recall(real, fake, k=k), ref.precision_recall(real, fake, k=k)
        assert new == old and 0 < new[0] + new[1] < 2
    x = torch.randn(50, 8, generator=g)
    assert M.precision_recall(x, x.clone()) == ref.precision_recall(x, x.clone()) == (1.0, 1.0)
