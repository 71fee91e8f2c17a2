"""From discovered files to items: one item per plate field, scene and time point, with metadata columns.

:func:`apply_selection` rewrites a :class:`~embedkit.sources.Source` so that every microscopy file becomes
the items it holds. Each item's path is a locator (``file::t=3,z=max``) and its metadata records what
was read: the physical pixel size (or 'unknown'), the channel names, the frame, the Z rule, and for
OME-Zarr plates the plate, row, column, well and field (the well is then the default group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..errors import BadImageError, EmbedkitError
from ..sources import Item, Source
from . import plates
from .locator import Locator
from .plugins import plugin_for
from .reader import FileInfo, describe

PLATE_COLUMNS = ("plate", "row", "column", "well", "field")


@dataclass(frozen=True)
class Selection:
    """Run-wide plane choices: Z rule, time points (None = all) and a target pixel size in µm (None = native)."""

    z: str | None = None
    t: tuple[int, ...] | None = None
    pixel_size: float | None = None

    def to_dict(self) -> dict:
        return {"z": self.z, "t": None if self.t is None else list(self.t), "pixel_size": self.pixel_size}


def _planes(info: FileInfo, sel: Selection, path: str) -> list[int | None]:
    if info.t <= 1:  # --t picks frames of time series; still images pass through
        return [None]
    frames = list(range(info.t)) if sel.t is None else list(sel.t)
    bad = [t for t in frames if t >= info.t]
    if bad:
        raise BadImageError(path, f"has {info.t} time points but --t asks for frame {bad[0]}")
    return frames


def _meta(info: FileInfo, loc: Locator, sel: Selection) -> dict[str, str]:
    meta = {"pixel_size": info.pixel_size_text, "channel_names": "|".join(info.channel_names),
            "format": info.kind}
    if loc.t is not None:
        meta["t"] = str(loc.t)
    if info.z > 1:
        meta["z"] = loc.z or "max"
    if loc.scene is not None:
        meta["scene"] = str(loc.scene)
    if sel.pixel_size is not None:
        meta["resampled_to"] = f"{sel.pixel_size:g}" if info.pixel_size is not None else "no (pixel size unknown)"
    return meta


def file_items(item: Item, root: str, sel: Selection = Selection(), group_by: str | None = None) -> list[Item]:
    """The items one source item (a file, OME-Zarr image or plate) holds under ``sel``."""
    path = os.path.join(root, item.path)
    fields = [(item.path, {})]
    if plates.is_plate(path):
        fields = [(f"{item.path.rstrip('/')}/{f.path}", f.columns()) for f in plates.plate_fields(path)]
    out = []
    for rel, plate_cols in fields:
        abs_file = os.path.join(root, rel)
        first = describe(abs_file)
        for scene in ([None] if first.n_scenes <= 1 else range(first.n_scenes)):
            info = first if scene is None else describe(abs_file, scene)
            for t in _planes(info, sel, abs_file):
                loc = Locator(rel, scene=scene, t=t, z=(sel.z or "max") if info.z > 1 else None,
                              px=sel.pixel_size if info.pixel_size is not None else None)
                meta = {**item.meta, **plate_cols, **_meta(info, loc, sel)}
                group = item.group
                if plate_cols and (group_by is None or group_by in PLATE_COLUMNS):
                    group = f"{plate_cols['plate']}/{plate_cols.get(group_by or 'well')}"
                single = len(fields) == 1 and str(loc) == item.path
                out.append(Item(id=item.id if single else _item_id(item, rel, loc), path=str(loc), label=item.label,
                                group=group, meta=meta))
    return out


def _item_id(item: Item, rel: str, loc: Locator) -> str:
    """The id of one plane: the source item's id with the plane's part of the locator appended."""
    suffix = str(loc)[len(item.path):] if str(loc).startswith(item.path) else "/" + str(loc)
    return item.id + suffix


def apply_selection(source: Source, sel: Selection = Selection(), group_by: str | None = None,
                    skip_bad: bool = False) -> tuple[Source, list[tuple[str, str]]]:
    """Expand every microscopy file of ``source`` into its items; plain images pass through unchanged.

    Returns the new source and, with ``skip_bad``, the (path, reason) of files that could not be read.
    With ``sel.pixel_size`` set, plain images cannot be resampled: they record pixel_size 'unknown'.
    """
    items: list[Item] = []
    failed: list[tuple[str, str]] = []
    for it in source.items:
        if plugin_for(it.path) is None:
            if sel.pixel_size is not None and "pixel_size" not in it.meta:
                it = replace(it, meta={**it.meta, "pixel_size": "unknown", "resampled_to": "no (pixel size unknown)"})
            items.append(it)
            continue
        try:
            items += file_items(it, source.root, sel, group_by)
        except BadImageError as exc:
            if not skip_bad:
                raise
            failed.append((exc.path, exc.reason))
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise EmbedkitError(f"duplicate item id {it.id!r} after expanding microscopy files; ids must be unique")
        seen.add(it.id)
    return Source(source.root, items, source.kind), failed
