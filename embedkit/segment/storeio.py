"""How segment and patches write a store: a pinned run configuration, finished fields as shards, one commit.

Layout added to the store (see docs/segment.md)::

    /segment            attrs: command (segment|patches), config (JSON), config_fingerprint
        fields          string [F]: fields already cut into the store (zero-cell fields included)
        failed          string [K, 2]: path, reason of fields that failed in the last run
        attrs           gmm_thresholds (JSON, patches with paired-channel labels)
    /pixels             uint8 [N, S, S, 3] crops or patches, row-aligned with /items, stitched from the
                        run's shards (each holds finished fields: their per-row columns and crops)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .. import store as st
from ..errors import EmbedkitError
from ..store.schema import upgrade_message
from ..store.writing import commit_fields

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
    s = st.Store(store_path)
    rec = s.segment_record()
    if rec is None:
        raise EmbedkitError(f"{store_path} already holds {len(s)} items that 'embedkit {command}' did not make; "
                            f"write the {'cells' if command == 'segment' else 'patches'} to a new --out store")
    old_cmd = rec.get("command", "")
    if old_cmd != command or rec.get("config_fingerprint") != config_fingerprint(config):
        what = f"command: {old_cmd!r} in store vs {command!r} now" if old_cmd != command else differences(rec.get("config", {}), config)
        raise EmbedkitError(f"{store_path} was made with different settings ({what[:400]}); "
                            f"re-run with the store's settings to add fields, or choose a new --out")
    if s.schema < st.SCHEMA_VERSION:
        raise EmbedkitError(upgrade_message(store_path))
    return set(rec["fields"])


#: (items, per-item columns, shard holding their crops, rows of those crops in the shard)
Batch = tuple[Sequence[Any], dict[str, np.ndarray], Path, np.ndarray]


def path_writer(store_path: str, root: str) -> Callable[[str], str]:
    """How source paths are written into a store: relative to the store's root, absolute if the root differs."""
    store_root = (st.Store(store_path).root or root) if os.path.exists(store_path) else root
    if os.path.abspath(store_root) == os.path.abspath(root):
        return lambda rel: rel
    return lambda rel: os.path.join(os.path.abspath(root), rel)


def run_attr(store_path: str, name: str) -> Any:
    """A JSON attribute of an existing store's /segment record (None when absent)."""
    if not os.path.exists(store_path):
        return None
    rec = st.Store(store_path).segment_record()
    return None if rec is None else rec.get(name)


def open_run(store_path: str, kind: str, config: dict) -> st.Run:
    """The run of ``kind`` pinned to ``config``: a pending one with these settings resumes; one with other
    settings that finished some fields is refused."""
    run = st.Run(store_path, kind)
    run.start(config, config_fingerprint(config), differences)
    return run


@dataclass(frozen=True)
class FieldRef:
    """Where a finished field's rows are: ``count`` rows from ``start`` of ``shard``; ``info`` per-field numbers."""

    shard: Path
    start: int
    count: int
    info: dict[str, int]


class FieldShards:
    """Buffers finished fields (per-row arrays, crops last) and writes them as shards of a run.

    A shard is written when the buffer holds ``max_fields`` fields or ``flush_bytes``, or ``flush_seconds``
    have passed since the last one, so a killed run loses at most that much work; crops are written once, here.
    """

    def __init__(self, run: st.Run, max_fields: int | None = None, flush_bytes: int = 64 << 20, flush_seconds: float = 20.0):
        self.run, self.max_fields, self.flush_bytes, self.flush_seconds = run, max_fields, flush_bytes, flush_seconds
        self._fields: list[tuple[int, str, dict[str, int], dict[str, np.ndarray]]] = []
        self._bytes = 0
        self._last = time.monotonic()

    def add(self, index: int, field_id: str, info: dict[str, int], rows: dict[str, np.ndarray]) -> None:
        self._fields.append((index, field_id, info, rows))
        self._bytes += sum(np.asarray(v).nbytes for v in rows.values())
        if (self._bytes >= self.flush_bytes or time.monotonic() - self._last >= self.flush_seconds
                or (self.max_fields and len(self._fields) >= self.max_fields)):
            self.flush()

    def flush(self) -> None:
        if self._fields:
            idx = [f[0] for f in self._fields]
            arrays = {"field": np.array([f[1] for f in self._fields], dtype=object), "index": np.array(idx, np.int64),
                      "count": np.array([len(f[3]["pixels"]) for f in self._fields], np.int64)}
            for name in self._fields[0][2]:
                arrays[f"info_{name}"] = np.array([f[2][name] for f in self._fields], np.int64)
            for name in self._fields[0][3]:
                arrays[name] = np.concatenate([f[3][name] for f in self._fields])
            self.run.write(st.Run.shard_name("w0", "f", min(idx), max(idx) + 1), arrays, compress=("pixels",))
        self._fields, self._bytes, self._last = [], 0, time.monotonic()


def done_fields(run: st.Run) -> dict[str, FieldRef]:
    """Field id -> where its rows are, for every field in the run's pending shards."""
    out = {}
    for shard in run.shards():
        c = st.Run.read(shard, "field", "count", *[n for n in st.Run.names(shard) if n.startswith("info_")])
        starts = np.concatenate([[0], np.cumsum(c["count"])[:-1]]).astype(np.int64)
        for k, fid in enumerate(c["field"]):
            info = {n[5:]: int(c[n][k]) for n in c if n.startswith("info_")}
            out[str(fid)] = FieldRef(shard, int(starts[k]), int(c["count"][k]), info)
    return out


def field_rows(ref: FieldRef, names: Sequence[str], cache: dict) -> dict[str, np.ndarray]:
    """The per-row arrays ``names`` of one finished field (crops stay on disk); ``cache`` keeps the last shard read."""
    if cache.get("shard") != ref.shard:
        cache.clear()
        cache.update(shard=ref.shard, data=st.Run.read(ref.shard, *names))
    return {k: v[ref.start:ref.start + ref.count] for k, v in cache["data"].items()}


def commit(store_path: str, run: st.Run, command: str, config: dict, root: str, batches: Iterable[Batch],
           pixel_shape: tuple[int, ...], fields: Sequence[str], failed: Sequence[Sequence[str]],
           attrs: dict[str, Any] | None = None) -> int:
    """Append the batches' items and stitch their crops, recording the finished fields, in one commit."""
    return commit_fields(store_path, run, command, config, config_fingerprint(config), root, batches, pixel_shape,
                         fields, failed, attrs)
