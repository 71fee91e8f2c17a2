"""Saving matplotlib figures the one way embedkit writes files: to a temp name, then renamed; always closed."""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (unless one was chosen already)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 130, **savefig_kwargs) -> Path:
    """Write ``fig`` to ``path`` atomically (format from the suffix, PNG by default) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    finally:
        pyplot().close(fig)
    return path
