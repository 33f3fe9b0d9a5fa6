"""Packaging: the top-level callbacks/ folder is installed as diffes_pl.callbacks."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_callbacks_package_is_the_project_folder():
    import diffes_pl.callbacks as cb

    assert Path(cb.__file__).resolve() == ROOT / "callbacks" / "__init__.py"
    assert hasattr(cb, "SearchPlots")


def test_callbacks_importable_outside_the_checkout(tmp_path):
    """From another working directory (no sys.path help from the checkout): the installed mapping."""
    code = "import diffes_pl.callbacks as c, pathlib; print(pathlib.Path(c.__file__).resolve())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == ROOT / "callbacks" / "__init__.py"


def test_package_does_not_import_callbacks():
    offenders = [p for p in (ROOT / "diffes_pl").rglob("*.py") if "diffes_pl.callbacks" in p.read_text()
                 or "from ..callbacks" in p.read_text()]
    assert offenders == []


def test_public_api_names():
    """The names DESIGN.md promises users (and the README uses)."""
    import diffes_pl as dp

    for name in ("load_denoiser", "count_macs", "sample", "Schedule", "StagePartition", "TrajectoryStore", "Router"):
        assert callable(getattr(dp, name)), name
    assert callable(dp.pruners.obs.prune_groups)
    assert callable(dp.export.save) and callable(dp.export.load)
