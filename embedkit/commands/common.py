"""Options and helpers shared by several commands, so one meaning has one flag and one spelling."""

from __future__ import annotations

from typing import Callable

import click

KEY_HELP = "Embedding key or encoder name [default: the store's only key]."


def echo_err(msg: str) -> None:
    """Print a note or warning on stderr."""
    click.echo(msg, err=True)


def _balance(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from ..balance import ALIASES

    if value in ALIASES:
        echo_err(f"warning: --balance {value} is an old spelling; use --balance {ALIASES[value]}")
        return ALIASES[value]
    return value


def balance_option(help_text: str) -> Callable:
    """``--balance none|weights|oversample|undersample`` (the old 'weighted' is accepted with a warning)."""
    from ..balance import ALIASES, BALANCE_MODES

    return click.option("--balance", type=click.Choice([*BALANCE_MODES, *ALIASES]), default="weights",
                        show_default=True, callback=_balance, help=help_text)
