"""The files shipped in diffes_pl/assets: the built-in model's weights and config, the digits
classifier, and the architecture configs of every family's hub names (`Family.hub_names`)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def asset_path(name: str) -> Path:
    """Path of a file shipped in diffes_pl/assets."""
    return Path(str(resources.files("diffes_pl") / "assets" / name))
