"""diffes-pl: Diff-ES — stage-wise structural pruning of diffusion models by evolutionary search."""
from __future__ import annotations

import logging

# bitsandbytes (installed with pyiqa) warns on import, through diffusers' quantizers, about an
# optional CPU 4-bit kernel this toolkit never uses: silence that one logger, nothing else.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .denoisers import DenoiserAdapter, UnitGroup, load_denoiser
from .macs import count_macs
from .errors import ScheduleError
from .partition import StagePartition
from .schedule import Schedule
from .sampling import sample

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier parts load on first use, so `import diffes_pl` stays quick.
    if name == "TrajectoryStore":
        from .trajectory import TrajectoryStore
        return TrajectoryStore
    if name == "Router":
        from .routing import Router
        return Router
    if name in ("pruners", "export"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'diffes_pl' has no attribute {name!r}")


__all__ = ["DenoiserAdapter", "Router", "Schedule", "ScheduleError", "StagePartition", "TrajectoryStore",
           "UnitGroup", "count_macs", "load_denoiser", "sample"]
