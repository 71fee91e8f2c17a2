"""Config files for commands: YAML whose keys are a command's option names, checked against the command.

``embedkit probe S.h5 --config probe.yaml`` reads the file into click's ``default_map``, so flags on the
command line still win. ``embedkit run`` (see :mod:`embedkit.study`) turns the same keys into arguments.
An unknown key is refused with one line naming it and the closest valid name.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import click

from .errors import EmbedkitError

CONFIG_OPTION = "config"


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file, turning read and syntax errors into one-line user errors."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise EmbedkitError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise EmbedkitError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


def param_names(command: click.Command) -> dict[str, click.Parameter]:
    """Every name a config may use for the command's parameters: the parameter name and each long flag."""
    names: dict[str, click.Parameter] = {}
    for p in command.params:
        if p.name in (None, CONFIG_OPTION, "help"):
            continue
        names[p.name] = p
        for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", []):
            if opt.startswith("--"):
                names.setdefault(opt[2:].replace("-", "_"), p)
    return names


def resolve_keys(options: dict, command: click.Command, where: str) -> dict[str, Any]:
    """Map a config's keys (option names, dashes or underscores) to parameter names; refuse unknown keys."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise EmbedkitError(f"{where}: expected a mapping of option names to values, found {type(options).__name__}")
    names = param_names(command)
    out: dict[str, Any] = {}
    for key, value in options.items():
        norm = str(key).replace("-", "_")
        if norm not in names:
            close = difflib.get_close_matches(norm, list(names), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(names))}"
            raise EmbedkitError(f"{where}: unknown key {key!r} for 'embedkit {command.name}'{hint}")
        out[names[norm].name] = value
    return out


def _load_default_map(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Eager callback of --config: the file's keys become this command's defaults (command-line flags win)."""
    if not value:
        return
    data = read_yaml(value)
    defaults = resolve_keys(data, ctx.command, value)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def add_config_option(command: click.Command) -> click.Command:
    """Give ``command`` a ``--config FILE`` option (once)."""
    if any(p.name == CONFIG_OPTION for p in command.params):
        return command
    command.params.append(click.Option(
        ["--config", CONFIG_OPTION], type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
        callback=_load_default_map,
        help="YAML file of this command's options (keys are option names); flags given here win."))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_config_option(sub)
    return command


def to_argv(options: dict, command: click.Command, where: str) -> list[str]:
    """Command-line arguments for ``command`` from a config mapping (arguments positional, options as flags)."""
    values = resolve_keys(options, command, where)
    positional: list[str] = []
    flags: list[str] = []
    for p in command.params:
        if p.name not in values:
            continue
        v = values[p.name]
        if isinstance(p, click.Argument):
            positional += [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
            continue
        flags += _option_argv(p, v)
    return flags + (["--"] + positional if positional else [])


def _option_argv(p: click.Option, v: Any) -> list[str]:
    long = next((o for o in p.opts if o.startswith("--")), p.opts[0])
    if p.is_flag:
        if p.secondary_opts:
            return [long if v else p.secondary_opts[0]]
        return [long] if v else []
    if v is None:
        return []
    values = v if p.multiple and isinstance(v, (list, tuple)) else [v]
    out: list[str] = []
    for one in values:
        parts = one if isinstance(one, (list, tuple)) else [one]
        if isinstance(one, (list, tuple)) and p.nargs == 1:  # a comma list written as a YAML list
            parts = [",".join(str(x) for x in one)]
        out += [long] + [str(x) for x in parts]
    return out
