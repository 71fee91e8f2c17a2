"""Sliding-window patches over a whole field; every patch is addressed by its (y, x) offset."""

from __future__ import annotations

import numpy as np

from ..errors import EmbedkitError


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Start positions of windows of ``size`` every ``stride`` pixels, plus one flush with the far edge.

    The extra last window means no strip of the field is left out; a field smaller than ``size`` has none.
    """
    if size < 1 or stride < 1:
        raise EmbedkitError(f"patch size {size} and stride {stride} must both be positive")
    if length < size:
        return []
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def patch_offsets(shape: tuple[int, int], size: int, stride: int) -> np.ndarray:
    """(y, x) offsets of all windows over a field of ``shape``, row by row; int32 [N, 2]."""
    ys, xs = window_starts(shape[0], size, stride), window_starts(shape[1], size, stride)
    if not ys or not xs:
        return np.zeros((0, 2), np.int32)
    return np.array([(y, x) for y in ys for x in xs], np.int32)


def cut_patches(image: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """The windows of ``image`` at ``offsets``: [N, size, size, C] (a 2-D image gets C = 1)."""
    img = image if image.ndim == 3 else image[:, :, None]
    out = np.empty((len(offsets), size, size, img.shape[2]), img.dtype)
    for k, (y, x) in enumerate(offsets):
        out[k] = img[y:y + size, x:x + size]
    return out


def window_means(plane: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """Mean of a 2-D plane over each window (summed-area table, exact); float64 [N]."""
    p = np.asarray(plane, np.float64)
    sat = np.zeros((p.shape[0] + 1, p.shape[1] + 1))
    sat[1:, 1:] = p.cumsum(0).cumsum(1)
    y, x = offsets[:, 0].astype(np.int64), offsets[:, 1].astype(np.int64)
    total = sat[y + size, x + size] - sat[y, x + size] - sat[y + size, x] + sat[y, x]
    return total / float(size * size)
