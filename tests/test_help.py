"""The command's help: every model and data option documented, the Trainer options a search does not
use left out (yet accepted), `diffes-pl --help` without Lightning, and the public names of the package."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffes_pl.cli import main
from diffes_pl.cli_help import top_level_help
from diffes_pl.cli_parser import TRAINER_HELP_SHOWN

OPTION = re.compile(r"^  (-\S+)")  # an option's first line in argparse's list (the usage lines are indented more)


def run_main(capsys, monkeypatch, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps at the terminal width: fix it
    monkeypatch.setattr(sys, "argv", ["diffes-pl"])  # pytest's own arguments are not the command's
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    assert stop.value.code in (0, None)
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """{option: its help text without the (type: …, default: …) note} from an argparse help page."""
    entries, current = {}, None
    for line in text.splitlines():
        match = OPTION.match(line)
        if match:
            current = match.group(1).rstrip(",")
            # the help starts after the option and its metavars, two spaces or more away
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            entries[current] = parts[1] if len(parts) > 1 else ""
        elif current is not None and line.startswith(" " * 6) and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return {option: re.sub(r"\s*\(type: .*\)$", "", text).strip() for option, text in entries.items()}


@pytest.fixture(scope="module")
def fit_help():
    # one `fit --help` for the module's tests, in this process
    import io
    from contextlib import redirect_stdout

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("COLUMNS", "100")
        monkeypatch.setattr(sys, "argv", ["diffes-pl"])
        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit) as stop:
            main(["fit", "--help"])
    assert stop.value.code in (0, None)
    return out.getvalue()


def test_every_model_and_data_option_has_help(fit_help):
    entries = help_entries(fit_help)
    options = [o for o in entries if o.startswith(("--model.", "--data."))]
    # every argument of DiffES and CalibrationDataModule is an option
    import inspect

    from diffes_pl.data.calibration import CalibrationDataModule
    from diffes_pl.search.lightning_module import DiffES

    arguments = {f"--{prefix}.{name}" for prefix, cls in (("model", DiffES), ("data", CalibrationDataModule))
                 for name in inspect.signature(cls.__init__).parameters if name != "self"}
    assert len(arguments) > 40 and arguments <= set(options), sorted(arguments - set(options))
    missing = [o for o in options if not entries[o]]
    assert not missing, f"options without help text: {missing}"
    # the five whose docstrings had merged into their neighbours' say what they are, and only that
    assert entries["--model.sampler"].startswith("the sampling scheduler")
    assert entries["--model.guidance"] == "classifier-free guidance scale (1: no guidance)."
    assert entries["--model.survivors"] == "individuals kept from one generation to the next (elitist)."
    assert entries["--model.moves_per_child"] == "moves applied per child."
    assert entries["--model.probe_batch_size"].startswith("probes per denoiser call")
    assert entries["--model.steps"] == "sampling steps."
    assert entries["--model.offspring"] == "children per generation."


def test_fit_help_lists_only_the_trainer_options_a_run_uses(fit_help):
    shown = {o.split(".")[1].rstrip("+") for o in help_entries(fit_help) if o.startswith("--trainer.")}
    assert shown == set(TRAINER_HELP_SHOWN)
    assert "--trainer.gradient_clip_val" not in fit_help and "--trainer.accumulate_grad_batches" not in fit_help
    assert "[--trainer.devices DEVICES]" in fit_help  # the usage lines follow the list
    assert len(fit_help.splitlines()) < 480  # 709 lines at 80 columns before (470 in the terminal)


def test_hidden_trainer_options_are_still_accepted(capsys, monkeypatch):
    config = run_main(capsys, monkeypatch, "fit", "--trainer.gradient_clip_val", "0.5",
                      "--trainer.deterministic", "true", "--print_config")
    assert re.search(r"^  gradient_clip_val: 0\.5$", config, re.M)
    assert re.search(r"^  deterministic: true$", config, re.M)
    assert re.search(r"^  max_epochs: null$", config, re.M)  # a shown option is dumped as before


def test_top_level_help_equals_the_cli_parser(capsys, monkeypatch):
    real = run_main(capsys, monkeypatch, "--help")  # LightningCLI's parser, with every subcommand's options
    assert top_level_help() == real
    for name in ("fit", "predict", "test"):
        assert re.search(rf"^    {name}\s+\S", real, re.M)


def test_top_level_help_imports_no_lightning_torch_or_diffusers():
    code = ("import sys; from diffes_pl.__main__ import main; main(['--help']); "
            "print(sorted(m for m in ('lightning', 'torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: diffes-pl [-c CONFIG] {fit,predict,test} ...")
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_import_is_light_and_public_names_resolve():
    # a fresh interpreter: `import diffes_pl` loads no torch; every public name loads on first use,
    # and dir() lists them before and after
    code = ("import sys, diffes_pl as dp; heavy = 'torch' in sys.modules; before = set(dir(dp)); "
            "values = {n: getattr(dp, n) for n in dp.__all__}; "
            "print(heavy, sorted(set(dp.__all__) - before), sorted(set(dp.__all__) - set(dir(dp))), "
            "sorted(n for n, v in values.items() if v is None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False [] [] []"
    assert "Skipping publisher trust check" not in out.stdout + out.stderr


def test_public_names():
    import diffes_pl as dp

    assert {"Router", "TrajectoryStore", "export", "DiffES", "CalibrationDataModule", "Schedule", "sample",
            "load_denoiser", "count_macs", "StagePartition", "pruners", "read_evaluations"} <= set(dp.__all__)
    assert dp.__all__ == sorted(dp.__all__) and set(dp.__all__) <= set(dir(dp))
    from diffes_pl.routing import Router
    from diffes_pl.search.lightning_module import DiffES

    assert dp.Router is Router and dp.DiffES is DiffES and callable(dp.export.save)
    with pytest.raises(AttributeError, match="no attribute 'ensure_store'"):
        dp.ensure_store
    assert Path(dp.export.__file__).name == "export.py"


@pytest.mark.parametrize("subcommand", ["predict", "test"])
def test_other_subcommands_document_every_option(capsys, monkeypatch, subcommand):
    entries = help_entries(run_main(capsys, monkeypatch, subcommand, "--help"))
    assert "--model.survivors" in entries and "--data.source" in entries
    assert subcommand != "test" or "--schedule" in entries and "--eval.num_images" in entries
    assert not [o for o, text in entries.items() if not text]
    assert {o.split(".")[1].rstrip("+") for o in entries if o.startswith("--trainer.")} == set(TRAINER_HELP_SHOWN)


def test_every_pruner_option_has_help(capsys, monkeypatch):
    from diffes_pl.pruners import PRUNERS

    for cls in PRUNERS.values():
        entries = help_entries(run_main(capsys, monkeypatch, "fit", "--model.pruner.help", cls.__name__))
        assert not [o for o, text in entries.items() if not text], cls.__name__
        if cls.__name__ == "OBSPruner":
            assert entries["--model.pruner.w_max"].startswith("the largest timestep weight")
            assert {"--model.pruner.damp", "--model.pruner.w_min", "--model.pruner.sequential_level"} <= set(entries)
