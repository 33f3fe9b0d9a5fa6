"""No-reference image quality through pyiqa (the `iqa` extra): TOPIQ-NR and CLIP-IQA.

Weights are never fetched silently: if they are not in pyiqa's cache the metric refuses at once,
naming the cache folder and the command that pre-fetches them (on a machine with network).
"""
from __future__ import annotations

import os
from pathlib import Path


def _cache_dir() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "pyiqa"


def iqa_metric(name: str, pyiqa_name: str, higher_is_better: bool):
    from . import Metric

    try:
        import pyiqa  # noqa: F401
    except ImportError:
        raise ImportError(f"fitness metric {name!r} needs pyiqa: pip install 'diffes-pl[iqa]'") from None
    cache = _cache_dir()
    if not cache.is_dir() or not any(cache.iterdir()):
        raise FileNotFoundError(
            f"fitness metric {name!r}: pyiqa's weights are not in {cache}; fetch them once on a machine with "
            f"network: python -c \"import pyiqa; pyiqa.create_metric('{pyiqa_name}')\" and copy that folder here")
    holder: dict = {}

    def fn(x):
        if "m" not in holder:
            import pyiqa

            holder["m"] = pyiqa.create_metric(pyiqa_name, device=x.images.device, as_loss=False)
        images = x.images if x.images.shape[1] == 3 else x.images.repeat(1, 3, 1, 1)
        return holder["m"](images).mean()

    return Metric(name, fn, higher_is_better)
