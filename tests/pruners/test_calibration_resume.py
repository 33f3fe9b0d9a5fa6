"""Calibration that survives preemption (issue 24, part 4): each finished stage's shard is kept with
its checksum in `.<store>.partial/progress.json`; a build killed with SIGKILL after stage k resumes
at stage k + 1 and seals a store byte-identical to an uninterrupted build; SIGTERM (Ctrl-C) mid-stage
stops at the next calibration batch with one line and exit 143 (130), keeping the finished stages.

The kills happen in a `diffes-pl predict` subprocess whose driver (DRIVER, written beside the run)
patches the product in that process only: SIGKILL right after stage k's shard and record are
written, a signal to itself after a given batch of a given stage. What is on disk at the kill is
asserted before the rerun."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffes_pl.integrity import file_sha256, seal_holds
from diffes_pl.trajectory import (MANIFEST, PROGRESS, PROGRESS_SHA256, PartialStore, TrajectoryStore, make_key,
                                  shard_name)

from helpers.process_group import run_group

ROOT = Path(__file__).resolve().parents[2]
STAGES, BATCHES = 4, 4  # 8 samples in batches of 2: 4 calibration batches per stage
SMALL = ["--model.num_stages", str(STAGES), "--model.steps", "8", "--data.nsamples", "8", "--data.batch_size", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1"}
for var in ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)

DRIVER = '''
import os, signal, sys
from diffes_pl.pruners import base
from diffes_pl.trajectory import PartialStore

# Ctrl-C as in a terminal, even when the tests run as a background job (which ignores SIGINT, and the
# CLI leaves an ignored SIGINT alone)
signal.signal(signal.SIGINT, signal.default_int_handler)
kill_after = int(os.environ.get("KILL_AFTER_STAGE", "-1"))
signal_at = os.environ.get("SIGNAL_AT")  # "<signal> <stage> <batch>": sent to itself after that batch
log = open(os.environ["BATCH_LOG"], "a") if "BATCH_LOG" in os.environ else None

write_stage = PartialStore.write_stage
def write_then_die(self, stage, tensors):
    write_stage(self, stage, tensors)
    if stage == kill_after:  # stage k whole and recorded: die as a preempted job does, no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
PartialStore.write_stage = write_then_die

predict_step = base.Pruner.predict_step
def logged_step(self, batch, batch_idx):
    skipped = self._stopping  # several processes stopping: the batch is passed over, not run
    out = predict_step(self, batch, batch_idx)
    if log is not None and not skipped:
        rank = f" rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        log.write(f"{self.stage} {self.part} {batch_idx}{rank}\\n")
        log.flush()
    if signal_at is not None and self.global_rank == 0:
        sig, stage, at = signal_at.split()
        if (self.stage, self.part, batch_idx) == (int(stage), 0, int(at)):
            os.kill(os.getpid(), getattr(signal, sig))
    return out
base.Pruner.predict_step = logged_step

kill_block = os.environ.get("KILL_AFTER_BLOCK")  # "<stage> <block>": SIGKILL once that block's shard is kept
write_block = PartialStore.write_block
def write_block_then_die(self, stage, block, tensors):
    write_block(self, stage, block, tensors)
    if kill_block is not None and (stage, block) == tuple(map(int, kill_block.split())):
        os.kill(os.getpid(), signal.SIGKILL)
PartialStore.write_block = write_block_then_die

signal_block = os.environ.get("SIGNAL_AT_BLOCK")  # "<signal> <stage> <block>": sent while that block runs
carry_block = base.Pruner._carry_block
def logged_carry(self, index, advance):
    if signal_block is not None:
        sig, stage, block = signal_block.split()
        if (self.stage, index) == (int(stage), int(block)) and self.global_rank == 0:
            os.kill(os.getpid(), getattr(signal, sig))
    out = carry_block(self, index, advance)
    if log is not None:
        rank = f" rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        log.write(f"block {self.stage} {index}{rank}\\n")
        log.flush()
    return out
base.Pruner._carry_block = logged_carry

from diffes_pl.cli import main
main()
'''


def predict(root: Path, config: str = "configs/tiny_obs.yaml", extra=(), **env) -> subprocess.CompletedProcess:
    """`diffes-pl predict` of the small calibration into `root`, through DRIVER (env: its settings)."""
    driver = root.parent / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), "predict", "--config", str(ROOT / config), *SMALL, *extra,
           "--trainer.default_root_dir", str(root)]
    return subprocess.run(cmd, env={**ENV, **env}, cwd=root.parent, capture_output=True, text=True, timeout=300)


def files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Uninterrupted builds (OBS; OBS-Diff's 3 sequential passes per stage): every file of each store."""
    out = {}
    for name, config in (("obs", "configs/tiny_obs.yaml"), ("obsdiff", "configs/tiny_obsdiff.yaml")):
        root = tmp_path_factory.mktemp(f"straight_{name}") / "run"
        done = predict(root, config)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "resuming" not in done.stdout
        out[config] = files(root / "store")
        assert sorted(out[config]) == [MANIFEST, *(shard_name(s) for s in range(STAGES))]
    return out


