"""Files and folders: everything the toolkit saves is written to a temporary name and renamed; a
folder it will write is checked before any work."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class FolderNotWritable(OSError):
    """A run, store or evaluation folder that cannot be created or written."""


def check_writable(folder: str | os.PathLike, what: str, option: str) -> None:
    """Refuses, before any work, a folder that cannot be created or written: Lightning and the store
    writer would fail only later (after calibration, for the store) behind a long PathError."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():  # the nearest existing ancestor is where the folder will be created
        existing = existing.parent
    if not existing.is_dir():
        raise FolderNotWritable(f"{what} {folder} cannot be created: {existing} is a file, not a folder; "
                                f"choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
        raise FolderNotWritable(f"{what} {folder} {problem}; make it writable or choose another {option}")
