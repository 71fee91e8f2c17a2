"""Segmenting a field too large for memory: tile by tile with overlap, each cell kept exactly once.

Every tile is read with a margin around its core. A cell belongs to the tile whose core holds its
centroid, so cells on a seam are neither lost nor duplicated; the margin (at least half a crop, and
several cell diameters) makes the owning tile see the whole cell and its whole crop. A cell that still
reaches the edge of the read box (larger than the margin) is incomplete and flagged as an edge cell.
Intensities are rescaled with percentiles sampled over the whole field, so all tiles share one scale.
The label image is written tile by tile into a Zarr array beside the store.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import BadImageError, EmbedkitError
from ..images import Conversion
from ..segment.backends import Segmenter
from ..segment.crops import CellTable, CropParams, FieldCells, cut_crop, measure_cells, scale_factors, select_cells
from .lazy import LazyField, Tile, tiles

DEFAULT_TILE = 2048


@dataclass(frozen=True)
class Scaling:
    """Fixed per-channel intensity scaling for every tile: source channel per output plane, and its low/high."""

    sources: tuple[int | None, ...]
    lo: np.ndarray
    hi: np.ndarray
    divide_255: bool

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """(h, w, C) raw -> float32 (h, w, len(sources)) in [0, 1]."""
        out = np.zeros(raw.shape[:2] + (len(self.sources),), np.float32)
        for k, c in enumerate(self.sources):
            if c is None:
                continue
            x = raw[:, :, c].astype(np.float32)
            out[:, :, k] = x / 255.0 if self.divide_255 else np.clip((x - self.lo[c]) / (self.hi[c] - self.lo[c]), 0, 1)
        return out


def channel_sources(conv: Conversion, n_channels: int, path: str) -> tuple[int | None, ...]:
    """Which raw channel feeds each RGB plane, by the same rules as :func:`embedkit.images.to_rgb`."""
    if conv.channels is not None:
        from . import resolve_channel_names

        chans = resolve_channel_names(conv.channels, path) if any(isinstance(c, str) for c in conv.channels) else conv.channels
        bad = [c for c in chans if c is not None and c >= n_channels]
        if bad:
            raise BadImageError(path, f"has {n_channels} channel(s) but --channels asks for channel {bad[0]}")
        return tuple(chans)
    if n_channels == 1 or n_channels == 2:
        return (0, 0, 0)
    if n_channels in (3, 4):
        return (0, 1, 2)
    raise BadImageError(path, f"has {n_channels} channels; pass --channels to map them to RGB, e.g. --channels 0,1,2")


def field_scaling(field: LazyField, conv: Conversion, sources: tuple[int | None, ...]) -> Scaling:
    """Percentiles of every channel over sample windows spread across the field."""
    sample = field.sample()
    divide = sample.dtype == np.uint8 and not conv.rescale_8bit
    n = sample.shape[-1]
    lo, hi = np.zeros(n, np.float32), np.ones(n, np.float32)
    for c in range(n):
        vals = sample[..., c].astype(np.float32)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            lo[c], hi[c] = np.percentile(vals, conv.percentiles)
        hi[c] = hi[c] if hi[c] > lo[c] else lo[c] + 1.0
    return Scaling(sources, lo, hi, divide)


def default_margin(crop: CropParams, pixel_size: float | None, diameter: float | None) -> int:
    """Overlap that lets the owning tile see a whole cell and its whole crop window."""
    span = crop.size
    if crop.scale.mode == "pixel" and pixel_size:
        span = crop.size * crop.scale.value / pixel_size
    elif crop.scale.mode in ("diameter", "cell"):
        span = 2 * crop.size
    return int(math.ceil(max(span / 2 + 4, 3 * (diameter or 30), 64)))


def _labels_array(path: str | None, shape: tuple[int, int]):
    if path is None:
        return None
    import zarr

    return zarr.open_array(path, mode="w", shape=shape, chunks=(1024, 1024), dtype=np.int32, zarr_format=2, fill_value=0)


def segment_large_field(locator: str, segmenter: Segmenter, crop: CropParams = CropParams(), *,
                        conv: Conversion = Conversion(), seg_channels: tuple[int, ...] | None = None,
                        pixel_size: float | None = None, labels_path: str | None = None, tile: int = DEFAULT_TILE,
                        margin: int | None = None, progress: bool = True) -> FieldCells:
    """Segment and crop a field tile by tile; memory grows with the tile and the crops, not the field.

    Returns the same :class:`FieldCells` as :func:`embedkit.segment.crops.crop_cells` in field coordinates,
    with mask ids numbered across the field (and equal to the ids in the label Zarr at ``labels_path``).
    """
    from tqdm.auto import tqdm

    field = LazyField(locator)
    h, w = field.shape
    sources = channel_sources(conv, field.channels, locator)
    scaling = field_scaling(field, conv, sources)
    seg_scaling = None if seg_channels is None else Scaling(tuple(seg_channels), scaling.lo, scaling.hi, scaling.divide_255)
    if seg_channels is not None and max(seg_channels) >= field.channels:
        raise BadImageError(locator, f"has {field.channels} channel(s) but --seg-channels asks for channel {max(seg_channels)}")
    diameter = getattr(getattr(segmenter, "params", None), "diameter", None) or getattr(segmenter, "diameter", None)
    margin = default_margin(crop, pixel_size, diameter) if margin is None else margin
    labels_out = _labels_array(labels_path, (h, w))
    parts: list[tuple[CellTable, np.ndarray, np.ndarray, np.ndarray]] = []
    n_found, next_id = 0, 1
    grid = list(tiles((h, w), tile, margin))
    for t in tqdm(grid, unit="tile", desc=f"tiles of {os.path.basename(locator)}", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True, leave=False):
        raw = field.region(*t.read)
        rgb = scaling.apply(raw)
        seg = rgb if seg_scaling is None else seg_scaling.apply(raw)
        labels = _segment(segmenter, seg, locator, t)
        cells, local_ids, found = _owned_cells(labels, t, (h, w), crop)
        n_found += found
        scale = scale_factors(cells, crop, pixel_size)
        rgb_u8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
        pixels = np.zeros((len(cells), crop.size, crop.size, 3), np.uint8)
        boxes = np.zeros((len(cells), 4), np.float32)
        oy, ox = t.origin
        for k in range(len(cells)):
            pixels[k], boxes[k] = cut_crop(rgb_u8, labels, cells.centroid[k], int(local_ids[k]), crop.size, float(scale[k]), crop.mask)
        global_ids = np.arange(next_id, next_id + len(cells), dtype=np.int32)
        next_id += len(cells)
        if labels_out is not None and len(cells):
            _write_labels(labels_out, labels, local_ids, global_ids, t)
        off = np.array([oy, ox], np.float32)
        moved = CellTable(global_ids, cells.bbox + np.array([oy, ox, oy, ox], np.int32), cells.centroid + off, cells.area,
                          cells.edge)
        parts.append((moved, scale, boxes + np.array([oy, ox, oy, ox], np.float32), pixels))
    return _concat(parts, n_found, crop.size)


def _segment(segmenter: Segmenter, seg: np.ndarray, locator: str, t: Tile) -> np.ndarray:
    try:
        labels = np.asarray(segmenter.segment(seg))
    except (EmbedkitError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a backend failing on one tile fails the field, with the tile named
        raise BadImageError(locator, f"segmentation failed in tile {t.core} ({type(exc).__name__}: {str(exc)[:200]})") from None
    if labels.shape != seg.shape[:2]:
        raise BadImageError(locator, f"segmenter returned labels of shape {labels.shape} for a {seg.shape[:2]} tile")
    return labels


def _owned_cells(labels: np.ndarray, t: Tile, shape: tuple[int, int], crop: CropParams) -> tuple[CellTable, np.ndarray, int]:
    """The cells this tile owns that pass the crop rules (local coordinates), their local ids, and how many it owns."""
    cells = measure_cells(labels)
    oy, ox = t.origin
    cy, cx = cells.centroid[:, 0] + oy, cells.centroid[:, 1] + ox
    y0, y1, x0, x1 = t.core
    owned = (cy >= y0 - 0.5) & (cy < y1 - 0.5) & (cx >= x0 - 0.5) & (cx < x1 - 0.5)
    cells = cells.take(owned)
    th, tw = labels.shape
    ry0, ry1, rx0, rx1 = t.read
    b = cells.bbox
    field_edge = (b[:, 0] + oy == 0) | (b[:, 1] + ox == 0) | (b[:, 2] + oy == shape[0]) | (b[:, 3] + ox == shape[1])
    truncated = ((b[:, 0] == 0) & (ry0 > 0)) | ((b[:, 1] == 0) & (rx0 > 0)) | ((b[:, 2] == th) & (ry1 < shape[0])) \
        | ((b[:, 3] == tw) & (rx1 < shape[1]))
    cells = CellTable(cells.mask_id, cells.bbox, cells.centroid, cells.area, field_edge | truncated)
    kept = cells.take(select_cells(cells, crop))
    return kept, kept.mask_id.copy(), int(owned.sum())


def _write_labels(out, labels: np.ndarray, local_ids: np.ndarray, global_ids: np.ndarray, t: Tile) -> None:
    """Paint this tile's owned cells, with their field-wide ids, into the label array."""
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[local_ids] = global_ids
    mapped = lut[labels]
    y0, y1, x0, x1 = t.read
    region = out[y0:y1, x0:x1]
    paint = (mapped > 0) & (region == 0)  # where two tiles' masks overlap, the first owner keeps the pixel
    region[paint] = mapped[paint]
    out[y0:y1, x0:x1] = region


def _concat(parts, n_found: int, size: int) -> FieldCells:
    """Join the tiles' cells into one field's :class:`FieldCells`."""
    if not parts:
        parts = [(measure_cells(np.zeros((1, 1), np.int32)), np.zeros(0, np.float32), np.zeros((0, 4), np.float32),
                  np.zeros((0, size, size, 3), np.uint8))]
    tables = [p[0] for p in parts]
    cells = CellTable(*(np.concatenate([getattr(c, a) for c in tables]) for a in ("mask_id", "bbox", "centroid", "area", "edge")))
    return FieldCells(cells, *(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3)), n_found)
