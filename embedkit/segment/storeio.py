"""How segment and patches write a store: a pinned configuration, a list of finished fields, items and pixels.

Layout added to the store (see docs/segment.md)::

    /segment            attrs: command (segment|patches), config (JSON), config_fingerprint
        fields          string [F]: fields already cut into the store (zero-cell fields included)
        failed          string [K, 2]: path, reason of fields that failed in the last run
        attrs           gmm_thresholds (JSON, patches with paired-channel labels)
    /pixels             uint8 [N, S, S, 3] crops or patches, row-aligned with /items
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Sequence

import h5py
import numpy as np

from .. import store as st
from ..errors import EmbedkitError
from ..sources import Item

#: Config keys that are provenance only: they never make two runs incompatible.
PROVENANCE_KEYS = ("versions",)


def comparable(config: dict) -> dict:
    """The part of a run configuration that changes the output (library versions excluded)."""
    out = {}
    for k, v in config.items():
        if k in PROVENANCE_KEYS:
            continue
        out[k] = comparable(v) if isinstance(v, dict) else v
    return out


def config_fingerprint(config: dict) -> str:
    return st.fingerprint(comparable(config))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: dict, new: dict) -> str:
    """'key: old vs new' for every setting that differs."""
    a, b = _flat(comparable(old)), _flat(comparable(new))
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: {a.get(k)!r} in store vs {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k))


def finished_fields(store_path: str, command: str, config: dict) -> set[str]:
    """Fields already in an existing store made with the same settings; refuse any other store."""
    if not os.path.exists(store_path):
        return set()
    st.check_schema(store_path)
    with h5py.File(store_path, "r") as f:
        if "segment" not in f:
            n = f["items"]["id"].shape[0] if "items" in f else 0
            raise EmbedkitError(f"{store_path} already holds {n} items that 'embedkit {command}' did not make; "
                                f"write the {'cells' if command == 'segment' else 'patches'} to a new --out store")
        g = f["segment"]
        old_cmd = g.attrs.get("command", "")
        old = json.loads(g.attrs["config"])
        if old_cmd != command or g.attrs["config_fingerprint"] != config_fingerprint(config):
            what = f"command: {old_cmd!r} in store vs {command!r} now" if old_cmd != command else differences(old, config)
            raise EmbedkitError(f"{store_path} was made with different settings ({what[:400]}); "
                                f"re-run with the store's settings to add fields, or choose a new --out")
        return set(g["fields"].asstr()[:])


Batch = tuple[Sequence[Item], dict[str, np.ndarray], np.ndarray]


def path_writer(store_path: str, root: str) -> Callable[[str], str]:
    """How source paths are written into a store: relative to the store's root, absolute if the root differs."""
    store_root = (st.Store(store_path).root or root) if os.path.exists(store_path) else root
    if os.path.abspath(store_root) == os.path.abspath(root):
        return lambda rel: rel
    return lambda rel: os.path.join(os.path.abspath(root), rel)


def run_attr(store_path: str, name: str) -> Any:
    """A JSON attribute of an existing store's /segment group (None when absent)."""
    if not os.path.exists(store_path):
        return None
    with h5py.File(store_path, "r") as f:
        raw = f["segment"].attrs.get(name) if "segment" in f else None
    return None if raw is None else json.loads(raw)


def commit(store_path: str, command: str, config: dict, root: str, batches: Iterable[Batch], pixel_shape: tuple[int, ...],
           fields: Sequence[str], failed: Sequence[Sequence[str]], attrs: dict[str, Any] | None = None) -> None:
    """Append batches of (items, columns, pixels) and record the finished fields, in one atomic transaction.

    Batches stream from the journal, so a run never holds all its crops in memory.
    """
    with st.transaction(store_path) as f:
        if "segment" not in f:
            g = f.create_group("segment")
            g.attrs["command"] = command
            g.attrs["config"] = json.dumps(config, sort_keys=True)
            g.attrs["config_fingerprint"] = config_fingerprint(config)
            g.attrs["created"] = st.now_iso()
            g.create_dataset("fields", shape=(0,), maxshape=(None,), dtype=st.STR, chunks=(1024,))
        g = f["segment"]
        _ensure_pixels(f, pixel_shape)
        if "items" not in f:
            st.write_items(f, [], root)
        for items, columns, pixels in batches:
            if not len(items):
                continue
            n_old = f["items"]["id"].shape[0]
            st.write_items(f, items, root, columns=columns)
            _append_pixels(f, pixels, n_old)
        ds = g["fields"]
        ds.resize(ds.shape[0] + len(fields), axis=0)
        if len(fields):
            ds[-len(fields):] = np.array(list(fields), dtype=object)
        if "failed" in g:
            del g["failed"]
        g.create_dataset("failed", data=np.array([list(r) for r in failed], dtype=object).reshape(-1, 2), dtype=st.STR)
        for k, v in (attrs or {}).items():
            g.attrs[k] = json.dumps(v, sort_keys=True)
        g.attrs["modified"] = st.now_iso()


def _ensure_pixels(f: h5py.File, shape: tuple[int, ...]) -> None:
    n_items = f["items"]["id"].shape[0] if "items" in f else 0
    if "pixels" not in f:
        if n_items:
            raise EmbedkitError("the store has items but no pixels; cannot add crops to it")
        chunk_rows = max(1, min(64, (1 << 20) // max(1, int(np.prod(shape)))))
        f.create_dataset("pixels", shape=(0,) + tuple(shape), maxshape=(None,) + tuple(shape), dtype=np.uint8,
                         chunks=(chunk_rows,) + tuple(shape), compression="gzip", compression_opts=1)
    ds = f["pixels"]
    if ds.shape[1:] != tuple(shape):
        raise EmbedkitError(f"the store's pixels are {ds.shape[1:]}, these crops are {tuple(shape)}; use a new --out store")
    if ds.shape[0] != n_items:
        raise EmbedkitError(f"the store's pixels ({ds.shape[0]} rows) are out of step with its items ({n_items}); "
                            f"it was not written by embedkit")


def _append_pixels(f: h5py.File, pixels: np.ndarray, n_old: int) -> None:
    ds = f["pixels"]
    ds.resize(n_old + len(pixels), axis=0)
    ds[n_old:] = pixels
