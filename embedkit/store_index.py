"""A FAISS index of one store key, saved beside the store with a record of exactly what it covers.

Files (``cells.h5``, key ``efficientnet_lite0``)::

    cells.efficientnet_lite0.faiss        the index in FAISS's own format (faiss.read_index opens it);
                                          its ids are store row numbers
    cells.efficientnet_lite0.faiss.json   the record: store, key, encoder configuration fingerprint,
                                          rows covered, kind, parameters, measured recall

The record makes staleness checkable: rows embedded after the build (or a store replaced by another
one at the same path) change the covered-rows fingerprint, and every reader says the index is stale.
Both files are written to temporary names and renamed; the record stores the index file's size and
modification time, so an index renamed into place without its record (a crash in between) is caught too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .errors import EmbedkitError
from .neighbors import BuiltIndex, build_index, depth_parameter, set_depth
from .store import Store, now_iso

RECORD_VERSION = 1


def index_paths(store_path: str | os.PathLike, key: str, out: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(index file, record file) for a store key; ``out`` overrides the index file's path."""
    if out is None:
        p = Path(store_path)
        out = p.with_name(f"{p.stem}.{key}.faiss")
    out = Path(out)
    return out, out.with_name(out.name + ".json")


def rows_fingerprint(done: np.ndarray) -> str:
    """Hash of which rows are embedded (the done mask): any row added or finished later changes it."""
    mask = np.asarray(done, dtype=bool)
    return hashlib.sha256(np.packbits(mask).tobytes() + str(len(mask)).encode()).hexdigest()[:16]


def coverage(store: Store, key: str) -> dict:
    """What an index built now from ``store``/``key`` would cover."""
    done = store.done(key)
    cfg = store.config(key)
    fp = str(store.key_attrs(key).get("config_fingerprint", ""))
    return {"store": str(Path(store.path).resolve()), "store_created": str(store.attrs.get("created", "")),
            "key": key, "encoder": cfg.get("encoder"), "config_fingerprint": fp, "n_items": int(len(done)),
            "n_rows": int(done.sum()), "rows_fingerprint": rows_fingerprint(done)}


