"""Item locators: a file (or OME-Zarr folder) plus the plane of it that one item is.

A locator is the item's path in the store, so every later reader (thumbnails, explanations, leak checks)
reproduces exactly the pixels that were embedded: ``movie.ome.tiff::t=3,z=max`` is frame 3 of a movie,
max-projected over Z; ``slide.czi::scene=2`` the third scene; ``...::px=0.65`` resampled to 0.65 µm/px.
A plain file name is a locator with no selection.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import EmbedkitError

SEP = "::"
KEYS = ("scene", "t", "z", "px")


@dataclass(frozen=True)
class Locator:
    """A file plus an optional scene, time point, Z rule ('max', 'mid' or an index) and target pixel size."""

    file: str
    scene: int | None = None
    t: int | None = None
    z: str | None = None
    px: float | None = None

    def __str__(self) -> str:
        parts = [f"{k}={_fmt(getattr(self, k))}" for k in KEYS if getattr(self, k) is not None]
        return self.file + (SEP + ",".join(parts) if parts else "")

    def with_(self, **changes) -> "Locator":
        return replace(self, **changes)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse(text: str) -> Locator:
    """Split 'FILE::k=v,...' into a :class:`Locator`; a string without '::' is just a file."""
    text = str(text)
    if SEP not in text:
        return Locator(text)
    file, _, spec = text.rpartition(SEP)
    fields: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        k, eq, v = part.partition("=")
        if not eq or k not in KEYS:
            raise EmbedkitError(f"{text}: bad plane selector {part!r}; use {', '.join(k + '=...' for k in KEYS)}")
        try:
            fields[k] = float(v) if k == "px" else (v if k == "z" else int(v))
        except ValueError:
            raise EmbedkitError(f"{text}: {k}={v!r} is not a number") from None
    return Locator(file, **fields)


def file_of(text: str) -> str:
    """The file part of a locator string."""
    return str(text).rpartition(SEP)[0] if SEP in str(text) else str(text)
