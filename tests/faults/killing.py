"""kill -9 at seeded random points of a command, then resume: helpers shared by the tests and the benchmark.

A kill point is either a count of journal chunks (for the journalled stages: embed, segment, patches)
or a time since the process started, drawn between 10% and 90% of an uninterrupted run's duration (for
finetune and view, whose progress shows only at epoch ends or at the final commit). Each killed run is
started from the state the previous kill left, so later kills also hit resumed runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cases import cli, cli_env

#: Attributes that record when or how fast something ran; everything else must match bit for bit.
_TIMING_ATTRS = ("created", "modified", "seconds", "time", "date", "per_second", "elapsed")


def h5_digest(path: Path) -> dict[str, str]:
    """sha256 of every dataset (dtype, shape, bytes) and of every attribute that is not a timing, by HDF5 path."""
    import h5py
    import numpy as np

    out: dict[str, str] = {}

    def attrs(name: str, obj) -> None:
        for k, v in obj.attrs.items():
            if not any(t in k.lower() for t in _TIMING_ATTRS):
                out[f"{name}@{k}"] = hashlib.sha256(repr(np.asarray(v).tolist()).encode()).hexdigest()

    def visit(name: str, obj) -> None:
        attrs(name, obj)
        if isinstance(obj, h5py.Dataset):
            data = obj[()]
            raw = np.asarray(data).tobytes() if np.asarray(data).dtype != object else repr(np.asarray(data).tolist()).encode()
            out[name] = hashlib.sha256(f"{obj.dtype}{obj.shape}".encode() + raw).hexdigest()

    with h5py.File(path, "r") as f:
        attrs("/", f)
        f.visititems(visit)
    return out


def h5_readable(path: Path) -> bool:
    """True when plain h5py opens the file and reads its items (or the file does not exist yet)."""
    import h5py

    if not path.exists():
        return True
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) and obj.size < 10_000_000 else None)
        return True
    except Exception:
        return False


def chunk_count(folder: Path) -> Callable[[float], float]:
    """Progress as the number of journal chunks under ``folder`` (the store's ``.partial`` folder)."""
    return lambda elapsed: float(len(list(folder.rglob("chunk_*")))) if folder.exists() else 0.0


def seconds(elapsed: float) -> float:
    """Progress as seconds since the process started."""
    return elapsed


@dataclass
class KillReport:
    """What the kills did: which landed while the command still ran, and whether the store stayed readable."""

    points: list[float]
    mid_run: list[bool] = field(default_factory=list)
    readable: list[bool] = field(default_factory=list)
    resumed_stdout: str = ""


def kill_points(seed: int, n: int, low: float, high: float, integer: bool) -> list[float]:
    """``n`` increasing seeded random points in [low, high] (distinct integers when ``integer``)."""
    rng = random.Random(seed)
    if integer:
        return [float(p) for p in sorted(rng.sample(range(int(low), int(high) + 1), n))]
    return sorted(rng.uniform(low, high) for _ in range(n))


def run_with_kills(args: list[str], cwd: Path, progress: Callable[[float], float], points: list[float],
                   store: Path | None = None, timeout: float = 300) -> KillReport:
    """Start ``args`` once per point and SIGKILL its process group when ``progress`` reaches the point; then finish."""
    report = KillReport(points)
    for point in points:
        proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", *map(str, args)], cwd=str(cwd), env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        start = time.monotonic()
        while proc.poll() is None and progress(time.monotonic() - start) < point:
            if time.monotonic() - start > timeout:
                break
            time.sleep(0.01)
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        report.mid_run.append(alive)
        report.readable.append(h5_readable(store) if store is not None else True)
    report.resumed_stdout = cli(args, cwd, check=True, timeout=timeout).stdout
    return report


def timed(args: list[str], cwd: Path, timeout: float = 300) -> float:
    """Run a command to the end; its wall time in seconds."""
    t0 = time.monotonic()
    cli(args, cwd, check=True, timeout=timeout)
    return time.monotonic() - t0


def leftovers(folder: Path) -> list[str]:
    """Temporary files or journals a finished command left behind (names with '.tmp' or '.partial')."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial"))


def json_without_timings(path: Path) -> str:
    """A JSON file re-serialised without the keys that record time (fit seconds, items per second, dates)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not any(t in k.lower() for t in _TIMING_ATTRS)}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True)
