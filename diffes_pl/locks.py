"""Exclusive, non-blocking locks on folders that a run writes (a trajectory store, a run folder).

`exclusive(lock_file, what, fix)` holds a `filelock.FileLock` (an OS lock: `flock` on POSIX,
`msvcrt.locking` on Windows) on `lock_file` for the `with` block; the holder's pid is written into
the lock file as soon as it is acquired (filelock's `on_acquired` hands over the locked descriptor;
filelock never truncates an existing lock file, so a competitor reads it). A second process refuses
at once (timeout 0) with `LockedError` naming the holder's pid instead of waiting or interleaving its
writes with the first one's. The OS drops the lock when the holder dies (even by SIGKILL), so a lock
file left by a killed run never blocks a rerun.

On a normal exit the holder unlinks the file while it still holds the lock (filelock's Unix lock
keeps the file on release; our tests and folder checks expect it gone). A process that opened the
old file meanwhile finds, once its flock succeeds, that the inode has no link left; filelock then
declines that inode (`_finalize_locked_fd`) and, with timeout 0, reports a timeout — `exclusive`
retries when the lock file has vanished, so that process locks the new file instead of refusing.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Tries when the lock file vanished under a refused acquisition (its holder released it meanwhile);
# each try is a single non-blocking attempt, so this never waits on a live holder.
_RETRIES = 20


class LockedError(RuntimeError):
    """Another live process holds the lock on what this process is about to write."""


def holder_pid(lock_file: str | os.PathLike) -> str:
    """The pid written by the lock's holder ('unknown' while it is being written)."""
    try:
        return Path(lock_file).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _write_pid(fd: int) -> None:
    """filelock's `on_acquired` hook: the holder's pid into the (still locked) lock file."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())


@contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, fix: str = "wait for it to finish") -> Iterator[Path]:
    """Holds an exclusive lock on `lock_file` for the block; refuses at once if another process holds it.

    Args:
        lock_file: the lock file (created, with its folder, if absent).
        what: what the holder is doing, for the message ("building the trajectory store at …").
        fix: what the user can do instead of waiting ("point `store:` elsewhere").
    """
    from filelock import FileLock, Timeout

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the hold belongs to the process, whichever thread leaves the block. A second
    # `exclusive` in the same process opens its own descriptor and is refused like another process.
    lock = FileLock(lock_file, timeout=0, thread_local=False, on_acquired=_write_pid)
    for attempt in range(_RETRIES):
        try:
            lock.acquire()
            break
        except Timeout:
            if lock_file.exists() or attempt == _RETRIES - 1:
                raise LockedError(f"another diffes-pl run (pid {holder_pid(lock_file)}) is {what} "
                                  f"(lock {lock_file}); {fix}") from None
    try:
        yield lock_file
    finally:
        try:
            os.unlink(lock_file)  # still locked here: see the module docstring
        except OSError:  # already gone, or Windows (an open file cannot be unlinked; filelock removes it)
            pass
        lock.release()
