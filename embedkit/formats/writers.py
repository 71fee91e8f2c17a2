"""Writing small OME-TIFF, OME-Zarr and HCS plate files (test fixtures, benchmarks, examples)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def write_ome_tiff(path: str | os.PathLike, data: np.ndarray, dim_order: str, channel_names: Sequence[str] | None = None,
                   pixel_size: float | None = None, z_step: float | None = None) -> str:
    """Write ``data`` (any of T, C, Z, Y, X in ``dim_order``) as OME-TIFF with channel names and µm per pixel."""
    from bioio_base.types import PhysicalPixelSizes
    from bioio_ome_tiff.writers import OmeTiffWriter

    pps = PhysicalPixelSizes(z_step, pixel_size, pixel_size) if pixel_size else None
    OmeTiffWriter.save(data, str(path), dim_order=dim_order, channel_names=list(channel_names) if channel_names else None,
                       physical_pixel_sizes=pps)
    return str(path)


def write_ome_zarr(path: str | os.PathLike, data: np.ndarray, channel_names: Sequence[str] | None = None,
                   pixel_size: float | None = None, chunks: tuple[int, int] = (1024, 1024)) -> str:
    """Write a (T, C, Z, Y, X) array as a single-level OME-Zarr image (NGFF 0.4, Zarr v2)."""
    w = _writer(path, data.shape, data.dtype, channel_names, pixel_size, chunks)
    w.write_full_volume(data)
    return str(path)


def _writer(path, shape, dtype, channel_names, pixel_size, chunks):
    from bioio_ome_zarr.writers import Channel, OMEZarrWriter

    t, c, z = shape[:3]
    channels = [Channel(label=str(n), color="FFFFFF") for n in channel_names] if channel_names else None
    scale = [1.0, 1.0, 1.0, pixel_size, pixel_size] if pixel_size else None
    units = [None, None, "micrometer", "micrometer", "micrometer"] if pixel_size else None
    return OMEZarrWriter(str(path), level_shapes=tuple(shape), dtype=dtype, zarr_format=2, channels=channels,
                         physical_pixel_size=scale, axes_units=units,
                         chunk_shape=(1, 1, 1) + tuple(min(k, n) for k, n in zip(chunks, shape[3:])))


def ome_zarr_array(path: str | os.PathLike, shape: tuple[int, ...], dtype, channel_names: Sequence[str] | None = None,
                   pixel_size: float | None = None, chunks: tuple[int, int] = (1024, 1024)):
    """Create an empty (T, C, Z, Y, X) OME-Zarr image and return its level-0 zarr array, to fill region by region."""
    w = _writer(path, shape, np.dtype(dtype), channel_names, pixel_size, chunks)
    w.initialize()  # creates the arrays and metadata, writes no pixels
    return w.datasets[0]


def write_plate(path: str | os.PathLike, wells: dict[str, Sequence[np.ndarray]], channel_names: Sequence[str] | None = None,
                pixel_size: float | None = None, name: str = "plate") -> str:
    """Write an OME-Zarr HCS plate: ``wells`` maps 'A/1' to its fields, each a (C, Y, X) or (T, C, Z, Y, X) array."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    rows = sorted({w.split("/")[0] for w in wells})
    cols = sorted({w.split("/")[1] for w in wells}, key=lambda s: (len(s), s))
    for well, fields in wells.items():
        r, c = well.split("/")
        for k, data in enumerate(fields):
            data = np.asarray(data)
            if data.ndim == 3:
                data = data[None, :, None]
            write_ome_zarr(os.path.join(str(path), r, c, str(k)), data, channel_names, pixel_size)
        zarr.open_group(os.path.join(str(path), r, c), mode="a", zarr_format=2).attrs["well"] = {
            "images": [{"path": str(k)} for k in range(len(fields))], "version": "0.4"}
    root.attrs["plate"] = {
        "name": name, "version": "0.4", "field_count": max(len(f) for f in wells.values()),
        "rows": [{"name": r} for r in rows], "columns": [{"name": c} for c in cols],
        "wells": [{"path": w, "rowIndex": rows.index(w.split("/")[0]), "columnIndex": cols.index(w.split("/")[1])}
                  for w in wells]}
    return str(path)
