"""One resumable-run mechanism for embed, segment and patches: a run writes shards as it goes, and its
progress is the set of shards present; one commit stitches them into the store.

A run lives in ``S.h5.shards/<name>-<token>/``: ``run.json`` pins its configuration, and shard files
``<writer>-<r|f><first>-<stop>.h5`` hold its results (store rows for ``r``, source field indices for
``f``). Shards are written straight into their final folder, so committing moves no data: the main file
starts naming them (segment and patches), or names ``merged-*`` shards that the commit wrote from them
in row order, after which the checkpoint shards are deleted (embed). Until the commit, checkpoint shards
are pending work that a re-run of the same command resumes.
Many writers (one per worker) can add shards to one run at once; their names never collide because
they carry the writer id, and one committer stitches them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from ..atomic import atomic_write_json, sweep_stale_temps
from ..errors import EmbedkitError
from .schema import now_iso, validate_key
from .shards import ShardInfo, ShardTable, file_checksum, folder_of, write_shard

STATE = "run.json"
#: Name prefix of the shards a commit merges a run's checkpoint shards into.
MERGED = "merged-"


def committed_files(store_path: Path) -> set[str]:
    """Shard files (relative to the shards folder) that the store's main file names."""
    if not store_path.exists():
        return set()
    with h5py.File(store_path, "r") as f:
        return set(ShardTable.read(f, folder_of(store_path).name).files)


def sweep_temps(store_path: Path) -> None:
    """Remove temp files left beside the store and in its run folders by processes that died."""
    sweep_stale_temps(store_path.parent)
    folder = folder_of(store_path)
    sweep_stale_temps(folder)
    if folder.is_dir():
        for d in folder.iterdir():
            if d.is_dir():
                sweep_stale_temps(d)


class Run:
    """A resumable run of ``kind`` (``embed``, ``segment``, ``patches``) on one store, for one key."""

    def __init__(self, store_path: str | os.PathLike, kind: str, key: str | None = None):
        self.store_path = Path(store_path)
        self.name = f"{kind}-{validate_key(key)}" if key else kind
        self.folder = folder_of(self.store_path)
        self.dir: Path | None = None

    # --------------------------------------------------------------------------------- starting
    def _candidates(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(d for d in self.folder.iterdir()
                      if d.is_dir() and d.name.rsplit("-", 1)[0] == self.name and (d / STATE).is_file())

    def start(self, config: dict, config_fingerprint: str, differences: Callable[[dict, dict], str] | None = None,
              extra: dict | None = None) -> bool:
        """Continue the pending run with this configuration, or begin a new one; return True when resuming.

        A pending run with another configuration that already holds shards is refused (nothing is deleted);
        one that holds none is closed, as it has no work to lose.
        """
        sweep_temps(self.store_path)
        committed = committed_files(self.store_path)
        for d in self._candidates():
            state = json.loads((d / STATE).read_text())
            if not self._pending_in(d, committed):
                self._close(d)
                continue
            if state.get("config_fingerprint") != config_fingerprint:
                diff = differences(state.get("config", {}), config) if differences else "settings differ"
                raise EmbedkitError(f"an interrupted run under {d} used another configuration ({diff[:400]}); re-run it "
                                    f"with the original settings to resume, or delete {d} to start over")
            self.dir = d
            return True
        self.dir = self.folder / f"{self.name}-{secrets.token_hex(4)}"
        self.dir.mkdir(parents=True, exist_ok=False)
        atomic_write_json(self.dir / STATE, {"kind": self.name, "config": config, "config_fingerprint": config_fingerprint,
                                             "created": now_iso(), **(extra or {})})
        return False

    def state(self) -> dict:
        return json.loads((self._dir() / STATE).read_text())

    def _dir(self) -> Path:
        if self.dir is None:
            raise RuntimeError("Run.start() must be called first")
        return self.dir

    def _pending_in(self, d: Path, committed: set[str]) -> list[Path]:
        """Checkpoint shards of run folder ``d`` that the store does not name (merged shards are the commit's own)."""
        return sorted(p for p in d.glob("*.h5") if f"{d.name}/{p.name}" not in committed and not p.name.startswith(MERGED))

    # --------------------------------------------------------------------------------- shards
    def shards(self) -> list[Path]:
        """Shards this run wrote that the store does not name yet, in name order (writer, then range)."""
        return self._pending_in(self._dir(), committed_files(self.store_path))

    @staticmethod
    def shard_name(writer: str, unit: str, first: int, stop: int) -> str:
        return f"{writer}-{unit}{first:09d}-{stop:09d}.h5"

    @staticmethod
    def merged_name(first: int, stop: int) -> str:
        """Name of a shard that a commit merges from checkpoint shards (store rows first..stop)."""
        return f"{MERGED}r{first:09d}-{stop:09d}.h5"

    def write(self, name: str, arrays: dict[str, np.ndarray], compress: tuple[str, ...] = ()) -> ShardInfo:
        """Write one shard of this run (verified, atomically renamed)."""
        info = write_shard(self._dir(), name, arrays, compress)
        return ShardInfo(f"{self._dir().name}/{info.file}", info.bytes, info.checksum)

    def info(self, shard: Path) -> ShardInfo:
        """The record of a shard found on disk (verified against its content checksum when it was written)."""
        with h5py.File(shard, "r") as f:
            checksum = str(f.attrs.get("checksum", "")) or file_checksum(f)
        return ShardInfo(f"{shard.parent.name}/{shard.name}", shard.stat().st_size, checksum)

    @staticmethod
    def names(shard: Path) -> list[str]:
        """The datasets a shard holds."""
        with h5py.File(shard, "r") as f:
            return list(f)

    @staticmethod
    def read(shard: Path, *names: str) -> dict[str, Any]:
        """Small arrays of a shard (strings as str objects); big ones stay on disk unless named."""
        with h5py.File(shard, "r") as f:
            out = {}
            for n in names or list(f):
                ds = f[n]
                out[n] = np.array(ds.asstr()[()], dtype=object) if h5py.check_string_dtype(ds.dtype) else ds[()]
            return out

    # --------------------------------------------------------------------------------- ending
    def discard(self, shards: list[Path]) -> None:
        """After a verified commit that names merged copies of them: delete this run's checkpoint shards."""
        for p in shards:
            if p.parent.resolve() != self._dir().resolve():
                raise RuntimeError(f"refusing to delete {p}: not a shard of run {self._dir()}")
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def finish(self) -> None:
        """After a verified commit: the run folder now only holds committed shards; drop its state."""
        self._close(self._dir())

    def _close(self, d: Path) -> None:
        d = d.resolve()
        if d.parent != self.folder.resolve():  # never touch anything outside the store's own shards folder
            raise RuntimeError(f"refusing to clean {d}: not a run folder of {self.store_path}")
        with contextlib.suppress(FileNotFoundError):
            (d / STATE).unlink()
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty: a folder holding committed shards stays
