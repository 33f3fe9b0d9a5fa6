"""The CLI's argument parser: parse errors as one line naming the config file, the cause and the fix.

jsonargparse prints the whole usage and, for a YAML syntax error, a position in "<unicode string>";
`DiffESParser` remembers which --config file is being read and turns each error into
`diffes-pl: error: <file>: <cause>; <fix>`, exit code 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Iterable

from lightning.pytorch.cli import LightningArgumentParser


class ConfigSyntaxError(TypeError):
    """A --config file that is not valid YAML (TypeError: what jsonargparse turns into a parse error)."""


class ConfigContentError(TypeError):
    """A --config file that is valid YAML but holds no settings: empty (or comments only), or not a mapping."""


# the shipped configs, named in messages as a place to start from
EXAMPLE = "configs/tiny_obs.yaml"

# The Trainer options `--help` shows: what a run (calibration, search, evaluation) reads. The search
# trains nothing (one generation per epoch, a no-op optimizer), so gradient clipping, accumulation,
# validation, batch limits, sanity steps and the like mean nothing here; they stay accepted (a
# config may set them and config.yaml records them) and are only left out of the help.
TRAINER_HELP_SHOWN = ("accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks",
                      "max_epochs", "default_root_dir", "enable_progress_bar")
TRAINER_GROUP_HELP = ("Lightning's Trainer; shown are the options a run uses (max_epochs: generations of the "
                      "search). Lightning's other Trainer options are accepted in a config too, but a search "
                      "trains nothing: they are not listed here.")


class DiffESParser(LightningArgumentParser):
    """Parse errors as one line on stderr naming the config file (when one is being read), the cause
    and the fix, instead of the full usage and, for YAML, a position in "<unicode string>"."""

    _config_path: str | None = None
    _hidden_help: tuple[str, ...] = ()  # option strings `format_help` leaves out (hide_from_help)

    def hide_from_help(self, prefix: str, shown: Iterable[str], description: str | None = None) -> None:
        """Leaves the options `<prefix>.<name>…` whose name is not in `shown` out of `--help` (usage
        and list) and, given a `description`, puts it under the group's title. Parsing, defaults and
        the saved config are unchanged: a hidden option is still accepted and recorded."""
        shown = set(shown)
        options = {option for action in self._actions for option in action.option_strings}
        self._hidden_help += tuple(sorted(
            option for option in options if option.startswith(f"--{prefix}.")
            and option[len(prefix) + 3:].split(".")[0].rstrip("+") not in shown))
        if description is not None:
            for group in self._action_groups:
                if any(a.option_strings == [f"--{prefix}"] for a in group._group_actions):
                    group.description = description

    def format_help(self) -> str:
        # jsonargparse drops an action whose help is SUPPRESS from saved configs too: suppress
        # only while the help is formatted
        hidden = [action for action in self._actions
                  if action.option_strings and set(action.option_strings) <= set(self._hidden_help)]
        saved = [action.help for action in hidden]
        for action in hidden:
            action.help = argparse.SUPPRESS
        try:
            return super().format_help()
        finally:
            for action, text in zip(hidden, saved):
                action.help = text

    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        # jsonargparse reports YAML errors against the file's text, not its name: remember the name
        previous, self._config_path = self._config_path, str(path)
        try:
            return super().parse_path(path, *args, **kwargs)
        finally:
            self._config_path = previous

    def _load_config_parser_mode(self, content: str, *args: Any, **kwargs: Any) -> Any:
        import yaml

        try:
            return super()._load_config_parser_mode(content, *args, **kwargs)
        except TypeError as err:
            if isinstance(err.__cause__, yaml.YAMLError):
                raise ConfigSyntaxError(_yaml_problem(err.__cause__)) from err.__cause__
            if str(err).startswith("Unexpected config:"):  # jsonargparse's words for "not a mapping"
                raise ConfigContentError(_not_settings(content)) from None
            raise

    def error(self, message: str, ex: Exception | None = None) -> Any:
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():  # a caller handles it (e.g. nested parsers)
            super().error(message, ex)
        where = f"{self._config_path}: " if self._config_path else ""
        text = _plain(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))
        missing = re.match(r'Parser key "config": File does not exist: \'(.*)\'$', text)
        if missing:
            where, text = f"{missing.group(1)}: ", (f"the config file does not exist; check the path (the shipped "
                                                     f"configs are in configs/, e.g. {EXAMPLE})")
        elif not isinstance(ex, (ConfigSyntaxError, ConfigContentError)):
            text += f"; see `{self.prog.replace(' [options]', '')} --help` for the accepted options"
        print(f"diffes-pl: error: {where}{text}", file=sys.stderr)
        self.exit(2)


def _plain(message: str) -> str:
    """jsonargparse's type errors in a few words: `model.levels: expected int or null, got 8.5`."""
    union = re.match(r'Parser key "([^"]+)": Does not validate against any of the Union subtypes '
                     r'Subtypes: \[(.*?)\] .*Given value: (.*)$', message)
    single = re.match(r'Parser key "([^"]+)": Expected a (.*?)\. Got value: (.*)$', message)
    if union:
        key, types, value = union.groups()
    elif single:
        key, types, value = single.groups()
    else:
        return re.sub(r"<class '([\w.]+)'>", r"\1", message)
    names = [name.replace("NoneType", "null") for name in re.findall(r"<class '([\w.]+)'>", types)] or [types]
    return f"{key}: expected {' or '.join(names)}, got {value}"


def _not_settings(content: str) -> str:
    """Why a config that parses is no config: it is empty, or holds a list or a value instead of settings."""
    import yaml

    value = yaml.safe_load(content)
    if value is None:
        return (f"the config file is empty; write its settings in it (model:, data:, trainer:; start from "
                f"{EXAMPLE}), or leave out --config")
    kind = {list: "list", str: "string"}.get(type(value), type(value).__name__)
    return (f"the config file holds a YAML {kind}, not settings (model:, data:, trainer:); write them as a "
            f"mapping, as {EXAMPLE} does")


def _yaml_problem(err: Exception) -> str:
    """`line 32, column 9: did not find expected ',' (while parsing a flow sequence at line 30)`."""
    mark, context, opened = (getattr(err, key, None) for key in ("problem_mark", "context", "context_mark"))
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown line"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if context and opened:
        problem += f" ({context} at line {opened.line + 1})"
    return f"not valid YAML at {where}: {problem}; fix the YAML there"
