"""What the `diffes-pl` command and its subcommands say about themselves, and its top-level help built
without Lightning.

`cli.DiffESCLI` takes its description and its subcommands' help from here. `top_level_help` builds
the same `diffes-pl --help` page with jsonargparse alone: the real parser needs the model, data and
Trainer classes of every subcommand, and importing Lightning alone loads torch, torchmetrics,
transformers and torchvision (seconds), where the list of subcommands needs none of them.
`tests/test_help.py` checks that both pages are equal.
"""
from __future__ import annotations

DESCRIPTION = "Diff-ES: stage-wise structural pruning of diffusion models by evolutionary search (PyTorch Lightning)."

# What each subcommand does here (LightningCLI would describe the Trainer methods of the same names).
SUBCOMMAND_HELP = {
    "fit": "Calibrate (when no trajectory store matches the run), then search for the best schedule; writes "
           "<default_root_dir>/schedule.json. Resume an interrupted search with --ckpt_path last.",
    "predict": "Calibrate and build the trajectory store (no search); fit and test reuse it when it matches.",
    "test": "Evaluate a schedule (--schedule, default <default_root_dir>/schedule.json): FID, IS, "
            "precision/recall, SSIM against the dense model, MACs and latency; writes evaluation.json beside it.",
}

HELP_FLAGS = ("-h", "--help")


def top_level_help(prog: str = "diffes-pl") -> str:
    """`diffes-pl --help`: the options of the main parser and the subcommands, as `cli.DiffESCLI`
    prints them, made by a parser that holds nothing else."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=DESCRIPTION)
    # what LightningCLI.init_parser adds to every parser (jsonargparse adds --print_config with it)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="Path to a configuration file in json or yaml format.")
    subcommands = parser.add_subcommands()
    for name, text in SUBCOMMAND_HELP.items():
        subcommands.add_subcommand(name, ArgumentParser(description=text), help=text)
    return parser.format_help()
