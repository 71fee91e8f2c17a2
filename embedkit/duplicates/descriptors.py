"""Stage 1 of the duplicate search: descriptors that stay close under rotation, mirroring, shift and zoom.

Two blocks of rotation- and mirror-invariant numbers, each from rings of samples:

* **polar**: the image sampled on rings around the cell (the strongest blob of contrast within the
  central disc, refined to its local centroid), and
* **spectrum**: the Fourier magnitude of the windowed image (blind to shifts), on rings around its centre.

Per ring, the magnitudes of its angular Fourier series; between neighbouring rings, the phase
differences of each harmonic (``Re`` and ``|Im|`` of c[r, m] * conj(c[r + 1, m]), magnitude-normalised);
within a ring, the phase couplings c1^2 conj(c2) and c1 c2 conj(c3). A rotation multiplies c[r, m] by the
same phase on every ring and a mirror conjugates them, so all of these are unchanged, but unlike plain
magnitudes they keep how the rings line up.

:class:`Metric` then weighs the numbers by how well they survive augmentation *on the data at hand*: it is
fitted on pairs of seeded augmented copies (:mod:`.augment`) of the catalog's own items, and whitens the
within-copy scatter (a Mahalanobis metric), so numbers that augmentation scrambles count little. The
descriptors only have to put a copy among an item's k nearest candidates; stage 2 (:mod:`.align`) decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .prepare import SMALL

RINGS_POLAR, HARMONICS_POLAR = 10, 8
RINGS_SPECTRUM, HARMONICS_SPECTRUM = 12, 6
ANGLES = 32
_PAD = 8


def _block_dim(rings: int, harmonics: int) -> int:
    return rings * (harmonics + 1) + 2 * (rings - 1) * harmonics + 4 * rings


DIM = _block_dim(RINGS_POLAR, HARMONICS_POLAR) + _block_dim(RINGS_SPECTRUM, HARMONICS_SPECTRUM)


def _grid(radii: np.ndarray, half_turn: bool) -> tuple[np.ndarray, np.ndarray]:
    theta = np.linspace(0, np.pi if half_turn else 2 * np.pi, ANGLES, endpoint=False)
    return (radii[:, None] * np.cos(theta)[None]).astype(np.float32), (radii[:, None] * np.sin(theta)[None]).astype(np.float32)


_N_SPEC = SMALL + 2 * _PAD
_SPEC_GRID = _grid(np.linspace((_N_SPEC / 2 - 1) / RINGS_SPECTRUM, _N_SPEC / 2 - 1, RINGS_SPECTRUM), True)
_POLAR_GRID = _grid(np.linspace(0.4 * SMALL / RINGS_POLAR, 0.4 * SMALL, RINGS_POLAR), False)
_WINDOW = np.outer(np.hanning(_N_SPEC), np.hanning(_N_SPEC)).astype(np.float32)
_YY, _XX = np.mgrid[:SMALL, :SMALL].astype(np.float32)
_C = (SMALL - 1) / 2
#: Blobs are looked for within this radius of the crop centre (fraction of the side): a copy shifted by
#: 20 % still holds its cell there.
CENTRE_RADIUS = 0.4
#: Scale of the blobs (Gaussian sigma, fraction of the side).
BLOB_SIGMA = 0.08
_CENTRAL = ((_YY - _C) ** 2 + (_XX - _C) ** 2) <= (CENTRE_RADIUS * SMALL) ** 2


def _rings(img: np.ndarray, cx: float, cy: float, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    import cv2

    return cv2.remap(img, grid[0] + np.float32(cx), grid[1] + np.float32(cy), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _invariants(rings: np.ndarray, harmonics: int) -> np.ndarray:
    """Rotation- and mirror-invariant numbers of [rings, angles] samples (see the module docstring)."""
    c = np.fft.rfft(rings, axis=-1)[:, :harmonics + 1]
    lag = c[:-1, 1:] * np.conj(c[1:, 1:])
    norm = np.sqrt(np.abs(lag)) + 1e-6
    b12 = c[:, 1] ** 2 * np.conj(c[:, 2])
    b123 = c[:, 1] * c[:, 2] * np.conj(c[:, 3])
    n12, n123 = np.abs(b12) ** (2 / 3) + 1e-6, np.abs(b123) ** (2 / 3) + 1e-6
    return np.concatenate([np.abs(c).ravel(), (lag.real / norm).ravel(), (np.abs(lag.imag) / norm).ravel(),
                           b12.real / n12, np.abs(b12.imag) / n12, b123.real / n123, np.abs(b123.imag) / n123])


def _contrast(x: np.ndarray) -> np.ndarray:
    """How far each pixel stands out from the crop's border, above the median such distance."""
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    w = np.abs(x - np.median(border))
    return np.maximum(w - np.median(w), 0)


