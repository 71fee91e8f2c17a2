"""The ``embedkit`` command: a thin click group; each stage's commands live in embedkit/commands/."""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import EmbedkitError

#: Command modules, one per stage. Each exposes ``COMMANDS``, a list of click commands.
COMMAND_MODULES = ("embed", "store", "probe", "segment", "neighbors", "leaks", "finetune", "explain")


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


for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"embedkit.commands.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"embedkit.commands.{_name}":
            raise
        continue
    for _cmd in _mod.COMMANDS:
        cli.add_command(_cmd)


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
