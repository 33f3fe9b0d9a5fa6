"""evaluations.jsonl, the search's archive on disk: one JSON line per evaluated schedule, each
ending with a `check` field (`integrity.sealed_line`) so that a damaged line is refused, not read as
a result. `read_evaluations` is the one reader: benchmarks and tests compare its rows, which do not
hold the check."""
from __future__ import annotations

import os
from collections.abc import Iterable

from ..integrity import read_sealed_lines, sealed_line

EVALUATIONS = "evaluations.jsonl"
# the archive is also in the checkpoint, and the search rewrites the whole file after each generation
FIX = "it is rewritten from checkpoints/last.ckpt when the search resumes, or rerun the search"


def evaluation_lines(archive: Iterable[dict]) -> str:
    """The text of evaluations.jsonl for the archive's rows."""
    return "".join(sealed_line(row) for row in archive)


def read_evaluations(path: str | os.PathLike) -> list[dict]:
    """The rows of an evaluations.jsonl (without their check); a damaged line raises
    `integrity.DamagedFileError` naming the file and the line. Older files (no checks) are read as
    they are."""
    return read_sealed_lines(path, FIX)
