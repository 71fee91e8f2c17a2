"""Atomic changes to a store's main file: copy, modify, verify, fsync, rename.

The main file holds items, masks, views and the map of shards, never the big arrays, so a copy costs what
the store's small part weighs. The modified copy is closed, reopened and read back in full (every inline
dataset, every row count, every shard it names) before it replaces the original, so a write that the disk
failed silently is never reported as success.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Callable, Iterator

import h5py

from .. import __version__
from ..atomic import disk_error, fsync_dir, temp_name
from ..errors import EmbedkitError
from .faults import fault
from .schema import SCHEMA_VERSION, now_iso, schema_version, upgrade_message
from .shards import ShardTable, folder_of, shard_problem


def copy_tree(src: h5py.Group, dst: h5py.Group, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Copy attributes, groups and datasets of ``src`` into ``dst``, leaving out datasets ``skip`` names."""
    for k, v in src.attrs.items():
        dst.attrs[k] = v
    for name, obj in src.items():
        if isinstance(obj, h5py.Group):
            copy_tree(obj, dst.require_group(name), skip)
        elif not skip(obj.name.lstrip("/")):
            src.copy(obj, dst, name=name)


@contextlib.contextmanager
def transaction(path: str | os.PathLike, *, rebuild_without: Callable[[str], bool] | None = None) -> Iterator[h5py.File]:
    """Yield a writable h5py.File whose changes replace ``path`` atomically when the block succeeds.

    A new store is created with the schema attributes. On an exception, or a crash at any point, the
    original file is untouched. Schema-1 stores are refused with the upgrade command. ``rebuild_without``
    (used by upgrade) writes a fresh file that leaves out the datasets it names instead of copying the file.
    The new main file is built in memory and written by plain file I/O, so a full disk is one clean error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    if path.exists() and rebuild_without is None:
        if schema_version(path) < SCHEMA_VERSION:
            raise EmbedkitError(upgrade_message(path))
        buf.write(path.read_bytes())
        buf.seek(0)
    f = h5py.File(buf, "r+" if buf.getbuffer().nbytes else "w")
    try:
        if path.exists() and rebuild_without is not None:
            with h5py.File(path, "r") as src:
                copy_tree(src, f, rebuild_without)
        if "created" not in f.attrs:
            f.attrs["created"] = now_iso()
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["embedkit_version"] = __version__
        yield f
        f.attrs["modified"] = now_iso()
        f.close()
        write_verified(path, buf.getbuffer())
    finally:
        with contextlib.suppress(Exception):
            f.close()
    fault("commit:renamed", path)


def write_verified(path: Path, data) -> None:
    """Write a main file image to a temp name, read it back as a store, then fsync and rename it over ``path``."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            fault("commit:written", tmp)
            os.fsync(fh.fileno())
        problem = verify_main(tmp, folder_of(path))
        if problem:
            raise EmbedkitError(f"disk full or I/O error while writing {path} (the new copy {problem}); "
                                f"nothing was lost; free space and re-run")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        err = disk_error(exc, path)
        if err is not None:
            raise err from None
        raise


def verify_main(path: Path, default_folder: Path) -> str | None:
    """Why the main file at ``path`` is not a consistent store (None when it is): read every inline
    dataset, check that every per-row array has the item count, and that every shard it names is present."""
    try:
        with h5py.File(path, "r") as f:
            n = f["items"]["id"].shape[0] if "items" in f and "id" in f["items"] else None
            bad: list[str] = []

            def visit(name: str, obj) -> None:
                if not isinstance(obj, h5py.Dataset) or bad:
                    return
                if not obj.is_virtual:
                    obj[()]  # noqa: B018 - reading it is the check
                if n is not None and _row_aligned(name) and obj.shape[0] != n:
                    bad.append(f"has {obj.shape[0]} rows in {name} for {n} items")

            f.visititems(visit)
            if bad:
                return bad[0]
            table = ShardTable.read(f, default_folder.name)
            folder = path.parent / table.folder
            for rel, size in zip(table.files, table.bytes):
                problem = shard_problem(folder, rel, int(size))
                if problem:
                    return f"names shard {rel}, which {problem}"
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        return f"does not read back: {str(exc)[:160]}"
    return None


def _row_aligned(name: str) -> bool:
    """Datasets with one row per item (views keep the row count they were made for, and go stale)."""
    parts = name.split("/")
    return parts[0] == "items" or name == "pixels" or (parts[0] == "embeddings" and parts[-1] in ("vectors", "done"))