def load_vectors(store: Store, key: str, rows: np.ndarray | None = None, batch: int = 65536,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rows, float32 vectors) of the done rows of ``key`` (or of the given sorted ``rows``), read in blocks."""
    from tqdm.auto import tqdm

    done = store.done(key)
    if rows is None:
        rows = np.flatnonzero(done)
    else:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= len(done)):
            raise ValueError("rows must be sorted, unique store row numbers")
        if not done[rows].all():
            raise EmbedkitError(f"{int((~done[rows]).sum())} requested rows have no vector under key {key!r} yet; "
                                f"run 'embedkit embed' to finish them")
    dim = int(store.config(key).get("dim") or 0)
    out = None
    pos = 0
    with tqdm(total=len(done), unit="row", desc=f"reading {key}", disable=not progress or len(done) < 200_000, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for s, block in store.iter_vectors(key, batch):
            if out is None:
                dim = block.shape[1]
                out = np.empty((len(rows), dim), dtype=np.float32)
            lo, hi = np.searchsorted(rows, [s, s + len(block)])
            out[pos:pos + hi - lo] = block[rows[lo:hi] - s]
            pos += hi - lo
            bar.update(len(block))
    if out is None:
        out = np.empty((0, dim), dtype=np.float32)
    return rows, out


@dataclass
class SavedIndex:
    """A loaded index and its record; ``stale`` lists why it no longer matches the store (empty: fresh)."""

    path: Path
    record: dict
    built: BuiltIndex
    stale: list[str] = field(default_factory=list)

    @property
    def fresh(self) -> bool:
        return not self.stale

    def describe(self) -> str:
        r = self.record
        depth = depth_parameter(r["kind"])
        extra = f", {depth}={r['params'].get(depth)}" if depth else ""
        return (f"{self.path}: {r['kind']} index of {r['n_rows']:,} rows under key '{r['key']}'{extra}, "
                f"Recall@10 {r.get('recall_at_10', 1.0):.3f}, built {r['built']}")


def staleness(record: dict, now: dict) -> list[str]:
    """Reasons an index with ``record`` no longer matches the store state ``now`` (see :func:`coverage`)."""
    reasons = []
    if record.get("store_created") != now["store_created"]:
        reasons.append(f"it was built for another store (created {record.get('store_created')}, this one {now['store_created']})")
    if record.get("config_fingerprint") != now["config_fingerprint"]:
        reasons.append(f"key '{now['key']}' now holds vectors of another encoder configuration")
    if record.get("n_items") != now["n_items"] or record.get("rows_fingerprint") != now["rows_fingerprint"]:
        added = now["n_rows"] - int(record.get("n_rows", 0))
        what = f"{added:+,} embedded rows" if added else "different embedded rows"
        reasons.append(f"the store changed since the build: it covers {record.get('n_rows', 0):,} rows, the store now has "
                       f"{now['n_rows']:,} embedded rows under '{now['key']}' ({what})")
    return reasons


def build_store_index(store_path: str | os.PathLike, key: str, kind: str = "auto", *, out: str | os.PathLike | None = None,
                      nlist: int | None = None, target_recall: float = 0.95, use_gpu: bool | None = None, seed: int = 0,
                      log: Callable[[str], None] | None = None, progress: bool = True) -> SavedIndex:
    """Index the done rows of ``key`` and save index + record atomically beside the store (or at ``out``)."""
    import faiss

    store = Store(store_path)
    key = store.resolve_key(key)
    cov = coverage(store, key)
    rows, x = load_vectors(store, key, progress=progress)
    if len(rows) == 0:
        raise EmbedkitError(f"{store_path}: key {key!r} has no embedded rows yet; run 'embedkit embed' first")
    built = build_index(x, kind, ids=rows, nlist=nlist, target_recall=target_recall, use_gpu=use_gpu, seed=seed, log=log)
    index_path, record_path = index_paths(store_path, key, out)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_name(f".{index_path.name}.tmp-{os.getpid()}")
    try:
        faiss.write_index(built.index, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        st = os.stat(tmp)
        params = {k: v for k, v in built.params.items() if k != "reason"}
        record = {"format": RECORD_VERSION, **cov, "kind": built.kind, "reason": built.params.get("reason"),
                  "params": params, "recall_at_10": built.recall,
                  "recall_at_10_ci95": list(built.recall_interval or (1.0, 1.0)), "target_recall": target_recall, "dim": int(x.shape[1]),
                  "built": now_iso(), "build_seconds": round(built.seconds, 2), "faiss_version": faiss.__version__,
                  "embedkit_version": __version__, "index_file": index_path.name, "index_bytes": st.st_size,
                  "index_mtime_ns": st.st_mtime_ns}
        os.replace(tmp, index_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _write_json_atomic(record_path, record)
    return SavedIndex(index_path, record, built)


def _write_json_atomic(path: Path, obj: dict) -> None:
    from .atomic import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def read_record(store_path: str | os.PathLike, key: str, path: str | os.PathLike | None = None) -> tuple[Path, dict] | None:
    """(index path, record) of the saved index for a key, or None when there is none."""
    index_path, record_path = index_paths(store_path, key, path)
    if not index_path.exists() and not record_path.exists():
        return None
    if not record_path.exists():
        raise EmbedkitError(f"{index_path} has no record ({record_path.name}); rebuild it with 'embedkit index'")
    if not index_path.exists():
        raise EmbedkitError(f"{record_path} describes a missing index file {index_path.name}; rebuild it with 'embedkit index'")
    try:
        record = json.loads(record_path.read_text())
        missing = [f for f in ("kind", "key", "n_rows", "params") if f not in record]
        if missing:
            raise KeyError(f"missing {', '.join(missing)}")
    except (ValueError, KeyError) as exc:
        raise EmbedkitError(f"{record_path}: not an embedkit index record ({exc}); rebuild it with 'embedkit index'") from None
    st = os.stat(index_path)
    if (st.st_size, st.st_mtime_ns) != (record.get("index_bytes"), record.get("index_mtime_ns")):
        raise EmbedkitError(f"{index_path} does not match its record (an interrupted build or a copied file?); "
                            f"rebuild it with 'embedkit index'")
    return index_path, record


def index_status(store_path: str | os.PathLike, key: str, path: str | os.PathLike | None = None) -> tuple[dict | None, list[str]]:
    """(record or None, staleness reasons) without loading the index itself."""
    store = Store(store_path)
    found = read_record(store_path, key, path)
    if found is None:
        return None, []
    return found[1], staleness(found[1], coverage(store, key))


def open_index(store_path: str | os.PathLike, key: str, path: str | os.PathLike | None = None) -> SavedIndex | None:
    """Load the saved index of ``key`` (None when none was built) and check it against the store."""
    import faiss

    store = Store(store_path)
    found = read_record(store_path, key, path)
    if found is None:
        return None
    index_path, record = found
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise EmbedkitError(f"{index_path}: FAISS cannot read it ({str(exc).splitlines()[0][:200]}); rebuild it") from None
    built = BuiltIndex(index, record["kind"], dict(record.get("params", {})), record.get("recall_at_10"))
    depth = depth_parameter(record["kind"])
    if depth and depth in built.params:
        set_depth(built, built.params[depth])
    return SavedIndex(index_path, record, built, staleness(record, coverage(store, key)))


def stale_message(saved: SavedIndex) -> str:
    return f"index {saved.path.name} is stale: {'; '.join(saved.stale)}; rebuild it with 'embedkit index {saved.record.get('store')} --encoder {saved.record['key']}'"

