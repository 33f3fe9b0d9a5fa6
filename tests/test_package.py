"""Packaging: the built wheel holds every package folder under diffes_pl/ and every asset (automatic
package discovery; a hand-written package list once forgot diffes_pl.caching), and the public names."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffes_pl"
# what a fresh clone does not hold (.gitignore) and a build writes: never copied into the build folder
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "runs", "lightning_logs", ".whl", ".gl", ".hypothesis",
                                    ".pytest_cache", "__pycache__", "*.egg-info", "*.pyc")


def source_files() -> tuple[set[str], set[str]]:
    """The wheel paths the source tree asks for: every .py file and every folder holding one (as its
    `__init__.py`, so a folder that forgot it is named), and every asset."""
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    folders = {f"{Path(m).parent.as_posix()}/__init__.py" for m in modules}
    assets = {p.relative_to(ROOT).as_posix() for p in (PACKAGE / "assets").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    return modules | folders, assets


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` from a copy of the checkout: setuptools' build/ folder in the checkout would carry
    files of earlier builds into the wheel (a module dropped from discovery would still be there)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(source)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("diffes_pl-*.whl")
    return wheel


@pytest.mark.timeout(900)
def test_wheel_holds_every_package_folder_and_asset(tmp_path):
    expected, assets = source_files()
    assert "diffes_pl/caching/__init__.py" in expected and "diffes_pl/callbacks/__init__.py" in expected
    assert {"diffes_pl/assets/tiny_digits.safetensors", "diffes_pl/assets/tiny_digits_config.json"} <= assets
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    missing = sorted((expected | assets) - names)
    folders = sorted({Path(m).parent.as_posix() for m in missing if m.startswith("diffes_pl/")})
    assert not missing, (f"the wheel lacks {len(missing)} file(s) of the source tree, in {folders} "
                         f"(a folder without __init__.py, or left out of [tool.setuptools.packages.find] / "
                         f"package-data in pyproject.toml):\n" + "\n".join(missing))
    stale = sorted(n for n in names if n.endswith(".py") and n not in expected)
    assert not stale, f"the wheel holds modules the source tree does not: {stale}"
    assert "diffes-pl = diffes_pl.__main__:main" in entry_points  # --help without Lightning, then cli.main


def test_callbacks_are_part_of_the_package(tmp_path):
    """From another working directory (no sys.path help from the checkout): diffes_pl/callbacks/."""
    code = "import diffes_pl.callbacks as c, pathlib; print(pathlib.Path(c.__file__).resolve()); c.SearchPlots"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == PACKAGE / "callbacks" / "__init__.py"


def test_public_api_names():
    """The names docs/DESIGN.md promises users ("Public names"; the README uses them too)."""
    import diffes_pl as dp

    for name in ("load_denoiser", "count_macs", "sample", "Schedule", "StagePartition", "TrajectoryStore", "Router"):
        assert callable(getattr(dp, name)), name
    assert callable(dp.pruners.obs.prune_groups)
    assert callable(dp.export.save) and callable(dp.export.load)
