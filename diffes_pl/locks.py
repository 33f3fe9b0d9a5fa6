"""Exclusive, non-blocking locks on folders that a run writes (a trajectory store, a run folder).

`exclusive(lock_file, what, fix)` holds an advisory `flock` on `lock_file` for the `with` block and
writes the holder's pid into it. A second process refuses at once with `LockedError` naming the
holder's pid instead of waiting or interleaving its writes with the first one's. The OS drops the
lock when the holder dies (even by SIGKILL), so a lock file left by a killed run never blocks a
rerun. On a normal exit the holder unlinks the file while still holding the lock; a process that
opened the old file meanwhile notices (its inode is no longer the path's) and locks the new one.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no locking, runs behave as before
    fcntl = None


class LockedError(RuntimeError):
    """Another live process holds the lock on what this process is about to write."""


def holder_pid(lock_file: str | os.PathLike) -> str:
    """The pid written by the lock's holder ('unknown' while it is being written)."""
    try:
        return Path(lock_file).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, fix: str = "wait for it to finish") -> Iterator[Path]:
    """Holds an exclusive lock on `lock_file` for the block; refuses at once if another process holds it.

    Args:
        lock_file: the lock file (created, with its folder, if absent).
        what: what the holder is doing, for the message ("building the trajectory store at …").
        fix: what the user can do instead of waiting ("point `store:` elsewhere").
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_file, what, fix)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock_file
    finally:
        try:
            os.unlink(lock_file)  # still locked here: see the module docstring
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the flock


def _acquire(lock_file: Path, what: str, fix: str) -> int:
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"another diffes-pl run (pid {holder_pid(lock_file)}) is {what} "
                              f"(lock {lock_file}); {fix}") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder unlinked this file as we opened it: lock the current one
