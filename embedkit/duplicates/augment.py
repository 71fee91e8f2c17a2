"""Seeded augmented copies of cell crops: the transforms public datasets save beside their originals.

Used to measure the duplicate detector (scripts/bench_leaks.py, tests): each copy is the original warped
by a random affine transform (any rotation, optional mirror, shift up to 20 % of the crop, shear up to
0.2, zoom 0.8-1.2 per axis) with a random border fill (black, nearest or reflect), then given a random
brightness and contrast change of up to 30 % and re-compressed as JPEG. The copy keeps the original's shape.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

FILLS = ("constant", "nearest", "reflect")


@dataclass(frozen=True)
class AugmentRange:
    """Limits of the random transforms (fractions of the crop size for shift)."""

    max_shift: float = 0.2
    max_shear: float = 0.2
    zoom: tuple[float, float] = (0.8, 1.2)
    max_intensity: float = 0.3
    jpeg_quality: tuple[int, int] = (60, 95)
    mirror: bool = True


def augmented_copy(img: np.ndarray, rng: np.random.Generator, limits: AugmentRange = AugmentRange()) -> np.ndarray:
    """One random augmented copy of a uint8 grey or RGB crop, same shape and dtype."""
    import cv2

    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"augmented_copy needs a uint8 image (JPEG is 8-bit), got {img.dtype}")
    h, w = img.shape[:2]
    theta = rng.uniform(0, 2 * np.pi)
    zx, zy = rng.uniform(*limits.zoom, size=2)
    shear = rng.uniform(-limits.max_shear, limits.max_shear)
    shift = rng.uniform(-limits.max_shift, limits.max_shift, size=2) * (w, h)
    mirror = limits.mirror and rng.random() < 0.5
    c, s = np.cos(theta), np.sin(theta)
    lin = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([zx, zy])
    if mirror:
        lin = lin @ np.diag([-1.0, 1.0])
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    offset = centre + shift - lin @ centre
    fill = FILLS[rng.integers(len(FILLS))]
    border = {"constant": cv2.BORDER_CONSTANT, "nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101}[fill]
    warped = cv2.warpAffine(img.astype(np.float32), np.hstack([lin, offset[:, None]]), (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=border, borderValue=0)
    gain, bias = rng.uniform(1 - limits.max_intensity, 1 + limits.max_intensity, size=2)
    mean = float(img.mean())
    out = np.clip(np.rint((warped - mean) * gain + mean * bias), 0, 255).astype(np.uint8)
    return _jpeg(out, int(rng.integers(limits.jpeg_quality[0], limits.jpeg_quality[1] + 1)))


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through JPEG at ``quality``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert(Image.fromarray(img).mode))
