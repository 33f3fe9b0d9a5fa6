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
