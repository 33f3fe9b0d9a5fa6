"""CI runs what the README tells a newcomer to run, in a new virtual environment: the two cannot drift."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    setup = ROOT.joinpath("README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def _ci_lines() -> list[str]:
    return [line.strip() for line in ROOT.joinpath(".ci", "run").read_text().splitlines()]


def test_readme_setup_has_the_demo_and_the_test_command():
    assert _readme_commands() == [
        "pip install -e . && diffes-pl fit --config configs/tiny_obs.yaml",
        'pip install -e ".[dev]" && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q',
    ]


def test_ci_runs_each_readme_command_verbatim_in_order():
    lines = _ci_lines()
    positions = [lines.index(command) for command in _readme_commands()]  # ValueError: not verbatim
    assert positions == sorted(positions)


def test_ci_uses_a_new_isolated_virtual_environment_before_installing():
    text = ROOT.joinpath(".ci", "run").read_text()
    lines = _ci_lines()
    assert "set -euo pipefail" in lines
    venv = next(i for i, line in enumerate(lines) if line.startswith("python3 -m venv --clear"))
    first_install = next(i for i, line in enumerate(lines) if line.startswith("pip install"))
    activate = next(i for i, line in enumerate(lines) if line.startswith("source") and "bin/activate" in line)
    assert venv < activate < first_install
    assert "mktemp -d" in text and "--system-site-packages" not in text.replace("# no --system-site-packages", "")
    assert "export PYTHONNOUSERSITE=1" in text and "unset PYTHONPATH" in text
    # the demo runs offline although its README command sets no variable
    offline = next(i for i, line in enumerate(lines) if line.startswith("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"))
    assert offline < first_install


def test_documented_commands_need_only_declared_packages():
    """What the README's commands use is installed by them: default dependencies for the package and
    the shipped configs, `dev` for the tests; a missing one shows only on a fresh machine."""
    import tomllib

    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    names = lambda reqs: {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
    default, extras = names(project["dependencies"]), project["optional-dependencies"]
    assert {"transformers", "tokenizers", "sentencepiece", "protobuf", "torch-fidelity", "pyiqa", "accelerate",
            "huggingface-hub", "pillow", "pyyaml", "psutil"} <= default
    assert "setuptools<81" in project["dependencies"]  # pyiqa's CLIP-IQA imports pkg_resources
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(project["dependencies"])
    assert {"pytest", "pytest-timeout", "hypothesis", "scipy", "nbclient", "nbformat", "ipykernel"} <= names(extras["dev"])
    assert names(extras["tensorboard"]) == {"tensorboard"}


def test_ci_installs_the_built_wheel_in_a_second_environment_and_runs_it_outside_the_checkout():
    """Editable installs hide a module missing from the package list: CI also installs the wheel."""
    lines = _ci_lines()
    second = [i for i, line in enumerate(lines) if line.startswith("python3 -m venv --clear")][1]
    after = lines[second:]
    assert any(line.startswith("source") and "bin/activate" in line for line in after)
    build = next(i for i, line in enumerate(after) if line.startswith("pip wheel --no-deps"))
    install = next(i for i, line in enumerate(after) if line.startswith("pip install") and ".whl" in line)
    assert build < install and not any(line.startswith("pip install -e") for line in after)
    outside = next(i for i, line in enumerate(after) if line.startswith('cd "$venv_root/'))
    commands = [next(i for i, line in enumerate(after) if line.startswith(command)) for command in (
        'diffes-pl fit --config "$checkout/configs/tiny_obs.yaml" --trainer.max_epochs 1',
        'diffes-pl fit --config "$checkout/configs/tiny_joint.yaml" --trainer.max_epochs 1',
        'diffes-pl test --config "$checkout/configs/tiny_joint.yaml"')]
    assert install < outside < min(commands)
    assert "pkgutil.walk_packages(diffes_pl.__path__" in "\n".join(after[outside:])
