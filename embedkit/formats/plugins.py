"""Which bioio plugin reads which file, and opening files through it with one clear error line.

Plain PNG/JPEG/TIFF files keep embedkit's own fast reader (``embedkit.images``); the formats here go
through bioio: OME-TIFF, OME-Zarr (NGFF, also single fields of an HCS plate), Zeiss CZI, Nikon ND2 and
Leica LIF. A missing plugin is named in the error, with the pip command that installs it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

from ..errors import BadImageError


@dataclass(frozen=True)
class Plugin:
    """A bioio reader plugin: the file kind, the module that reads it and the pip package that ships it."""

    kind: str
    module: str
    package: str


OME_TIFF = Plugin("OME-TIFF", "bioio_ome_tiff", "bioio-ome-tiff")
OME_ZARR = Plugin("OME-Zarr", "bioio_ome_zarr", "bioio-ome-zarr")
PLUGINS: dict[str, Plugin] = {
    ".ome.tif": OME_TIFF, ".ome.tiff": OME_TIFF, ".ome.zarr": OME_ZARR, ".zarr": OME_ZARR,
    ".czi": Plugin("Zeiss CZI", "bioio_czi", "bioio-czi"),
    ".nd2": Plugin("Nikon ND2", "bioio_nd2", "bioio-nd2"),
    ".lif": Plugin("Leica LIF", "bioio_lif", "bioio-lif"),
}
#: Suffixes embedkit discovers in folders in addition to the plain image suffixes.
SUFFIXES = tuple(PLUGINS)


def zarr_root(path: str | os.PathLike) -> str | None:
    """The enclosing '*.zarr' folder of a path (the path itself, or a field inside a plate), else None."""
    parts = str(path).replace(os.sep, "/").split("/")
    for i in range(len(parts), 0, -1):
        if parts[i - 1].lower().endswith(".zarr"):
            return "/".join(parts[:i])
    return None


def plugin_for(path: str | os.PathLike) -> Plugin | None:
    """The plugin for a file name (OME-Zarr for anything inside a '*.zarr' folder); None for plain images."""
    if zarr_root(path) is not None:
        return OME_ZARR
    low = str(path).lower()
    for suffix, plugin in sorted(PLUGINS.items(), key=lambda kv: -len(kv[0])):
        if low.endswith(suffix):
            return plugin
    return None


def available(plugin: Plugin) -> bool:
    """True when the plugin's module imports."""
    try:
        importlib.import_module(plugin.module)
    except ImportError:
        return False
    return True


def _reader_class(path: str, plugin: Plugin):
    try:
        mod = importlib.import_module(plugin.module)
    except ImportError:
        raise BadImageError(path, f"is a {plugin.kind} file, which needs the bioio plugin '{plugin.package}': "
                                  f"pip install {plugin.package} (or pip install 'embedkit[formats]')") from None
    return _single_parse(mod.Reader) if plugin is OME_TIFF else mod.Reader


@functools.lru_cache(maxsize=None)
def _single_parse(base: type) -> type:
    """bioio-ome-tiff's reader without its up-front support check, which parses the OME-XML a second time
    (half the cost of opening a small file); a file that is not OME-TIFF still fails, when it is parsed."""

    class OmeTiffReader(base):
        @staticmethod
        def _is_supported_image(fs, path, clean_metadata: bool = True, **kwargs) -> bool:
            return True

    return OmeTiffReader


def open_image(path: str | os.PathLike):
    """A ``bioio.BioImage`` for ``path`` read by its plugin (cached per file and modification time)."""
    path = str(path)
    if not os.path.exists(path):
        raise BadImageError(path, "file not found")
    return _open(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=16)
def _open(path: str, mtime: float):
    plugin = plugin_for(path)
    if plugin is None:
        raise BadImageError(path, "is not a microscopy format embedkit reads through bioio")
    reader = _reader_class(path, plugin)
    try:
        from bioio import BioImage
    except ImportError:
        raise BadImageError(path, f"is a {plugin.kind} file, which needs bioio: pip install bioio {plugin.package}") from None
    logs = [logging.getLogger(name) for name in ("bioio", "tifffile")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)  # they also log each failed attempt; the error below says it once
    try:
        return BioImage(path, reader=reader)
    except Exception as exc:  # plugins raise many types; all mean "this file cannot be read by it"
        raise BadImageError(path, f"not a readable {plugin.kind} file ({plugin.package}: {_reason(exc, path)})") from None
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _reason(exc: Exception, path: str) -> str:
    """The plugin's own reason from bioio's error (its last 'Reader: ...' line), shortened to one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    attempts = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("- ")]
    text = (attempts[-1] if attempts else lines[-1] if lines else type(exc).__name__).replace(f"'{path}'", "it")
    return text.replace(os.path.abspath(path), "it")[:200]
