"""diffes-pl: Diff-ES — stage-wise structural pruning of diffusion models by evolutionary search.

The public names (`__all__`, shown by `dir(diffes_pl)`): `import diffes_pl as dp` loads only the
plain-Python ones (`Schedule`, `ScheduleError`, `StagePartition`); every other name imports its module
on first use, so that `import diffes_pl` does not pay for torch, diffusers, Lightning and what they
pull in (transformers, torchmetrics, bitsandbytes) before a name needs them.

- a denoiser: `load_denoiser`, `DenoiserAdapter`, `UnitGroup`, `count_macs`
- a run: `DiffES` (the LightningModule: calibration, then the search under `Trainer.fit`),
  `CalibrationDataModule`, `pruners` (`pruners.OBSPruner`, …), `read_evaluations` (a run's
  evaluations.jsonl)
- its result: `Schedule`, `StagePartition`, `TrajectoryStore`, `Router`, `sample`, `export`
  (`save`, `load`, `load_cached`), `routed_denoiser` (the pruned model as a diffusers model:
  `save_pretrained`, `from_pretrained`, `push_to_hub`)
- comparisons: `evaluate_schedules` (schedules on probes the search never saw), `mosaicdiff_schedule`
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

from .errors import ScheduleError  # noqa: F401 (public: __all__)
from .partition import StagePartition  # noqa: F401 (public: __all__)
from .schedule import Schedule  # noqa: F401 (public: __all__)

__version__ = "0.1.0"


class _KernelTrustNotice(logging.Filter):
    # bitsandbytes (installed with pyiqa), imported by diffusers' quantizers whenever diffusers loads,
    # asks the `kernels` package for a Hub kernel this toolkit never uses; offline, that prints
    # "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'" at the top of
    # every command. Drop that one message; every other record of that logger passes.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Skipping publisher trust check for 'kernels-community/")


logging.getLogger("kernels._internals.hf_hub").addFilter(_KernelTrustNotice())
# the same import warns about an optional CPU 4-bit kernel this toolkit never uses
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# name → the module that defines it (relative to this package); a module name maps to None
_LAZY: dict[str, str | None] = {
    "CalibrationDataModule": ".data.calibration",
    "DenoiserAdapter": ".denoisers",
    "DiffES": ".search.lightning_module",
    "Router": ".routing",
    "TrajectoryStore": ".trajectory",
    "UnitGroup": ".denoisers",
    "count_macs": ".macs",
    "evaluate_schedules": ".search.holdout",
    "load_denoiser": ".denoisers",
    "mosaicdiff_schedule": ".search.baselines",
    "read_evaluations": ".search.archive_file",
    "routed_denoiser": ".routed_model",
    "sample": ".sampling",
    "export": None,
    "pruners": None,
}

__all__ = sorted(["Schedule", "ScheduleError", "StagePartition", *_LAZY])


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffes_pl' has no attribute {name!r}")
    module = _LAZY[name]
    value = (importlib.import_module(f".{name}", __name__) if module is None
             else getattr(importlib.import_module(module, __name__), name))
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    # the public names, loaded or not (not this module's own imports and helpers)
    return sorted({*__all__, "__version__"})
