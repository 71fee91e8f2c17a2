"""Reading one plane of a microscopy file through bioio: (H, W, C) pixels plus what the metadata says.

The reader picks the scene and time point of a :class:`~embedkit.formats.locator.Locator`, reduces Z by
its rule, and optionally resamples to a target pixel size. Everything stays lazy (dask) until the plane
or region is cut, so :mod:`embedkit.formats.lazy` reads huge fields region by region with the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import BadImageError
from . import dims
from .locator import Locator, parse
from .plugins import open_image, plugin_for
from .resample import resample, resample_factor


@dataclass(frozen=True)
class FileInfo:
    """Shape and metadata of one scene of a file: sizes of T, C, Z, Y, X, channel names, µm per pixel (Y, X)."""

    path: str
    kind: str
    n_scenes: int
    t: int
    c: int
    z: int
    y: int
    x: int
    channel_names: tuple[str, ...]
    pixel_size: tuple[float, float] | None
    dtype: str

    @property
    def pixel_size_text(self) -> str:
        """µm per pixel along X as recorded per item (a number, as ``segment`` reads it), or 'unknown'."""
        return "unknown" if self.pixel_size is None else f"{self.pixel_size[1]:g}"


def _scene(im, scene: int | None, path: str):
    if scene is not None:
        if scene >= len(im.scenes):
            raise BadImageError(path, f"has {len(im.scenes)} scene(s) but the item asks for scene {scene}")
        im.set_scene(scene)
    elif len(im.scenes) > 1:
        im.set_scene(0)
    return im


def _pixel_size(im) -> tuple[float, float] | None:
    try:
        pps = im.physical_pixel_sizes
    except Exception:  # some plugins raise on missing or odd metadata; it is only metadata
        return None
    y, x = getattr(pps, "Y", None), getattr(pps, "X", None)
    if not x or not y or not np.isfinite([x, y]).all() or x <= 0 or y <= 0:
        return None
    return float(y), float(x)


def _channel_names(im, n: int) -> tuple[str, ...]:
    try:
        names = list(im.channel_names or [])
    except Exception:  # missing channel metadata is not an error
        names = []
    return tuple(str(c) for c in names) if len(names) == n else tuple(f"C{i}" for i in range(n))


def describe(path: str | os.PathLike, scene: int | None = None) -> FileInfo:
    """What one scene of a file holds, from its metadata (no pixels are read)."""
    path = str(path)
    im = _scene(open_image(path), scene, path)
    d = im.dims
    n_s = getattr(d, "S", 1) if "S" in d.order else 1
    c = d.C * n_s
    return FileInfo(path, plugin_for(path).kind, len(im.scenes), d.T, c, d.Z, d.Y, d.X,
                    _channel_names(im, d.C) if n_s == 1 else tuple(f"C{i}" for i in range(c)), _pixel_size(im),
                    str(im.dtype))


def stack(path: str, scene: int | None, t: int | None):
    """The lazy (Z, C, Y, X) dask array of one scene and time point (RGB samples count as channels)."""
    im = _scene(open_image(path), scene, path)
    d = im.dims
    t = 0 if t is None else t
    if t >= d.T:
        raise BadImageError(path, f"has {d.T} time point(s) but the item asks for frame {t}")
    try:
        if "S" in d.order and d.S > 1:
            arr = im.get_image_dask_data("ZCYXS", T=t)
            z, c, y, x, s = arr.shape
            return arr.transpose(0, 1, 4, 2, 3).reshape(z, c * s, y, x)
        return im.get_image_dask_data("ZCYX", T=t)
    except BadImageError:
        raise
    except Exception as exc:  # plugin errors while building the lazy array
        raise BadImageError(path, f"cannot read its pixels ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_plane(loc: Locator | str, region: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, FileInfo]:
    """The (H, W, C) pixels of a locator (optionally only rows y0:y1, columns x0:x1 before resampling) and the file's info."""
    loc = parse(loc) if isinstance(loc, str) else loc
    path = loc.file
    info = describe(path, loc.scene)
    arr = stack(path, loc.scene, loc.t)
    if region is not None:
        y0, y1, x0, x1 = region
        arr = arr[:, :, y0:y1, x0:x1]
    try:
        z = dims.z_index(loc.z, arr.shape[0], path)
        plane = np.asarray((arr.max(axis=0) if z is None else arr[z]).compute(scheduler="synchronous"))
    except BadImageError:
        raise
    except Exception as exc:  # decoding errors surface only when pixels are computed
        raise BadImageError(path, f"cannot read its pixels ({type(exc).__name__}: {str(exc)[:200]})") from None
    hwc = np.moveaxis(plane, 0, -1)
    factor = resample_factor(info.pixel_size, loc.px)
    if factor is not None:
        hwc = resample(hwc, factor)
    return hwc, info


def read_raw(text: str | os.PathLike) -> np.ndarray:
    """(H, W, C) pixels of a locator string, as ``embedkit.images.read_image`` returns them."""
    return read_plane(str(text))[0]
