"""TrajectoryStore: the pruners → router contract, on disk.

Layout of a store folder:
    manifest.json          key, key fields, pruner, H, stages, unit groups, dtype, sizes
    stage_00.safetensors   per unit group: `<group>.order` (removal order, most removable first)
    stage_01.safetensors   and, for compensating pruners, `<group>.weight.<level>` (the output
    ...                    layer's compensated weight on the kept columns at level 1..H);
                           for depth pruning `blocks.order`.
Level 0 is the dense model and is never stored. Shards are read lazily (memory-mapped by
safetensors). The whole folder is written under a temporary name and renamed, so a store either
exists complete or not at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StoreMismatchError(ValueError):
    """A store built for another denoiser, calibration, partition or pruner."""


def canonical(obj: Any) -> Any:
    """JSON-able, order-stable form of nested settings (tuples → lists, dtypes → names)."""
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def make_key(fields: dict) -> str:
    """sha256 of the canonical JSON of the key fields."""
    return hashlib.sha256(json.dumps(canonical(fields), sort_keys=True).encode()).hexdigest()


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix or "<root>"]


def shard_name(stage: int) -> str:
    return f"stage_{stage:02d}.safetensors"


class TrajectoryStore:
    """Read access to a written store (use `TrajectoryStore.open`)."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._handles: dict[int, Any] = {}

    # --- writing --------------------------------------------------------------------------
    @staticmethod
    def write(path: str | os.PathLike, manifest: dict, stages: Iterable[dict[str, Tensor]]) -> "TrajectoryStore":
        """Writes a complete store atomically. `stages` yields one dict of tensors per stage."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o755)
        try:
            nbytes = 0
            count = 0
            for stage, tensors in enumerate(stages):
                tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
                save_file(tensors, str(tmp / shard_name(stage)))
                nbytes += sum(v.numel() * v.element_size() for v in tensors.values())
                count += 1
            if count != manifest["num_stages"]:
                raise ValueError(f"store got {count} stages, manifest says {manifest['num_stages']}")
            manifest = {**manifest, "format": FORMAT_VERSION, "nbytes": nbytes}
            (tmp / MANIFEST).write_text(json.dumps(canonical(manifest), indent=1))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return TrajectoryStore.open(path)

    # --- reading --------------------------------------------------------------------------
    @classmethod
    def exists(cls, path: str | os.PathLike) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def open(cls, path: str | os.PathLike, key_fields: dict | None = None) -> "TrajectoryStore":
        """Opens a store; with `key_fields`, refuses it unless its key matches (naming the differences)."""
        path = Path(path)
        if not cls.exists(path):
            raise FileNotFoundError(
                f"no trajectory store at {path} (no {MANIFEST}); build one with `diffes-pl predict --config …`")
        manifest = json.loads((path / MANIFEST).read_text())
        store = cls(path, manifest)
        if key_fields is not None:
            store.check_key(key_fields)
        return store

    def check_key(self, key_fields: dict) -> None:
        if make_key(key_fields) == self.manifest["key"]:
            return
        differing = _diff(canonical(key_fields), self.manifest.get("key_fields", {}))
        raise StoreMismatchError(
            f"the trajectory store at {self.path} was built for other settings (differing: "
            f"{', '.join(differing) or 'format'}); delete it, or point `store:` at another folder to build a new one")

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def num_stages(self) -> int:
        return int(self.manifest["num_stages"])

    @property
    def levels_max(self) -> int:
        return int(self.manifest["levels_max"])

    @property
    def pruner(self) -> str:
        return self.manifest["pruner"]

    @property
    def depth(self) -> bool:
        return bool(self.manifest.get("depth", False))

    @property
    def compensated(self) -> bool:
        return bool(self.manifest.get("compensated", False))

    @property
    def nbytes(self) -> int:
        return int(self.manifest.get("nbytes", 0))

    def _shard(self, stage: int):
        if not 0 <= stage < self.num_stages:
            raise IndexError(f"stage {stage} outside [0, {self.num_stages}) of the store at {self.path}")
        if stage not in self._handles:
            self._handles[stage] = safe_open(str(self.path / shard_name(stage)), framework="pt")
        return self._handles[stage]

    def keys(self, stage: int) -> list[str]:
        return list(self._shard(stage).keys())

    def tensor(self, stage: int, name: str) -> Tensor:
        shard = self._shard(stage)
        if name not in shard.keys():
            raise KeyError(f"{name!r} is not in stage {stage} of the store at {self.path}")
        return shard.get_tensor(name)

    def order(self, stage: int, group: str) -> Tensor:
        """Removal order (most removable first) of the group's units [n]."""
        return self.tensor(stage, f"{group}.order")

    def block_order(self, stage: int) -> Tensor:
        """Depth pruning: block indices, most removable (most identity-like) first [num_blocks]."""
        return self.tensor(stage, "blocks.order")

    def weight(self, stage: int, group: str, level: int) -> Tensor | None:
        """Compensated output-layer weight on the kept columns at `level`, or None (no compensation,
        level 0, or nothing removed at that level)."""
        if not self.compensated or level == 0:
            return None
        name = f"{group}.weight.{level}"
        shard = self._shard(stage)
        return shard.get_tensor(name) if name in shard.keys() else None
