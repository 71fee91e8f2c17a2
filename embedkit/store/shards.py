"""Shard files: immutable HDF5 files beside the store that hold its big arrays (pixels, vectors).

A shard is written under a temporary name, closed, read back and compared with a checksum of what was
meant to be written, fsynced and renamed; the main file records its size and checksum when it commits it.
The main file stitches shards into one array per target (``pixels``, ``embeddings/<key>/vectors``) with
an HDF5 virtual dataset for plain h5py readers, and keeps the same mapping as a table
(``/shards/maps/<target>``: rows vstart..vstart+n come from rows sstart.. of shard ``file``) that
:class:`RowReader` uses to read shards directly and to name a missing or truncated one.
"""

from __future__ import annotations

import contextlib
import io
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from ..atomic import atomic_path, disk_error
from ..errors import EmbedkitError
from .faults import fault
from .schema import STR

#: Rows read from one dataset per block while checksumming.
_BLOCK_BYTES = 1 << 26
#: Open shard files a reader keeps (bounded so that stores with many shards never run out of descriptors).
_OPEN_SHARDS = 32
#: Size of a shard that holds a whole array's worth of rows (a merged key, an upgraded array): few file
#: opens per read, yet small enough to build in memory and verify before it is renamed into place.
BIG_SHARD_BYTES = 256 << 20
#: HDF5 chunk cache per open file: several compressed crop chunks, so that neighbouring rows decompress once.
CHUNK_CACHE = 16 << 20


def folder_of(store_path: str | os.PathLike) -> Path:
    """The shards folder of a store: ``S.h5`` -> ``S.h5.shards``."""
    return Path(f"{store_path}.shards")


# --------------------------------------------------------------------------- checksums


def _update(crc: int, block: np.ndarray) -> int:
    if block.dtype.kind in "OUS":
        return zlib.crc32("\x00".join(str(v) for v in block.ravel()).encode("utf-8") + b"\x01", crc)
    return zlib.crc32(memoryview(np.ascontiguousarray(block)).cast("B"), crc)


