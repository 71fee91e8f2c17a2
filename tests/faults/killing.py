"""kill -9 at seeded random points of a command, then resume: helpers shared by the tests and the benchmark.

A kill point is either a count of shard files a run has written (for the sharded stages: embed, segment, patches)
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

from .cases import MITOCHECK, STARDIST_FIELD, cli, cli_env

KILL_CLASSES = ("Anaphase", "Interphase", "Metaphase", "Prometaphase")

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
        if name.split("/")[0] == "shards":  # the shard index: file names and sizes, not content (read through the arrays)
            return
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


def shard_count(store: Path) -> Callable[[float], float]:
    """Progress as the number of finished shard files under the store's shards folder (temp files not counted)."""
    folder = Path(f"{store}.shards")
    return lambda elapsed: float(sum(1 for p in folder.rglob("*.h5") if not p.name.startswith("."))) if folder.exists() else 0.0


def seconds(elapsed: float) -> float:
    """Progress as seconds since the process started."""
    return elapsed


@dataclass
class KillReport:
    """What the kills did (which landed while the command still ran, whether the store stayed readable),
    and how the resumed result compares with an uninterrupted run."""

    command: str
    points: list[float]
    mid_run: list[bool] = field(default_factory=list)
    readable: list[bool] = field(default_factory=list)
    resumed_stdout: str = ""
    differences: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences


def kill_points(seed: int, n: int, low: float, high: float, integer: bool) -> list[float]:
    """``n`` increasing seeded random points in [low, high] (distinct integers when ``integer``)."""
    rng = random.Random(seed)
    if integer:
        return [float(p) for p in sorted(rng.sample(range(int(low), int(high) + 1), n))]
    return sorted(rng.uniform(low, high) for _ in range(n))


def run_with_kills(args: list[str], cwd: Path, progress: Callable[[float], float], points: list[float],
                   store: Path | None = None, timeout: float = 300) -> KillReport:
    """Start ``args`` once per point and SIGKILL its process group when ``progress`` reaches the point; then finish."""
    report = KillReport(str(args[0]), points)
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
    """Temporary files or unfinished runs a finished command left behind (names with '.tmp', '.partial', run.json)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if ".tmp" in p.name or p.name.endswith(".partial") or p.name == "run.json")


def json_without_timings(path: Path) -> str:
    """A JSON file re-serialised without the keys that record time (fit seconds, items per second, dates)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not any(t in k.lower() for t in _TIMING_ATTRS)}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True)


def differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """Names whose digests differ between two digest maps (or that only one has)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# --------------------------------------------------------------------------------------------- inputs

def make_cells(root: Path, per_class: int = 6) -> Path:
    """Real MitoCheck cells as class folders, ``per_class`` of each of four classes."""
    import shutil

    for cls in KILL_CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((MITOCHECK / cls).glob("*.png"))[:per_class]:
            shutil.copy(f, root / cls / f.name)
    return root


def make_fields(root: Path, n: int = 12, size: int = 128) -> Path:
    """``n`` tiles of the StarDist nuclei field (16-bit), one field each."""
    import tifffile

    img = tifffile.imread(STARDIST_FIELD)
    per_row = img.shape[1] // size
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        r, c = divmod(i, per_row)
        tifffile.imwrite(root / f"t{i:02d}.tif", img[r * size:(r + 1) * size, c * size:(c + 1) * size])
    return root


# --------------------------------------------------------------------------------------------- scenarios

EMBED_CHECKPOINT_ROWS = 3
EMBED_ARGS = ["--batch-size", "3", "--checkpoint-rows", str(EMBED_CHECKPOINT_ROWS), "--quiet"]


def _kill_sharded(command: str, source: Path, out_flag: str, args: list[str], ref: Path, store: Path,
                  work: Path, kills: int, seed: int, n_units: int | None = None) -> KillReport:
    """Run a sharded stage into ``store`` killed at ``kills`` shard counts below ``n_units`` (the shards the
    reference run ``ref`` kept, unless given); compare with ``ref``."""
    store.parent.mkdir(parents=True, exist_ok=True)
    n_units = n_units or int(shard_count(ref)(0))
    points = kill_points(seed, kills, 1, n_units - 1, integer=True)
    report = run_with_kills([command, source, out_flag, store, *args], work, shard_count(store), points, store)
    report.differences = differing(h5_digest(ref), h5_digest(store))
    report.leftovers = leftovers(store.parent)
    return report


def kill_embed(cells: Path, ref: Path, work: Path, kills: int, seed: int) -> KillReport:
    """Embed ``cells`` (ref: an uninterrupted store made with EMBED_ARGS), killed at ``kills`` shard counts."""
    import h5py

    with h5py.File(ref, "r") as f:  # the commit merged the run's checkpoint shards: count the checkpoints it wrote
        n_units = -(-f["items"]["id"].shape[0] // EMBED_CHECKPOINT_ROWS)
    return _kill_sharded("embed", cells, "--store", EMBED_ARGS, ref, work / "killed.h5", work, kills, seed, n_units)


def kill_segment(fields: Path, work: Path, kills: int, seed: int) -> KillReport:
    """Watershed segmentation of ``fields``, killed at ``kills`` shard counts; store and label TIFFs compared."""
    import numpy as np
    import tifffile

    args = ["--backend", "watershed", "--checkpoint-fields", "1", "--quiet"]
    ref, store = work / "ref" / "cells.h5", work / "killed" / "cells.h5"
    ref.parent.mkdir(parents=True)
    cli(["segment", fields, "--out", ref, *args], work, check=True)
    report = _kill_sharded("segment", fields, "--out", args, ref, store, work, kills, seed)
    labels_ref = sorted(p.relative_to(ref.parent) for p in ref.parent.rglob("*.tif"))
    labels_out = sorted(p.relative_to(store.parent) for p in store.parent.rglob("*.tif"))
    if not labels_ref or labels_ref != labels_out:
        report.differences.append("label TIFF names")
    report.differences += [str(r) for r in labels_ref if r in labels_out and not np.array_equal(
        tifffile.imread(ref.parent / r), tifffile.imread(store.parent / r))]
    return report


def kill_patches(fields: Path, work: Path, kills: int, seed: int) -> KillReport:
    """Sliding-window patches of ``fields`` (simple filter), killed at ``kills`` shard counts."""
    args = ["--size", "32", "--stride", "32", "--checkpoint-fields", "1", "--quiet"]
    ref = work / "ref.h5"
    cli(["patches", fields, "--out", ref, *args], work, check=True)
    return _kill_sharded("patches", fields, "--out", args, ref, work / "killed" / "patches.h5", work, kills, seed)


def kill_finetune(cells: Path, work: Path, kills: int, seed: int) -> KillReport:
    """Two epochs of a tiny network, killed at ``kills`` random times; weights, predictions and history compared."""
    import numpy as np
    from safetensors.numpy import load_file

    args = ["--group-by", "mitocheck", "--model", "test_resnet", "--random-init", "--image-size", "32", "--epochs", "2",
            "--batch-size", "8", "--quiet"]
    ref, out = work / "ref", work / "killed"
    duration = timed(["finetune", cells, *args, "--out", ref], work)
    # early in the reference's time: a killed run resumes from its last epoch, and this machine's load may make
    # it quicker than the reference was, so late points would land after it finished
    points = kill_points(seed, kills, 0.1 * duration, 0.45 * duration, integer=False)
    report = run_with_kills(["finetune", cells, *args, "--out", out], work, seconds, points)
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    report.differences = [f"model.safetensors:{k}" for k in sorted(set(a) | set(b))
                          if k not in a or k not in b or not np.array_equal(a[k], b[k])]
    if (ref / "predictions.csv").read_bytes() != (out / "predictions.csv").read_bytes():
        report.differences.append("predictions.csv")
    report.differences += [n for n in ("history.json", "metrics.json")
                           if json_without_timings(ref / n) != json_without_timings(out / n)]
    report.leftovers = leftovers(out)
    return report


def kill_view(store: Path, work: Path, kills: int, seed: int) -> KillReport:
    """A t-SNE view of an embedded ``store`` (copied twice), killed at ``kills`` random times; stores compared."""
    import shutil

    ref, killed = work / "ref" / store.name, work / "killed" / store.name  # a store's shards folder keeps its name
    for dst in (ref, killed):
        dst.parent.mkdir(parents=True)
        shutil.copy(store, dst)
        shutil.copytree(f"{store}.shards", f"{dst}.shards")
    args = ["--method", "tsne", "--quiet"]
    # the shorter of two runs: the first also fills caches (numba's compiled code), which killed runs then reuse
    duration = min(timed(["view", ref, *args, "--out", work / "ref.png"], work) for _ in range(2))
    points = kill_points(seed, kills, 0.1 * duration, 0.45 * duration, integer=False)  # early: load varies
    report = run_with_kills(["view", killed, *args, "--out", work / "killed.png"], work, seconds, points, killed)
    report.differences = differing(h5_digest(ref), h5_digest(killed))
    if not (work / "killed.png").exists():
        report.differences.append("killed.png missing")
    report.leftovers = leftovers(work)
    return report
