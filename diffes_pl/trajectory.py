"""TrajectoryStore: the pruners → router contract, on disk.

Layout of a store folder:
    manifest.json          key, key fields, pruner, H, stages, unit groups, dtype, sizes
    stage_00.safetensors   per unit group: `<group>.order` (removal order, most removable first)
    stage_01.safetensors   and, for compensating pruners, `<group>.weight.<level>` (the output
    ...                    layer's compensated weight on the kept columns at level 1..H);
                           for depth pruning `blocks.order`; for unstructured / N:M sparsity, per
                           linear layer `<layer>.level` and `<layer>.values.<level>` (sparsity.py).
Level 0 is the dense model and is never stored. Shards are read lazily (memory-mapped by
safetensors). The shards are written into `.<name>.partial` next to the store, the manifest last,
and the folder is renamed into place (never copied), so a store either exists complete or not at
all; `.<name>.lock` is held while it is written (see `locks.py`). A killed build's finished stages
stay in `.<name>.partial` with their checksums (`PartialStore`), and a rerun resumes after them.

Every shard is verified when first opened: its size and sha256 against the manifest, then its
contents (every `.order` a permutation, every group's order present, weight widths matching the
level). A store that fails is refused with one line naming the shard and the fix, never used.
The manifest itself carries the sha256 of its other fields (`manifest_sha256`), checked before any
shard: an edited manifest is named as such, not blamed on the shard whose recorded checksum changed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .integrity import DamagedFileError, file_sha256, json_digest, seal_holds
from .locks import exclusive
from .schedule import units_removed

if TYPE_CHECKING:
    from .sparsity import Granularity

MANIFEST = "manifest.json"
# 2: the manifest holds every shard's size and sha256 ("shards"). Format-1 stores (no checksums)
# are still read, with a one-line warning: their contents are validated like any store's, and
# refusing them would throw away calibrations that may have taken hours; rebuilding verifies them.
# 3: the manifest also holds the sha256 of its own other fields (`MANIFEST_SHA256`); format-2 stores
# are read as before (their manifest unverified, their shards verified).
FORMAT_VERSION = 3
MANIFEST_SHA256 = "manifest_sha256"


def rebuild(path: Path) -> str:
    """The fix for a damaged store (a rerun of `predict` or `fit` builds it again once it is gone)."""
    return f"delete {path} and rebuild it with `diffes-pl predict --config <your config>`"


class StoreMismatchError(ValueError):
    """A store built for another denoiser, calibration, partition or pruner."""


class StoreCorruptError(StoreMismatchError, DamagedFileError):
    """A store whose files changed after it was written (checksum, size) or hold invalid trajectories."""


class DiskSpaceError(OSError):
    """Not enough free space for the store about to be written."""


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


def block_shard_name(stage: int, block: int) -> str:
    """A finished block of the stage under way (carried block-by-block calibration), until the stage's
    shard replaces its blocks' shards."""
    return f"stage_{stage:02d}.block_{block:03d}.safetensors"


# --- files next to a store: the lock, the folder being written, leftovers of killed writers -------
def lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def partial_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


def remove_stale(path: Path, keep_partial: bool = False) -> list[Path]:
    """Removes what a killed writer of `path` left behind (`.<name>.partial` unless `keep_partial`:
    `PartialStore.resume` judges it; the temporary `.<name>.*.tmp` of older versions). Call only while
    holding the store's lock: a live writer would hold it, so anything found then is stale."""
    found = [] if keep_partial else [partial_dir(path)]
    stale = [p for p in [*found, *path.parent.glob(f".{path.name}.*.tmp")] if p.exists()]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return stale


PROGRESS = "progress.json"
PROGRESS_SHA256 = "progress_sha256"