def array_checksum(arr: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of an array's values (strings by their text), the same however it is split into row blocks."""
    arr = np.asarray(arr)
    if arr.ndim == 0 or arr.dtype.kind in "OUS":
        return _update(crc, arr)
    step = max(1, _BLOCK_BYTES // max(1, arr[:1].nbytes))
    for s in range(0, arr.shape[0], step):
        crc = _update(crc, arr[s:s + step])
    return crc


def dataset_checksum(ds: h5py.Dataset, crc: int = 0) -> int:
    """CRC-32 of a stored dataset, read in blocks; equal to :func:`array_checksum` of the array written."""
    if h5py.check_string_dtype(ds.dtype) is not None:
        return _update(crc, np.array(ds.asstr()[()], dtype=object))
    if ds.ndim == 0:
        return _update(crc, ds[()])
    step = max(1, _BLOCK_BYTES // max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize))
    for s in range(0, ds.shape[0], step):
        crc = _update(crc, ds[s:s + step])
    return crc


def _checksum_text(crc: int) -> str:
    return f"crc32:{crc:08x}"


def file_checksum(f: h5py.File) -> str:
    """Checksum of every dataset of a shard, in name order."""
    crc = 0
    for name in sorted(f):
        crc = dataset_checksum(f[name], crc)
    return _checksum_text(crc)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardInfo:
    """A written shard: its path relative to the shards folder, size in bytes and content checksum."""

    file: str
    bytes: int
    checksum: str


def write_shard(folder: Path, rel: str, arrays: dict[str, np.ndarray], compress: tuple[str, ...] = ()) -> ShardInfo:
    """Write ``arrays`` as one shard ``folder/rel``, verified by reading it back before it is renamed into place.

    Row arrays are chunked along rows (about 1 MB a chunk, as in a single-file store); ``compress`` names the
    ones stored gzip-compressed (crops).
    """
    path = folder / rel
    expected = 0
    for name in sorted(arrays):
        expected = array_checksum(arrays[name], expected)
    buf = io.BytesIO()  # built in memory and written by plain file I/O: a full disk is one clean OSError
    with h5py.File(buf, "w") as f:
        f.attrs["checksum"] = _checksum_text(expected)
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype.kind in "OUS":
                f.create_dataset(name, data=np.asarray(arr, dtype=object), dtype=STR)
            elif arr.ndim >= 2 and arr.shape[0]:
                rows = max(1, min(arr.shape[0], (1 << 20) // max(1, arr[:1].nbytes)))
                kw = {"compression": "gzip", "compression_opts": 1} if name in compress else {}
                f.create_dataset(name, data=arr, chunks=(rows,) + arr.shape[1:], **kw)
            else:
                f.create_dataset(name, data=arr)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(buf.getbuffer())
                fh.flush()
                fault("shard:written", tmp)
            got = _read_back(tmp)
            if got != _checksum_text(expected):
                raise EmbedkitError(f"disk full or I/O error while writing {path} (it read back with checksum {got}, "
                                    f"expected {_checksum_text(expected)}); nothing was lost; free space and re-run")
    except OSError as exc:
        err = disk_error(exc, path)
        if err is not None:
            raise err from None
        raise
    fault("shard:renamed", path)
    return ShardInfo(rel, path.stat().st_size, _checksum_text(expected))


def _read_back(path: Path) -> str:
    try:
        with h5py.File(path, "r") as f:
            return file_checksum(f)
    except (OSError, KeyError, ValueError) as exc:
        return f"unreadable ({str(exc)[:120]})"


# --------------------------------------------------------------------------- the shard table in the main file


@dataclass
class ShardTable:
    """Committed shards of a store, as recorded in its main file's ``/shards`` group."""

    folder: str
    files: list[str]
    bytes: np.ndarray
    checksums: list[str]

    @classmethod
    def read(cls, f: h5py.File, default_folder: str, checksums: bool = True) -> "ShardTable":
        if "shards" not in f:
            return cls(default_folder, [], np.zeros(0, np.int64), [])
        g = f["shards"]
        return cls(str(g.attrs.get("folder", default_folder)), list(g["files"].asstr()[:]), g["bytes"][:],
                   list(g["checksums"].asstr()[:]) if checksums else [])

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.files)}


def add_shards(f: h5py.File, folder_name: str, infos: Iterable[ShardInfo]) -> dict[str, int]:
    """Record shards in the main file being committed; return file -> index for all recorded shards."""
    g = f.require_group("shards")
    if "folder" not in g.attrs:
        g.attrs["folder"] = folder_name
    for name, dtype in (("files", STR), ("checksums", STR), ("bytes", np.int64)):
        if name not in g:
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
    known = {n: i for i, n in enumerate(g["files"].asstr()[:])}
    new = [i for i in infos if i.file not in known]
    if new:
        n0 = g["files"].shape[0]
        for name in ("files", "checksums", "bytes"):
            g[name].resize(n0 + len(new), axis=0)
        g["files"][n0:] = np.array([i.file for i in new], dtype=object)
        g["checksums"][n0:] = np.array([i.checksum for i in new], dtype=object)
        g["bytes"][n0:] = np.array([i.bytes for i in new], dtype=np.int64)
        known.update({i.file: n0 + k for k, i in enumerate(new)})
    return known


def maps_of(f: h5py.File, target: str) -> tuple[np.ndarray, str | None]:
    """(maps [K, 4] of vstart, n, file index, sstart; source dataset name) of a sharded target."""
    name = f"shards/maps/{target}"
    if name not in f:
        return np.zeros((0, 4), np.int64), None
    ds = f[name]
    return ds[:], str(ds.attrs["source"])


def set_maps(f: h5py.File, target: str, maps: np.ndarray, source: str) -> None:
    name = f"shards/maps/{target}"
    if name in f:
        del f[name]
    ds = f.create_dataset(name, data=np.asarray(maps, np.int64).reshape(-1, 4), maxshape=(None, 4))
    ds.attrs["source"] = source


def runs_of(vrows: np.ndarray, srows: np.ndarray, file_index: int) -> np.ndarray:
    """Maps [K, 4] placing shard rows ``srows`` at store rows ``vrows``, one per run where both step by one."""
    vrows, srows = np.asarray(vrows, np.int64), np.asarray(srows, np.int64)
    if not len(vrows):
        return np.zeros((0, 4), np.int64)
    breaks = np.flatnonzero((np.diff(vrows) != 1) | (np.diff(srows) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(vrows)]])
    return np.stack([vrows[starts], stops - starts, np.full(len(starts), file_index), srows[starts]], axis=1)


def stitch(f: h5py.File, target: str, n_rows: int, tail: tuple[int, ...], dtype, fill) -> None:
    """(Re)create the virtual dataset ``target`` of ``n_rows`` rows from its maps; rows no map covers read ``fill``."""
    maps, source = maps_of(f, target)
    table = ShardTable.read(f, "")
    attrs = dict(f[target].attrs) if target in f else {}
    if target in f:
        del f[target]
    layout = h5py.VirtualLayout(shape=(n_rows,) + tuple(tail), dtype=dtype)  # fixed extent: opening it never opens the shards
    for vstart, n, fi, sstart in maps:
        src = h5py.VirtualSource(f"{table.folder}/{table.files[fi]}", source, shape=(int(sstart + n),) + tuple(tail))
        layout[int(vstart):int(vstart + n)] = src[int(sstart):int(sstart + n)]
    ds = f.create_virtual_dataset(target, layout, fillvalue=fill)
    for k, v in attrs.items():
        ds.attrs[k] = v


# --------------------------------------------------------------------------- reading and checking


def shard_problem(folder: Path, rel: str, size: int) -> str | None:
    """Why shard ``rel`` cannot be read ('missing', 'truncated ...'), or None when its size is as recorded."""
    try:
        got = (folder / rel).stat().st_size
    except FileNotFoundError:
        return "is missing"
    if got != size:
        return f"is {'truncated' if got < size else 'altered'} ({got} bytes, {size} recorded)"
    return None


def damaged_message(store_path: str | os.PathLike, folder: Path, rel: str, problem: str) -> str:
    return (f"{store_path}: shard {folder.name}/{rel} {problem}; restore the store's shards folder from a copy, "
            f"or run 'embedkit store check {store_path}' to list every damaged shard")


class RowReader:
    """Rows of one store array: an inline dataset, or shards stitched by the store's maps (read directly)."""

    def __init__(self, store_path: Path, f: h5py.File, target: str):
        self.store_path = store_path
        self.ds = f[target]
        self.shape = self.ds.shape
        self.dtype = self.ds.dtype
        maps, self.source = maps_of(f, target) if self.ds.is_virtual else (np.zeros((0, 4), np.int64), None)
        self.sharded = self.ds.is_virtual and self.source is not None
        if not self.sharded:
            return
        order = np.argsort(maps[:, 0], kind="stable")
        self.maps = maps[order]
        self.fill = self.ds.fillvalue
        table = ShardTable.read(f, folder_of(store_path).name, checksums=False)
        self.folder = store_path.parent / table.folder
        self.files = table.files
        for fi in np.unique(self.maps[:, 2]):
            problem = shard_problem(self.folder, table.files[fi], int(table.bytes[fi]))
            if problem:
                raise EmbedkitError(damaged_message(store_path, self.folder, table.files[fi], problem))
        self._open: OrderedDict[int, tuple[h5py.File, h5py.Dataset]] = OrderedDict()
        # compressed crops want a chunk cache (neighbouring rows decompress once); plain vectors read faster
        # straight into the caller's array, past any cache
        self._cache = CHUNK_CACHE if target == "pixels" else 0

    def close(self) -> None:
        for fh, _ in getattr(self, "_open", {}).values():
            with contextlib.suppress(Exception):
                fh.close()
        if self.sharded:
            self._open.clear()

    def _src(self, fi: int) -> h5py.Dataset:
        entry = self._open.pop(fi, None)
        if entry is None:
            try:
                fh = h5py.File(self.folder / self.files[fi], "r", rdcc_nbytes=self._cache)
                entry = (fh, fh[self.source])
            except (OSError, KeyError) as exc:
                raise EmbedkitError(damaged_message(self.store_path, self.folder, self.files[fi],
                                                    f"cannot be opened ({str(exc)[:100]})")) from None
            if len(self._open) >= _OPEN_SHARDS:
                self._open.popitem(last=False)[1][0].close()
        self._open[fi] = entry
        return entry[1]

    def _empty(self, n: int) -> np.ndarray:
        return np.full((n,) + self.shape[1:], self.fill, dtype=self.dtype)

    def read_slice(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows start..stop (clipped to the array), read straight into ``out`` when given (same dtype)."""
        start, stop = max(0, start), min(self.shape[0], stop)
        if out is None:
            out = np.empty((max(0, stop - start),) + self.shape[1:], self.dtype)
        if not self.sharded:
            _read_into(self.ds, start, stop, out)
            return out
        maps = list(self._overlapping(start, stop))
        if sum(min(stop, int(m[0] + m[1])) - max(start, int(m[0])) for m in maps) != stop - start:
            out[...] = self.fill  # rows no shard holds read as the fill value
        for vstart, n, fi, sstart in maps:
            lo, hi = max(start, int(vstart)), min(stop, int(vstart + n))
            _read_into(self._src(int(fi)), int(sstart) + lo - int(vstart), int(sstart) + hi - int(vstart),
                       out[lo - start:hi - start])
        return out

    def _overlapping(self, start: int, stop: int) -> Iterator[np.ndarray]:
        ends = self.maps[:, 0] + self.maps[:, 1]
        first = int(np.searchsorted(ends, start, side="right"))
        for m in self.maps[first:]:
            if m[0] >= stop:
                break
            yield m

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows given as sorted, unique indices."""
        rows = np.asarray(rows, np.int64)
        if not self.sharded:
            return _take(self.ds, rows, np.empty((len(rows),) + self.shape[1:], dtype=self.dtype))
        m = np.searchsorted(self.maps[:, 0], rows, side="right") - 1
        ok = (m >= 0)
        ok[ok] &= rows[ok] < (self.maps[m[ok], 0] + self.maps[m[ok], 1])
        out = np.empty((len(rows),) + self.shape[1:], self.dtype) if ok.all() else self._empty(len(rows))
        for mi in np.unique(m[ok]):
            sel = np.flatnonzero(ok & (m == mi))  # rows and maps are sorted: one block of positions per map
            vstart, _, fi, sstart = self.maps[mi]
            _take(self._src(int(fi)), rows[sel] - vstart + sstart, out[sel[0]:sel[-1] + 1])
        return out


def _take(ds: h5py.Dataset, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Sorted unique ``rows`` of a dataset into ``out``. Crops are read run by run (a fancy selection over
    compressed 4-D chunks is many times slower in HDF5); plain 2-D rows in one fancy read."""
    if not len(rows):
        return out
    if ds.ndim <= 2:
        out[:] = ds[rows]
        return out
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    pos = 0
    for run in np.split(rows, breaks):
        _read_into(ds, int(run[0]), int(run[-1]) + 1, out[pos:pos + len(run)])
        pos += len(run)
    return out


def _read_into(ds: h5py.Dataset, start: int, stop: int, out: np.ndarray) -> None:
    """Rows start..stop of ``ds`` into the (C-contiguous) array ``out`` without a temporary copy."""
    if stop > start:
        ds.read_direct(out, np.s_[start:stop], np.s_[0:stop - start])


def check_store_shards(store_path: str | os.PathLike, f: h5py.File) -> tuple[int, list[str]]:
    """Verify every committed shard's size and checksum; return (shards checked, one line per problem)."""
    table = ShardTable.read(f, folder_of(store_path).name)
    folder = Path(store_path).parent / table.folder
    problems = []
    for rel, size, want in zip(table.files, table.bytes, table.checksums):
        problem = shard_problem(folder, rel, int(size))
        if problem is None:
            got = _read_back(folder / rel)
            if got != want:
                problem = f"fails its checksum ({got}, {want} recorded)"
        if problem:
            problems.append(f"{table.folder}/{rel} {problem}")
    return len(table.files), problems
