"""The HDF5 store: one file that every stage reads and writes (layout in docs/store.md).

Crash safety works in two layers:

* Every change to a store happens in a :func:`transaction`: a copy of the file is modified, flushed,
  fsynced and atomically renamed over the original. A ``kill -9`` at any moment leaves either the old or
  the new store, never a torn one.
* Long runs (embedding, segmentation) never hold the store open for writing. They append results to a
  :class:`Journal` of atomically written chunk files next to the store, and commit once at the end. A
  re-run finds the journal and resumes from it.

Only one process may write a store at a time; :func:`write_lock` enforces that with an advisory lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from . import __version__
from .atomic import atomic_write_bytes, fsync_dir
from .configdiff import describe_differences
from .errors import EmbedkitError
from .sources import Item

SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")
ITEM_FIELDS = ("id", "path", "label", "group")
#: Up to this many rows, ``Store.vectors`` reads with one fancy-indexed HDF5 read instead of a block scan.
FANCY_READ_LIMIT = 4096


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (configs, id lists)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def key_for(encoder_name: str) -> str:
    """Default embedding key for an encoder name: 'timm:vit_small' -> 'timm_vit_small'."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", encoder_name).strip("_")


# --------------------------------------------------------------------------- locking and transactions


@contextlib.contextmanager
def write_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<store>.lock`` for the duration of a write."""
    lock_path = f"{path}.lock"
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbedkitError(f"{path} is being written by another embedkit process; wait for it to finish") from None
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


@contextlib.contextmanager
def transaction(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Yield a writable h5py.File whose changes replace ``path`` atomically when the block succeeds.

    A new store is created with the schema attributes. On an exception, or a crash at any point, the
    original file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.exists():
        check_schema(path)
        shutil.copyfile(path, tmp)
        f = h5py.File(tmp, "r+")
    else:
        f = h5py.File(tmp, "w")
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["embedkit_version"] = __version__
        f.attrs["created"] = now_iso()
    try:
        yield f
        f.attrs["modified"] = now_iso()
        f.flush()
        f.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_schema(path: str | os.PathLike) -> None:
    """Refuse files that are not embedkit stores, or that come from a newer schema."""
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("schema_version")
    except OSError as exc:
        raise EmbedkitError(f"{path}: not a readable HDF5 store ({exc})") from None
    if version is None:
        raise EmbedkitError(f"{path}: an HDF5 file, but not an embedkit store (no schema_version attribute)")
    if int(version) > SCHEMA_VERSION:
        raise EmbedkitError(f"{path}: store schema {int(version)} is newer than this embedkit understands "
                            f"({SCHEMA_VERSION}); upgrade embedkit")


# --------------------------------------------------------------------------- writing items and vectors


def write_items(f: h5py.File, items: Sequence[Item], root: str, columns: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Append items (and optional per-item array columns) to /items; return their row indices.

    Paths are stored relative to the store's root attribute; items from another root keep absolute paths.
    """
    g = f.require_group("items")
    if "root" not in f.attrs:
        f.attrs["root"] = str(root)
    store_root = str(f.attrs["root"])
    n_old = g["id"].shape[0] if "id" in g else 0
    new = {
        "id": [it.id for it in items],
        "path": [it.path if os.path.abspath(store_root) == os.path.abspath(root) else os.path.join(os.path.abspath(root), it.path) for it in items],
        "label": [it.label or "" for it in items],
        "group": [it.group or "" for it in items],
    }
    for name, values in new.items():
        _append(g, name, np.array(values, dtype=object), STR, n_old)
    meta_cols = sorted({k for it in items for k in it.meta})
    existing_meta = list(g["meta"].keys()) if "meta" in g else []
    if meta_cols or existing_meta:
        mg = g.require_group("meta")
        for col in sorted(set(meta_cols) | set(existing_meta)):
            _append(mg, col, np.array([it.meta.get(col, "") for it in items], dtype=object), STR, n_old)
    for name, arr in (columns or {}).items():
        arr = np.asarray(arr)
        if arr.shape[0] != len(items):
            raise ValueError(f"column {name!r} has {arr.shape[0]} rows for {len(items)} items")
        _append(g, name, arr, STR if arr.dtype == object else arr.dtype, n_old)
    for name in g:  # numeric columns absent from this batch get padding so all stay length N
        ds = g[name]
        if isinstance(ds, h5py.Dataset) and ds.shape[0] < n_old + len(items):
            _pad(ds, n_old + len(items))
    _pad_embeddings(f, n_old + len(items))
    return np.arange(n_old, n_old + len(items))


