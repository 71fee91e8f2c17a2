"""Stage 2 of the duplicate search: align a candidate onto the query and measure what still matches.

1. **Coarse search** on the SMALL canvases: the query's band-passed image is rotated in 15-degree steps,
   plain and mirrored (48 hypotheses; ECC then finds zoom and shear); FFT cross-correlation gives each one's best shift.
2. **Refinement** of the best hypotheses with OpenCV's ECC (a full affine warp: rotation, shear, zoom,
   shift), on the detailed canvases, where both images hold real pixels.
3. **Scores** over the central part of the overlap (augmented copies have filled-in borders): the
   correlation of the band-passed images (texture and outline, ``mid``) and of their finest detail
   (``fine``). Copies keep both; distinct cells that merely look alike keep at most the outline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from .prepare import SMALL, Prepared

ANGLE_STEP = 15
_ANGLES = np.arange(0, 360, ANGLE_STEP, dtype=np.float64)
#: Zooms tried by the coarse search (more zooms found no more copies on the benchmark: ECC finds them).
SCALES = (1.0,)
#: Difference-of-Gaussians band (sigmas, small-canvas pixels) of the coarse search.
COARSE_BAND = (0.8, 2.5)
#: Radius of the central region compared, as a fraction of the canvas side.
CENTRAL = 0.42


@dataclass
class Match:
    """How well a candidate matches the query after alignment."""

    mid: float
    fine: float
    overlap: float
    coarse: float  # band-passed correlation at the best coarse hypothesis (small canvases)
    small: float  # the same after ECC on the small canvases
    flat: float = -1.0  # correlation of the finest detail in the flattest half of the overlap (noise, texture)


def dog(x: np.ndarray, s1: float, s2: float) -> np.ndarray:
    """Difference of Gaussians (band-pass)."""
    import cv2

    return cv2.GaussianBlur(x, (0, 0), s1) - cv2.GaussianBlur(x, (0, 0), s2)


def _window(n: int) -> np.ndarray:
    w = np.hanning(n + 2)[1:-1]
    return np.outer(w, w).astype(np.float32)


_SMALL_WINDOW = _window(SMALL)


def _hypothesis_matrices() -> np.ndarray:
    """[len(SCALES) * 48, 3, 3] maps from query SMALL coordinates to its scaled, rotated (and mirrored) versions."""
    import cv2

    c = ((SMALL - 1) / 2, (SMALL - 1) / 2)
    flip = np.array([[-1, 0, SMALL - 1], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    out = []
    for scale in SCALES:
        for mirror in (False, True):
            for a in _ANGLES:
                m = np.vstack([cv2.getRotationMatrix2D(c, float(a), scale), [0, 0, 1]])
                out.append(m @ flip if mirror else m)
    return np.stack(out)


_HYPOTHESES = _hypothesis_matrices()


class Query:
    """A query image with the spectra of its scaled, rotated and mirrored band-passed versions (one per hypothesis)."""

    def __init__(self, prep: Prepared):
        import cv2

        self.prep = prep
        band = dog(prep.small, *COARSE_BAND) * prep.small_mask
        views = [cv2.warpAffine(band, m[:2], (SMALL, SMALL), flags=cv2.INTER_LINEAR) for m in _HYPOTHESES]
        self.spectra = np.conj(sfft.rfft2(np.stack(views) * _SMALL_WINDOW))

    def coarse(self, cands: list[Prepared], keep: int = 2) -> list[list[tuple[int, int, int]]]:
        """For each candidate, the ``keep`` best (hypothesis, dy, dx) by circular cross-correlation."""
        if not cands:
            return []
        bands = np.stack([dog(c.small, *COARSE_BAND) * c.small_mask for c in cands]) * _SMALL_WINDOW
        cc = sfft.irfft2(self.spectra[None] * sfft.rfft2(bands)[:, None], s=(SMALL, SMALL))
        flat = cc.reshape(len(cands), len(_HYPOTHESES), -1)
        peak_pos = flat.argmax(axis=2)
        peak = np.take_along_axis(flat, peak_pos[..., None], axis=2)[..., 0]
        out = []
        for j in range(len(cands)):
            order = np.argsort(-peak[j])[:keep]
            hyps = []
            for h in order:
                dy, dx = divmod(int(peak_pos[j, h]), SMALL)
                hyps.append((int(h), dy - SMALL if dy >= SMALL // 2 else dy, dx - SMALL if dx >= SMALL // 2 else dx))
            out.append(hyps)
        return out


def _scaled(warp: np.ndarray, n_query: int, n_cand: int, from_query: int, from_cand: int) -> np.ndarray:
    """Re-express a 2x3 query->candidate map between canvases of other sizes."""
    full = np.vstack([warp, [0, 0, 1]]).astype(np.float64)
    full = np.diag([n_cand / from_cand, n_cand / from_cand, 1.0]) @ full @ np.diag([from_query / n_query, from_query / n_query, 1.0])
    return full[:2].astype(np.float32)


def _coarse_warp(h: int, dy: int, dx: int) -> np.ndarray:
    """2x3 map from query SMALL coordinates to candidate SMALL coordinates for a coarse hypothesis."""
    m = _HYPOTHESES[h].copy()
    m[:2, 2] += (dx, dy)
    return m[:2].astype(np.float32)


_DISCS: dict[int, np.ndarray] = {}


def _disc(n: int) -> np.ndarray:
    if n not in _DISCS:
        yy, xx = np.mgrid[:n, :n]
        c = (n - 1) / 2
        _DISCS[n] = (((yy - c) ** 2 + (xx - c) ** 2) <= (CENTRAL * n) ** 2).astype(np.float32)
    return _DISCS[n]


def _wncc(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    sw = float(w.sum())
    if sw < 16:
        return -1.0
    da = a - (a * w).sum() / sw
    db = b - (b * w).sum() / sw
    den = np.sqrt(float((da * da * w).sum()) * float((db * db * w).sum()))
    return float((da * db * w).sum() / den) if den > 1e-12 else -1.0


def _ecc(xq: np.ndarray, xc: np.ndarray, warp: np.ndarray, weight: np.ndarray, sigma: float, iterations: int) -> np.ndarray:
    """OpenCV ECC affine refinement of a query->candidate warp; the input warp when it does not converge."""
    import cv2

    try:
        _, out = cv2.findTransformECC(cv2.GaussianBlur(xq, (0, 0), sigma), cv2.GaussianBlur(xc, (0, 0), sigma), warp.copy(),
                                      cv2.MOTION_AFFINE, (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 1e-3),
                                      (weight > 0).astype(np.uint8), 1)
    except cv2.error:
        return warp
    lin = out[:, :2].astype(np.float64)
    sv = np.linalg.svd(lin, compute_uv=False)
    if not (0.5 < sv[1] and sv[0] < 2.0):  # collapsed onto a corner or blown up: not a copy's warp
        return warp
    return out


def _aligned(xq: np.ndarray, mq: np.ndarray, xc: np.ndarray, mc: np.ndarray, warp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The candidate resampled into query coordinates, and the weight of the central overlap."""
    import cv2

    n = xq.shape[0]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    back = cv2.warpAffine(xc, warp, (n, n), flags=flags)
    valid = cv2.warpAffine(mc * _disc(xc.shape[0]), warp, (n, n), flags=flags)
    return back, mq * _disc(n) * (valid > 0.99)


