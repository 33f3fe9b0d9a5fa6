"""The `diffes-pl` command (also `python -m diffes_pl`).

`diffes-pl --help` lists the subcommands from `cli_help` without importing Lightning, torch or
diffusers (importing Lightning alone takes seconds); everything else, a subcommand's `--help`
included, runs `cli.main`.
"""
from __future__ import annotations

import sys
from typing import Any

from .cli_help import HELP_FLAGS, top_level_help


def main(args: Any = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and len(argv) == 1 and argv[0] in HELP_FLAGS:
        print(top_level_help(), end="")
        return
    from .cli import main as run

    run(args)


if __name__ == "__main__":
    main()