def assert_kept(run: Path, kept: int) -> dict:
    """On disk: stages 0..kept − 1 whole and verified against progress.json, no later shard, no store."""
    partial = run / ".store.partial"
    assert not (run / "store").exists() and not (partial / MANIFEST).exists()
    progress = json.loads((partial / PROGRESS).read_text())
    assert seal_holds(progress, PROGRESS_SHA256) and progress["num_stages"] == STAGES
    names = [shard_name(s) for s in range(kept)]
    assert sorted(progress["shards"]) == names
    assert sorted(p.name for p in partial.iterdir()) == sorted([PROGRESS, *names])  # no stage k + 1, no temp file
    for name in names:
        assert file_sha256(partial / name) == progress["shards"][name]["sha256"]
    return progress


def calibrated_stages(stdout: str) -> list[int]:
    """Stages whose calibration passes ran to the end, from the plain progress line of each pass."""
    return list(dict.fromkeys(int(line.split("stage ")[1].split(" ")[0]) for line in stdout.splitlines()
                              if line.startswith("calibration, stage ")))


@pytest.mark.parametrize("config,k", [("configs/tiny_obs.yaml", 1), ("configs/tiny_obsdiff.yaml", 2)],
                         ids=["obs-after-stage-1", "obsdiff-3-passes-after-stage-2"])
def test_sigkill_after_stage_k_resumes_byte_identical(straight, tmp_path, config, k):
    run = tmp_path / "run"
    killed = predict(run, config, KILL_AFTER_STAGE=str(k))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert calibrated_stages(killed.stdout) == list(range(k + 1))  # the kill struck after stage k, mid-build
    progress = assert_kept(run, k + 1)
    resumed = predict(run, config)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    kept = "stage 0" if k == 0 else f"stages 0–{k}"
    assert f"resuming calibration of {run / 'store'}: {kept} kept (verified), calibrating from stage {k + 1}" \
        in resumed.stdout
    assert calibrated_stages(resumed.stdout) == list(range(k + 1, STAGES))  # the kept stages were not redone
    assert files(run / "store") == straight[config]  # every file, manifest.json included, byte for byte
    assert json.loads(files(run / "store")[MANIFEST])["key"] == progress["key"]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "store"]  # no partial folder, no lock


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_stage_stops_at_the_next_batch(straight, tmp_path, sig):
    """Signalled after batch 1 of stage 2's 4: batch 2 never runs, stage 2 is abandoned, stages 0–1
    kept; exit 128 + signal with one line; the rerun resumes at stage 2 and ends byte-identical."""
    run, batches = tmp_path / "run", tmp_path / "batches.txt"
    stopped = predict(run, SIGNAL_AT=f"{sig.name} 2 1", BATCH_LOG=str(batches))
    assert stopped.returncode == 128 + sig, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    ran = [tuple(map(int, line.split())) for line in batches.read_text().splitlines()]
    assert ran == [(s, 0, b) for s in range(2) for b in range(BATCHES)] + [(2, 0, 0), (2, 0, 1)]  # within one batch
    assert "Traceback" not in stopped.stderr and "Received SIGTERM: 2" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"diffes-pl: stopped by {sig.name} during `predict`; calibration stages 0–1 of {STAGES} kept in "
        f"{run / '.store.partial'}: run the command again to resume at stage 2")
    assert calibrated_stages(stopped.stdout) == [0, 1]
    assert_kept(run, 2)
    resumed = predict(run, BATCH_LOG=str(batches))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming calibration of {run / 'store'}: stages 0–1 kept (verified), calibrating from stage 2" \
        in resumed.stdout
    assert files(run / "store") == straight["configs/tiny_obs.yaml"]


# --- what a rerun keeps of a partial folder (no calibration: the folder is judged alone) ---------------

