"""Files for a person beside the store: label TIFFs, outline overlays and the failed-fields report."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_path


def safe_name(field_id: str) -> str:
    """A flat, unique file name for a field id: 'A/img1.png' -> 'A__img1.png'.

    Where characters had to be replaced ('A/img 1.png'), a short hash of the id keeps names apart.
    """
    flat = field_id.replace("/", "__")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", flat).strip("_.") or "field"
    if safe != flat:
        safe += "-" + hashlib.sha256(field_id.encode()).hexdigest()[:8]
    return safe


def _atomic(path: Path, write) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def save_labels(folder: str | os.PathLike, field_id: str, labels: np.ndarray) -> Path:
    """Write a field's instance labels as ``<field>.labels.tif`` (uint16, or uint32 past 65535 objects)."""
    import tifffile

    dtype = np.uint16 if int(labels.max(initial=0)) < 2 ** 16 else np.uint32
    path = Path(folder) / f"{safe_name(field_id)}.labels.tif"
    return _atomic(path, lambda p: tifffile.imwrite(str(p), labels.astype(dtype), compression="zlib"))


def save_overlay(folder: str | os.PathLike, field_id: str, rgb_u8: np.ndarray, labels: np.ndarray,
                 kept_ids: Sequence[int]) -> Path:
    """Outline PNG: kept cells in green, segmented but dropped ones (edge, area) in magenta."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    img = rgb_u8[..., :3].copy()
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    outline = find_boundaries(labels, mode="inner")
    kept = np.isin(labels, np.asarray(kept_ids, dtype=labels.dtype))
    img[outline & kept] = (0, 255, 0)
    img[outline & ~kept] = (255, 0, 255)
    path = Path(folder) / f"{safe_name(field_id)}.overlay.png"
    return _atomic(path, lambda p: Image.fromarray(img).save(p, format="PNG"))


def write_failures(path: str | os.PathLike, failures: Sequence[Sequence[str]]) -> Path:
    """CSV of fields that could not be used: path, reason."""
    def write(p):
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "reason"])
            w.writerows(failures)
    return _atomic(Path(path), write)
