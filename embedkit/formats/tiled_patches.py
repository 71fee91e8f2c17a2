"""Sliding-window patches of a field too large for memory, read tile by tile.

The windows are those of :func:`embedkit.segment.patches.patch_offsets` over the whole field. Each tile
of the field is read with ``size`` extra pixels below and to the right, so every window that starts
inside it is complete. Intensities use percentiles sampled across the field (as in
:mod:`embedkit.formats.tiled`), and the simple filter's background is the median over the same samples.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadImageError
from ..images import Conversion
from ..segment.filters import SimpleFilter, decide
from ..segment.patches import cut_patches, patch_offsets
from .lazy import LazyField
from .tiled import DEFAULT_TILE, channel_sources, field_scaling


def _u8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def large_field_patches(locator: str, size: int, stride: int, *, conv: Conversion = Conversion(), filt=None,
                        paired=None, device: str = "cpu", batch_size: int = 32, tile: int = DEFAULT_TILE) -> dict[str, np.ndarray]:
    """The kept windows of a large field with their measurements, as the patch journal stores them."""
    if paired is not None:
        raise BadImageError(locator, "labels from a paired channel are not supported for fields read tile by tile; "
                                     "cut the field into smaller files first")
    field = LazyField(locator)
    h, w = field.shape
    scaling = field_scaling(field, conv, channel_sources(conv, field.channels, locator))
    background = float(np.median(SimpleFilter.gray(np.stack([_u8(scaling.apply(s)) for s in field.sample()]))))
    offsets = patch_offsets((h, w), size, stride)
    parts = []
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            sel = (offsets[:, 0] >= y0) & (offsets[:, 0] < y0 + tile) & (offsets[:, 1] >= x0) & (offsets[:, 1] < x0 + tile)
            if not sel.any():
                continue
            off = offsets[sel]
            y1, x1 = int(off[:, 0].max()) + size, int(off[:, 1].max()) + size
            rgb = _u8(scaling.apply(field.region(y0, y1, x0, x1)))
            patches = cut_patches(rgb, off - np.array([y0, x0], np.int32), size)
            fg, sd, score, keep = decide(filt, patches, background, device, batch_size)
            parts.append((off[keep], patches[keep], fg[keep], sd[keep], score[keep]))
    cat = [np.concatenate([p[i] for p in parts]) if parts else None for i in range(5)]
    n = 0 if cat[0] is None else len(cat[0])
    empty = (np.zeros((0, 2), np.int32), np.zeros((0, size, size, 3), np.uint8)) + (np.zeros(0, np.float32),) * 3
    off, pixels, fg, sd, score = (c if c is not None else e for c, e in zip(cat, empty))
    return {"n_windows": np.array([len(offsets)]), "offset": off, "pixels": pixels, "foreground": fg, "std": sd,
            "filter_score": score, "paired_mean": np.full(n, np.nan, np.float64)}