def _partial(tmp_path: Path, key: str = "k" * 64, stages: int = 3) -> PartialStore:
    partial = PartialStore(tmp_path / "store", key, num_stages=4)
    for stage in range(stages):
        partial.write_stage(stage, {"g.order": torch.arange(5).roll(stage)})
    return partial


def test_verified_stages_kept_and_unrecorded_files_removed(tmp_path):
    _partial(tmp_path)
    folder = tmp_path / ".store.partial"
    (folder / shard_name(3)).write_bytes(b"written, never recorded")  # killed before its record
    (folder / f".{shard_name(3)}.abc.tmp").write_bytes(b"half a shard")
    again = PartialStore(tmp_path / "store", "k" * 64, num_stages=4)
    assert again.resume() == [] and again.kept == 3
    assert sorted(p.name for p in folder.iterdir()) == [PROGRESS, *(shard_name(s) for s in range(3))]


def test_a_damaged_shard_and_the_stages_after_it_are_calibrated_again(tmp_path):
    _partial(tmp_path)
    shard = tmp_path / ".store.partial" / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    again = PartialStore(tmp_path / "store", "k" * 64, num_stages=4)
    assert again.resume() == [f"stage 1 of an interrupted build of {tmp_path / 'store'} is not kept "
                              f"({shard_name(1)}: checksum mismatch); it and the stages after it are calibrated again"]
    assert again.kept == 1 and list(again.shards) == [shard_name(0)]
    assert sorted(p.name for p in (tmp_path / ".store.partial").iterdir()) == [PROGRESS, shard_name(0)]
    progress = json.loads((tmp_path / ".store.partial" / PROGRESS).read_text())
    assert seal_holds(progress, PROGRESS_SHA256) and list(progress["shards"]) == [shard_name(0)]  # rewritten


@pytest.mark.parametrize("damage,why", [
    ("key", "built for other settings: another store key"),
    ("edited", f"its {PROGRESS} fails its checksum"),
    ("garbled", f"its {PROGRESS} is not valid JSON"),
])
def test_a_partial_folder_of_other_settings_or_with_a_damaged_record_is_removed(tmp_path, damage, why):
    _partial(tmp_path)
    record = tmp_path / ".store.partial" / PROGRESS
    if damage == "edited":
        progress = json.loads(record.read_text())
        progress["shards"].pop(shard_name(2))
        record.write_text(json.dumps(progress))
    elif damage == "garbled":
        record.write_bytes(b"\xff{")
    again = PartialStore(tmp_path / "store", ("o" if damage == "key" else "k") * 64, num_stages=4)
    assert again.resume() == [f"removed .store.partial, what an interrupted build of {tmp_path / 'store'} left ({why})"]
    assert again.kept == 0 and not (tmp_path / ".store.partial").exists()


def test_stages_are_recorded_in_order(tmp_path):
    partial = _partial(tmp_path, stages=1)
    with pytest.raises(RuntimeError, match="stage 2 finished while stages 0..0 are recorded"):
        partial.write_stage(2, {"g.order": torch.arange(5)})


def test_sealing_drops_the_record(tmp_path):
    """The sealed store holds the shards and the manifest only, whatever the build recorded."""
    partial = _partial(tmp_path, key=make_key({"x": 1}), stages=4)
    manifest = {"key": partial.key, "num_stages": 4, "levels_max": 1, "groups": [], "depth": False}
    store = TrajectoryStore.seal(partial.folder, partial.path, manifest)
    assert sorted(p.name for p in store.path.iterdir()) == [MANIFEST, *(shard_name(s) for s in range(4))]
    assert not partial.folder.exists()