def _append(g: h5py.Group, name: str, values: np.ndarray, dtype, n_old: int) -> None:
    if name not in g:
        shape = (n_old + len(values),) + values.shape[1:]
        ds = g.create_dataset(name, shape=shape, maxshape=(None,) + values.shape[1:], dtype=dtype,
                              chunks=True if shape[0] else None)
        if n_old:
            _fill_default(ds, 0, n_old)
    else:
        ds = g[name]
        ds.resize(n_old + len(values), axis=0)
    if len(values):
        ds[n_old:n_old + len(values)] = values


def _fill_default(ds: h5py.Dataset, start: int, stop: int) -> None:
    if h5py.check_string_dtype(ds.dtype) is not None:
        ds[start:stop] = np.array([""] * (stop - start), dtype=object)
    elif np.issubdtype(ds.dtype, np.floating):
        ds[start:stop] = np.nan
    elif np.issubdtype(ds.dtype, np.integer):
        ds[start:stop] = -1


def _pad(ds: h5py.Dataset, n: int) -> None:
    old = ds.shape[0]
    ds.resize(n, axis=0)
    _fill_default(ds, old, n)


def _pad_embeddings(f: h5py.File, n: int) -> None:
    """New rows start as not-done (NaN vectors, the datasets' fill value) in every existing embedding key."""
    for key in f.get("embeddings", {}):
        g = f["embeddings"][key]
        if g["vectors"].shape[0] < n:
            g["vectors"].resize(n, axis=0)
            g["done"].resize(n, axis=0)


