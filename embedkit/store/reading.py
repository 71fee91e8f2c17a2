"""``Store``: the one handle through which embedkit reads a store (items, vectors, pixels, views, runs)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from ..errors import EmbedkitError
from .rows import key_config
from .schema import ITEM_FIELDS, file_schema_version, key_for
from .shards import CHUNK_CACHE, RowReader

#: Up to this many rows, ``Store.vectors`` reads the rows asked for instead of scanning blocks.
FANCY_READ_LIMIT = 4096


def _decode(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


class Store:
    """Read access to a store. Reads are lazy through one cached read-only handle, reopened when a commit
    has replaced the file (or in a forked worker); use it as a context manager to close it early."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise EmbedkitError(f"{self.path}: no such store; create one with 'embedkit embed' or 'embedkit segment'")
        self._f: h5py.File | None = None
        self._stamp: tuple | None = None
        self._readers: dict[str, RowReader] = {}
        try:
            self.schema = file_schema_version(self._h5(), self.path)
        except OSError as exc:
            raise EmbedkitError(f"{self.path}: not a readable HDF5 store ({exc})") from None

    # handle ------------------------------------------------------------------------------------
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Close the cached handle and any open shards (the next read reopens them)."""
        for r in self._readers.values():
            r.close()
        self._readers = {}
        if self._f is not None and self._stamp and self._stamp[0] == os.getpid():
            with contextlib.suppress(Exception):
                self._f.close()
        self._f, self._stamp = None, None

    def _h5(self) -> h5py.File:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise EmbedkitError(f"{self.path}: the store was removed while it was being read") from None
        stamp = (os.getpid(), st.st_ino, st.st_mtime_ns, st.st_size)
        if self._f is None or stamp != self._stamp:
            if self._stamp and self._stamp[0] == os.getpid():
                self.close()
            else:  # a forked child must not touch its parent's HDF5 handles
                self._f, self._readers = None, {}
            self._f = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE)
            self._stamp = stamp
        return self._f

    def _reader(self, target: str) -> RowReader:
        f = self._h5()
        r = self._readers.get(target)
        if r is None:
            r = self._readers[target] = RowReader(self.path, f, target)
        return r

    # attributes and items ----------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return {k: _decode(v) for k, v in self._h5().attrs.items()}

    @property
    def root(self) -> str:
        return str(self.attrs.get("root", ""))

    def __len__(self) -> int:
        g = self._h5()["items"]
        return int(g["id"].shape[0]) if "id" in g else 0

    def _column_ds(self, name: str) -> h5py.Dataset:
        g = self._h5()["items"]
        if name in g and isinstance(g[name], h5py.Dataset):
            return g[name]
        if "meta" in g and name in g["meta"]:
            return g["meta"][name]
        raise EmbedkitError(f"{self.path}: no item column {name!r} (have: {', '.join(self.columns())})")

    def column(self, name: str) -> np.ndarray:
        """One per-item column: id, path, label, group, a metadata column, or a numeric column."""
        ds = self._column_ds(name)
        if h5py.check_string_dtype(ds.dtype) is not None:
            return np.array(ds.asstr()[:], dtype=object)
        return ds[:]

    def columns(self) -> list[str]:
        g = self._h5()["items"]
        cols = [k for k in g if isinstance(g[k], h5py.Dataset)]
        cols += list(g["meta"].keys()) if "meta" in g else []
        return cols

    @property
    def ids(self) -> np.ndarray:
        return self.column("id")

    @property
    def labels(self) -> np.ndarray:
        return self.column("label")

    @property
    def groups(self) -> np.ndarray:
        return self.column("group")

    def items_frame(self):
        """All 1-D item columns as a pandas DataFrame (one row per item)."""
        import pandas as pd

        g = self._h5()["items"]
        names = [k for k in ITEM_FIELDS if k in g] + [k for k in g if k not in ITEM_FIELDS and isinstance(g[k], h5py.Dataset)]
        cols = [(k, g[k]) for k in names]
        cols += [(k, g["meta"][k]) for k in g["meta"]] if "meta" in g else []
        data = {}
        for name, ds in cols:
            if ds.ndim != 1:
                continue
            data[name] = ds.asstr()[:] if h5py.check_string_dtype(ds.dtype) is not None else ds[:]
        return pd.DataFrame(data)

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    # embeddings --------------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        f = self._h5()
        return list(f["embeddings"].keys()) if "embeddings" in f else []

    def _group(self, key: str) -> h5py.Group:
        f = self._h5()
        if "embeddings" not in f or key not in f["embeddings"]:
            have = ", ".join(self.keys) or "none yet"
            raise EmbedkitError(f"{self.path}: no embeddings under key {key!r} (have: {have}); run 'embedkit embed' first")
        return f["embeddings"][key]

    def _key_reader(self, key: str) -> RowReader:
        target = f"embeddings/{key}/vectors"
        self._h5()  # drops readers of a replaced file
        if target not in self._readers:
            self._group(key)
        return self._reader(target)

    def resolve_key(self, key_or_encoder: str | None) -> str:
        """Accept an embedding key or an encoder name; with one key in the store (baseline and layer keys aside), None picks it."""
        from ..encoders.layers import LAYER_KEY

        keys = self.keys
        if key_or_encoder is None:
            own = [k for k in keys if k != "handcrafted" and not k.endswith("@random-init") and not LAYER_KEY.match(k)]
            if len(own) == 1:
                return own[0]
            raise EmbedkitError(f"{self.path}: holds {len(keys)} embedding keys ({', '.join(keys) or 'none'}); choose one with --encoder")
        if key_or_encoder in keys:
            return key_or_encoder
        if key_for(key_or_encoder) in keys:
            return key_for(key_or_encoder)
        raise EmbedkitError(f"{self.path}: no embeddings for {key_or_encoder!r} (have: {', '.join(keys) or 'none'})")

    def config(self, key: str) -> dict:
        return key_config(self._group(key), key)

    def key_attrs(self, key: str) -> dict:
        """All attributes of an embedding key (config fingerprint, skipped files, dates)."""
        return {k: _decode(v) for k, v in self._group(key).attrs.items()}

    def done(self, key: str) -> np.ndarray:
        return self._group(key)["done"][:]

    def vectors(self, key: str, rows: np.ndarray | slice | None = None, dtype=np.float32) -> np.ndarray:
        """Vectors of ``key`` for ``rows`` (all rows by default), read in blocks and cast to ``dtype``."""
        r = self._key_reader(key)
        n, dim = r.shape
        if rows is None:
            rows = slice(0, n)
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(n)
            out = np.empty((max(0, stop - start), dim), dtype=dtype)
            step = max(1, 2 ** 26 // max(1, dim * r.dtype.itemsize))
            for s in range(start, stop, step):
                e = min(stop, s + step)
                if out.dtype == r.dtype:
                    r.read_slice(s, e, out[s - start:e - start])
                else:
                    out[s - start:e - start] = r.read_slice(s, e)
            return out
        rows = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = np.empty((len(rows), dim), dtype=dtype)
        if len(rows) <= FANCY_READ_LIMIT:  # few rows: read just the unique rows asked for
            uniq, inverse = np.unique(sorted_rows, return_inverse=True)
            if len(uniq):
                out[order] = r.read_rows(uniq)[inverse.ravel()]
            return out
        step = max(1024, 2 ** 26 // max(1, dim * r.dtype.itemsize))
        for start in range(0, n, step):  # many rows: one sequential scan in blocks
            lo, hi = np.searchsorted(sorted_rows, [start, start + step])
            if hi > lo:
                block = r.read_slice(start, min(start + step, n))
                out[order[lo:hi]] = block[sorted_rows[lo:hi] - start]
        return out

    def iter_vectors(self, key: str, batch: int = 65536, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start_row, block) over all vectors without loading the whole matrix."""
        r = self._key_reader(key)
        for s in range(0, r.shape[0], batch):
            yield s, r.read_slice(s, s + batch).astype(dtype, copy=False)

    # pixels ------------------------------------------------------------------------------------
    @property
    def has_pixels(self) -> bool:
        return "pixels" in self._h5()

    def pixels(self, rows: np.ndarray | slice | int) -> np.ndarray:
        """Crops of ``rows`` (an index, a slice or an array of indices, in any order)."""
        if not self.has_pixels:
            raise EmbedkitError(f"{self.path}: this store holds no pixels; embed from the image files instead")
        r = self._reader("pixels")
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + (r.shape[0] if rows < 0 else 0)
            if not 0 <= i < r.shape[0]:
                raise IndexError(f"pixel row {rows} out of range for {r.shape[0]} rows")
            return r.read_slice(i, i + 1)[0]
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(r.shape[0])
            return r.read_slice(start, stop)
        rows = np.arange(r.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < -r.shape[0] or rows.max() >= r.shape[0]):
            raise IndexError(f"pixel rows out of range for {r.shape[0]} rows")
        rows = np.where(rows < 0, rows + r.shape[0], rows)
        if np.all(np.diff(rows) > 0):  # already sorted and unique: no reordering copy
            return r.read_rows(rows)
        uniq, inverse = np.unique(rows, return_inverse=True)
        return r.read_rows(uniq)[inverse.ravel()]

    # views and segmentation records --------------------------------------------------------------
    def view(self, key: str, method: str) -> tuple[np.ndarray, dict] | None:
        """The saved 2-D view ``/views/<key>/<method>`` and its attributes, or None."""
        f = self._h5()
        if "views" not in f or key not in f["views"] or method not in f["views"][key]:
            return None
        ds = f["views"][key][method]
        return ds[:], {k: _decode(v) for k, v in ds.attrs.items()}

    def views(self, key: str) -> dict[str, np.ndarray]:
        """Every saved 2-D view of ``key``: method -> float32 [N, 2] coordinates."""
        f = self._h5()
        if "views" not in f or key not in f["views"]:
            return {}
        return {method: ds[:] for method, ds in f["views"][key].items()}

    def segment_attrs(self) -> dict[str, Any]:
        """The raw attributes segment/patches recorded (JSON ones as text); empty when it made no part of the store."""
        f = self._h5()
        return {k: _decode(v) for k, v in f["segment"].attrs.items()} if "segment" in f else {}

    def to_anndata(self, key: str | None = None, only_done: bool = True):
        """This store as AnnData (X = vectors of ``key``, every key in obsm, items in obs); see embedkit.anndata_io."""
        from ..anndata_io import to_anndata

        return to_anndata(self, key, only_done)

    def segment_record(self) -> dict | None:
        """What segment/patches recorded (command, config, fields done, failed, attributes), or None."""
        f = self._h5()
        if "segment" not in f:
            return None
        g = f["segment"]
        rec = self.segment_attrs()
        rec["fields"] = list(g["fields"].asstr()[:]) if "fields" in g else []
        rec["failed"] = g["failed"].asstr()[:].tolist() if "failed" in g else []
        for k in ("config", "gmm_thresholds"):
            if k in rec:
                rec[k] = json.loads(rec[k])
        return rec
