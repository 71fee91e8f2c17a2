"""What the store fault tests share: the embed settings, byte snapshots of folders, one-line errors, store copies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np

KEY = "efficientnet_lite0"
#: 8 cells in batches of 4 make two checkpoint shards; 64 px keeps each run cheap (no check depends on the size).
ARGS = ("--batch-size", "4", "--checkpoint-rows", "4", "--image-size", "64", "--quiet")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (lock files excluded: taking a lock is not a write)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``embedkit: error:`` line of a run that exited 2 without a traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("embedkit: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def copy_store(src: Path, folder: Path) -> Path:
    """Copy a store and its shards folder (under its own name) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copy(src, dst)
    if Path(f"{src}.shards").is_dir():
        shutil.copytree(f"{src}.shards", f"{dst}.shards")
    return dst


def every_array(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a store read with plain h5py (the shard index left out)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.startswith("shards"):
                out[name] = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]
        f.visititems(visit)
    return out
