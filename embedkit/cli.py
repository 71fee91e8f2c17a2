"""The ``embedkit`` command: a thin click group; each stage's commands live in embedkit/commands/."""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .configfile import add_config_option
from .errors import EmbedkitError

#: Command modules, one per stage. Each exposes ``COMMANDS``, a list of click commands.
COMMAND_MODULES = ("embed", "store", "segment", "probe", "finetune", "compare", "neighbors", "leaks", "view", "explain",
                   "adapt", "report", "run")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="embedkit")
def cli() -> None:
    """Embeddings, probes, neighbours and explanations for cell microscopy.

    \b
    Typical session:
      embedkit embed CELLS/ --store store/cells.h5 --encoder efficientnet_lite0 --group-by mitocheck
      embedkit probe store/cells.h5 --heads all --out results/lite0
      embedkit encoders            # what encoders exist, and whose weights are here

    Every stage reads and writes one HDF5 store; see docs/store.md for its layout.
    """


def _unavailable(name: str, exc: ModuleNotFoundError) -> click.Command:
    """A stand-in for a command module whose dependency is missing: it is listed, and says what to install."""
    missing = exc.name or "a dependency"

    @click.command(name=name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"(unavailable: needs the Python package {missing!r})")
    def stand_in() -> None:
        raise EmbedkitError(f"'embedkit {name}' needs the Python package {missing!r}, which is not installed "
                            f"here; install it (pip install {missing.split('.')[0]}) and try again")

    return stand_in


def load_commands(group: click.Group) -> None:
    """Add every stage's commands (each with --config); a module whose dependency is missing still shows up."""
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"embedkit.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"embedkit.commands.{name}":
                raise
            group.add_command(_unavailable(name, exc))
            continue
        for cmd in mod.COMMANDS:
            group.add_command(add_config_option(cmd))


load_commands(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="embedkit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("embedkit: interrupted; finished work is kept, run the same command again to resume", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("embedkit: interrupted; finished work is kept, run the same command again to resume", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except EmbedkitError as exc:
        click.echo(f"embedkit: error: {exc}", err=True)
        sys.exit(2)
    except MemoryError:
        click.echo("embedkit: error: out of memory; lower --batch-size or use a machine with more RAM", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
