"""Writing per-item rows into a main file being committed: the /items table and embedding keys."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import h5py
import numpy as np

from ..errors import EmbedkitError
from .schema import STR, comparable_config, config_mismatch_message, fingerprint, now_iso, validate_key
from .shards import stitch


def n_items(f: h5py.File) -> int:
    return int(f["items"]["id"].shape[0]) if "items" in f and "id" in f["items"] else 0


def write_items(f: h5py.File, items: Sequence[Any], root: str, columns: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Append items (objects with .id, .path, .label, .group, .meta) and optional per-item array columns
    to /items; return their row indices.

    Paths are stored relative to the store's root attribute; items from another root keep absolute paths.
    """
    g = f.require_group("items")
    if "root" not in f.attrs:
        f.attrs["root"] = str(root)
    store_root = str(f.attrs["root"])
    n_old = g["id"].shape[0] if "id" in g else 0
    same_root = os.path.abspath(store_root) == os.path.abspath(root)
    new = {
        "id": [it.id for it in items],
        "path": [it.path if same_root else os.path.join(os.path.abspath(root), it.path) for it in items],
        "label": [it.label or "" for it in items],
        "group": [it.group or "" for it in items],
    }
    for name, values in new.items():
        _append(g, name, np.array(values, dtype=object), STR, n_old)
    meta_cols = sorted({k for it in items for k in (it.meta or {})})
    existing_meta = list(g["meta"].keys()) if "meta" in g else []
    if meta_cols or existing_meta:
        mg = g.require_group("meta")
        for col in sorted(set(meta_cols) | set(existing_meta)):
            _append(mg, col, np.array([(it.meta or {}).get(col, "") for it in items], dtype=object), STR, n_old)
    for name, arr in (columns or {}).items():
        arr = np.asarray(arr)
        if arr.shape[0] != len(items):
            raise ValueError(f"column {name!r} has {arr.shape[0]} rows for {len(items)} items")
        _append(g, name, arr, STR if arr.dtype == object else arr.dtype, n_old)
    for name in g:  # numeric columns absent from this batch get padding so all stay length N
        ds = g[name]
        if isinstance(ds, h5py.Dataset) and ds.shape[0] < n_old + len(items):
            _pad(ds, n_old + len(items))
    pad_rows(f, n_old + len(items))
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


def pad_rows(f: h5py.File, n: int) -> None:
    """New rows start as not-done (NaN vectors, blank pixels) in every per-row array outside /items."""
    targets = [f"embeddings/{k}/vectors" for k in f.get("embeddings", {})] + (["pixels"] if "pixels" in f else [])
    for target in targets:
        ds = f[target]
        if ds.shape[0] >= n:
            continue
        if ds.is_virtual:
            stitch(f, target, n, ds.shape[1:], ds.dtype, ds.fillvalue)
        else:
            ds.resize(n, axis=0)
    for k in f.get("embeddings", {}):
        done = f["embeddings"][k]["done"]
        if done.shape[0] < n:
            done.resize(n, axis=0)


def check_key_config(f: h5py.File, key: str, config: dict) -> h5py.Group | None:
    """The existing group of ``key`` when its configuration matches ``config`` (None when absent); refuse others."""
    if "embeddings" not in f or key not in f["embeddings"]:
        return None
    g = f["embeddings"][key]
    old = key_config(g, key)
    if fingerprint(comparable_config(old)) != fingerprint(comparable_config(config)):
        raise EmbedkitError(config_mismatch_message(key, old, config))
    return g


def key_config(g: h5py.Group, key: str) -> dict:
    """The recorded encoder configuration of a key group, or a one-line error when it is missing or broken."""
    where = re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", os.path.basename(g.file.filename))  # a commit's temp copy -> the store
    raw = g.attrs.get("config")
    if raw is None:
        raise EmbedkitError(f"{where}: embedding key {key!r} has no 'config' attribute; the store is damaged or was not "
                            f"written by embedkit (re-embed under another --key)")
    try:
        cfg = json.loads(raw)
    except (TypeError, ValueError):
        raise EmbedkitError(f"{where}: embedding key {key!r}: its 'config' attribute is not valid JSON; the store is damaged") from None
    if not isinstance(cfg, dict):
        raise EmbedkitError(f"{where}: embedding key {key!r}: its 'config' attribute is not a JSON object; the store is damaged")
    return cfg


def _key_group(f: h5py.File, key: str, dim: int, dtype: str, config: dict) -> h5py.Group:
    g = f.require_group("embeddings").create_group(validate_key(key))
    g.create_dataset("done", shape=(n_items(f),), maxshape=(None,), dtype=bool, chunks=True, fillvalue=False)
    g.attrs["config"] = json.dumps(config, sort_keys=True)
    g.attrs["config_fingerprint"] = fingerprint(comparable_config(config))
    g.attrs["encoder"] = config.get("encoder", "")
    g.attrs["dim"] = dim
    g.attrs["dtype"] = dtype
    g.attrs["created"] = now_iso()
    return g


def ensure_embedding(f: h5py.File, key: str, dim: int, dtype: str, config: dict) -> h5py.Group:
    """Create /embeddings/<key> with inline vectors (small stores, tests) or check the existing configuration."""
    g = check_key_config(f, key, config)
    if g is not None:
        return g
    g = _key_group(f, key, dim, dtype, config)
    n = n_items(f)
    g.create_dataset("vectors", shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                     chunks=(max(1, min(n, max(1, 2 ** 20 // (dim * np.dtype(dtype).itemsize)))), dim), fillvalue=np.nan)
    return g


def ensure_sharded_embedding(f: h5py.File, key: str, dim: int, dtype: str, config: dict) -> h5py.Group:
    """Create /embeddings/<key> whose vectors are stitched from shards, or check the existing one."""
    g = check_key_config(f, key, config)
    if g is None:
        g = _key_group(f, key, dim, dtype, config)
        stitch(f, f"embeddings/{key}/vectors", n_items(f), (dim,), np.dtype(dtype), np.nan)
    return g
