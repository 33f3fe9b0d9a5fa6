"""Checksums on the files diffes-pl writes and later reads back and trusts, and the error that
refuses a file whose checksum does not hold (docs/DESIGN.md: Formats).

Why: a damaged file that still parses is used silently — a search resumes from wrong latents, an
evaluation scores wrong images, an export samples a wrong model — and the result looks like any
other. So every such file carries a checksum written with it, in a place its other readers ignore:
- a checkpoint (a zip written by `torch.save`): the zip's archive comment (`seal_zip`, `check_zip`),
  so plain `torch.load` and Lightning still read the file;
- a JSON object (a store manifest, export.json): a field holding the digest of the other fields
  (`sealed`, `seal_holds`);
- a JSON line (evaluations.jsonl): a short final `check` field (`sealed_line`, `read_sealed_lines`);
- a safetensors file: its metadata (the caller hashes the tensor bytes, `sha256_hex`).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any


class DamagedFileError(ValueError):
    """A file that changed after diffes-pl wrote it (or was never written whole). The message is one
    line: the file, what is wrong, and the way out. A ValueError, so the CLI prints it as a user error."""


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike, end: int | None = None) -> str:
    """sha256 of a file's bytes (the first `end` bytes when given), read in chunks."""
    h, left = hashlib.sha256(), end
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 24 if left is None else min(1 << 24, left))
            if not chunk:
                break
            h.update(chunk)
            left = None if left is None else left - len(chunk)
    return h.hexdigest()


# --- JSON objects and lines -----------------------------------------------------------------------
def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no spaces), taken after one JSON round
    trip so that what is written and what is read back hash alike (tuples → lists, int keys → str)."""
    text = json.dumps(json.loads(json.dumps(obj)), sort_keys=True, separators=(",", ":"))
    return sha256_hex(text.encode())


def sealed(obj: dict, field: str) -> dict:
    """`obj` with `field` set to the digest of all its other fields."""
    rest = {k: v for k, v in obj.items() if k != field}
    return {**rest, field: json_digest(rest)}


def seal_holds(obj: dict, field: str) -> bool | None:
    """Whether `obj[field]` is the digest of its other fields; None when it has no such field (written
    before there were checksums: the caller decides whether that is allowed)."""
    if field not in obj:
        return None
    return obj[field] == json_digest({k: v for k, v in obj.items() if k != field})


# --- folders of files (exports, routed models) ----------------------------------------------------
def file_records(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file under `root` but `skip`, in sorted order."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() not in skip}


def check_files(root: str | os.PathLike, records: dict[str, dict], damaged: Any) -> None:
    """Checks every file of `records` under `root` (present, then size, then sha256); the first that
    fails raises `damaged(name, what)` (a DamagedFileError naming the file and the way out)."""
    for name, record in records.items():
        file = Path(root) / name
        if not file.is_file():
            raise damaged(name, "the file is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise damaged(name, f"{size} bytes where the record says {record['bytes']}")
        if file_sha256(file) != record["sha256"]:
            raise damaged(name, "checksum mismatch")


CHECK = "check"  # a JSON line's own field: the first 16 hex digits of the digest of the others


def sealed_line(row: dict) -> str:
    """One JSON line (with its newline) for `row`, ending with its `check` field."""
    row = {k: v for k, v in row.items() if k != CHECK}
    return json.dumps({**row, CHECK: json_digest(row)[:16]}) + "\n"


def read_sealed_lines(path: str | os.PathLike, fix: str) -> list[dict]:
    """The rows of a JSON-lines file written by `sealed_line`, without their `check` field. A line
    that is not a JSON object, or whose check does not hold, is refused naming the file, the line and
    `fix`. Files of older versions (no line has a check) are read unchecked; once one line has a
    check, every line must (a line that lost it is damaged)."""
    path = Path(path)
    rows, checked = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:  # a UnicodeDecodeError too
            row = ValueError
        check = row.pop(CHECK, None) if isinstance(row, dict) else None
        if not isinstance(row, dict):
            problem = "not valid JSON" if row is ValueError else "not a JSON object"
        elif check is not None and check != json_digest(row)[:16]:
            problem = "checksum mismatch: it changed after it was written"
        else:
            rows.append(row)
            checked.append(check is not None)
            continue
        raise DamagedFileError(f"{path} line {number} is damaged ({problem}); {fix}")
    if any(checked) and not all(checked):
        raise DamagedFileError(f"{path} line {checked.index(False) + 1} is damaged (its checksum is missing); {fix}")
    return rows


# --- zip files (torch.save checkpoints) -------------------------------------------------------------
# A zip ends with its end-of-central-directory record (EOCD): 22 bytes starting with this signature,
# the last 2 the length of the archive comment that follows. Zip readers (Python's zipfile, the
# miniz reader of torch.load) find the EOCD by scanning back over a comment, so a comment changes
# nothing they read; the comment holds the sha256 of every byte before the comment-length field.
EOCD = b"PK\x05\x06"
EOCD_SIZE = 22


def seal_zip(path: str | os.PathLike, tag: str) -> None:
    """Appends `<tag> sha256=<hex>` as the archive comment of the zip at `path` (written without a
    comment, as torch.save writes). Seal a temporary file before renaming it into place."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(size - EOCD_SIZE, 0))
        tail = f.read()
    if len(tail) != EOCD_SIZE or tail[:4] != EOCD or tail[-2:] != b"\0\0":
        raise ValueError(f"cannot seal {path}: not a zip without comment, as torch.save writes")
    comment = f"{tag} sha256={file_sha256(path, size - 2)}".encode()
    with open(path, "r+b") as f:
        f.seek(size - 2)
        f.write(struct.pack("<H", len(comment)) + comment)
        f.flush()
        os.fsync(f.fileno())


def check_zip(path: str | os.PathLike, tag: str) -> tuple[bool, str]:
    """(True, "") when the zip's comment seal holds; (False, why) when it is damaged. A zip without
    any comment (EOCD exactly at the end, comment length 0: written before seals) raises nothing and
    returns (False, "") — unverified, for the caller to accept with a warning."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(size - EOCD_SIZE - 512, 0))  # a seal's comment is < 200 bytes
        tail = f.read()
    if tail[-EOCD_SIZE:][:4] == EOCD and tail[-2:] == b"\0\0":
        return False, ""
    start = tail.rfind(tag.split("/")[0].encode() + b"/")
    eocd = start - EOCD_SIZE
    if start < 0 or eocd < 0 or tail[eocd:eocd + 4] != EOCD:
        return False, "no checksum at its end: it was cut short or changed after it was written"
    (length,) = struct.unpack("<H", tail[start - 2:start])
    comment = tail[start:]
    if length != len(comment):
        return False, "its checksum record is damaged"
    try:
        name, _, digest = comment.decode("ascii").partition(" sha256=")
    except UnicodeDecodeError:
        return False, "its checksum record is damaged"
    if name != tag:
        return False, f"format {name!r}, where this diffes-pl reads {tag!r}"
    if file_sha256(path, size - len(comment) - 2) != digest:
        return False, "checksum mismatch: it changed after it was written"
    return True, ""
