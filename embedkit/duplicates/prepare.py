"""Images as the duplicate detector sees them: grey, on a square canvas with a mask of real pixels.

Non-square crops are padded to square by repeating their edge pixels, never with zeros: a black band
would dominate band-passed comparisons and make every crop of one shape look alike. The mask records
which canvas pixels are real, so the verifier compares only those. Canvases are kept as uint8 (4 KB
for a 64 x 64 crop), so 100,000 items fit in memory; :class:`Prepared` is made from one when needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Side of the small canvas used for candidate descriptors and the first alignment.
SMALL = 32
#: Largest side of the detailed canvas used for verification (larger crops are shrunk to it).
DETAIL = 64


def grey(img: np.ndarray) -> np.ndarray:
    """Float32 grey plane of a [H, W] or [H, W, C] image (alpha ignored)."""
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
    return a


def canvas(img: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(uint8 square canvas of side min(max(h, w), DETAIL) but >= SMALL, h, w) of one crop."""
    import cv2

    a = grey(img)
    if a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"not an image: shape {np.shape(img)}")
    if np.asarray(img).dtype != np.uint8:
        lo, hi = np.percentile(a, (0.5, 99.5))
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else a * 0
    h, w = a.shape
    m = max(h, w)
    top, left = (m - h) // 2, (m - w) // 2
    sq = cv2.copyMakeBorder(np.ascontiguousarray(a, dtype=np.float32), top, m - h - top, left, m - w - left,
                            cv2.BORDER_REPLICATE)
    n = int(min(DETAIL, max(SMALL, m)))
    if n != m:
        sq = cv2.resize(sq, (n, n), interpolation=cv2.INTER_AREA if m > n else cv2.INTER_LINEAR)
    return np.clip(np.rint(sq), 0, 255).astype(np.uint8), h, w


def mask(n: int, h: int, w: int) -> np.ndarray:
    """Float32 [n, n] mask of the canvas pixels that come from the h x w crop (not from padding)."""
    m = max(h, w)
    out = np.zeros((n, n), np.float32)
    top, left = (m - h) / 2 * n / m, (m - w) / 2 * n / m
    out[int(np.ceil(top - 0.5)):int(np.floor(top + h * n / m + 0.5)),
        int(np.ceil(left - 0.5)):int(np.floor(left + w * n / m + 0.5))] = 1
    return out


def _zscore(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    vals = x[m > 0]
    if vals.size < 2:
        vals = x.ravel()
    return ((x - vals.mean()) / (vals.std() + 1e-3)).astype(np.float32)


def small_canvas(detail: np.ndarray) -> np.ndarray:
    """The SMALL x SMALL float32 version of a canvas."""
    import cv2

    x = detail.astype(np.float32)
    return x if x.shape[0] == SMALL else cv2.resize(x, (SMALL, SMALL), interpolation=cv2.INTER_AREA)


@dataclass
class Prepared:
    """One image: z-scored ``small`` [SMALL, SMALL] and ``detail`` [n, n] canvases with their masks (and what
    the verifier derives from them once, in ``cache``)."""

    small: np.ndarray
    small_mask: np.ndarray
    detail: np.ndarray
    detail_mask: np.ndarray
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_canvas(cls, canvas_u8: np.ndarray, h: int, w: int) -> "Prepared":
        n = canvas_u8.shape[0]
        dm, sm = mask(n, h, w), mask(SMALL, h, w)
        return cls(_zscore(small_canvas(canvas_u8), sm), sm, _zscore(canvas_u8.astype(np.float32), dm), dm)


def prepare(img: np.ndarray) -> Prepared:
    """Prepared canvases of one crop."""
    return Prepared.from_canvas(*canvas(img))
