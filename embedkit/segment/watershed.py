"""Classical nucleus segmentation that needs no weights: threshold, distance transform, seeded watershed.

Tuned on the DSB 2018 fluorescence images (see scripts/bench_segment.py); on transmitted light
(bright-field, H&E) it works on optical density and is much weaker, as the benchmark reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

POLARITIES = ("auto", "bright", "dark")


@dataclass(frozen=True)
class WatershedParams:
    """Settings of :func:`watershed_segment`; recorded with every run as provenance."""

    polarity: str = "auto"          # bright objects on dark (fluorescence), dark on bright (transmitted light), or auto
    smooth: float = 0.5             # Gaussian sigma (pixels) applied to the intensity before thresholding
    threshold_scale: float = 0.75   # foreground above this fraction of the Otsu level (dim nuclei and halos count)
    diameter: float | None = None   # expected object diameter in pixels; None estimates it per field
    peak_distance: float = 0.7      # seeds at least this many radii apart
    min_size: int = 20              # objects smaller than this (pixels) are dropped
    fill_holes: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _normalise(x: np.ndarray, lo: float = 1.0, hi: float = 99.8) -> np.ndarray:
    a, b = np.percentile(x, (lo, hi))
    return np.clip((x - a) / max(b - a, 1e-6), 0.0, 1.0).astype(np.float32)


def is_colour(rgb: np.ndarray) -> bool:
    """True for stained colour images (H&E); False for grayscale stored as RGB."""
    return rgb.ndim == 3 and rgb.shape[2] >= 3 and float(np.mean(rgb.max(-1) - rgb.min(-1))) > 0.05


def intensity(image: np.ndarray, polarity: str = "auto") -> tuple[np.ndarray, str]:
    """One [0, 1] plane in which objects are bright, and the polarity used.

    Transmitted light is turned into optical density (hematoxylin density for colour H&E), since
    absorbance, not brightness, is what grows with the amount of stained material.
    """
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, not {polarity!r}")
    img = np.asarray(image, dtype=np.float32)
    gray = img.mean(-1) if img.ndim == 3 else img
    if polarity == "auto":
        g = _normalise(gray)
        polarity = "dark" if float(np.median(g)) > 0.5 else "bright"
    if polarity == "bright":
        return _normalise(gray), polarity
    if img.ndim == 3 and is_colour(img):
        from skimage.color import rgb2hed

        return _normalise(rgb2hed(np.clip(img[..., :3], 0, 1))[..., 0]), polarity
    return _normalise(-np.log(np.clip(gray, 1.0 / 255, 1.0))), polarity


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 0 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def estimate_radius(foreground: np.ndarray) -> float:
    """Typical object radius: the median over connected components of their largest inscribed distance.

    Touching objects merge into one component, but its deepest point is still about one radius deep.
    """
    dist = ndi.distance_transform_edt(foreground)
    cc, n = ndi.label(foreground)
    if n == 0:
        return 0.0
    return float(np.median(ndi.maximum(dist, cc, np.arange(1, n + 1))))


def watershed_segment(image: np.ndarray, params: WatershedParams = WatershedParams()) -> np.ndarray:
    """Instance labels (int32, 0 = background) of the bright (or, for transmitted light, dense) objects."""
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_multiotsu, threshold_otsu
    from skimage.segmentation import relabel_sequential, watershed

    plane, polarity = intensity(image, params.polarity)
    if params.smooth > 0:
        plane = gaussian(plane, params.smooth, preserve_range=True)
    if float(plane.max() - plane.min()) < 1e-6:
        return np.zeros(plane.shape, np.int32)
    colour = np.asarray(image).ndim == 3 and is_colour(np.asarray(image, np.float32))
    if polarity == "dark" and not colour:
        # Bright-field: background, cytoplasm and nuclei form three intensity classes; keep the densest.
        level = float(threshold_multiotsu(plane, classes=3)[1])
    elif polarity == "dark":
        level = float(threshold_otsu(plane))  # H&E: hematoxylin density is already a clean nuclear signal
    else:
        level = params.threshold_scale * float(threshold_otsu(plane))
    fg = plane > level
    if params.fill_holes:
        fg = ndi.binary_fill_holes(fg)
    fg = _remove_small(ndi.label(fg)[0], params.min_size) > 0
    if not fg.any():
        return np.zeros(plane.shape, np.int32)
    radius = params.diameter / 2 if params.diameter else estimate_radius(fg)
    dist = ndi.distance_transform_edt(fg)
    cc, _ = ndi.label(fg)
    peaks = peak_local_max(gaussian(dist, 1.0, preserve_range=True), min_distance=max(1, int(round(params.peak_distance * radius))),
                           labels=cc, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Components without a peak (tiny or flat) still become one object each.
    missing = np.setdiff1d(np.unique(cc[fg]), np.unique(cc[markers > 0]))
    if len(missing):
        extra = np.isin(cc, missing)
        markers[extra] = cc[extra] + len(peaks)
    labels = watershed(-dist, markers, mask=fg)
    labels = _remove_small(labels, params.min_size)
    return relabel_sequential(labels)[0].astype(np.int32)


class WatershedSegmenter:
    """The classical backend behind the same interface as Cellpose: ``segment(image) -> labels``."""

    name = "watershed"

    def __init__(self, params: WatershedParams = WatershedParams()):
        self.params = params

    @property
    def config(self) -> dict:
        from importlib.metadata import version

        return {"backend": "watershed", **self.params.to_dict(), "versions": {"scikit-image": version("scikit-image")}}

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Labels of an (H, W, C) float image: RGB as a whole, or the first of selected channels (the nuclear one)."""
        img = np.asarray(image, np.float32)
        if img.ndim == 3 and img.shape[2] != 3:
            img = img[:, :, 0]
        return watershed_segment(img, self.params)