def ensure_embedding(f: h5py.File, key: str, dim: int, dtype: str, config: dict) -> h5py.Group:
    """Create /embeddings/<key> or check that the existing one has the same encoder configuration."""
    n = f["items"]["id"].shape[0]
    eg = f.require_group("embeddings")
    cfg_fp = fingerprint(comparable_config(config))
    if key in eg:
        g = eg[key]
        old = json.loads(g.attrs["config"])
        if g.attrs["config_fingerprint"] != cfg_fp:
            raise EmbedkitError(config_mismatch_message(key, old, config))
        return g
    g = eg.create_group(key)
    g.create_dataset("vectors", shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                     chunks=(max(1, min(n, max(1, 2 ** 20 // (dim * np.dtype(dtype).itemsize)))), dim), fillvalue=np.nan)
    g.create_dataset("done", shape=(n,), maxshape=(None,), dtype=bool, chunks=True, fillvalue=False)
    g.attrs["config"] = json.dumps(config, sort_keys=True)
    g.attrs["config_fingerprint"] = cfg_fp
    g.attrs["encoder"] = config.get("encoder", "")
    g.attrs["dim"] = dim
    g.attrs["dtype"] = dtype
    g.attrs["created"] = now_iso()
    return g


#: Fields of an encoder run that change the vectors; library versions and devices are provenance only.
COMPARED_FIELDS = ("encoder", "weights_fingerprint", "preprocess", "pooling", "conversion", "dtype", "dim")


def comparable_config(config: dict) -> dict:
    return {k: config.get(k) for k in COMPARED_FIELDS}


def config_mismatch_message(key: str, old: dict, new: dict) -> str:
    return (f"embedding key {key!r} was made with a different encoder configuration "
            f"({describe_differences(old, new, COMPARED_FIELDS)}); use another --key to keep both")


# --------------------------------------------------------------------------- reading


class Store:
    """Read access to a store; opens the file per call so that no handle outlives a read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise EmbedkitError(f"{self.path}: no such store; create one with 'embedkit embed' or 'embedkit segment'")
        check_schema(self.path)

    @contextlib.contextmanager
    def h5(self) -> Iterator[h5py.File]:
        with h5py.File(self.path, "r") as f:
            yield f

    @property
    def attrs(self) -> dict:
        with self.h5() as f:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

    @property
    def root(self) -> str:
        return str(self.attrs.get("root", ""))

    def __len__(self) -> int:
        with self.h5() as f:
            return int(f["items"]["id"].shape[0]) if "items" in f else 0

    def column(self, name: str) -> np.ndarray:
        """One per-item column: id, path, label, group, a metadata column, or a numeric column."""
        with self.h5() as f:
            g = f["items"]
            if name in g and isinstance(g[name], h5py.Dataset):
                ds = g[name]
            elif "meta" in g and name in g["meta"]:
                ds = g["meta"][name]
            else:
                raise EmbedkitError(f"{self.path}: no item column {name!r} (have: {', '.join(self.columns())})")
            if h5py.check_string_dtype(ds.dtype) is not None:
                return np.array(ds.asstr()[:], dtype=object)
            return ds[:]

    def columns(self) -> list[str]:
        with self.h5() as f:
            g = f["items"]
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

        data = {}
        with self.h5() as f:
            g = f["items"]
            names = [k for k in ITEM_FIELDS if k in g] + [k for k in g if k not in ITEM_FIELDS and isinstance(g[k], h5py.Dataset)]
            cols = [(k, g[k]) for k in names]
            cols += [(k, g["meta"][k]) for k in g["meta"]] if "meta" in g else []
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
        with self.h5() as f:
            return list(f["embeddings"].keys()) if "embeddings" in f else []

    def _group(self, f: h5py.File, key: str) -> h5py.Group:
        if "embeddings" not in f or key not in f["embeddings"]:
            have = ", ".join(self.keys) or "none yet"
            raise EmbedkitError(f"{self.path}: no embeddings under key {key!r} (have: {have}); run 'embedkit embed' first")
        return f["embeddings"][key]

    def resolve_key(self, key_or_encoder: str | None) -> str:
        """Accept an embedding key or an encoder name; with one key in the store, None picks it."""
        keys = self.keys
        if key_or_encoder is None:
            if len(keys) == 1:
                return keys[0]
            raise EmbedkitError(f"{self.path}: holds {len(keys)} embedding keys ({', '.join(keys) or 'none'}); choose one with --encoder")
        if key_or_encoder in keys:
            return key_or_encoder
        if key_for(key_or_encoder) in keys:
            return key_for(key_or_encoder)
        raise EmbedkitError(f"{self.path}: no embeddings for {key_or_encoder!r} (have: {', '.join(keys) or 'none'})")

    def config(self, key: str) -> dict:
        with self.h5() as f:
            return json.loads(self._group(f, key).attrs["config"])

    def done(self, key: str) -> np.ndarray:
        with self.h5() as f:
            return self._group(f, key)["done"][:]

    def vectors(self, key: str, rows: np.ndarray | slice | None = None, dtype=np.float32) -> np.ndarray:
        """Vectors of ``key`` for ``rows`` (all rows by default), read in chunks and cast to ``dtype``."""
        with self.h5() as f:
            ds = self._group(f, key)["vectors"]
            if rows is None:
                rows = slice(0, ds.shape[0])
            if isinstance(rows, slice):
                start, stop, _ = rows.indices(ds.shape[0])
                out = np.empty((max(0, stop - start), ds.shape[1]), dtype=dtype)
                step = max(1, 2 ** 26 // max(1, ds.shape[1] * ds.dtype.itemsize))
                for s in range(start, stop, step):
                    e = min(stop, s + step)
                    out[s - start:e - start] = ds[s:e]
                return out
            rows = np.asarray(rows, dtype=np.int64)
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            out = np.empty((len(rows), ds.shape[1]), dtype=dtype)
            if len(rows) <= FANCY_READ_LIMIT:  # few rows: one fancy-indexed read of the unique rows
                uniq, inverse = np.unique(sorted_rows, return_inverse=True)
                if len(uniq):
                    out[order] = ds[uniq][inverse.ravel()]
                return out
            step = max(1024, 2 ** 26 // max(1, ds.shape[1] * ds.dtype.itemsize))
            for start in range(0, ds.shape[0], step):  # many rows: one sequential scan in blocks
                lo, hi = np.searchsorted(sorted_rows, [start, start + step])
                if hi > lo:
                    block = ds[start:min(start + step, ds.shape[0])]
                    out[order[lo:hi]] = block[sorted_rows[lo:hi] - start]
            return out

    def iter_vectors(self, key: str, batch: int = 65536, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start_row, block) over all vectors without loading the whole matrix."""
        with self.h5() as f:
            ds = self._group(f, key)["vectors"]
            for s in range(0, ds.shape[0], batch):
                yield s, ds[s:s + batch].astype(dtype, copy=False)

    # pixels ------------------------------------------------------------------------------------
    @property
    def has_pixels(self) -> bool:
        with self.h5() as f:
            return "pixels" in f

    def pixels(self, rows: np.ndarray | slice) -> np.ndarray:
        with self.h5() as f:
            if "pixels" not in f:
                raise EmbedkitError(f"{self.path}: this store holds no pixels; embed from the image files instead")
            return f["pixels"][rows]


# --------------------------------------------------------------------------- the journal


class Journal:
    """Results of a long run, kept in atomically written chunk files beside the store until committed.

    ``<store>.partial/<key>/state.json`` pins the configuration; numbered ``chunk_*.npz`` files hold
    the results (for embedding: item ids, vectors and an ok mask). A half-written chunk is never visible (write to temp, fsync, rename).
    """

    def __init__(self, store_path: str | os.PathLike, key: str):
        self.dir = Path(f"{store_path}.partial") / key

    @property
    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def state(self) -> dict:
        return json.loads((self.dir / "state.json").read_text())

    def start(self, state: dict) -> None:
        """Begin a run, or continue one whose pinned state matches; refuse a different configuration."""
        if self.exists:
            old = self.state()
            if old.get("config_fingerprint") != state.get("config_fingerprint"):
                raise EmbedkitError(
                    f"an interrupted run under {self.dir} used another configuration "
                    f"({describe_differences(old.get('config', {}), state.get('config', {}))}); "
                    f"re-run it with the original settings to resume, or delete {self.dir} to start over")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._atomic_write(self.dir / "state.json", json.dumps(state, indent=1, sort_keys=True).encode())

    def _atomic_write(self, path: Path, data: bytes) -> None:
        atomic_write_bytes(path, data)

    def write_chunk(self, **arrays: np.ndarray) -> None:
        """Add one chunk of results (plain arrays, no pickled objects) as the next numbered file."""
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._atomic_write(self.dir / f"chunk_{len(self.chunks()):08d}.npz", buf.getvalue())

    def write_json(self, name: str, obj: Any) -> None:
        self._atomic_write(self.dir / name, json.dumps(obj, indent=1).encode())

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.dir / name
        return json.loads(p.read_text()) if p.exists() else default

    def chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk_*.npz")) if self.dir.exists() else []

    def iter_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        for c in self.chunks():
            with np.load(c, allow_pickle=False) as z:
                yield {k: z[k] for k in z.files}

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()