class PartialStore:
    """The shards of a store being built (`.<name>.partial/`) and `progress.json` beside them: the store
    key and each finished stage's size and sha256, sealed (`integrity.sealed`) and rewritten atomically
    after each stage. Why: a calibration of a big model takes hours and a cluster may kill it at any
    time; the finished stages a kill leaves are kept, verified, and a rerun of the same store starts at
    the first missing stage. Only the store's lock holder (rank 0) uses it. Stages are recorded in order
    (0, 1, …), so the kept stages are always 0..kept − 1. Block by block (carried calibration), the
    finished blocks of the stage under way are kept the same way (`write_block`, blocks 0..blocks_kept − 1
    of stage `kept`): a rerun resumes within the stage."""

    def __init__(self, path: str | os.PathLike, key: str, num_stages: int) -> None:
        self.path = Path(path)
        self.folder = partial_dir(self.path)
        self.key, self.num_stages = key, int(num_stages)
        self.shards: dict[str, dict] = {}  # shard name → {"sha256", "bytes"}, stages 0..kept − 1
        self.blocks: dict[str, dict] = {}  # the same for blocks 0..blocks_kept − 1 of stage `kept`

    @property
    def kept(self) -> int:
        return len(self.shards)

    @property
    def blocks_kept(self) -> int:
        return len(self.blocks)

    def resume(self) -> list[str]:
        """Keeps the verified finished stages a killed build of the SAME store left and removes
        everything else in the folder (a shard not yet recorded, temporary files); a folder of another
        store key, without a readable sealed record, or from its first damaged shard on, is removed.
        Returns one line per removal saying why (empty when nothing was removed). Hold the lock."""
        if not self.folder.is_dir():
            if self.folder.exists():
                self.folder.unlink()
                return [f"removed {self.folder.name} (a file where a folder of shards belongs)"]
            return []
        why = self._read_progress()
        if why is not None:
            shutil.rmtree(self.folder)
            self.shards = {}
            return [f"removed {self.folder.name}, what an interrupted build of {self.path} left ({why})"]
        notes, recorded, blocks, self.shards, self.blocks = [], self.shards, self.blocks, {}, {}
        for stage in range(self.num_stages):  # the verified prefix 0..k: a rerun starts at k + 1
            name = shard_name(stage)
            if name not in recorded:
                break
            problem = _shard_problem(self.folder / name, recorded[name])
            if problem is not None:
                notes.append(f"stage {stage} of an interrupted build of {self.path} is not kept ({name}: {problem}); "
                             f"it and the stages after it are calibrated again")
                blocks = {}
                break
            self.shards[name] = recorded[name]
        block = 0
        while (name := block_shard_name(self.kept, block)) in blocks:  # the stage under way's verified blocks
            problem = _shard_problem(self.folder / name, blocks[name])
            if problem is not None:
                notes.append(f"block {block} of stage {self.kept} of an interrupted build of {self.path} is not kept "
                             f"({name}: {problem}); it and the blocks after it are calibrated again")
                break
            self.blocks[name] = blocks[name]
            block += 1
        keep = {*self.shards, *self.blocks, PROGRESS}
        extra = sorted(p for p in self.folder.iterdir() if p.name not in keep)
        for p in extra:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        self._record()  # the record now lists exactly the shards kept
        return notes

    def _read_progress(self) -> str | None:
        """Loads the kept shards' records from `progress.json`; returns why the folder cannot be
        resumed, or None."""
        file = self.folder / PROGRESS
        if not file.is_file():
            return f"no {PROGRESS}: written before builds could resume, or killed before its first stage finished"
        try:
            progress = json.loads(file.read_text())
        except ValueError:  # a UnicodeDecodeError too
            return f"its {PROGRESS} is not valid JSON"
        if not isinstance(progress, dict) or not seal_holds(progress, PROGRESS_SHA256):
            return f"its {PROGRESS} fails its checksum"
        if progress.get("key") != self.key or progress.get("num_stages") != self.num_stages:
            return "built for other settings: another store key"
        self.shards = dict(progress.get("shards") or {})
        self.blocks = dict(progress.get("blocks") or {})
        return None

    def _record(self) -> None:
        from .integrity import sealed
        from .io import write_json

        if not self.shards and not self.blocks:  # nothing finished: nothing a rerun could keep
            (self.folder / PROGRESS).unlink(missing_ok=True)
            return
        write_json(self.folder / PROGRESS, sealed({"format": 1, "key": self.key, "num_stages": self.num_stages,
                                                   "shards": self.shards, "blocks": self.blocks}, PROGRESS_SHA256))

    def _write(self, name: str, tensors: dict[str, Tensor], parts: Iterable[Path] = ()) -> dict:
        """Writes a shard (`tensors` and those of the shards `parts`) under a temporary name and
        renames it into place; returns its record."""
        from .io import atomic_path

        self.folder.mkdir(parents=True, exist_ok=True)
        file = self.folder / name
        with atomic_path(file) as tmp:
            write_shard(tmp, tensors, parts)
        return {"sha256": file_sha256(file), "bytes": file.stat().st_size}

    def write_block(self, stage: int, block: int, tensors: dict[str, Tensor]) -> None:
        """Keeps block `block` of the stage under way (blocks are written in order, from 0)."""
        if stage != self.kept or block != self.blocks_kept:
            raise RuntimeError(f"block {block} of stage {stage} finished while stages 0..{self.kept - 1} and "
                               f"{self.blocks_kept} blocks of stage {self.kept} are recorded: this is a bug")
        name = block_shard_name(stage, block)
        self.blocks[name] = self._write(name, tensors)
        self._record()

    def write_stage(self, stage: int, tensors: dict[str, Tensor]) -> None:
        """Writes stage `stage`'s shard — `tensors` and those of its kept blocks' shards — under a
        temporary name, renames it into place, then records its checksum: a kill at any point leaves
        either the stage recorded and whole, or not recorded (and its blocks kept)."""
        if stage != self.kept:
            raise RuntimeError(f"stage {stage} finished while stages 0..{self.kept - 1} are recorded: "
                               f"stages are written in order; this is a bug")
        name = shard_name(stage)
        self.shards[name] = self._write(name, tensors, [self.folder / b for b in self.blocks])
        blocks, self.blocks = self.blocks, {}
        self._record()  # the stage recorded, its blocks no longer: then their files go
        for block in blocks:
            (self.folder / block).unlink(missing_ok=True)

    def discard_if_empty(self) -> None:
        """After a failed build: the folder goes unless it holds a finished stage a rerun keeps."""
        if self.folder.exists() and not self.shards and not self.blocks:
            shutil.rmtree(self.folder)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_shard(file: str | os.PathLike, tensors: dict[str, Tensor], parts: Iterable[Path] = ()) -> None:
    """A safetensors file of `tensors` and every tensor of the safetensors files `parts`, written one
    tensor at a time (tensors in name order). Why not `save_file`: it serialises every tensor into one
    bytes object first, twice a stage in host memory (FLUX OBS: 2 × 73 GiB); here a merged stage needs
    one tensor of it at a time."""
    entries: dict[str, tuple[str, list[int], Callable[[], Tensor]]] = {}
    for part in parts:
        with safe_open(str(part), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                entries[name] = (piece.get_dtype(), list(piece.get_shape()), lambda p=part, n=name: _read_one(p, n))
    for name, tensor in tensors.items():
        entries[name] = (SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), lambda t=tensor: t)
    itemsize = {code: dtype.itemsize for dtype, code in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name in sorted(entries):
        code, shape, _ = entries[name]
        nbytes = math.prod(shape) * itemsize[code]
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(entries):
            tensor = entries[name][2]().detach().contiguous().cpu().reshape(-1)
            out.write(memoryview(tensor.view(torch.uint8).numpy()))


def _read_one(file: Path, name: str) -> Tensor:
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def _shard_problem(file: Path, record: dict) -> str | None:
    if not file.is_file():
        return "the file is missing"
    size = file.stat().st_size
    if size != record.get("bytes"):
        return f"{size} bytes where {PROGRESS} says {record.get('bytes')}"
    if file_sha256(file) != record.get("sha256"):
        return "checksum mismatch"
    return None


def writing(path: Path):
    """The store's lock, refusing at once while another process writes the same store."""
    return exclusive(lock_file(path), f"building the trajectory store at {path}",
                     fix="wait for it, or point `store:` at another folder")


def check_free_space(path: Path, needed: int, margin: float = 0.1) -> None:
    """Refuses (before any calibration) when the disk holding `path` lacks `needed` bytes + margin."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    want = int(needed * (1 + margin)) + 2**20  # headers, manifest, filesystem slack
    if free < want:
        raise DiskSpaceError(
            f"the trajectory store at {path} needs ≈ {want / 2**20:.1f} MiB but {folder} has {free / 2**20:.1f} MiB "
            f"free; free some space, point `store:` at a folder on another disk, or lower the pruner's `store_dtype`")


# --- checksums and validation -------------------------------------------------------------
_VERIFIED: set[tuple] = set()  # shards hashed in this process: (file, inode, size, mtime, ctime, sha256)


def sealed_manifest(manifest: dict) -> dict:
    """The manifest as written (canonical), with `MANIFEST_SHA256` over all its other fields."""
    manifest = canonical({k: v for k, v in manifest.items() if k != MANIFEST_SHA256})
    return {**manifest, MANIFEST_SHA256: json_digest(manifest)}


def _stamp(path: Path, sha: str) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file, from its header; raises ValueError when the
    header is unreadable or the file is shorter than the header says (truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"truncated ({size} bytes, not even a header)")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ValueError(f"truncated ({size} bytes; its header alone needs {8 + length})")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ValueError("its safetensors header is not valid JSON") from None
    ends = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
    end = max((e for _, e in ends), default=0)
    if 8 + length + end > size:
        raise ValueError(f"truncated ({size} of {8 + length + end} bytes)")
    return sum(e - b for b, e in ends)


def trajectory_problems(names: Iterable[str], get: Callable[[str], Tensor], shape: Callable[[str], list[int]],
                        manifest: dict) -> list[str]:
    """What is wrong with one stage's tensors (empty when valid): orders that are not permutations
    of range(n) (n from the manifest's unit groups when it lists them), missing orders, weights whose
    width is not the kept columns of their level."""
    names = set(names)
    groups = {g["name"]: g for g in manifest.get("groups") or []}
    H = int(manifest.get("levels_max", 0))
    if "sparse" in manifest:
        return _sparse_problems(names, get, manifest["sparse"]["layers"], H, bool(manifest.get("compensated")))
    expected = ["blocks.order"] if manifest.get("depth") else [f"{g}.order" for g in groups]
    problems = [f"{name} is missing" for name in expected if name not in names]
    for name in sorted(names):
        group, _, tail = name.rpartition(".order") if name.endswith(".order") else name.partition(".weight.")
        info = groups.get(group)
        if name.endswith(".order"):
            problems += _order_problems(name, get(name), info["size"] if info else None)
        elif tail.isdigit() and info is not None:
            level, width = int(tail), shape(name)[-1]
            kept = (info["size"] - units_removed(level, H, info["size"])) * info["unit_width"]
            if not 1 <= level <= H or width != kept:
                problems.append(f"{name} has {width} columns; level {level} of {H} keeps {kept}")
    return problems


def _sparse_problems(names: set[str], get: Callable[[str], Tensor], layers: dict[str, list[int]], H: int,
                     compensated: bool) -> list[str]:
    """A sparse stage: every layer's level map (uint8 [out, in], levels 1..H: level H removes every
    weight), or an export's packed masks of its routed levels; compensated, one value per kept weight
    at each level stored."""
    from .sparsity import removed_mask, unpack_mask

    problems = []
    for layer, (out, n_in) in layers.items():
        masks = {}
        if f"{layer}.level" in names:
            level_map = get(f"{layer}.level")
            if level_map.dtype != torch.uint8 or list(level_map.shape) != [out, n_in] or \
                    int(level_map.max()) > H or bool((level_map == 0).any()):
                problems.append(f"{layer}.level is not a [{out}, {n_in}] uint8 map of removal levels 1..{H}")
                continue
            masks = {level: (lambda level=level: removed_mask(level_map, level)) for level in range(1, H + 1)}
        else:
            for name in (n for n in names if n.startswith(f"{layer}.removed.")):
                packed, level = get(name), name.rpartition(".")[2]
                if packed.dtype != torch.uint8 or list(packed.shape) != [out, (n_in + 7) // 8] or not level.isdigit():
                    problems.append(f"{name} is not a packed [{out}, {n_in}] mask")
                    continue
                masks[int(level)] = lambda packed=packed: unpack_mask(packed, n_in)
            if not masks:
                problems.append(f"{layer}.level is missing")
        for name in (n for n in names if n.startswith(f"{layer}.values.")):
            level = name.rpartition(".")[2]
            mask = masks.get(int(level)) if level.isdigit() else None
            kept = None if mask is None else int((~mask()).sum())
            if not compensated or kept is None or get(name).numel() != kept:
                problems.append(f"{name} does not hold the weights its level keeps ({kept})")
    return problems


def _order_problems(name: str, order: Tensor, size: int | None) -> list[str]:
    n = len(order) if size is None else size
    if order.dim() != 1 or order.is_floating_point() or len(order) != n:
        return [f"{name} has shape {list(order.shape)} ({order.dtype}); expected {n} integer unit indices"]
    counts = torch.bincount(order.clamp(0, n), minlength=n + 1)
    if bool((order < 0).any()) or bool((order >= n).any()) or bool((counts[:n] != 1).any()):
        repeated = torch.nonzero(counts[:n] > 1).flatten()[:5].tolist()
        absent = torch.nonzero(counts[:n] == 0).flatten()[:5].tolist()
        return [f"{name} is not a permutation of 0..{n - 1} (repeated {repeated}, absent {absent})"]
    return []


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
        with writing(path):
            remove_stale(path)
            folder = partial_dir(path)
            folder.mkdir(parents=True)
            try:
                count = 0
                for stage, tensors in enumerate(stages):
                    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
                    problems = trajectory_problems(tensors, tensors.__getitem__, lambda k: list(tensors[k].shape),
                                                   manifest)
                    if problems:
                        raise StoreCorruptError(f"stage {stage} given for the trajectory store at {path} is invalid: "
                                                f"{'; '.join(problems[:3])}; the trajectories were not written")
                    save_file(tensors, str(folder / shard_name(stage)))
                    count += 1
                if count != manifest["num_stages"]:
                    raise ValueError(f"store got {count} stages, manifest says {manifest['num_stages']}")
                return TrajectoryStore.seal(folder, path, manifest)
            finally:
                if folder.exists():
                    shutil.rmtree(folder)

    @staticmethod
    def seal(folder: Path, path: Path, manifest: dict) -> "TrajectoryStore":
        """The stage shards in `folder` → the store at `path`: each shard is validated and hashed,
        the manifest (with the checksums) is written last, and the folder is renamed into place, so
        nothing is copied and no more than the store's size is ever needed. The caller holds the
        store's lock (`writing`)."""
        folder, path = Path(folder), Path(path)
        shards, nbytes = {}, 0
        for stage in range(manifest["num_stages"]):
            file = folder / shard_name(stage)
            try:
                nbytes += tensor_bytes(file)
            except ValueError as err:
                raise StoreCorruptError(f"the shard {file} just written is unreadable: {err}") from None
            sha = file_sha256(file)
            shards[file.name] = {"sha256": sha, "bytes": file.stat().st_size}
            with safe_open(str(file), framework="pt") as f:
                problems = trajectory_problems(f.keys(), f.get_tensor, lambda k: f.get_slice(k).get_shape(), manifest)
            if problems:
                raise StoreCorruptError(f"the shard {file} just written is invalid: {'; '.join(problems[:3])}")
        manifest = {**manifest, "format": FORMAT_VERSION, "nbytes": nbytes, "shards": shards}
        (folder / MANIFEST).write_text(json.dumps(sealed_manifest(manifest), indent=1))
        os.chmod(folder, 0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(folder, path)
        # the build's own record goes only now: a kill while sealing leaves the stages resumable
        (path / PROGRESS).unlink(missing_ok=True)
        for name, record in shards.items():  # hashed just now: a reopen in this process need not rehash
            _VERIFIED.add(_stamp(path / name, record["sha256"]))
        return TrajectoryStore(path, json.loads((path / MANIFEST).read_text()))

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
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except ValueError as err:  # a UnicodeDecodeError too
            raise StoreCorruptError(f"the manifest {path / MANIFEST} is not valid JSON ({err}); {rebuild(path)}") from None
        if not isinstance(manifest, dict):
            raise StoreCorruptError(f"the manifest {path / MANIFEST} is not a JSON object; {rebuild(path)}")
        store = cls(path, manifest)
        store._check_format()
        if key_fields is not None:
            store.check_key(key_fields)
            # About to be reused for a whole run: verify every shard now (one read of the store; a
            # store hashed by this process since it was last modified is not read again).
            store.verify()
        return store

    def _check_format(self) -> None:
        """Refuses a newer format and a manifest whose own checksum fails (before any shard is read,
        whose recorded checksums it holds); warns about a store without checksums."""
        version = self.manifest.get("format", 1)
        if not isinstance(version, int):
            raise self._manifest_changed(f"its format is {version!r}")
        if version > FORMAT_VERSION:
            raise StoreMismatchError(f"the trajectory store at {self.path} has format {version}, written by a newer "
                                     f"diffes-pl (this one reads up to {FORMAT_VERSION}); upgrade, or {rebuild(self.path)}")
        if version >= 3 and not seal_holds(self.manifest, MANIFEST_SHA256):
            raise self._manifest_changed("checksum mismatch" if MANIFEST_SHA256 in self.manifest else
                                         "its checksum is missing")
        if "shards" not in self.manifest:
            warnings.warn(f"the trajectory store at {self.path} has no checksums (written by an older diffes-pl): "
                          f"its shards are validated but cannot be verified; rebuild it to verify them", stacklevel=3)

    def _manifest_changed(self, what: str) -> StoreCorruptError:
        return StoreCorruptError(f"the manifest {self.path / MANIFEST} was changed after the store was written "
                                 f"({what}); {rebuild(self.path)}")

    def verify(self) -> None:
        """Verifies every shard now (checksum, size, contents) instead of when first used."""
        for stage in range(self.num_stages):
            self._shard(stage)

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
    def sparse(self) -> bool:
        """Unstructured or N:M sparsity (`granularity`), not units or blocks."""
        return "sparse" in self.manifest

    @property
    def granularity(self) -> Granularity | None:
        from .sparsity import Granularity

        sparse = self.manifest.get("sparse")
        return None if sparse is None else Granularity(sparse["kind"], int(sparse["m"]))

    def level_map(self, stage: int, layer: str) -> Tensor:
        """Sparse stores: the level 1..H at which each weight of `layer` is first removed (uint8 [out, in])."""
        return self.tensor(stage, f"{layer}.level")

    def removed(self, stage: int, layer: str, level: int) -> Tensor:
        """Sparse stores: the weights of `layer` removed at `level` (bool [out, in]), from its level
        map, or from the packed mask of that level (an export's routes hold only the routed level)."""
        from .sparsity import removed_mask, unpack_mask

        shard = self._shard(stage)
        if f"{layer}.level" in shard.keys():
            return removed_mask(shard.get_tensor(f"{layer}.level"), level)
        shape = self.manifest["sparse"]["layers"][layer]
        return unpack_mask(self.tensor(stage, f"{layer}.removed.{level}"), shape[1])

    def values(self, stage: int, layer: str, level: int) -> Tensor | None:
        """Sparse compensated stores: the kept weights of `layer` at `level` [kept] (row-major), or
        None (no compensation, level 0, or no weight kept)."""
        name = f"{layer}.values.{level}"
        shard = self._shard(stage)
        return shard.get_tensor(name) if self.compensated and level > 0 and name in shard.keys() else None

    @property
    def nbytes(self) -> int:
        return int(self.manifest.get("nbytes", 0))

    def _shard(self, stage: int):
        if not 0 <= stage < self.num_stages:
            raise IndexError(f"stage {stage} outside [0, {self.num_stages}) of the store at {self.path}")
        if stage not in self._handles:
            self._handles[stage] = self._open_shard(self.path / shard_name(stage))
        return self._handles[stage]

    def _open_shard(self, file: Path):
        """Opens one shard after checking its size and sha256 against the manifest and its contents."""
        if not file.is_file():
            raise self._corrupt(file, "the file is missing")
        record = self.manifest.get("shards", {}).get(file.name)
        if record is not None:
            size = file.stat().st_size
            if size < record["bytes"]:
                raise self._corrupt(file, f"truncated ({size} of {record['bytes']} bytes)")
            if size != record["bytes"]:
                raise self._corrupt(file, f"{size} bytes where the manifest says {record['bytes']}")
            if _stamp(file, record["sha256"]) not in _VERIFIED:
                if file_sha256(file) != record["sha256"]:
                    raise self._corrupt(file, "checksum mismatch (its bytes changed after the store was written)")
                _VERIFIED.add(_stamp(file, record["sha256"]))
        elif "shards" in self.manifest:
            raise self._corrupt(file, "the manifest has no checksum for it")
        try:
            tensor_bytes(file)  # a clear "truncated" for stores without checksums too
            handle = safe_open(str(file), framework="pt")
            problems = trajectory_problems(handle.keys(), handle.get_tensor, lambda k: handle.get_slice(k).get_shape(),
                                           self.manifest)
        except ValueError as err:
            raise self._corrupt(file, str(err)) from None
        except Exception as err:  # safetensors' own errors on a damaged file
            raise self._corrupt(file, f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if problems:
            raise self._corrupt(file, "; ".join(problems[:3]))
        return handle

    def _corrupt(self, file: Path, what: str) -> StoreCorruptError:
        return StoreCorruptError(f"the trajectory store shard {file} is corrupt: {what}; {rebuild(self.path)}")

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
