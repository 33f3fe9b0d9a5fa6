import json

import pytest
import torch

from diffes_pl.trajectory import StoreMismatchError, TrajectoryStore, make_key

FIELDS = {"denoiser": {"name": "tiny-digits"}, "partition": {"num_stages": 2}, "pruner": {"name": "obs", "damp": 0.01}}


def _write(path, fields=FIELDS):
    manifest = {"key": make_key(fields), "key_fields": fields, "pruner": "obs", "levels_max": 2,
                "num_stages": 2, "compensated": True}
    stages = [{"blocks.0.ff.order": torch.tensor([2, 0, 1, 3]),
               "blocks.0.ff.weight.1": torch.randn(3, 2, dtype=torch.float16),
               "blocks.0.ff.weight.2": torch.randn(3, 0, dtype=torch.float16)} for _ in range(2)]
    return TrajectoryStore.write(path, manifest, stages), stages


def test_round_trip_exact(tmp_path):
    store, stages = _write(tmp_path / "store")
    again = TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS)
    for s in range(2):
        assert torch.equal(again.order(s, "blocks.0.ff"), stages[s]["blocks.0.ff.order"])
        assert torch.equal(again.weight(s, "blocks.0.ff", 1), stages[s]["blocks.0.ff.weight.1"])
        assert again.weight(s, "blocks.0.ff", 1).dtype == torch.float16
        assert again.weight(s, "blocks.0.ff", 0) is None
    assert again.nbytes == 2 * (4 * 8 + 6 * 2)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_mismatch_names_fields(tmp_path):
    _write(tmp_path / "store")
    other = {**FIELDS, "pruner": {"name": "obs", "damp": 0.1}}
    with pytest.raises(StoreMismatchError, match=r"differing: pruner\.damp"):
        TrajectoryStore.open(tmp_path / "store", key_fields=other)


def test_failed_write_leaves_nothing(tmp_path):
    manifest = {"key": "k", "key_fields": {}, "pruner": "obs", "levels_max": 2, "num_stages": 3}

    def stages():
        yield {"a.order": torch.arange(3)}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        TrajectoryStore.write(tmp_path / "store", manifest, stages())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="diffes-pl predict"):
        TrajectoryStore.open(tmp_path / "store")


def test_key_is_order_independent():
    assert make_key({"a": 1, "b": [1, 2]}) == make_key({"b": (1, 2), "a": 1})
    assert make_key({"a": 1}) != make_key({"a": 2})


# --- verification: checksums, orders, truncation -------------------------------------------------
from diffes_pl.trajectory import StoreCorruptError, file_sha256, sealed_manifest  # noqa: E402

GROUPS = [{"name": "blocks.0.ff", "kind": "channels", "block": 0, "attr": "ff", "size": 4, "unit_width": 1}]


def _flip(file, offset_from_end=100, count=64):
    data = bytearray(file.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_manifest_holds_every_shards_checksum(tmp_path):
    store, _ = _write(tmp_path / "store")
    shards = store.manifest["shards"]
    assert store.manifest["format"] == 3 and sorted(shards) == ["stage_00.safetensors", "stage_01.safetensors"]
    for name, record in shards.items():
        assert record["sha256"] == file_sha256(tmp_path / "store" / name)
        assert record["bytes"] == (tmp_path / "store" / name).stat().st_size


def test_flipped_bytes_are_refused_naming_the_shard(tmp_path):
    from safetensors.torch import load_file

    manifest = {"key": make_key(FIELDS), "key_fields": FIELDS, "pruner": "obs", "levels_max": 2, "num_stages": 2,
                "compensated": True}
    stages = [{"blocks.0.ff.order": torch.tensor([2, 0, 1, 3]), "blocks.0.ff.weight.1": torch.randn(64, 3)}
              for _ in range(2)]
    TrajectoryStore.write(tmp_path / "store", manifest, stages)
    shard = tmp_path / "store" / "stage_01.safetensors"
    _flip(shard, offset_from_end=128)  # inside the weight's data: safetensors alone reads it silently
    assert not torch.equal(load_file(shard)["blocks.0.ff.weight.1"], stages[1]["blocks.0.ff.weight.1"])
    lazy = TrajectoryStore.open(tmp_path / "store")  # plain open: stage 0 still serves, stage 1 is refused on use
    assert torch.equal(lazy.order(0, "blocks.0.ff"), stages[0]["blocks.0.ff.order"])
    with pytest.raises(StoreCorruptError) as err:
        lazy.weight(1, "blocks.0.ff", 1)
    message = _one_line(err)
    assert "stage_01.safetensors is corrupt: checksum mismatch" in message
    assert f"delete {tmp_path / 'store'} and rebuild it with `diffes-pl predict" in message
    with pytest.raises(StoreCorruptError, match="stage_01.safetensors is corrupt: checksum mismatch"):
        TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS)  # reuse: every shard verified up front


