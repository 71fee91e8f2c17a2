"""The one spelling of class-imbalance modes shared by probes and fine-tuning (``--balance``)."""

from __future__ import annotations

import warnings

from .errors import EmbedkitError

BALANCE_MODES = ("none", "weights", "oversample", "undersample")
ALIASES = {"weighted": "weights"}


def normalise_balance(mode: str, warn: bool = True) -> str:
    """The canonical mode for ``mode``; an old spelling ('weighted') is accepted with a warning."""
    if mode in ALIASES:
        if warn:
            warnings.warn(f"--balance {mode!r} is an old spelling; use {ALIASES[mode]!r}", UserWarning, stacklevel=3)
        return ALIASES[mode]
    if mode not in BALANCE_MODES:
        raise EmbedkitError(f"unknown --balance {mode!r}; choose one of {', '.join(BALANCE_MODES)}")
    return mode
