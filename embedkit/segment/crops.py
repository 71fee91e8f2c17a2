"""From an instance label image to per-cell provenance and fixed-size crops.

Coordinates are (y, x) in field pixels: ``centroid`` in pixel-index units, ``bbox`` [y0, x0, y1, x1) of
the mask, ``crop_box`` the window that was cut, as pixel edges (it may reach past the field, where the
crop is zero-padded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from ..errors import EmbedkitError

EDGE_MODES = ("drop", "keep")


@dataclass(frozen=True)
class ScaleSpec:
    """How crops are resampled: not at all, to a physical pixel size, or to a cell diameter (field median or per cell)."""

    mode: str = "none"      # none | pixel | diameter | cell
    value: float = 0.0      # target µm per pixel, or target diameter in pixels

    @classmethod
    def parse(cls, spec: str | None) -> "ScaleSpec":
        """'none', 'pixel:0.5' (µm/px), 'diameter:30' (field's median cell diameter) or 'cell:30' (each cell)."""
        if spec is None or spec.strip().lower() in ("", "none"):
            return cls()
        mode, _, value = spec.partition(":")
        mode = mode.strip().lower()
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if mode not in ("pixel", "diameter", "cell") or not v > 0:
            raise EmbedkitError(f"--scale {spec!r}: use none, pixel:UM_PER_PX (e.g. pixel:0.65), diameter:PX "
                                f"(field median, e.g. diameter:30) or cell:PX (every cell to PX)")
        return cls(mode, v)

    def __str__(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode}:{self.value:g}"


@dataclass(frozen=True)
class CropParams:
    """Settings that decide which cells become crops and how; recorded as provenance."""

    size: int = 96
    mask: bool = False
    scale: ScaleSpec = ScaleSpec()
    edge: str = "drop"
    min_area: int = 15
    max_area: int | None = None

    def __post_init__(self):
        if self.size < 8:
            raise EmbedkitError(f"--crop {self.size}: crops must be at least 8 pixels")
        if self.edge not in EDGE_MODES:
            raise EmbedkitError(f"--edge {self.edge!r}: choose drop or keep")
        if self.max_area is not None and self.max_area < self.min_area:
            raise EmbedkitError(f"--max-area {self.max_area} is below --min-area {self.min_area}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"] = str(self.scale)
        return d


@dataclass
class CellTable:
    """Per-object measurements of a label image, one row per mask id (sorted)."""

    mask_id: np.ndarray   # int32 [N]
    bbox: np.ndarray      # int32 [N, 4] y0, x0, y1, x1 (end exclusive)
    centroid: np.ndarray  # float32 [N, 2] y, x
    area: np.ndarray      # int64 [N]
    edge: np.ndarray      # bool [N]: touches the field border

    def __len__(self) -> int:
        return len(self.mask_id)

    def take(self, keep: np.ndarray) -> "CellTable":
        return CellTable(self.mask_id[keep], self.bbox[keep], self.centroid[keep], self.area[keep], self.edge[keep])

    @property
    def diameter(self) -> np.ndarray:
        """Equivalent diameter (of the circle with the same area)."""
        return 2.0 * np.sqrt(self.area / np.pi)


def measure_cells(labels: np.ndarray) -> CellTable:
    """Mask ids, bounding boxes, centroids, areas and border contact of every object in ``labels``."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    h, w = labels.shape
    ids = np.unique(labels)
    ids = ids[ids > 0].astype(np.int64)
    if len(ids) == 0:
        return CellTable(np.zeros(0, np.int32), np.zeros((0, 4), np.int32), np.zeros((0, 2), np.float32),
                         np.zeros(0, np.int64), np.zeros(0, bool))
    slices = ndi.find_objects(labels.astype(np.int64, copy=False))
    bbox = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in (slices[i - 1] for i in ids)], np.int32)
    centroid = np.array(ndi.center_of_mass(np.ones_like(labels, np.float32), labels, ids), np.float32).reshape(-1, 2)
    area = np.bincount(labels.ravel().astype(np.int64), minlength=int(ids.max()) + 1)[ids].astype(np.int64)
    edge = (bbox[:, 0] == 0) | (bbox[:, 1] == 0) | (bbox[:, 2] == h) | (bbox[:, 3] == w)
    return CellTable(ids.astype(np.int32), bbox, centroid, area, edge)


def select_cells(cells: CellTable, params: CropParams) -> np.ndarray:
    """Boolean mask of the cells that pass the area limits and the edge rule."""
    keep = cells.area >= params.min_area
    if params.max_area is not None:
        keep &= cells.area <= params.max_area
    if params.edge == "drop":
        keep &= ~cells.edge
    return keep


def scale_factors(cells: CellTable, params: CropParams, pixel_size: float | None = None) -> np.ndarray:
    """Output pixels per field pixel for each cell (1.0 = no resampling)."""
    n = len(cells)
    spec = params.scale
    if spec.mode == "none":
        return np.ones(n, np.float32)
    if spec.mode == "pixel":
        if not pixel_size or pixel_size <= 0:
            raise EmbedkitError("--scale pixel:... needs the field's pixel size: pass --pixel-size UM or a 'pixel_size' manifest column")
        return np.full(n, pixel_size / spec.value, np.float32)
    if n == 0:
        return np.ones(0, np.float32)
    if spec.mode == "diameter":
        interior = cells.diameter[~cells.edge]
        typical = float(np.median(interior if len(interior) else cells.diameter))
        return np.full(n, spec.value / typical, np.float32)
    return (spec.value / cells.diameter).astype(np.float32)


def _window(arr: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """arr[y0:y0+h, x0:x0+w] with zeros wherever the window leaves the array."""
    out = np.zeros((h, w) + arr.shape[2:], arr.dtype)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(arr.shape[0], y0 + h), min(arr.shape[1], x0 + w)
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = arr[ys:ye, xs:xe]
    return out


def cut_crop(image: np.ndarray, labels: np.ndarray, centroid: np.ndarray, mask_id: int, size: int,
             scale: float = 1.0, mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One ``size`` x ``size`` crop centred on ``centroid``; returns (crop, crop_box in field coordinates).

    With ``scale`` != 1 the window covers size/scale field pixels, resampled (antialiased when shrinking).
    With ``mask`` everything outside the cell's own mask is zero.
    """
    cy, cx = float(centroid[0]), float(centroid[1])
    if abs(scale - 1.0) < 1e-6:
        y0, x0 = int(round(cy)) - size // 2, int(round(cx)) - size // 2
        crop = _window(image, y0, x0, size, size)
        if mask:
            crop = crop * (_window(labels, y0, x0, size, size) == mask_id)[..., None].astype(crop.dtype)
        return crop, np.array([y0, x0, y0 + size, x0 + size], np.float32)
    span = size / scale
    fy0, fx0 = cy + 0.5 - span / 2, cx + 0.5 - span / 2   # window edges in continuous field coordinates
    margin = 2 + int(np.ceil(2 / scale)) if scale < 1 else 2
    wy0, wx0 = int(np.floor(fy0)) - margin, int(np.floor(fx0)) - margin
    wh = wv = int(np.ceil(span)) + 2 * margin + 1
    win = _window(image, wy0, wx0, wh, wv).astype(np.float32)
    if scale < 1:  # antialias before shrinking
        sigma = (1.0 / scale - 1.0) / 2.0
        win = ndi.gaussian_filter(win, sigma=(sigma, sigma) + (0,) * (win.ndim - 2))
    centres = (np.arange(size) + 0.5) / scale - 0.5   # output pixel centres in window-relative field pixels
    yy = fy0 - wy0 + centres[:, None] + np.zeros((1, size))
    xx = fx0 - wx0 + centres[None, :] + np.zeros((size, 1))
    planes = [ndi.map_coordinates(win[..., c], [yy, xx], order=1, mode="constant", cval=0.0) for c in range(win.shape[2])]
    crop = np.stack(planes, axis=-1)
    if np.issubdtype(image.dtype, np.integer):
        crop = np.clip(np.rint(crop), np.iinfo(image.dtype).min, np.iinfo(image.dtype).max).astype(image.dtype)
    else:
        crop = crop.astype(image.dtype)
    if mask:
        lab = ndi.map_coordinates(_window(labels, wy0, wx0, wh, wv), [yy, xx], order=0, mode="constant", cval=0)
        crop = crop * (lab == mask_id)[..., None].astype(crop.dtype)
    return crop, np.array([fy0, fx0, fy0 + span, fx0 + span], np.float32)


@dataclass
class FieldCells:
    """The cells kept from one field, with their crops."""

    cells: CellTable
    scale: np.ndarray     # float32 [N]
    crop_box: np.ndarray  # float32 [N, 4]
    pixels: np.ndarray    # uint8 [N, S, S, C]
    n_found: int          # objects segmented before filtering


def crop_cells(image_u8: np.ndarray, labels: np.ndarray, params: CropParams, pixel_size: float | None = None) -> FieldCells:
    """Measure, filter and crop every cell of one field (``image_u8`` is the uint8 RGB rendering)."""
    if image_u8.shape[:2] != labels.shape:
        raise ValueError(f"image {image_u8.shape[:2]} and labels {labels.shape} differ in size")
    all_cells = measure_cells(labels)
    cells = all_cells.take(select_cells(all_cells, params))
    scale = scale_factors(cells, params, pixel_size)
    s, c = params.size, image_u8.shape[2]
    pixels = np.zeros((len(cells), s, s, c), np.uint8)
    boxes = np.zeros((len(cells), 4), np.float32)
    for k in range(len(cells)):
        pixels[k], boxes[k] = cut_crop(image_u8, labels, cells.centroid[k], int(cells.mask_id[k]), s, float(scale[k]), params.mask)
    return FieldCells(cells, scale, boxes, pixels, len(all_cells))
