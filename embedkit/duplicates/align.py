"""Stage 2 of the duplicate search: align a candidate onto the query and measure what still matches.

1. **Hypotheses** from the cells' centres, two guesses per image (:func:`.descriptors.centre`,
   :func:`.descriptors.middle`): each image is sampled on rings around a guess; the circular
   cross-correlation of the rings over the angle (summed over rings) gives the rotation at its two highest
   peaks, plain or mirrored, and the centres give the shift: up to four similarity transforms from query
   to candidate, without a search.
2. **Refinement** by OpenCV's ECC (a full affine warp: rotation, shear, zoom, shift) on the small
   canvases, best starting point first, stopping once one settles (``SETTLED``); the best must reach a
   band-passed correlation ``gate`` there, or the pair stops. Only then is the warp refined again on the
   detailed canvases, where both images hold real pixels.
3. **Scores** over the central part of the overlap (augmented copies have filled-in borders): the
   correlation of the band-passed images (texture and outline, ``mid``), of their finest detail (``fine``),
   and of the finest detail in the flattest half (``flat``). Copies keep them; distinct cells that merely
   look alike keep at most the outline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .descriptors import centre, middle
from .prepare import SMALL, Prepared

#: Difference-of-Gaussians band (sigmas, small-canvas pixels) of the small-canvas correlation.
COARSE_BAND = (0.8, 2.5)
#: Radius of the central region compared, as a fraction of the canvas side.
CENTRAL = 0.42
#: Angles sampled per ring and ring radii (small-canvas pixels) of the rotation estimate.
RING_ANGLES = 64
RING_RADII = np.linspace(2.0, 12.0, 8)
#: Rotation hypotheses refined per pair of centre guesses (the highest ring-correlation peaks, plain or
#: mirrored): 2 confirmed 76 of 96 single copy pairs of the test cells, 1 confirmed 67.
HYPOTHESES = 2
#: Hypotheses are refined best first (by their correlation before refinement); the first always, later ones
#: only while their unrefined correlation reaches HYPOTHESIS_FLOOR, and none once one refines to SETTLED.
#: On 11,880 verified pairs of copies and distinct cells this cut the ECC refinements by 39 % and changed
#: whether the gate passed for 6 of the 6,855 pairs that passed it with every hypothesis refined.
HYPOTHESIS_FLOOR = 0.1
SETTLED = 0.97
_THETA = np.linspace(0, 2 * np.pi, RING_ANGLES, endpoint=False)
_RING_X = (RING_RADII[:, None] * np.cos(_THETA)[None]).astype(np.float32)
_RING_Y = (RING_RADII[:, None] * np.sin(_THETA)[None]).astype(np.float32)
_MIRRORED = (-np.arange(RING_ANGLES)) % RING_ANGLES
_PREV, _NEXT = np.roll(np.arange(RING_ANGLES), 1), np.roll(np.arange(RING_ANGLES), -1)


@dataclass
class Match:
    """How well a candidate matches the query after alignment (``small``: band-passed correlation on the
    small canvases, the gate; the rest -1 when the pair stopped there)."""

    mid: float
    fine: float
    overlap: float
    small: float
    flat: float = -1.0


def dog(x: np.ndarray, s1: float, s2: float) -> np.ndarray:
    """Difference of Gaussians (band-pass)."""
    import cv2

    return cv2.GaussianBlur(x, (0, 0), s1) - cv2.GaussianBlur(x, (0, 0), s2)


class _Rings:
    """An image's band-pass and, around each of its centre guesses (:func:`.descriptors.centre`,
    :func:`.descriptors.middle`), the angular spectra of rings, plain and mirrored."""

    def __init__(self, p: Prepared):
        import cv2

        self.band = dog(p.small, *COARSE_BAND)
        self.centres, self.spectra, self.mirrored = [], [], []
        for c in (centre(p.small), middle(p.small)):
            r = cv2.remap(p.small, _RING_X + np.float32(c[0]), _RING_Y + np.float32(c[1]), cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
            r -= r.mean(axis=1, keepdims=True)
            self.centres.append(np.array(c))
            self.spectra.append(np.fft.rfft(r, axis=1))
            self.mirrored.append(np.fft.rfft(r[:, _MIRRORED], axis=1))


def _rings(p: Prepared) -> _Rings:
    if "rings" not in p.cache:
        p.cache["rings"] = _Rings(p)
    return p.cache["rings"]


def hypotheses(q: _Rings, c: _Rings, n: int = HYPOTHESES) -> list[np.ndarray]:
    """2x3 query->candidate maps (small-canvas coordinates), ``n`` per pair of centre guesses (the second pair
    only where it differs from the first): rotations (plain or mirrored) at the highest peaks of the ring
    correlation, refined between samples by a parabola, and the shift that maps centre onto centre."""
    out = []
    for k in range(len(q.centres)):
        if k and max(np.abs(q.centres[k] - q.centres[0]).max(), np.abs(c.centres[k] - c.centres[0]).max()) < 1.5:
            continue
        found = []
        for mirror, spectra in ((False, q.spectra[k]), (True, q.mirrored[k])):
            corr = np.fft.irfft((np.conj(spectra) * c.spectra[k]).sum(axis=0), n=RING_ANGLES)
            peaks = np.flatnonzero((corr >= corr[_PREV]) & (corr > corr[_NEXT]))  # distinct angles, not one peak's flank
            for s in peaks[np.argsort(-corr[peaks])][:n]:
                y0, y1, y2 = corr[(s - 1) % RING_ANGLES], corr[s], corr[(s + 1) % RING_ANGLES]
                den = y0 - 2 * y1 + y2
                a = (s + (0.5 * (y0 - y2) / den if abs(den) > 1e-12 else 0.0)) * 2 * np.pi / RING_ANGLES
                lin = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
                if mirror:
                    lin = lin @ np.diag([1.0, -1.0])
                t = c.centres[k] - lin @ q.centres[k]
                found.append((float(y1), np.hstack([lin, t[:, None]]).astype(np.float32)))
        found.sort(key=lambda x: -x[0])
        out += [w for _, w in found[:n]]
    return out


def match(q: Prepared, cands: list[Prepared], gate: float = 0.9) -> list[Match]:
    """Aligned match of each candidate onto the query; a pair whose small-canvas correlation stays under
    ``gate`` stops there (``fine``, ``flat`` -1, ``mid`` = that correlation)."""
    rq = _rings(q)
    central_small = q.small_mask * _disc(SMALL)
    out = []
    for cand in cands:
        rc = _rings(cand)
        small, warp = -2.0, None
        for rank, (before, w0) in enumerate(_ranked(rq, q, rc, cand)):
            if rank and before < HYPOTHESIS_FLOOR:
                break  # ECC rarely lifts a start this poor over the gate (it did for 6 of 6,855 pairs that passed)
            w1 = _ecc(q.small, cand.small, w0, central_small, 0.8, 15)
            score = _wncc(rq.band, *_aligned(rq.band, q.small_mask, rc.band, cand.small_mask, w1))
            if score > small:
                small, warp = score, w1
            if small >= SETTLED:
                break
        if small < gate:
            out.append(Match(small, -1.0, 0.0, small))
            continue
        out.append(_detailed(q, cand, warp, small))
    return out


def _ranked(rq: _Rings, q: Prepared, rc: _Rings, cand: Prepared) -> list[tuple[float, np.ndarray]]:
    """The hypotheses with the small-canvas correlation each gives before refinement, best first (a cheap
    warp and correlation, against one ECC refinement each)."""
    scored = [(_wncc(rq.band, *_aligned(rq.band, q.small_mask, rc.band, cand.small_mask, w)), w) for w in hypotheses(rq, rc)]
    return sorted(scored, key=lambda x: -x[0])


def _detailed(q: Prepared, cand: Prepared, warp: np.ndarray, small: float) -> Match:
    """Refine a small-canvas warp on the detailed canvases and score the central overlap there."""
    nq, nc = q.detail.shape[0], cand.detail.shape[0]
    central = q.detail_mask * _disc(nq)
    warp = _ecc(q.detail, cand.detail, _scaled(warp, nq, nc, SMALL, SMALL), central, 1.0, 15)
    back, w = _aligned(q.detail, q.detail_mask, cand.detail, cand.detail_mask, warp)
    mid = _wncc(dog(q.detail, 1.0, 3.0), dog(back, 1.0, 3.0), w)
    fine_q, fine_c = q.detail - _blur(q.detail, 1.2), back - _blur(back, 1.2)
    fine = _wncc(fine_q, fine_c, w)
    flat_w = w * _flattest(q.detail, w)
    flat = _wncc(_clipped(fine_q, flat_w), _clipped(fine_c, flat_w), flat_w)
    return Match(mid, fine, float(w.sum() / max(central.sum(), 1.0)), small, flat)


def _scaled(warp: np.ndarray, n_query: int, n_cand: int, from_query: int, from_cand: int) -> np.ndarray:
    """Re-express a 2x3 query->candidate map between canvases of other sizes."""
    full = np.vstack([warp, [0, 0, 1]]).astype(np.float64)
    full = np.diag([n_cand / from_cand, n_cand / from_cand, 1.0]) @ full @ np.diag([from_query / n_query, from_query / n_query, 1.0])
    return full[:2].astype(np.float32)


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
    (a, b), (c, d) = out[:, :2].astype(np.float64)
    energy, det = (a * a + b * b + c * c + d * d) / 2, abs(a * d - b * c)
    largest = np.sqrt(energy + np.sqrt(max(energy * energy - det * det, 0.0)))  # singular values of a 2x2 map
    if not (0.5 < det / max(largest, 1e-12) and largest < 2.0):  # collapsed onto a corner or blown up: not a copy's warp
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