def match(query: Query, cands: list[Prepared], coarse_gate: float = 0.5, gate: float = 0.75, keep: int = 12,
          refine: int = 2) -> list[Match]:
    """Aligned match of each candidate onto the query, in three steps that each may stop early.

    The ``keep`` strongest coarse hypotheses are re-ranked by their band-passed correlation on the small
    canvases; the best must reach ``coarse_gate``; the ``TINY_KEEP`` best are refined on tiny canvases and
    re-ranked. The ``refine`` best are refined by ECC there and the
    best result must reach ``gate``; only then is the detailed alignment made and scored."""
    q = query.prep
    band_q = dog(q.small, *COARSE_BAND)
    central_small = q.small_mask * _disc(SMALL)
    out = []
    for cand, hyps in zip(cands, query.coarse(cands, keep)):
        band_c = dog(cand.small, *COARSE_BAND)
        ranked = []
        for h, dy, dx in hyps:
            w0 = _coarse_warp(h, dy, dx)
            ranked.append((_wncc(band_q, *_aligned(band_q, q.small_mask, band_c, cand.small_mask, w0)), w0))
        ranked.sort(key=lambda x: -x[0])
        coarse = ranked[0][0]
        if coarse < coarse_gate:
            out.append(Match(coarse, -1.0, 0.0, coarse, coarse))
            continue
        if refine < len(ranked) and TINY_REFINE:
            ranked = _tiny_rerank(q, cand, ranked[:TINY_KEEP])
        small, warp = -2.0, None
        for _, w0 in ranked[:refine]:
            w1 = _ecc(q.small, cand.small, w0, central_small, 0.8, 15)
            score = _wncc(band_q, *_aligned(band_q, q.small_mask, band_c, cand.small_mask, w1))
            if score > small:
                small, warp = score, w1
        if small < gate:
            out.append(Match(small, -1.0, 0.0, coarse, small))
            continue
        nq, nc = q.detail.shape[0], cand.detail.shape[0]
        central = q.detail_mask * _disc(nq)
        warp = _ecc(q.detail, cand.detail, _scaled(warp, nq, nc, SMALL, SMALL), central, 1.0, 15)
        back, w = _aligned(q.detail, q.detail_mask, cand.detail, cand.detail_mask, warp)
        mid = _wncc(dog(q.detail, 1.0, 3.0), dog(back, 1.0, 3.0), w)
        fine_q, fine_c = q.detail - _blur(q.detail, 1.2), back - _blur(back, 1.2)
        fine = _wncc(fine_q, fine_c, w)
        flat_w = w * _flattest(q.detail, w)
        flat = _wncc(_clipped(fine_q, flat_w), _clipped(fine_c, flat_w), flat_w)
        out.append(Match(mid, fine, float(w.sum() / max(central.sum(), 1.0)), coarse, small, flat))
    return out


