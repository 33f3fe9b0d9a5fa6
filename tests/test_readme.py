"""The README a user follows: its sections in order, every config named, and what it tells a user to
run does run — each command of "Prune your own model" parsed by the CLI (the built-in model's also
planned), its Python snippets executed, the `data.source` forms it lists opened, and its memory
table equal to what `benchmarks/memory_plan.py` computes. Offline; ~1 minute."""
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTIONS = ["Set-up: install and run the demo", "Use the pruned model in diffusers", "Prune your own model",
            "Results in brief", "When something goes wrong"]
OWN_MODEL = ["The budget: `model.sparsity`", "DiT-XL/2 on an ImageNet-style image folder",
             "SDXL, SD3, FLUX, PixArt-Σ: images with captions", "Where calibration images come from: `data.source`",
             "How much GPU memory and time", "Every config"]
# the README's example paths, and what the test puts in their place
IMAGENET, COCO = "/data/imagenet/train", "/data/coco/train2017"


def _text() -> str:
    return README.read_text()


def _section(title: str, level: str = "## ") -> str:
    return _text().split(f"\n{level}{title}\n", 1)[1].split(f"\n{level}", 1)[0]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def _commands(text: str) -> list[str]:
    """The command lines of the bash blocks (backslash continuations joined)."""
    lines = []
    for block in _blocks(text, "bash"):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def test_sections_are_in_the_order_a_user_needs_them():
    titles = re.findall(r"^## (.+)$", _text(), flags=re.MULTILINE)
    assert titles == SECTIONS
    own = re.findall(r"^### (.+)$", _section("Prune your own model"), flags=re.MULTILINE)
    assert own == OWN_MODEL
    assert "benchmarks/RESULTS.md" in _section("Results in brief")


def test_every_config_is_named():
    text = _text()
    configs = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 28
    assert [name for name in configs if f"`{name}`" not in text] == []
    table = _section("Every config", "### ")
    assert [name for name in configs if name not in table] == []


def test_every_benchmark_command_of_the_readme_exists():
    scripts = set(re.findall(r"python (benchmarks/\w+\.py)", _text()))
    assert len(scripts) >= 6 and all((ROOT / s).is_file() for s in scripts), scripts


# --- the data.source forms ------------------------------------------------------------------------

def _image(path: Path, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)


def _class_folder(root: Path) -> Path:
    """An ImageNet-style folder: one subfolder per class, written in reverse order."""
    for i, wnid in enumerate(["n01443537", "n01440764"]):
        _image(root / wnid / f"{wnid}_{i}.png", i)
    return root


def _caption_folder(root: Path, lists: bool = False) -> Path:
    """The README's captioned imagefolder: metadata.jsonl with file_name and text (strings, or in
    every row lists of strings: datasets refuses a column of both)."""
    rows = [("000000000009.png", "A bowl of fruit on a table."), ("000000000025.png", "A giraffe.")]
    if lists:
        rows = [(name, [caption, "Another caption."]) for name, caption in rows]
    for i, (name, _) in enumerate(rows):
        _image(root / name, i)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in rows))
    return root


def test_image_folder_subfolders_are_class_ids_in_sorted_order(tmp_path, hf_cache):
    from diffes_pl.data.sources import open_source, resolve_source

    spec = resolve_source(str(_class_folder(tmp_path / "imagenet" / "train")))
    rows = open_source(spec, "train")
    assert spec.kind == "imagefolder" and rows.features["label"].names == ["n01440764", "n01443537"]
    assert sorted(zip(rows["label"], (Path(r.filename).parent.name for r in rows["image"]))) == \
        [(0, "n01440764"), (1, "n01443537")]


def test_captioned_folder_parquet_and_hub_name_are_read_as_the_table_says(tmp_path, hf_cache):
    import datasets

    from diffes_pl.data.sources import caption_texts, open_source, resolve_source

    for lists in (False, True):
        folder = _caption_folder(tmp_path / f"coco{int(lists)}", lists)
        spec = resolve_source(str(folder))
        rows = open_source(spec, "train")
        assert spec.kind == "imagefolder" and {"image", "text"} <= set(rows.column_names)
        assert sorted(caption_texts(rows["text"], str(folder), "text")) == ["A bowl of fruit on a table.", "A giraffe."]

    (tmp_path / "parquet").mkdir()
    rows.remove_columns("image").to_parquet(str(tmp_path / "parquet" / "coco.parquet"))
    for parquet in (tmp_path / "parquet" / "coco.parquet", tmp_path / "parquet"):  # a file, a folder of them
        spec = resolve_source(str(parquet))
        assert spec.kind == "parquet" and open_source(spec, "train")["text"] == rows["text"]
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "dict"))  # Dataset: the snippet's test
    spec = resolve_source(str(tmp_path / "dict"))
    assert spec.kind == "disk" and len(open_source(spec, "train")) == 2
    assert resolve_source("ILSVRC/imagenet-1k").kind == "hub"  # a name: resolved without loading
    assert resolve_source("digits").kind == "digits"


