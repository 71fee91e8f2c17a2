"""Large fields read lazily: region by region, tile by tile with overlap, never the whole plane at once.

OME-Zarr and (tiled) OME-TIFF are chunked on disk and bioio opens them as dask arrays, so a region costs
only the chunks it touches. Intensity percentiles, which the whole-field reader takes over every pixel,
come from a regular grid of sample windows instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import BadImageError
from .locator import Locator, parse
from .reader import FileInfo, describe, read_plane

#: Fields with more pixels than this are segmented tile by tile (8192 x 8192, 64 Mpx; 256 MiB per uint16 channel).
LARGE_FIELD_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class Tile:
    """One tile: the core it owns (cells whose centroid falls in it) and the larger box that is read."""

    core: tuple[int, int, int, int]   # y0, y1, x0, x1
    read: tuple[int, int, int, int]

    @property
    def origin(self) -> tuple[int, int]:
        return self.read[0], self.read[2]


class LazyField:
    """A field that is read region by region: ``shape``, ``channels`` and :meth:`region`."""

    def __init__(self, locator: str | Locator):
        self.locator = parse(locator) if isinstance(locator, str) else locator
        if self.locator.px is not None:
            raise BadImageError(str(self.locator), "large fields are read tile by tile at their native pixel size; "
                                                   "resample the crops instead (segment --scale pixel:UM)")
        self.info: FileInfo = describe(self.locator.file, self.locator.scene)

    @property
    def shape(self) -> tuple[int, int]:
        return self.info.y, self.info.x

    @property
    def channels(self) -> int:
        return self.info.c

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw (h, w, C) pixels of rows y0:y1 and columns x0:x1 (Z reduced by the locator's rule)."""
        return read_plane(self.locator, (y0, y1, x0, x1))[0]

    def sample(self, n: int = 16, size: int = 512) -> np.ndarray:
        """A grid of up to n x n windows of ``size`` pixels spread over the field, stacked as (k, h, w, C)."""
        h, w = self.shape
        sy, sx = min(size, h), min(size, w)
        ys = np.unique(np.linspace(0, h - sy, min(n, max(1, h // sy))).astype(int))
        xs = np.unique(np.linspace(0, w - sx, min(n, max(1, w // sx))).astype(int))
        return np.stack([self.region(y, y + sy, x, x + sx) for y in ys for x in xs])


def is_large_field(path: str, limit: int = LARGE_FIELD_PIXELS) -> bool:
    """True when ``path`` is a bioio-read field with more than ``limit`` pixels per plane."""
    from . import handles

    if not handles(path):
        return False
    loc = parse(path)
    info = describe(loc.file, loc.scene)
    return info.y * info.x > limit


def tiles(shape: tuple[int, int], tile: int, margin: int) -> Iterator[Tile]:
    """Tiles of ``tile`` pixels covering ``shape``, each read with ``margin`` extra pixels on every side."""
    h, w = shape
    for i in range(math.ceil(h / tile)):
        for j in range(math.ceil(w / tile)):
            y0, x0 = i * tile, j * tile
            y1, x1 = min(h, y0 + tile), min(w, x0 + tile)
            yield Tile((y0, y1, x0, x1), (max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)))


def large_labels_path(labels_dir: str, field_id: str) -> str:
    """Where the label image of a large field goes: a Zarr array beside the label TIFFs of ordinary fields."""
    from ..segment.outputs import safe_name

    os.makedirs(labels_dir, exist_ok=True)
    return os.path.join(labels_dir, f"{safe_name(field_id)}.zarr")
