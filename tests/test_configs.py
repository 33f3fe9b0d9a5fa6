"""Every shipped config parses with the command it opens with, and the fitness metric it names loads
with the packages `pip install -e .` installs: offline, a metric whose weights are absent refuses at
once, naming the file to place and the folder (never skipped for a missing package)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from diffes_pl.cli import main
from diffes_pl.fitness import IQA, METRICS, Metric, get_metric

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def cli_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["diffes-pl"])  # pytest's own arguments are not the CLI's


@pytest.fixture
def empty_iqa_cache(tmp_path, monkeypatch):
    """pyiqa's caches (its own folder, fixed at import, and torch hub's clip/) pointed at an empty folder."""
    from pyiqa.utils import download_util

    hub = tmp_path / "torch" / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(hub / "pyiqa"))
    return hub


def test_there_are_configs_for_every_family():
    from diffes_pl.denoisers import families

    # every registered family has configs (at least its OBS one), and every config is a family's
    assert {p.stem.partition("_")[0] for p in CONFIGS} == set(families())
    assert {f"{name}_obs.yaml" for name in families()} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_prints_and_its_metric_loads(path, capsys, no_network):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(path.read_text())
    name = raw["model"].get("metric", "ssim")
    assert printed["model"]["metric"] == name
    assert printed["model"]["denoiser"] == raw["model"]["denoiser"]
    assert name in METRICS or name in IQA, f"{path.name} names an unknown metric {name!r}"
    if name in IQA:
        import pyiqa  # a default dependency: never skipped

        from diffes_pl.fitness.iqa import IQAWeightsMissingError, weight_files

        assert pyiqa.__version__
        files = weight_files(IQA[name][0])
        try:
            metric = get_metric(name)
        except IQAWeightsMissingError as err:  # offline machine without pyiqa's weights
            missing = [f for f in files if not f.is_file()]
            assert missing and missing[0].name in str(err) and str(missing[0].parent) in str(err)
            return
        assert all(f.is_file() for f in files)
    else:
        metric = get_metric(name)
    assert isinstance(metric, Metric) and metric.name == name


@pytest.mark.parametrize("name, file, folder", [
    ("topiq", "cfanet_nr_koniq_res50-9a73138b.pth", "pyiqa"),
    ("clipiqa", "RN50.pt", "clip"),
])
def test_iqa_metric_without_weights_names_the_file_and_folder(name, file, folder, empty_iqa_cache, no_network):
    from diffes_pl.fitness.iqa import IQAWeightsMissingError

    start = time.monotonic()
    with pytest.raises(IQAWeightsMissingError) as err:
        get_metric(name)
    assert time.monotonic() - start < 5  # no download attempt, no retries
    message = str(err.value)
    assert "\n" not in message
    assert f"weight file {file} is missing from {empty_iqa_cache / folder}" in message
    assert f"pyiqa.create_metric('{IQA[name][0]}')" in message and "metric: ssim" in message
    assert isinstance(err.value, FileNotFoundError)  # the CLI's user errors: one line, exit code 2


@pytest.mark.parametrize("name", ["topiq", "clipiqa"])
def test_iqa_metric_loads_once_its_files_are_placed(name, empty_iqa_cache, no_network):
    from diffes_pl.fitness.iqa import weight_files

    for f in weight_files(IQA[name][0]):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"placeholder")
    metric = get_metric(name)
    assert isinstance(metric, Metric) and metric.name == name and metric.higher_is_better


def test_topiq_file_is_where_pyiqa_reads_it(empty_iqa_cache, no_network):
    """pyiqa resolves the checkpoint in the folder the error names (no download when it is there)."""
    from pyiqa.archs.topiq_arch import default_model_urls
    from pyiqa.utils.download_util import load_file_from_url

    from diffes_pl.fitness.iqa import weight_files

    (path,) = weight_files("topiq_nr")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"placeholder")
    assert Path(load_file_from_url(default_model_urls["cfanet_nr_koniq_res50"])) == path


def test_topiq_backbone_is_not_downloaded_separately():
    """TOPIQ-NR's checkpoint holds its ResNet-50 backbone: pyiqa must not start timm's download first."""
    import inspect

    from pyiqa.archs.topiq_arch import CFANet

    from diffes_pl.fitness.iqa import CREATE_KWARGS

    assert CREATE_KWARGS["topiq_nr"] == {"backbone_pretrain": False}
    assert "backbone_pretrain" in inspect.signature(CFANet).parameters


def test_cli_refuses_a_missing_iqa_weight_in_one_line(empty_iqa_cache, capsys, tmp_path, no_network):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs" / "tiny_obs.yaml"), "--model.metric", "topiq",
              "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffes-pl: error: IQAWeightsMissingError:")
    assert "cfanet_nr_koniq_res50-9a73138b.pth" in err[0] and str(empty_iqa_cache / "pyiqa") in err[0]
    assert not (tmp_path / "run" / "store").exists()
