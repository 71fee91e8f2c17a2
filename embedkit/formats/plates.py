"""OME-Zarr high-content-screening plates: every field of every well becomes items.

A plate (NGFF 'plate' metadata) lists its wells; each well lists its fields, and each field is an
ordinary OME-Zarr image at ``plate.zarr/<row>/<column>/<field>``. Plate, row, column, well and field become
item columns, and the well is the default group, so cells of one well never straddle a split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import BadImageError


@dataclass(frozen=True)
class PlateField:
    """One field of one well: where it is inside the plate and what it is called."""

    plate: str
    row: str
    column: str
    field: str
    path: str  # relative to the plate folder, e.g. 'A/1/0'

    @property
    def well(self) -> str:
        return f"{self.row}{self.column}"

    def columns(self) -> dict[str, str]:
        return {"plate": self.plate, "row": self.row, "column": self.column, "well": self.well, "field": self.field}


def _attrs(path: str) -> dict:
    import zarr

    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # not a zarr group at all
        return {}
    return dict(attrs.get("ome", attrs))


def is_plate(path: str | os.PathLike) -> bool:
    """True when ``path`` is an OME-Zarr folder with plate metadata."""
    return os.path.isdir(path) and "plate" in _attrs(str(path))


def plate_fields(path: str | os.PathLike) -> list[PlateField]:
    """Every field of every well of a plate, in the plate's well order."""
    path = str(path)
    meta = _attrs(path).get("plate")
    if not meta:
        raise BadImageError(path, "is not an OME-Zarr plate (no 'plate' metadata)")
    name = str(meta.get("name") or os.path.basename(path.rstrip("/")).split(".")[0])
    rows = [r["name"] for r in meta.get("rows", [])]
    cols = [c["name"] for c in meta.get("columns", [])]
    out = []
    for well in meta.get("wells", []):
        wpath = well["path"]
        if "rowIndex" in well and "columnIndex" in well:
            row, col = rows[well["rowIndex"]], cols[well["columnIndex"]]
        else:
            row, col = wpath.split("/")[:2]
        images = _attrs(os.path.join(path, wpath)).get("well", {}).get("images", [])
        if not images:
            raise BadImageError(path, f"well {wpath} lists no fields")
        out += [PlateField(name, str(row), str(col), str(img["path"]), f"{wpath}/{img['path']}") for img in images]
    if not out:
        raise BadImageError(path, "plate lists no wells")
    return out
