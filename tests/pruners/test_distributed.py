"""Calibration under DDP on CPU (gloo): `diffes-pl predict` with two processes writes the same
trajectory store as with one.

Statistics are summed in float64 inside each process and all-reduced once per stage, at epoch end,
so the two runs differ only in the order of a float64 sum. 7 samples over 2 processes: uneven
shards (4 + 3 samples, 4 + 3 predict steps), which a collective inside `predict_step` would hang on.

With batch_size 1 every sample goes through the denoiser alone in both runs, so its float32
activations are bit-identical and weights must agree to 1e-6 relative element by element. With
batch_size > 1 the shards regroup the samples into different batches (rank 0 runs [0, 2], [4, 6]
where one process runs [0, 1], [2, 3], …), and a float32 forward pass of a different batch shape
rounds differently (~1e-7); OBS's solve amplifies that to ~1e-6 of the weights' scale, the same as
changing batch_size in a single process. That case is checked at a tolerance of 1e-5 of the
weights' scale, with the orders still exact.
"""
import os
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffes_pl.trajectory import MANIFEST

from helpers.process_group import run_group

ROOT = Path(__file__).resolve().parents[2]
STAGES = 2
SMALL = ["--model.num_stages", str(STAGES), "--model.steps", "4", "--data.nsamples", "7"]
ESTIMATE = re.compile(r"calibration: \d+ stages, statistics [\d.]+ MiB per stage; store ≈ [\d.]+ MiB")
TIMEOUT = 80


def _env(extra_path: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    # a fresh launch: Lightning decides from these whether it is already a launched rank
    for var in ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _diffes_pl() -> str:
    script = Path(sys.executable).parent / "diffes-pl"
    return str(script) if script.exists() else "diffes-pl"


def predict(root: Path, config: str, devices: int, batch_size: int, extra=(), env=None) -> tuple[int, str, float]:
    """Runs `diffes-pl predict` in its own process group; kills the whole group (the launched second
    rank included) if it outlives TIMEOUT, so that a rank waiting on a dead peer cannot hang the tests."""
    cmd = [_diffes_pl(), "predict", "--config", config, *SMALL, "--data.batch_size", str(batch_size),
           "--trainer.devices", str(devices), "--trainer.default_root_dir", str(root), *extra]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    start = time.monotonic()
    code, out, _ = run_group(cmd, env=env or _env(), cwd=ROOT, timeout=TIMEOUT, merge_stderr=True,
                             what=f"diffes-pl predict --trainer.devices {devices}")
    return code, out, time.monotonic() - start


def _store(root: Path) -> tuple[dict, list[dict]]:
    import json

    path = root / "store"
    manifest = json.loads((path / MANIFEST).read_text())
    shards = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    assert len(shards) == STAGES == manifest["num_stages"]
    assert not (root / ".store.partial").exists()  # the shard folder is gone once sealed
    return manifest, [load_file(str(p)) for p in shards]


def _build_both(tmp_path: Path, config: str, batch_size: int):
    runs = {}
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        rc, out, seconds = predict(root, config, devices, batch_size)
        assert rc == 0, out[-4000:]
        assert len(ESTIMATE.findall(out)) == 1, out[-4000:]  # printed once (rank 0), before writing
        assert out.index("calibration:") < out.index("trajectory store written")
        if devices == 2:
            assert "Starting with 2 processes" in out and "distributed_backend=gloo" in out
        runs[devices] = _store(root)
        print(f"devices={devices} batch_size={batch_size}: {seconds:.1f} s")
    return runs[1], runs[2]


def _compare(one, two, weight_atol_scale: float = 0.0) -> None:
    (m1, shards1), (m2, shards2) = one, two
    assert m1["key"] == m2["key"]  # the process count is not part of the store's identity
    # checksums differ with the weights' last bits (compared with a tolerance below); sizes do not
    sizes1, sizes2 = ({n: r["bytes"] for n, r in m.pop("shards").items()} for m in (dict(m1), dict(m2)))
    assert sizes1 == sizes2
    # the shards' checksums (and so the manifest's own) differ with the summation order of the ranks
    differ = ("shards", "manifest_sha256")
    assert {k: v for k, v in m1.items() if k not in differ} == {k: v for k, v in m2.items() if k not in differ}
    for stage, (a, b) in enumerate(zip(shards1, shards2)):
        assert a.keys() == b.keys(), stage
        orders = [k for k in a if k.endswith(".order")]
        assert orders
        for k in orders:
            assert torch.equal(a[k], b[k]), f"stage {stage} {k}: {a[k].tolist()} vs {b[k].tolist()}"
        for k in a.keys() - set(orders):
            atol = weight_atol_scale * float(a[k].abs().max()) if a[k].numel() else 0.0
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=atol, msg=lambda m: f"stage {stage} {k}: {m}")