def centre(x: np.ndarray) -> tuple[float, float]:
    """Centre of the strongest blob of contrast (against the crop's border) peaking within the central disc
    of a SMALL canvas, refined to the contrast-weighted centroid around it."""
    import cv2

    w = _contrast(x)
    sigma = BLOB_SIGMA * SMALL
    g = cv2.GaussianBlur(w, (0, 0), sigma)
    peaks = np.where(_CENTRAL & (g >= cv2.dilate(g, np.ones((5, 5), np.uint8))), g, -1)  # true maxima, not a slope at the rim
    if peaks.max() < 0:  # flat crop
        return _C, _C
    cy, cx = np.unravel_index(int(np.argmax(peaks)), g.shape)
    near = w * np.exp(-((_XX - cx) ** 2 + (_YY - cy) ** 2) / (2 * (1.5 * sigma) ** 2))
    s = float(near.sum())
    if s <= 1e-9:
        return float(cx), float(cy)
    return float((near * _XX).sum() / s), float((near * _YY).sum() / s)


def middle(x: np.ndarray, steps: int = 5) -> tuple[float, float]:
    """Centre of the object nearest the middle of a SMALL canvas: mean shift of the contrast-weighted centroid
    from the middle (another guess than :func:`centre` where several cells share a crop)."""
    w = _contrast(x)
    cx = cy = _C
    for _ in range(steps):
        g = w * np.exp(-((_XX - cx) ** 2 + (_YY - cy) ** 2) / (2 * (0.3 * SMALL) ** 2))
        s = float(g.sum())
        if s <= 1e-9:
            break
        cx, cy = float((g * _XX).sum() / s), float((g * _YY).sum() / s)
    return cx, cy


def describe(small: np.ndarray) -> np.ndarray:
    """Raw descriptor [DIM] of one z-scored SMALL x SMALL canvas (before :class:`Metric`)."""
    import cv2

    cx, cy = centre(small)
    polar = _invariants(_rings(small, cx, cy, _POLAR_GRID), HARMONICS_POLAR)
    padded = cv2.copyMakeBorder(small, _PAD, _PAD, _PAD, _PAD, cv2.BORDER_REPLICATE)
    padded = (padded - padded.mean()) * _WINDOW
    spectrum = np.fft.fftshift(np.log1p(cv2.magnitude(*cv2.split(cv2.dft(padded, flags=cv2.DFT_COMPLEX_OUTPUT)))))
    spec = _invariants(_rings(spectrum, _N_SPEC / 2, _N_SPEC / 2, _SPEC_GRID), HARMONICS_SPECTRUM)
    return np.concatenate([polar, spec]).astype(np.float32)


def describe_canvas(canvas_u8: np.ndarray) -> np.ndarray:
    """Raw descriptor of one uint8 square canvas (:func:`.prepare.canvas`)."""
    from .prepare import small_canvas

    small = small_canvas(canvas_u8)
    return describe(((small - small.mean()) / (small.std() + 1e-3)).astype(np.float32))


#: Pairs of augmented copies the metric is fitted on (fewer for small catalogs, see :func:`fit_metric`).
FIT_PAIRS = 1500
#: Shrinkage of the within-copy scatter towards its diagonal (it is estimated from a few thousand pairs).
SHRINK = 0.3


@dataclass
class Metric:
    """Standardisation and whitening of raw descriptors: ``normalised((raw - mean) / std @ projection)``."""

    mean: np.ndarray
    std: np.ndarray
    projection: np.ndarray | None = None

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        z = (np.asarray(raw, np.float32) - self.mean) / self.std
        if self.projection is not None:
            z = z @ self.projection
        z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
        return z.astype(np.float32)


def augmented_pairs(canvases: Sequence[np.ndarray], seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two seeded augmented copies each of random canvases (``FIT_PAIRS``, or twice the items and at least
    500 for small sets; none for fewer than 2 items): what :func:`fit_metric` learns from."""
    from .augment import augmented_copy

    if len(canvases) < 2:
        return [], []
    rng = np.random.default_rng(seed)
    n = min(FIT_PAIRS, max(500, 2 * len(canvases)))
    picks = rng.choice(len(canvases), n, replace=n > len(canvases))
    return [augmented_copy(canvases[i], rng) for i in picks], [augmented_copy(canvases[i], rng) for i in picks]


def fit_metric(raw: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray) -> Metric:
    """Metric for ``raw`` descriptors that whitens the scatter between the raw descriptors of augmented
    pairs (:func:`augmented_pairs`), shrunk towards its diagonal; plain standardisation without pairs."""
    import scipy.linalg

    mean, std = raw.mean(axis=0), raw.std(axis=0) + 1e-6
    if not len(pair_a):
        return Metric(mean, std)
    diff = (pair_a - pair_b) / std
    within = diff.T @ diff / len(diff)
    within = (1 - SHRINK) * within + SHRINK * np.diag(np.diag(within)) + 1e-4 * np.eye(len(within))
    lower = np.linalg.cholesky(within)  # z @ inv(lower).T has unit within-copy scatter
    return Metric(mean, std, scipy.linalg.solve_triangular(lower, np.eye(len(lower)), lower=True).T.astype(np.float32))
