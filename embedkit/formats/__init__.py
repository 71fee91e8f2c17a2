"""Microscopy formats through bioio: OME-TIFF, OME-Zarr (and HCS plates), CZI, ND2, LIF.

The rest of embedkit calls four functions here; plain PNG/JPEG/TIFF never reach this package:

* :func:`handles` -- does this path (or item locator) go through bioio?
* :func:`read_raw` -- the (H, W, C) pixels of one item, as ``embedkit.images.read_image`` returns them;
* :func:`resolve_channel_names` -- turn ``--channels DAPI,Phalloidin,-`` into indices for one file;
* :func:`apply_selection` -- expand files into items (plate fields, scenes, time points) with metadata.
"""

from __future__ import annotations

import os

from .expand import PLATE_COLUMNS, Selection, apply_selection, file_items
from .locator import SEP, Locator, file_of, parse
from .plugins import SUFFIXES, plugin_for, zarr_root
from .reader import FileInfo, describe, read_plane, read_raw

__all__ = ["PLATE_COLUMNS", "SEP", "SUFFIXES", "FileInfo", "Locator", "Selection", "apply_selection", "describe",
           "exists", "file_items", "file_of", "handles", "is_container", "parse", "plugin_for", "read_plane",
           "read_raw", "resolve_channel_names"]


def handles(path: str | os.PathLike) -> bool:
    """True when ``path`` is a microscopy file or an item locator that bioio reads."""
    text = str(path)
    return SEP in text or plugin_for(text) is not None


def is_container(path: str | os.PathLike) -> bool:
    """True for a folder that is one image file: an OME-Zarr ('*.zarr')."""
    return os.path.isdir(path) and str(path).rstrip("/").lower().endswith(".zarr")


def exists(path: str | os.PathLike) -> bool:
    """Whether the file (or OME-Zarr folder) behind a path or locator exists."""
    return os.path.exists(file_of(str(path)))


def resolve_channel_names(channels, path: str | os.PathLike):
    """A channel map with names replaced by this file's channel indices (names need channel metadata)."""
    from ..errors import BadImageError
    from .dims import resolve_channels

    if not handles(path):
        raise BadImageError(str(path), "has no channel metadata, so --channels must use indices, e.g. 1,0,-")
    loc = parse(str(path))
    return resolve_channels(channels, describe(loc.file, loc.scene).channel_names, str(path))
