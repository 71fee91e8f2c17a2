"""Whole-store tools: ``check`` (every shard against its checksum), ``pack`` (one self-contained file for
sharing) and ``upgrade`` (move a schema-1 or packed store's big arrays into shards)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..atomic import atomic_path
from ..errors import EmbedkitError
from .commit import copy_tree, transaction
from .lock import write_lock
from .reading import Store
from .rows import n_items
from .runs import Run
from .schema import SCHEMA_VERSION, fingerprint, now_iso
from .shards import BIG_SHARD_BYTES, ShardTable, add_shards, check_store_shards, folder_of, runs_of, set_maps, stitch


@dataclass
class CheckReport:
    store: str
    n_shards: int
    problems: list[str] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)


def check(store_path: str | os.PathLike) -> CheckReport:
    """Verify every shard the store names (present, recorded size, content checksum) and list stray files."""
    s = Store(store_path)
    f = s._h5()
    n, problems = check_store_shards(s.path, f)
    table = ShardTable.read(f, folder_of(s.path).name)
    folder = s.path.parent / table.folder
    named = set(table.files)
    strays = sorted(str(p.relative_to(folder)) for p in folder.glob("*/*.h5")
                    if str(p.relative_to(folder)) not in named) if folder.is_dir() else []
    return CheckReport(str(store_path), n, problems, strays)


def _big(f: h5py.File) -> list[str]:
    """The per-row arrays that belong in shards: pixels and every key's vectors."""
    names = ["pixels"] if "pixels" in f else []
    names += [f"embeddings/{k}/vectors" for k in f.get("embeddings", {})]
    return names


def pack(store_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write one self-contained HDF5 file with every array of the store (shards read in), for sharing."""
    s = Store(store_path)
    out = Path(out)
    if out.resolve() == s.path.resolve():
        raise EmbedkitError("store pack: OUT must be another file than the store")
    f = s._h5()
    virtual = {name for name in _big(f) if f[name].is_virtual}
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as dst:
        copy_tree(f, dst, lambda name: name in virtual or name.startswith("shards/") or name == "shards")
        if "shards" in dst:
            del dst["shards"]
        for name in sorted(virtual):
            _materialize(s, name, dst)
        dst.attrs["schema_version"] = SCHEMA_VERSION
        dst.attrs["packed"] = now_iso()
    return out


def _materialize(s: Store, name: str, dst: h5py.File) -> None:
    r = s._reader(name)
    row_bytes = int(np.prod(r.shape[1:])) * r.dtype.itemsize
    kw = {"compression": "gzip", "compression_opts": 1} if name == "pixels" else {}
    chunk_rows = max(1, min(r.shape[0] or 1, (1 << 20) // max(1, row_bytes)))
    ds = dst.create_dataset(name, shape=r.shape, dtype=r.dtype, maxshape=(None,) + r.shape[1:],
                            chunks=(chunk_rows,) + r.shape[1:], fillvalue=r.ds.fillvalue, **kw)
    for k, v in r.ds.attrs.items():
        ds.attrs[k] = v
    step = max(1, (64 << 20) // max(1, row_bytes))
    for a in range(0, r.shape[0], step):
        ds[a:a + step] = r.read_slice(a, a + step)


def upgrade(store_path: str | os.PathLike) -> list[str]:
    """Move the store's inline pixels and vectors into shards (resumable); return the arrays moved."""
    path = Path(store_path)
    Store(path)  # refuses non-stores
    with write_lock(path):
        with h5py.File(path, "r") as f:
            inline = [n for n in _big(f) if not f[n].is_virtual]
            current = int(f.attrs["schema_version"]) == SCHEMA_VERSION
        if not inline and current:
            return []
        run = Run(path, "upgrade")
        run.start({"arrays": inline}, fingerprint(inline))
        plan = _write_upgrade_shards(path, run, inline)
        shards = run.shards()
        with transaction(path, rebuild_without=lambda name: name in inline) as f:
            index = add_shards(f, folder_of(path).name, [run.info(p) for p in shards])
            for name, (tail, dtype, fill, parts) in plan.items():
                maps = [runs_of(np.arange(a, b), np.arange(b - a), index[f"{run.dir.name}/{rel}"]) for rel, a, b in parts]
                set_maps(f, name, np.concatenate(maps) if maps else np.zeros((0, 4), np.int64), "data")
                stitch(f, name, n_items(f), tail, dtype, fill)
        run.finish()
    return inline


def _write_upgrade_shards(path: Path, run: Run, names: list[str]) -> dict:
    plan = {}
    with h5py.File(path, "r") as f:
        for name in names:
            ds = f[name]
            row_bytes = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
            step = max(1, BIG_SHARD_BYTES // row_bytes)
            parts = []
            for a in range(0, ds.shape[0], step):
                b = min(ds.shape[0], a + step)
                rel = Run.shard_name(name.replace("/", "+"), "r", a, b)
                if not (run.dir / rel).exists():  # resuming: shards already written stay
                    run.write(rel, {"data": ds[a:b]}, ("data",) if name == "pixels" else ())
                parts.append((rel, a, b))
            plan[name] = (ds.shape[1:], ds.dtype, ds.fillvalue, parts)
    return plan
