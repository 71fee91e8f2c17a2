"""Bringing images to one physical pixel size, so cells imaged with different objectives compare."""

from __future__ import annotations

import numpy as np


def resample_factor(pixel_size: tuple[float, float] | None, target: float | None) -> tuple[float, float] | None:
    """Output pixels per input pixel along (Y, X), or None when there is nothing to do or nothing known."""
    if target is None or pixel_size is None:
        return None
    fy, fx = pixel_size[0] / target, pixel_size[1] / target
    if abs(fy - 1) < 1e-6 and abs(fx - 1) < 1e-6:
        return None
    return fy, fx


def resample(arr: np.ndarray, factor: tuple[float, float]) -> np.ndarray:
    """Resize an (H, W, C) array by ``factor`` (antialiased when shrinking), keeping its dtype and range."""
    from skimage.transform import resize

    h, w = arr.shape[:2]
    shape = (max(1, int(round(h * factor[0]))), max(1, int(round(w * factor[1]))))
    out = resize(arr.astype(np.float32), shape + arr.shape[2:], order=1, mode="reflect",
                 anti_aliasing=factor[0] < 1 or factor[1] < 1, preserve_range=True)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(arr.dtype)
    return out.astype(arr.dtype)