def test_truncated_shard_is_one_line_naming_the_shard(tmp_path):
    _write(tmp_path / "store")
    shard = tmp_path / "store" / "stage_00.safetensors"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    with pytest.raises(StoreCorruptError) as err:
        TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS)
    assert f"shard {shard} is corrupt: truncated ({size // 2} of {size} bytes)" in _one_line(err)


def test_duplicate_order_refused_when_written(tmp_path):
    manifest = {"key": "k", "key_fields": {}, "pruner": "obs", "levels_max": 2, "num_stages": 1}
    with pytest.raises(StoreCorruptError) as err:
        TrajectoryStore.write(tmp_path / "store", manifest, [{"blocks.0.ff.order": torch.tensor([2, 0, 0, 3])}])
    assert "blocks.0.ff.order is not a permutation of 0..3 (repeated [0], absent [1])" in _one_line(err)
    assert list(tmp_path.iterdir()) == []  # nothing written, no partial folder, no lock file
    with pytest.raises(StoreCorruptError, match=r"blocks.0.ff.order has shape \[3\].*expected 4"):
        TrajectoryStore.write(tmp_path / "store", {**manifest, "groups": GROUPS},
                              [{"blocks.0.ff.order": torch.tensor([2, 0, 1])}])
    with pytest.raises(StoreCorruptError, match=r"blocks.0.ff.weight.1 has 3 columns; level 1 of 2 keeps 2"):
        TrajectoryStore.write(tmp_path / "store", {**manifest, "groups": GROUPS},
                              [{"blocks.0.ff.order": torch.arange(4), "blocks.0.ff.weight.1": torch.zeros(5, 3)}])


def test_tampered_order_refused_when_read(tmp_path):
    """A shard replaced by one with a duplicate index and its checksum updated: the contents are
    still validated, so the store is refused naming the shard."""
    from safetensors.torch import save_file

    _write(tmp_path / "store")
    shard = tmp_path / "store" / "stage_01.safetensors"
    save_file({"blocks.0.ff.order": torch.tensor([2, 0, 1, 1])}, str(shard))
    manifest_file = tmp_path / "store" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["shards"][shard.name] = {"sha256": file_sha256(shard), "bytes": shard.stat().st_size}
    manifest_file.write_text(json.dumps(sealed_manifest(manifest)))  # the manifest's own checksum updated too
    store = TrajectoryStore.open(tmp_path / "store")
    with pytest.raises(StoreCorruptError) as err:
        store.order(1, "blocks.0.ff")
    assert f"shard {shard} is corrupt: blocks.0.ff.order is not a permutation of 0..3 (repeated [1], absent [3])" \
        in _one_line(err)


def test_store_without_checksums_is_read_with_a_warning(tmp_path):
    """Format 1 (older diffes-pl): accepted, contents still validated, truncation still named."""
    _, stages = _write(tmp_path / "store")
    manifest_file = tmp_path / "store" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["shards"]
    manifest_file.write_text(json.dumps({**manifest, "format": 1}))
    with pytest.warns(UserWarning, match="has no checksums"):
        store = TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS)
    assert torch.equal(store.weight(1, "blocks.0.ff", 1), stages[1]["blocks.0.ff.weight.1"])
    shard = tmp_path / "store" / "stage_00.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.warns(UserWarning), pytest.raises(StoreCorruptError, match=f"shard {shard} is corrupt: truncated"):
        TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS)


def test_manifest_not_json_names_the_file(tmp_path):
    _write(tmp_path / "store")
    (tmp_path / "store" / "manifest.json").write_text("{\"key\": ")
    with pytest.raises(StoreCorruptError, match=r"manifest .*manifest.json is not valid JSON .*; delete"):
        TrajectoryStore.open(tmp_path / "store")


# --- the store's lock ------------------------------------------------------------------------------
def test_store_lock_refuses_a_second_writer_with_the_holders_pid(tmp_path):
    import os
    import subprocess
    import sys

    from diffes_pl.locks import LockedError, exclusive

    lock = tmp_path / ".store.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom diffes_pl.locks import exclusive\n"
                               f"with exclusive({str(lock)!r}, 'x'):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as err:
            _write(tmp_path / "store")
        assert _one_line(err).startswith(f"another diffes-pl run (pid {holder.pid}) is building the trajectory "
                                         f"store at {tmp_path / 'store'} (lock {lock}); wait for it, or point `store:`")
        assert not (tmp_path / "store").exists()
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock, the lock file stays behind
        holder.wait()
    assert lock.exists()
    _write(tmp_path / "store")  # a dead holder's lock file does not block
    assert not lock.exists()  # removed on a normal release
    with exclusive(lock, "checking"):  # same process, second open file description: refused too
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with exclusive(lock, "checking"):
                pass
