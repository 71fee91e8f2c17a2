"""``embedkit segment`` as a library call: fields -> segmenter -> crops -> shards -> store.

Finished fields go into the run's shards beside the store (crops written once, there); the main file is
written once, at the end, in one commit that stitches them. A killed run resumes from its shards and ends
with the same store as an uninterrupted one; a field that fails is reported and never touches what is
already written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .. import store as st
from ..engines.local import LocalEngine
from ..errors import BadImageError, EmbedkitError
from ..images import Conversion, to_uint8
from ..sources import Item, Source
from . import outputs, storeio
from .backends import Segmenter
from .crops import CropParams, crop_cells
from .fields import Field, load_field
from ..formats.lazy import is_large_field, large_labels_path
from ..formats.tiled import segment_large_field

RUN_KIND = "segment"
CELL_COLUMNS = ("mask_id", "bbox", "centroid", "area", "edge", "scale", "crop_box")


@dataclass
class SegmentResult:
    store: str
    n_fields: int
    n_resumed: int
    n_cells: int
    n_found: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    report: str | None = None
    labels_dir: str | None = None
    overlays_dir: str | None = None

    @property
    def cells_per_second(self) -> float:
        return self.n_found / self.seconds if self.seconds > 0 else 0.0


def sidecar(store_path: str, suffix: str) -> str:
    """A file or folder beside the store: store/cells.h5 -> store/cells<suffix>."""
    return f"{os.path.splitext(store_path)[0]}{suffix}"


def run_config(segmenter: Segmenter, crop: CropParams, conv: Conversion, seg_channels, pixel_size) -> dict:
    return {"segmenter": segmenter.config, "crop": crop.to_dict(), "conversion": conv.to_dict(),
            "seg_channels": None if seg_channels is None else list(seg_channels), "pixel_size": pixel_size}


def fail_or_record(path: str, reason: str, skip_bad: bool, failed: list[tuple[str, str]]) -> None:
    if not skip_bad:
        raise EmbedkitError(f"{path}: {reason}; fix or remove it, or pass --skip-bad to skip it and list it in a report "
                            f"(finished fields are kept: run the same command again to resume)")
    failed.append((path, reason))


def _pixel_size(item: Item, default: float | None) -> float | None:
    raw = item.meta.get("pixel_size", "")
    if raw and raw != "unknown":  # microscopy files record 'unknown' when their metadata has no pixel size
        try:
            return float(raw)
        except ValueError:
            raise EmbedkitError(f"{item.path}: manifest pixel_size {raw!r} is not a number") from None
    return default


def segment_fields(source: Source, store_path: str | os.PathLike, segmenter: Segmenter, crop: CropParams = CropParams(),
                   *, conv: Conversion = Conversion(), seg_channels: tuple[int, ...] | None = None,
                   pixel_size: float | None = None, labels_dir: str | None = None, overlays: int = 0,
                   skip_bad: bool = False, progress: bool = True, report_path: str | None = None,
                   checkpoint_fields: int | None = None, engine=None) -> SegmentResult:
    """Segment every field of ``source`` into cells in the store (resuming an interrupted run).

    ``engine``: None works here; a :class:`~embedkit.engines.ray_engine.RayEngine` loads fields in Ray tasks and
    segments them in its actor pool, each worker writing shards of the same run (``checkpoint_fields`` fields per
    shard), committed here."""
    store_path = str(store_path)
    t0 = time.perf_counter()
    config = run_config(segmenter, crop, conv, seg_channels, pixel_size)
    labels_dir = labels_dir or sidecar(store_path, "_labels")
    overlays_dir = sidecar(store_path, "_overlays") if overlays else None
    with st.write_lock(store_path):
        in_store = storeio.finished_fields(store_path, "segment", config)
        run = storeio.open_run(store_path, RUN_KIND, config)
        done = storeio.done_fields(run)
        todo = [(k, it) for k, it in enumerate(source.items) if it.id not in in_store and it.id not in done]
        n_resumed = len(source.items) - len(todo)
        where = Source(source.root, [], source.kind)  # what a worker needs of the source: its root
        n_found, failed = (engine or LocalEngine()).map_fields(
            todo, FieldLoader(where, conv, seg_channels),
            FieldCutter(where, segmenter, crop, conv, seg_channels, pixel_size, labels_dir, overlays_dir, overlays, skip_bad),
            run, desc=f"segment ({segmenter.name})", device=getattr(segmenter, "device", "cpu"),
            fields_per_block=checkpoint_fields, progress=progress, total=len(source.items), initial=n_resumed)
        done = storeio.done_fields(run)
        new_fields = [it.id for it in source.items if it.id in done and it.id not in in_store]
        report = str(outputs.write_failures(report_path or sidecar(store_path, ".segment-failed.csv"), failed)) if failed else None
        n_cells = 0
        if new_fields or failed or not os.path.exists(store_path):
            n_cells = storeio.commit(store_path, run, "segment", config, source.root, _batches(source, done, new_fields, store_path),
                                     (crop.size, crop.size, 3), new_fields, failed)
        else:
            run.finish()
    return SegmentResult(store_path, len(source.items), n_resumed, n_cells, n_found, failed, time.perf_counter() - t0,
                         report, labels_dir, overlays_dir)


@dataclass(frozen=True)
class FieldLoader:
    """Loads one field where fields are decoded (this process, or a Ray task); raises BadImageError when it cannot."""

    source: Source
    conv: Conversion
    seg_channels: tuple[int, ...] | None

    def __call__(self, k: int, item: Item) -> Field | None:
        path = self.source.abspath(item)
        if is_large_field(path):  # read tile by tile where it is segmented, never whole
            return None
        return load_field(path, self.conv, self.seg_channels)


@dataclass
class FieldCutter:
    """Segments and crops one loaded field into the run's shards where the segmenter is (here, or a Ray actor)."""

    source: Source
    segmenter: Segmenter
    crop: CropParams
    conv: Conversion
    seg_channels: tuple[int, ...] | None
    pixel_size: float | None
    labels_dir: str
    overlays_dir: str | None
    overlays: int
    skip_bad: bool

    def __call__(self, k: int, item: Item, fld: Field | BadImageError, shards: storeio.FieldShards, failed: list) -> int:
        return _one_field(self.source, k, item, self.segmenter, self.crop, self.conv, self.seg_channels, self.pixel_size,
                          shards, self.labels_dir, self.overlays_dir if k < self.overlays else None, self.skip_bad,
                          failed, fld)