def _run_snippet(code: str, **replace: str) -> dict:
    for old, new in replace.items():
        assert old in code, f"the README snippet no longer holds {old!r}"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 — the README's own code, as a user runs it
    return namespace


def test_save_to_disk_snippet_makes_a_caption_source(tmp_path, hf_cache, monkeypatch):
    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.data.sources import open_source, resolve_source

    snippet = next(b for b in _blocks(_section("Prune your own model"), "python") if "save_to_disk" in b)
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(["0001.png", "0002.png"]):
        _image(tmp_path / "photos" / name, i)
    _run_snippet(snippet)
    spec = resolve_source("my_calibration")
    rows = open_source(spec, "train")
    assert spec.kind == "disk" and rows["text"] == ["a cat on a sofa", "a red bicycle"]
    options = re.search(r"# then: (.*)", snippet).group(1).split()
    values = dict(zip(options[::2], options[1::2]))
    module = CalibrationDataModule(source=values["--data.source"], caption_column=values["--data.caption_column"],
                                   label_column=None if values["--data.label_column"] == "null" else "label")
    assert module.spec.kind == "disk"


# --- the commands -----------------------------------------------------------------------------------

def _metric_available(name: str) -> bool:
    from diffes_pl.fitness import get_metric

    try:
        get_metric(name)
        return True
    except (ImportError, FileNotFoundError):  # pyiqa's weights are not cached here
        return False


def _parse(line: str, root: Path, folders: dict[str, str]):
    """`diffes-pl fit|test …` as the CLI instantiates it (no subcommand: run=False), on the CPU, with
    the README's example data folders replaced by real ones."""
    import yaml

    from diffes_pl.cli import DiffESCLI

    words = shlex.split(line)
    assert words[:1] == ["diffes-pl"] and words[1] in ("fit", "test"), line
    args = [folders.get(word, word) for word in words[2:]]
    config = yaml.safe_load((ROOT / args[args.index("--config") + 1]).read_text())
    if not _metric_available(config["model"].get("metric", "ssim")):
        args.append("--model.metric=ssim")  # only the metric's weight files are missing offline
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
    return DiffESCLI(args=[*args, "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}"], run=False)


def test_every_command_of_prune_your_own_model_runs(tmp_path, hf_cache, no_network, monkeypatch, capsys):
    """Every line is checked: `diffes-pl` lines parsed (the built-in model's planned, as `fit` does
    before any work), `python benchmarks/…` run; only the download is left to the user."""
    monkeypatch.setattr(sys, "argv", ["diffes-pl"])  # pytest's own arguments are not the CLI's
    folders = {IMAGENET: str(_class_folder(tmp_path / "imagenet")), COCO: str(_caption_folder(tmp_path / "coco"))}
    checked = {"parsed": 0, "planned": 0, "script": 0, "online": 0}
    for i, line in enumerate(_commands(_section("Prune your own model"))):
        if line.startswith("hf download "):
            checked["online"] += 1
            continue
        if line.startswith("python benchmarks/memory_plan.py"):
            monkeypatch.setattr(sys, "argv", shlex.split(line)[1:])
            runpy.run_path(str(ROOT / "benchmarks/memory_plan.py"), run_name="__main__")
            assert "sdxl_obs.yaml" in capsys.readouterr().out
            monkeypatch.setattr(sys, "argv", ["diffes-pl"])
            checked["script"] += 1
            continue
        cli = _parse(line, tmp_path / f"run{i}", folders)
        checked["parsed"] += 1
        model = cli.model
        if model.hparams.denoiser == "tiny-digits":  # the built-in model: planned as `fit` plans it
            plan = model.check_run(tmp_path / f"run{i}")
            sparsity = model.hparams.sparsity
            assert plan.target_level == (model.hparams.target_level if sparsity is None else sparsity * plan.levels_max)
            checked["planned"] += 1
        for example, folder in folders.items():  # the example folder is the calibration source
            if example in line:
                assert cli.datamodule.spec.location == str(Path(folder).resolve())
        assert not (tmp_path / f"run{i}").exists()  # parsing and planning write nothing
    assert checked == {"parsed": 6, "planned": 3, "script": 1, "online": 1}, checked


