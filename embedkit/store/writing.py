"""The store's write operations. Each is one atomic commit of the main file (see :mod:`.commit`); big arrays
arrive as shards that a :class:`~.runs.Run` already wrote, so a commit copies no pixels and no vectors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from ..errors import EmbedkitError
from .commit import transaction
from .rows import ensure_sharded_embedding, n_items, write_items
from .runs import Run
from .schema import STR, now_iso
from .shards import BIG_SHARD_BYTES, ShardInfo, add_shards, folder_of, maps_of, runs_of, set_maps, stitch


def append_items(store_path: str | os.PathLike, items: Sequence[Any], root: str) -> np.ndarray:
    """Append items to the store (creating it when absent); return their rows."""
    with transaction(store_path) as f:
        return write_items(f, items, root)


def _inline_refusal(store_path: str | os.PathLike, target: str) -> EmbedkitError:
    return EmbedkitError(f"{store_path} holds {target} inside its main file (a packed or older store); run "
                         f"'embedkit store upgrade {store_path}' once to move it into shards, then run the command again")


def _extend_maps(f: h5py.File, target: str, source: str, new: list[np.ndarray]) -> None:
    old, old_source = maps_of(f, target)
    if old_source is not None and old_source != source:
        raise ValueError(f"{target}: shards map dataset {source!r}, existing ones {old_source!r}")
    set_maps(f, target, np.concatenate([old] + new) if new else old, source)


def commit_embedding(store_path: str | os.PathLike, run: Run, key: str, dim: int, dtype: str, config: dict,
                     skipped: list[tuple[str, str]]) -> int:
    """Stitch the run's vectors into ``/embeddings/<key>`` and mark their good rows done; return rows added.

    A run shard holds ``rows`` (store rows), ``ids`` (checked against the store), ``vectors`` and ``bad`` (reason
    per row, '' when good). A row already done, or written twice, keeps its first vector. The good vectors are
    first merged, in row order, into a few big shards (see :data:`~.shards.BIG_SHARD_BYTES`), which the
    commit names instead of the run's checkpoint shards: reading a key then costs a few file opens, not one
    per checkpoint. The checkpoint shards are deleted only after the commit.
    """
    shards = run.shards()
    target = f"embeddings/{key}/vectors"
    fresh = _fresh_rows(store_path, key, target, shards)
    if fresh is None:
        return 0
    merged = _write_merged(run, shards, fresh, dim, np.dtype(dtype))
    with transaction(store_path) as f:
        g = ensure_sharded_embedding(f, key, dim, dtype, config)
        done = g["done"][:]
        index = add_shards(f, folder_of(store_path).name, [info for info, _ in merged])
        _extend_maps(f, target, "vectors", [runs_of(rows, np.arange(len(rows)), index[info.file]) for info, rows in merged])
        stitch(f, target, n_items(f), (dim,), np.dtype(dtype), np.nan)
        done[fresh[:, 0]] = True
        added = int(done.sum() - g["done"][:].sum())
        g["done"][:] = done
        g.attrs["skipped"] = json.dumps([list(b) for b in skipped])
        g.attrs["modified"] = now_iso()
    run.discard(shards)
    run.finish()
    return added


def _fresh_rows(store_path: str | os.PathLike, key: str, target: str, shards: list[Path]) -> np.ndarray | None:
    """[K, 3] of (store row, shard index, shard row) for the good rows not yet done, sorted by store row;
    None when the key is held inline with nothing to add."""
    path = Path(store_path)
    with h5py.File(path, "r") as f:
        if target in f and not f[target].is_virtual:
            if not shards:
                return None
            raise _inline_refusal(store_path, target)
        ids = f["items"]["id"]
        done = np.zeros(ids.shape[0], bool)  # items appended since the key was made are not done
        if f"embeddings/{key}/done" in f:
            old = f[f"embeddings/{key}/done"][:]
            done[:len(old)] = old
        parts = []
        for si, p in enumerate(shards):
            c = Run.read(p, "rows", "ids", "bad")
            rows = c["rows"].astype(np.int64)
            if not _rows_match(ids, rows, c["ids"]):
                raise EmbedkitError(f"shard {p} does not match the store's items; delete {p.parent} and run again")
            good = c["bad"] == ""
            first = np.zeros(len(rows), bool)
            first[np.unique(rows, return_index=True)[1]] = True  # a row twice in one shard keeps its first vector
            new = np.flatnonzero(good & first & ~done[rows])
            done[rows[new]] = True
            parts.append(np.stack([rows[new], np.full(len(new), si), new], axis=1))
    fresh = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    return fresh[np.argsort(fresh[:, 0], kind="stable")]


def _write_merged(run: Run, shards: list[Path], fresh: np.ndarray, dim: int, dtype: np.dtype) -> list[tuple[ShardInfo, np.ndarray]]:
    """Write the vectors of ``fresh`` rows into merged shards of the run, in store-row order; return each
    shard's record and the store rows it holds (row i of the shard is store row rows[i])."""
    step = max(1, BIG_SHARD_BYTES // max(1, dim * dtype.itemsize))
    out = []
    for a in range(0, len(fresh), step):
        block = fresh[a:a + step]
        vectors = np.empty((len(block), dim), dtype)
        for si in np.unique(block[:, 1]):
            sel = np.flatnonzero(block[:, 1] == si)
            vectors[sel] = Run.read(shards[int(si)], "vectors")["vectors"][block[sel, 2]]  # cast to the key's dtype
        rows = block[:, 0]
        info = run.write(Run.merged_name(int(rows[0]), int(rows[-1]) + 1), {"rows": rows, "vectors": vectors})
        out.append((info, rows))
    return out


def _rows_match(ids: h5py.Dataset, rows: np.ndarray, shard_ids: np.ndarray) -> bool:
    """Whether the store's item ids at ``rows`` are the ids the shard was computed for."""
    if not len(rows):
        return True
    if rows.min() < 0 or rows.max() >= ids.shape[0]:
        return False
    uniq, first = np.unique(rows, return_index=True)
    return list(ids.asstr()[uniq]) == [str(i) for i in np.asarray(shard_ids)[first]]


def save_view(store_path: str | os.PathLike, key: str, method: str, coords: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write ``/views/<key>/<method>`` (float32 [N, 2]) with its attributes in one commit."""
    with transaction(store_path) as f:
        g = f.require_group("views").require_group(key)
        if method in g:
            del g[method]
        ds = g.create_dataset(method, data=np.asarray(coords, np.float32))
        for k, v in attrs.items():
            ds.attrs[k] = v


# --------------------------------------------------------------------------- segment and patches


def commit_fields(store_path: str | os.PathLike, run: Run, command: str, config: dict, config_fingerprint: str,
                  root: str, batches: Iterable[tuple[Sequence[Any], dict[str, np.ndarray], Path, np.ndarray]],
                  pixel_shape: tuple[int, ...], fields: Sequence[str], failed: Sequence[Sequence[str]],
                  attrs: dict[str, Any] | None = None) -> int:
    """Append the run's cells or patches and record the finished fields, in one commit; return rows added.

    Each batch is (items, columns, shard, shard_rows): the items and their columns go into /items, their
    crops stay in ``shard`` (rows ``shard_rows`` of its ``pixels``) and are stitched into /pixels.
    """
    shards = run.shards()
    with transaction(store_path) as f:
        if "segment" not in f:
            g = f.create_group("segment")
            g.attrs["command"] = command
            g.attrs["config"] = json.dumps(config, sort_keys=True)
            g.attrs["config_fingerprint"] = config_fingerprint
            g.attrs["created"] = now_iso()
            g.create_dataset("fields", shape=(0,), maxshape=(None,), dtype=STR, chunks=(1024,))
        g = f["segment"]
        if "items" not in f:
            write_items(f, [], root)
        n0 = n_items(f)
        _check_pixels(store_path, f, pixel_shape, n0)
        index = add_shards(f, folder_of(store_path).name, [run.info(p) for p in shards])
        new_maps = []
        for items, columns, shard, shard_rows in batches:
            if not len(items):
                continue
            rows = write_items(f, items, root, columns=columns)
            new_maps.append(runs_of(rows, shard_rows, index[f"{shard.parent.name}/{shard.name}"]))
        _extend_maps(f, "pixels", "pixels", new_maps)
        stitch(f, "pixels", n_items(f), tuple(pixel_shape), np.uint8, 0)
        ds = g["fields"]
        ds.resize(ds.shape[0] + len(fields), axis=0)
        if len(fields):
            ds[-len(fields):] = np.array(list(fields), dtype=object)
        if "failed" in g:
            del g["failed"]
        g.create_dataset("failed", data=np.array([list(r) for r in failed], dtype=object).reshape(-1, 2), dtype=STR)
        for k, v in (attrs or {}).items():
            g.attrs[k] = json.dumps(v, sort_keys=True)
        g.attrs["modified"] = now_iso()
        added = n_items(f) - n0
    run.finish()
    return added


def _check_pixels(store_path, f: h5py.File, shape: tuple[int, ...], n: int) -> None:
    if "pixels" not in f:
        if n:
            raise EmbedkitError("the store has items but no pixels; cannot add crops to it")
        return
    ds = f["pixels"]
    if ds.shape[1:] != tuple(shape):
        raise EmbedkitError(f"the store's pixels are {ds.shape[1:]}, these crops are {tuple(shape)}; use a new --out store")
    if ds.shape[0] != n:
        raise EmbedkitError(f"the store's pixels ({ds.shape[0]} rows) are out of step with its items ({n}); "
                            f"it was not written by embedkit")
    if not ds.is_virtual and n:
        raise _inline_refusal(store_path, "pixels")