def test_two_processes_resume_a_killed_single_process_build(tmp_path):
    """DDP (gloo, 2 ranks) rerun of a build killed after stage 1: every rank starts at rank 0's stage 2
    (broadcast), and the store equals the straight single-process one byte for byte (depth pruning: block
    orders, which two processes compute exactly as one)."""
    config, straight_root, run = "configs/tiny_depth.yaml", tmp_path / "straight" / "run", tmp_path / "killed" / "run"
    for root in (straight_root, run):
        root.parent.mkdir()
    done = predict(straight_root, config)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    killed = predict(run, config, KILL_AFTER_STAGE="1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert_kept(run, 2)
    driver = run.parent / "driver.py"
    cmd = [sys.executable, str(driver), "predict", "--config", str(ROOT / config), *SMALL, "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(run)]
    # a rank waiting on a peer that started elsewhere (ranks on different stages?) ends the group
    code, out, _ = run_group(cmd, env=ENV, cwd=run.parent, timeout=120, merge_stderr=True, what="the 2-process resume")
    assert code == 0, out[-4000:]
    assert "Starting with 2 processes" in out
    assert out.count("resuming calibration of") == 1  # rank 0 says it once
    assert calibrated_stages(out) == [2, 3]
    assert files(run / "store") == files(straight_root / "store")


def test_two_processes_stop_mid_stage_together(tmp_path):
    """DDP: rank 0 signalled after its batch 0 of stage 1 (Lightning passes SIGTERM on to rank 1): both
    ranks pass over their remaining batches, agree at the epoch end (no collective per batch: ranks may
    hold uneven shards), and exit 143; stage 0 kept, stage 1 abandoned."""
    run, batches = tmp_path / "run", tmp_path / "batches.txt"
    run.parent.mkdir(exist_ok=True)
    (run.parent / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, str(run.parent / "driver.py"), "predict", "--config", str(ROOT / "configs/tiny_obs.yaml"),
           *SMALL, "--data.batch_size", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.default_root_dir", str(run)]
    env = {**ENV, "SIGNAL_AT": "SIGTERM 1 0", "BATCH_LOG": str(batches)}
    code, out, err = run_group(cmd, env=env, cwd=run.parent, timeout=120, what="the 2-process stop")
    assert code == 143, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and last_line_of_ours(err) == (
        f"diffes-pl: stopped by SIGTERM during `predict`; calibration stage 0 of {STAGES} kept in "
        f"{run / '.store.partial'}: run the command again to resume at stage 1")
    ran = batches.read_text().splitlines()
    assert sorted(line for line in ran if line.startswith("0 ")) == sorted(
        f"0 0 {b} rank{r}" for r in range(2) for b in range(4))  # stage 0 whole on both ranks: 4 + 4 samples
    assert [line for line in ran if line.startswith("1 ") and line.endswith("rank0")] == ["1 0 0 rank0"]
    assert len([line for line in ran if line.startswith("1 ")]) < 8  # stage 1 was not run to its end
    assert_kept(run, 1)


# --- carried block by block: finished blocks of the stage under way are kept too ----------------------
BY_BLOCK = ["--model.calibrate_by", "block"]


def carried(log: Path, rank: str = "") -> list[tuple[int, int]]:
    """(stage, block) of each carried block that finished, in order (of `rank`, e.g. "rank0", under DDP)."""
    return [tuple(map(int, line.split()[1:3])) for line in log.read_text().splitlines()
            if line.startswith("block ") and line.split()[3:] == ([rank] if rank else [])]


def last_line_of_ours(err: str) -> str:
    """The last line diffes-pl wrote to a 2-process run's stderr. Rank 1 writes to the same pipe and may
    outlive rank 0 by a moment, and gloo's transport threads, left running by Lightning, may make the
    C++ runtime print "terminate called without an active exception" as a rank exits: not this
    test's subject."""
    return [line for line in err.strip().splitlines() if line.startswith("diffes-pl:")][-1]


def ddp(run: Path, config: str, env: dict, timeout: int = 180) -> tuple[int, str, str]:
    """The driver's `predict` on 2 processes (gloo), ended as a group if it hangs."""
    (run.parent / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, str(run.parent / "driver.py"), "predict", "--config", str(ROOT / config), *SMALL,
           *BY_BLOCK, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(run)]
    return run_group(cmd, env={**ENV, **env}, cwd=run.parent, timeout=timeout, what="the 2-process run")


def test_sigkill_after_a_block_resumes_within_the_stage_byte_identical(straight, tmp_path):
    """Killed (SIGKILL) once block 1 of stage 2 is kept: on disk stages 0–1 and blocks 0–1 of stage 2;
    the rerun calibrates stage 2 from block 2 (blocks 0–1 not redone) and seals the store of an
    uninterrupted whole-model build, byte for byte."""
    from diffes_pl.trajectory import block_shard_name

    run, log = tmp_path / "run", tmp_path / "log.txt"
    killed = predict(run, extra=BY_BLOCK, KILL_AFTER_BLOCK="2 1", BATCH_LOG=str(log))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    blocks = max(b for _, b in carried(log)) + 1  # every block of stages 0–1 ran
    # mid-stage: block 1 of stage 2 died right after its shard was kept, before its log line
    assert carried(log) == [(s, b) for s in range(2) for b in range(blocks)] + [(2, 0)]
    partial = run / ".store.partial"
    progress = json.loads((partial / PROGRESS).read_text())
    kept = [block_shard_name(2, 0), block_shard_name(2, 1)]
    assert sorted(progress["shards"]) == [shard_name(0), shard_name(1)] and sorted(progress["blocks"]) == kept
    assert sorted(p.name for p in partial.iterdir()) == sorted([PROGRESS, shard_name(0), shard_name(1), *kept])
    log.unlink()
    resumed = predict(run, extra=BY_BLOCK, BATCH_LOG=str(log))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert (f"resuming calibration of {run / 'store'}: stages 0–1 and blocks 0–1 of stage 2 kept (verified), "
            f"calibrating stage 2 from block 2") in resumed.stdout
    assert carried(log) == [(2, b) for b in range(2, blocks)] + [(s, b) for s in range(3, STAGES) for b in range(blocks)]
    assert files(run / "store") == straight["configs/tiny_obs.yaml"]


def test_sigterm_during_a_block_stops_at_the_next_block(straight, tmp_path):
    """SIGTERM while block 1 of stage 1 runs: the block is abandoned between its groups' solves (a big
    block's solve takes minutes; a cluster waits 30–120 s), block 0 of stage 1 is kept, block 2 never
    starts; exit 143 with one line naming where the rerun resumes; the rerun ends byte-identical."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    stopped = predict(run, extra=BY_BLOCK, SIGNAL_AT_BLOCK="SIGTERM 1 1", BATCH_LOG=str(log))
    assert stopped.returncode == 143, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    blocks = max(b for _, b in carried(log)) + 1
    assert carried(log) == [(0, b) for b in range(blocks)] + [(1, 0)]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"diffes-pl: stopped by SIGTERM during `predict`; calibration stage 0 and block 0 of stage 1 of {STAGES} "
        f"kept in {run / '.store.partial'}: run the command again to resume at stage 1, block 1")
    resumed = predict(run, extra=BY_BLOCK)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "stage 0 and block 0 of stage 1 kept (verified), calibrating stage 1 from block 1" in resumed.stdout
    assert files(run / "store") == straight["configs/tiny_obs.yaml"]


def test_two_processes_resume_a_killed_build_within_its_stage(tmp_path):
    """A single-process carried build killed after block 1 of stage 2, resumed on 2 processes (gloo):
    both ranks start at stage 2, block 2 (rank 0's, broadcast) and the store equals the straight
    single-process one byte for byte (Wanda: orders, which 2 processes compute as 1 does)."""
    config = "configs/tiny_wanda.yaml"
    straight_root, run, log = tmp_path / "straight" / "run", tmp_path / "killed" / "run", tmp_path / "log.txt"
    for root in (straight_root, run):
        root.parent.mkdir()
    done = predict(straight_root, config, extra=BY_BLOCK)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    killed = predict(run, config, extra=BY_BLOCK, KILL_AFTER_BLOCK="2 1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    code, out, err = ddp(run, config, {"BATCH_LOG": str(log)})
    assert code == 0, out[-3000:] + err[-3000:]
    assert "Starting with 2 processes" in out + err
    assert out.count("calibrating stage 2 from block 2") == 1  # rank 0 says it once
    blocks = max(b for _, b in carried(log, "rank0")) + 1
    for rank in ("rank0", "rank1"):
        assert carried(log, rank) == [(2, b) for b in range(2, blocks)] + [(3, b) for b in range(blocks)]
    assert files(run / "store") == files(straight_root / "store")


def test_two_processes_stop_together_between_blocks(tmp_path):
    """DDP: rank 0 signalled as block 1 of stage 1 starts (rank 1 may already wait in that block's first
    all-reduce: Lightning's own handler, which broadcasts, would hang here): both ranks agree there and
    exit 143 with stage 0 and block 0 of stage 1 kept; block 1 finishes nowhere."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    run.parent.mkdir(exist_ok=True)
    code, out, err = ddp(run, "configs/tiny_obs.yaml", {"SIGNAL_AT_BLOCK": "SIGTERM 1 1", "BATCH_LOG": str(log)})
    assert code == 143, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and last_line_of_ours(err) == (
        f"diffes-pl: stopped by SIGTERM during `predict`; calibration stage 0 and block 0 of stage 1 of {STAGES} "
        f"kept in {run / '.store.partial'}: run the command again to resume at stage 1, block 1")
    for rank in ("rank0", "rank1"):
        assert carried(log, rank)[-1] == (1, 0)
    progress = json.loads((run / ".store.partial" / PROGRESS).read_text())
    assert sorted(progress["shards"]) == [shard_name(0)] and len(progress["blocks"]) == 1