TINY_REFINE = True
TINY = 16
#: Hypotheses (best by small-canvas correlation) refined on 16-pixel canvases: 12 found no more copies than 4
#: on the benchmark and cost 40 % more.
TINY_KEEP = 4


def _tiny_rerank(q: Prepared, cand: Prepared, ranked: list) -> list:
    """Refine every kept hypothesis by a few ECC steps on 16-pixel canvases and re-rank them by correlation there."""
    import cv2

    half = TINY / SMALL
    xq = cv2.resize(q.small, (TINY, TINY), interpolation=cv2.INTER_AREA)
    xc = cv2.resize(cand.small, (TINY, TINY), interpolation=cv2.INTER_AREA)
    mq = (cv2.resize(q.small_mask, (TINY, TINY)) > 0.5).astype(np.float32)
    mc = (cv2.resize(cand.small_mask, (TINY, TINY)) > 0.5).astype(np.float32)
    central = mq * _disc(TINY)
    out = []
    for _, w0 in ranked:
        w = _ecc(xq, xc, _scaled(w0, TINY, TINY, SMALL, SMALL), central, 0.6, 10)
        score = _wncc(xq, *_aligned(xq, mq, xc, mc, w))
        out.append((score, _scaled(w, SMALL, SMALL, TINY, TINY)))
    out.sort(key=lambda x: -x[0])
    return out


def _flattest(x: np.ndarray, w: np.ndarray, share: float = 0.5) -> np.ndarray:
    """Mask of the ``share`` of weighted pixels with the least structure (gradient and curvature at the
    cell's scale): away from outlines and blob peaks, where only texture and noise remain, which a copy
    shares with its original and a look-alike does not."""
    import cv2

    smooth = _blur(x, 1.5)
    gy, gx = np.gradient(smooth)
    structure = gx * gx + gy * gy + cv2.Laplacian(smooth, cv2.CV_32F) ** 2
    inside = w > 0
    if not inside.any():
        return inside.astype(np.float32)
    return (structure <= np.quantile(structure[inside], share)).astype(np.float32)


def _clipped(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A detail band clipped at 3 robust standard deviations, so that no single pixel decides a correlation."""
    inside = f[w > 0]
    if inside.size == 0:
        return f
    s = 1.4826 * float(np.median(np.abs(inside - np.median(inside)))) + 1e-6
    return np.clip(f, -3 * s, 3 * s)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(x, (0, 0), sigma)
