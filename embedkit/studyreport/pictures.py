"""Pictures inlined into the report as base64 data URIs, so the page is one file that needs no network."""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Picture:
    """One inlined image: its data URI, a caption and the alt text."""

    uri: str
    caption: str = ""
    alt: str = ""


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def file_picture(path: str | os.PathLike, caption: str = "") -> Picture | None:
    """A PNG file as a picture (None when it is missing or not a PNG, so a broken image never reaches the page)."""
    p = Path(path)
    if not p.is_file():
        return None
    data = p.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return Picture(png_uri(data), caption, caption or p.name)


def figure_picture(fig, caption: str = "", dpi: int = 110) -> Picture:
    """A matplotlib figure as a picture (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return Picture(png_uri(buf.getvalue()), caption, caption)


def array_picture(rgb: np.ndarray, caption: str = "") -> Picture:
    """A uint8 (H, W, 3) array as a picture."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG")
    return Picture(png_uri(buf.getvalue()), caption, caption)
