"""Stage 1 of the duplicate search: small descriptors that stay close under rotation, shift and zoom.

Two blocks, each a set of rotation- and mirror-invariant magnitudes:

* **spectrum**: the Fourier magnitude of the windowed image (blind to shifts), resampled on a polar
  grid; the magnitudes of its angular Fourier series per ring are blind to rotation and mirroring.
* **polar**: the image sampled on rings around the cell (the brightness-weighted centre
  found by mean shift from the crop centre), again as angular Fourier magnitudes per ring.

They only have to put a copy among an item's k nearest candidates; stage 2 (:mod:`.align`) decides.
"""

from __future__ import annotations

import numpy as np

from .prepare import SMALL

RINGS_SPECTRUM, RINGS_POLAR, ANGLES = 12, 10, 32
HARMONICS_SPECTRUM, HARMONICS_POLAR = 6, 8
DIM = RINGS_SPECTRUM * HARMONICS_SPECTRUM + RINGS_POLAR * HARMONICS_POLAR
_PAD = 8


def _grid(radii: np.ndarray, half_turn: bool) -> tuple[np.ndarray, np.ndarray]:
    theta = np.linspace(0, np.pi if half_turn else 2 * np.pi, ANGLES, endpoint=False)
    return (radii[:, None] * np.cos(theta)[None]).astype(np.float32), (radii[:, None] * np.sin(theta)[None]).astype(np.float32)


_N_SPEC = SMALL + 2 * _PAD
_SPEC_GRID = _grid(np.linspace((_N_SPEC / 2 - 1) / RINGS_SPECTRUM, _N_SPEC / 2 - 1, RINGS_SPECTRUM), True)
_POLAR_GRID = _grid(np.linspace(0.4 * SMALL / RINGS_POLAR, 0.4 * SMALL, RINGS_POLAR), False)
_WINDOW = np.outer(np.hanning(_N_SPEC), np.hanning(_N_SPEC)).astype(np.float32)


def _rings(img: np.ndarray, cx: float, cy: float, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    import cv2

    return cv2.remap(img, grid[0] + np.float32(cx), grid[1] + np.float32(cy), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _harmonics(rings: np.ndarray, n: int) -> np.ndarray:
    return np.abs(np.fft.rfft(rings, axis=-1))[..., :n]


def centre(x: np.ndarray, steps: int = 5) -> tuple[float, float]:
    """Centre of the object nearest the crop centre: mean shift of the contrast-weighted centroid."""
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    w = np.abs(x - np.median(border))
    w = np.maximum(w - np.median(w), 0)
    n = x.shape[0]
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    cx = cy = (n - 1) / 2
    sigma2 = 2 * (0.3 * n) ** 2
    for _ in range(steps):
        g = w * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / sigma2)
        s = g.sum()
        if s <= 1e-9:
            break
        cx, cy = float((g * xx).sum() / s), float((g * yy).sum() / s)
    return cx, cy


def describe(small: np.ndarray) -> np.ndarray:
    """Descriptor [DIM] of one z-scored SMALL x SMALL canvas (unnormalised blocks)."""
    import cv2

    padded = cv2.copyMakeBorder(small, _PAD, _PAD, _PAD, _PAD, cv2.BORDER_REPLICATE)
    padded = (padded - padded.mean()) * _WINDOW
    spectrum = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(padded)))).astype(np.float32)
    spec = _harmonics(_rings(spectrum, _N_SPEC / 2, _N_SPEC / 2, _SPEC_GRID), HARMONICS_SPECTRUM)
    cx, cy = centre(small)
    polar = _harmonics(_rings(small, cx, cy, _POLAR_GRID), HARMONICS_POLAR)
    return np.concatenate([spec.ravel(), polar.ravel()]).astype(np.float32)


def normalise(desc: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardise each dimension (statistics of this set unless given), then scale rows to unit length."""
    mean = desc.mean(axis=0) if mean is None else mean
    std = desc.std(axis=0) + 1e-6 if std is None else std
    z = (desc - mean) / std
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    return z.astype(np.float32), mean, std