def _one_field(source: Source, k: int, item: Item, segmenter: Segmenter, crop: CropParams, conv: Conversion,
               seg_channels, pixel_size, shards: storeio.FieldShards, labels_dir: str, overlay_dir: str | None,
               skip_bad: bool, failed: list, fld: Field | BadImageError | None) -> int:
    """Segment and crop one field loaded by :class:`FieldLoader` (None for a large field, read here tile by tile),
    then hand it to the run's shards; returns the number of objects segmented."""
    path = source.abspath(item)
    if is_large_field(path):  # read and segment tile by tile with bounded memory (embedkit.formats.tiled)
        try:
            cells = segment_large_field(path, segmenter, crop, conv=conv, seg_channels=seg_channels, progress=False,
                                        pixel_size=_pixel_size(item, pixel_size), labels_path=large_labels_path(labels_dir, item.id))
        except BadImageError as exc:
            fail_or_record(path, exc.reason, skip_bad, failed)
            return 0
        return _shard_cells(shards, item, k, cells)
    if isinstance(fld, BadImageError):
        fail_or_record(path, fld.reason, skip_bad, failed)
        return 0
    try:
        labels = np.asarray(segmenter.segment(fld.seg))
        if labels.shape != fld.shape:
            raise ValueError(f"labels of shape {labels.shape} for a {fld.shape} field")
    except (EmbedkitError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a backend failing on one field must not end the run
        fail_or_record(path, f"segmentation failed ({type(exc).__name__}: {str(exc)[:200]})", skip_bad, failed)
        return 0
    rgb = to_uint8(fld.rgb)
    cells = crop_cells(rgb, labels, crop, _pixel_size(item, pixel_size))
    outputs.save_labels(labels_dir, item.id, labels)
    if overlay_dir:
        outputs.save_overlay(overlay_dir, item.id, rgb, labels, cells.cells.mask_id)
    return _shard_cells(shards, item, k, cells)


def _shard_cells(shards: storeio.FieldShards, item: Item, k: int, cells) -> int:
    """Hand one field's crops and their columns to the run's shards; returns the number of objects found."""
    c = cells.cells
    shards.add(k, item.id, {"n_found": int(cells.n_found)},
               {"mask_id": c.mask_id, "bbox": c.bbox, "centroid": c.centroid, "area": c.area, "edge": c.edge,
                "scale": cells.scale, "crop_box": cells.crop_box, "pixels": cells.pixels})
    return cells.n_found


def _batches(source: Source, done: dict[str, storeio.FieldRef], fields: list[str], store_path: str) -> Iterator[storeio.Batch]:
    """Store rows per field, in source order, read from the run's shards (crops stay there)."""
    by_id = {it.id: it for it in source.items}
    stored = storeio.path_writer(store_path, source.root)
    cache: dict = {}
    for fid in fields:
        it, ref = by_id[fid], done[fid]
        chunk = storeio.field_rows(ref, CELL_COLUMNS, cache)
        n = ref.count
        rel = stored(it.path)
        items = [Item(id=f"{it.id}#{int(m)}", path=it.path, label=it.label, group=it.group, meta=dict(it.meta))
                 for m in chunk["mask_id"]]
        columns = {"source": np.array([rel] * n, dtype=object), "mask_id": chunk["mask_id"].astype(np.int32),
                   "bbox": chunk["bbox"].astype(np.int32), "centroid": chunk["centroid"].astype(np.float32),
                   "area": chunk["area"].astype(np.int64), "edge": chunk["edge"].astype(bool),
                   "scale": chunk["scale"].astype(np.float32), "crop_box": chunk["crop_box"].astype(np.float32)}
        yield items, columns, ref.shard, np.arange(ref.start, ref.start + n)
