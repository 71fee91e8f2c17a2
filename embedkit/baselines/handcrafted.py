"""The handcrafted baseline: per-cell morphology, intensity and texture features (scikit-image).

The mask of a cell is the one ``segment --mask`` left in its crop (pixels outside the cell are zero), else
an Otsu mask of the crop (its largest component). Features go under the store key ``handcrafted`` with their
names kept in the key's config (``feature_names``).
"""

from __future__ import annotations

import numpy as np

from ..errors import EmbedkitError
from ..store import Store

KEY = "handcrafted"
GLCM_DISTANCES = (1, 2, 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
_SHAPE = ("area", "perimeter", "eccentricity", "solidity", "extent", "major_axis_length", "minor_axis_length",
          "equivalent_diameter_area", "feret_diameter_max", "euler_number", "orientation_sin2", "orientation_cos2")
_INTENSITY = ("mean", "std", "min", "max", "p10", "p25", "p50", "p75", "p90", "skew", "kurtosis", "integrated",
              "background_mean", "contrast_to_background")

FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"shape_{n}" for n in _SHAPE) + tuple(f"shape_hu{i}" for i in range(7))
    + tuple(f"intensity_{n}" for n in _INTENSITY) + tuple(f"intensity_ch{c}_mean" for c in range(3))
    + tuple(f"texture_{p}_d{d}" for d in GLCM_DISTANCES for p in GLCM_PROPS))


def cell_mask(gray: np.ndarray, stored_mask: bool) -> np.ndarray:
    """The cell's mask in its crop: nonzero pixels of a masked crop, else the largest Otsu component."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    if stored_mask:
        mask = gray > 0
    else:
        mask = gray > threshold_otsu(gray) if np.ptp(gray) > 0 else np.zeros(gray.shape, bool)
        lab = label(mask)
        if lab.max() > 1:
            mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return mask if mask.any() else np.ones(gray.shape, bool)


def cell_features(rgb: np.ndarray, stored_mask: bool = False) -> np.ndarray:
    """One cell's feature vector (order of :data:`FEATURE_NAMES`) from its RGB crop in [0, 1]."""
    from scipy.stats import kurtosis, skew
    from skimage.feature import graycomatrix, graycoprops
    from skimage.measure import regionprops

    gray = rgb.mean(axis=2)
    mask = cell_mask(gray, stored_mask)
    p = regionprops(mask.astype(np.uint8), intensity_image=gray)[0]
    shape = [p.area, p.perimeter, p.eccentricity, p.solidity, p.extent, p.axis_major_length, p.axis_minor_length,
             p.equivalent_diameter_area, p.feret_diameter_max, p.euler_number, np.sin(2 * p.orientation),
             np.cos(2 * p.orientation)] + list(p.moments_hu)
    v = gray[mask]
    bg = gray[~mask].mean() if (~mask).any() else 0.0
    q = np.percentile(v, [10, 25, 50, 75, 90])
    flat = np.ptp(v) == 0
    intensity = [v.mean(), v.std(), v.min(), v.max(), *q, 0.0 if flat else skew(v), 0.0 if flat else kurtosis(v),
                 v.sum(), bg, v.mean() - bg] + [rgb[..., c][mask].mean() for c in range(3)]
    y0, x0, y1, x1 = p.bbox
    levels = 32
    box = np.minimum((gray[y0:y1, x0:x1] * levels).astype(np.uint8), levels - 1)
    box = np.where(mask[y0:y1, x0:x1], box, 0)
    glcm = graycomatrix(box, GLCM_DISTANCES, [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels, symmetric=True,
                        normed=True)
    texture = [graycoprops(glcm, prop)[i].mean() for i in range(len(GLCM_DISTANCES)) for prop in GLCM_PROPS]
    return np.nan_to_num(np.asarray(shape + intensity + texture, dtype=np.float64)).astype(np.float32)


def _stored_mask(store: Store) -> bool:
    """Whether ``segment`` zeroed the pixels outside each cell (``--mask``), so a crop's nonzero pixels are its mask."""
    rec = store.segment_record() if store.has_pixels else None
    if not rec:
        return False
    cfg = rec.get("config") or {}
    return bool(cfg.get("mask") or (cfg.get("crop") or {}).get("mask"))


def compute_handcrafted(store: Store, progress: bool = True, chunk: int = 512) -> str:
    """Measure every item of ``store`` and commit the features under key ``handcrafted``; return the key."""
    from tqdm.auto import tqdm

    from ..items import ItemSet
    from ..store import Run, fingerprint, write_lock
    from ..store.writing import commit_embedding

    stored_mask = _stored_mask(store)
    cfg = {"encoder": KEY, "backend": "scikit-image", "arch": "regionprops+intensity+glcm", "weights": "none",
           "weights_fingerprint": fingerprint(list(FEATURE_NAMES)), "dim": len(FEATURE_NAMES), "dtype": "float32",
           "preprocess": {"mask": "segment" if stored_mask else "otsu", "gray": "mean of RGB", "glcm_levels": 32},
           "feature_names": list(FEATURE_NAMES)}
    items = ItemSet.from_store(store)
    n = len(items)
    with write_lock(store.path):
        run = Run(store.path, "embed", KEY)
        run.start({"config": cfg}, fingerprint(cfg))
        skipped = []
        for start in tqdm(range(0, n, chunk), desc="handcrafted features", unit="chunk", disable=not progress):
            pos = np.arange(start, min(n, start + chunk))
            vecs = np.full((len(pos), len(FEATURE_NAMES)), np.nan, np.float32)
            bad = []
            for j, rgb in enumerate(items.rgbs(pos)):
                if rgb is None:
                    bad.append("unreadable image")
                    skipped.append((items.where(int(pos[j])), "unreadable image"))
                    continue
                vecs[j] = cell_features(rgb, stored_mask)
                bad.append("")
            run.write(Run.shard_name("w0", "r", int(pos[0]), int(pos[-1]) + 1),
                      {"rows": items.rows[pos], "ids": np.asarray(items.ids[pos], dtype=object), "vectors": vecs,
                       "bad": np.array(bad, dtype=object), "paths": np.array([items.where(int(p)) for p in pos], dtype=object)})
        if not n:
            raise EmbedkitError(f"{store.path}: the store holds no items to measure")
        commit_embedding(store.path, run, KEY, len(FEATURE_NAMES), "float32", cfg, skipped)
    return KEY
