"""build_store's safety: free disk space checked before any calibration, the store's lock held while
it is written, leftovers of a killed build removed, and sealing by renaming the shards (no copy)."""
import os
import shutil

import lightning as L
import pytest

from diffes_pl.locks import LockedError
from diffes_pl.partition import StagePartition
from diffes_pl.pruners import WandaPruner, build_store
from diffes_pl.pruners import base, store_build
from diffes_pl.trajectory import DiskSpaceError, file_sha256, writing

from helpers.pruner_reference import HandNoisedDigits


class CountingDigits(HandNoisedDigits):
    """Counts the predict epochs (one per stage) that calibration starts."""

    epochs = 0

    def predict_dataloader(self):
        CountingDigits.epochs += 1
        return super().predict_dataloader()


def _build(tiny, root, log=lambda *_: None):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 2)
    CountingDigits.epochs = 0
    return build_store(trainer, WandaPruner(), CountingDigits(nsamples=4, batch_size=4), tiny, partition,
                       root / "store", 8, log=log)


def test_too_little_disk_space_refused_before_calibrating(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(DiskSpaceError) as err:
        _build(tiny, tmp_path)
    message = str(err.value)
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 2)
    needed = base.estimate_store_bytes(tiny, WandaPruner(), 8, partition.num_stages)  # orders only: a few KiB
    want = (int(needed * 1.1) + 2**20) / 2**20  # + 10 % and 1 MiB of margin
    assert "\n" not in message and f"the trajectory store at {tmp_path / 'store'} needs ≈ {want:.1f} MiB" in message
    assert f"but {tmp_path} has 0.0 MiB free; free some space, point `store:` at a folder on another disk, or " \
           "lower the pruner's `store_dtype`" in message
    assert CountingDigits.epochs == 0  # refused before any predict epoch
    assert os.listdir(tmp_path) == []  # no store, no partial folder, lock released and removed


def test_second_builder_refused_at_once(tiny, tmp_path):
    with writing(tmp_path / "store"):
        with pytest.raises(LockedError, match=rf"another diffes-pl run \(pid {os.getpid()}\) is building the "
                                              rf"trajectory store at {tmp_path / 'store'}"):
            _build(tiny, tmp_path)
    assert CountingDigits.epochs == 0 and not (tmp_path / "store").exists()


def test_stale_leftovers_removed_and_shards_sealed_by_rename(tiny, tmp_path, monkeypatch):
    (tmp_path / ".store.partial").mkdir()
    (tmp_path / ".store.partial" / "stage_00.safetensors").write_bytes(b"from a killed build")
    (tmp_path / ".store.x1y2.tmp").mkdir()  # the temporary folder of the former copy-based sealing
    (tmp_path / ".store.x1y2.tmp" / "stage_00.safetensors").write_bytes(b"killed while sealing")
    inodes = {}
    seal = store_build._seal

    def spy(shard_dir, path, manifest):
        inodes.update({p.name: p.stat().st_ino for p in shard_dir.iterdir() if p.suffix == ".safetensors"})
        return seal(shard_dir, path, manifest)

    monkeypatch.setattr(store_build, "_seal", spy)
    logged = []
    store = _build(tiny, tmp_path, log=logged.append)
    assert logged[1] == f"removed what an interrupted build of {tmp_path / 'store'} left: .store.x1y2.tmp"
    # a partial folder without a progress record (a build of an older version) resumes nothing
    assert logged[2] == (f"removed .store.partial, what an interrupted build of {tmp_path / 'store'} left (no "
                         "progress.json: written before builds could resume, or killed before its first stage "
                         "finished)")
    assert sorted(os.listdir(tmp_path)) == ["store"]  # no partial folder, temporary folder or lock left
    names = ["stage_00.safetensors", "stage_01.safetensors"]
    assert sorted(os.listdir(store.path)) == ["manifest.json", *names]
    # sealing renamed the calibration's shards into place: same files, never copied
    assert inodes == {n: (store.path / n).stat().st_ino for n in names}
    assert {n: r["sha256"] for n, r in store.manifest["shards"].items()} == {n: file_sha256(store.path / n)
                                                                             for n in names}
    assert CountingDigits.epochs == 2