# --- one process vs two -------------------------------------------------------------------------------

def test_obs_two_processes_equal_one(tmp_path):
    one, two = _build_both(tmp_path, "configs/tiny_obs.yaml", batch_size=1)
    assert one[0]["compensated"] and any(".weight." in k for k in one[1][0])
    # the two ranks' Hessians are summed in another order: a compensated weight that cancels to almost
    # 0 (seen: 6.6e-9 off by 8.9e-15) misses a purely relative 1e-6; 1e-9 of the tensor's largest
    # entry, far below one float32 step of it, lets only such near-zero entries through
    _compare(one, two, weight_atol_scale=1e-9)


def test_depth_two_processes_equal_one(tmp_path):
    one, two = _build_both(tmp_path, "configs/tiny_depth.yaml", batch_size=1)
    assert one[0]["depth"] and set(one[1][0]) == {"blocks.order"}
    _compare(one, two)


def test_block_by_block_two_processes_equal_one_whole_model(tmp_path):
    """Block by block (statistics all-reduced per block's pass) on 2 processes vs the whole model on
    one: the same store, to the ranks' summation order."""
    runs = {}
    for devices, mode in ((1, "model"), (2, "block")):
        root = tmp_path / mode
        rc, out, _ = predict(root, "configs/tiny_obs.yaml", devices, 1, extra=("--model.calibrate_by", mode))
        assert rc == 0, out[-4000:]
        assert ("per block at most (block by block, activations carried)" in out) == (mode == "block"), out[-4000:]
        runs[mode] = _store(root)
    _compare(runs["model"], runs["block"], weight_atol_scale=1e-9)


def test_obs_two_processes_uneven_batches(tmp_path):
    # batch_size 2: rank 0 runs 2 full batches, rank 1 a full one and a single sample
    one, two = _build_both(tmp_path, "configs/tiny_obs.yaml", batch_size=2)
    _compare(one, two, weight_atol_scale=1e-5)


# --- a failing rank ----------------------------------------------------------------------------------

FAILING = '''
from diffes_pl.pruners import OBSPruner


class RankOneFails(OBSPruner):
    def predict_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 1:
            raise RuntimeError("injected failure on rank 1")
        return super().predict_step(batch, batch_idx)
'''


def test_failure_in_one_rank_ends_the_run(tmp_path):
    """Rank 1 dies mid-epoch while rank 0 goes on to the epoch-end all-reduce: the run must end (not
    wait forever), fail, and leave neither a store nor the partial shard folder."""
    (tmp_path / "failing_pruner.py").write_text(FAILING)
    root = tmp_path / "run"
    rc, out, seconds = predict(root, "configs/tiny_obs.yaml", 2, 1, env=_env(tmp_path),
                               extra=["--model.pruner", "failing_pruner.RankOneFails"])
    assert rc != 0, out[-4000:]
    assert "injected failure on rank 1" in out
    assert not (root / "store").exists() and not (root / ".store.partial").exists()