def test_sparsity_example_is_refused_as_the_readme_says():
    """The README's example of a budget no schedule meets, and the nearest values it quotes."""
    from diffes_pl.errors import ScheduleError
    from diffes_pl.search.builder import plan_run
    from diffes_pl.search.settings import SearchSettings

    text = " ".join(_section("The budget: `model.sparsity`", "### ").split())
    asked, low, high = re.search(r"sparsity (0\.\d+) is refused, and the error names the nearest that work "
                                 r"\(sparsity (0\.\d+) or (0\.\d+)\)", text).groups()
    with pytest.raises(ScheduleError, match=f"choose sparsity {low} or sparsity {high}"):
        plan_run(SearchSettings(sparsity=float(asked), levels=8))
    for ok in (low, high):
        assert plan_run(SearchSettings(sparsity=float(ok), levels=8)).target_level == float(ok) * 8


# --- the memory table -----------------------------------------------------------------------------

def test_memory_table_is_what_memory_plan_computes():
    plan = runpy.run_path(str(ROOT / "benchmarks/memory_plan.py"))["plan"]
    table = _section("How much GPU memory and time", "### ")
    rows = re.findall(r"^\| `(\w+\.yaml)` \((\w+)\) \| ([\d.]+) GB \| ([\d.]+) GB \((\w+)\) \| ([\d.]+) / ([\d.]+) GB "
                      r"\| ([\d.]+) GB \|$", table, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["dit_obs.yaml", "sdxl_obs.yaml", "sd3_obs.yaml", "flux_obs.yaml", "pixart_obs.yaml"]
    gb = lambda b: f"{b / 1e9:.2f}"
    for name, dtype, weights, stats, stat_dtype, resident, shared, store in rows:
        row = plan(ROOT / "configs" / name)
        assert (dtype, stat_dtype) == (row["dtype"], row["stat_dtype"]), name
        assert (weights, stats, resident, shared, store) == (
            gb(row["denoiser_bytes"]), gb(row["stat_bytes_per_stage"]), gb(row["routed_resident_bytes"]),
            gb(row["routed_shared_bytes"]), gb(row["store_bytes"])), name


# --- the demo's Python snippet --------------------------------------------------------------------

def test_demo_snippet_samples_with_the_searched_schedule(tmp_path, one_thread):
    """The snippet on a small finished search (4 stages of 2 steps, one generation) in place of the
    demo's run: same calls, the run folder and step count swapped."""
    import torch
    from helpers.search_runs import calibrated_search

    module, trainer = calibrated_search(tmp_path / "run", 1, num_stages=4, steps=8, num_probes=2, offspring=1,
                                        survivors=1, init="uniform", target_level=4, levels=8)
    trainer.fit(module)
    assert (tmp_path / "run" / "schedule.json").is_file()
    snippet = next(b for b in _blocks(_section("Set-up: install and run the demo"), "python"))
    torch.manual_seed(0)
    ns = _run_snippet(snippet, **{"runs/tiny_obs": str(tmp_path / "run"), "steps=20": "steps=8"})
    images = ns["images"]
    assert images.shape == (4, 1, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1
    dense = ns["dp"].sample(ns["adapter"], [0, 1, 2, 3], steps=8, guidance=2.0, seed=0)
    assert not torch.equal(images, dense)  # the schedule was installed: a pruned model sampled


def test_diffusers_snippet_opens_the_export_pruned(tmp_path, one_thread):
    """The diffusers snippet on a small finished search: the export reopened by DiffusionPipeline
    samples what the Router samples."""
    import torch
    from helpers.search_runs import calibrated_search

    module, trainer = calibrated_search(tmp_path / "run", 1, num_stages=4, steps=8, num_probes=2, offspring=1,
                                        survivors=1, init="uniform", target_level=4, levels=8)
    trainer.fit(module)
    snippet = next(b for b in _blocks(_section("Use the pruned model in diffusers"), "python"))
    ns = _run_snippet(snippet, **{"runs/tiny_obs": str(tmp_path / "run"), "steps=20": "steps=8"})
    dp = ns["dp"]
    assert type(ns["pruned"]).__name__ == "RoutedDiTTransformer2DModel"
    with dp.Router(ns["adapter"], ns["store"], ns["schedule"]) as router:
        routed = dp.sample(ns["adapter"], [0, 1, 2, 3], steps=8, guidance=2.0, seed=0, router=router)
    assert torch.equal(ns["images"], routed)
