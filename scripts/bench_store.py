"""Benchmark the store's write and read costs (issue 10), writing JSON.

(a) Bytes written (``/proc/self/io`` write_bytes of a child process) and wall time of adding one
    embedding key of N x 1280 vectors and one 2-D view, on a store of N items and on one that also holds
    >= ``--pixel-gb`` GB of pixels. Target: bytes within 10%, wall time within 20%.
(b) Segment peak disk use while a run goes (the store, its shards and temp files, sampled every 50 ms)
    over the final store size. Target <= 1.3.
(c) Read throughput of ``Store.vectors(key)`` and of random pixel rows, sharded store vs the single-file
    (schema 1) layout of the same data built in this run by ``store pack``. Target within 10%.

With ``--baseline-code PATH`` (a checkout of an older embedkit), (a) and (b) are also measured with it.

    python scripts/bench_store.py --out bench/store.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedkit.store import Run, Store, write_lock  # noqa: E402
from embedkit.store.writing import append_items, commit_fields  # noqa: E402
from embedkit.store.tools import pack  # noqa: E402


class _Item:
    def __init__(self, i: int):
        self.id, self.path, self.label, self.group, self.meta = f"c{i:07d}", f"f/c{i:07d}.png", "ab"[i % 2], f"g{i // 20}", {}


def store_size(path: Path) -> int:
    """Bytes of a store: main file, shards folder and any temp files beside it."""
    total = 0
    for p in [path, *path.parent.glob(f".{path.name}.tmp-*")]:
        if p.is_file():
            total += p.stat().st_size
    shards = Path(f"{path}.shards")
    if shards.is_dir():
        total += sum(p.stat().st_size for p in shards.rglob("*") if p.is_file())
    return total


def make_store(path: Path, n: int, pixel_gb: float) -> None:
    """A store of n items; with pixel_gb > 0, also pixels of that many GB written as segment shards."""
    if pixel_gb <= 0:
        append_items(path, [_Item(i) for i in range(n)], "/data")
        return
    side = int(np.ceil(np.sqrt(pixel_gb * 1e9 / n / 3)))
    rng = np.random.default_rng(0)
    with write_lock(path):
        run = Run(path, "segment")
        run.start({"bench": side}, f"bench{side}")
        per = max(1, (256 << 20) // (side * side * 3))
        batches = []
        for a in range(0, n, per):
            b = min(n, a + per)
            pixels = rng.integers(0, 256, size=(b - a, side, side, 3), dtype=np.uint8)
            name = Run.shard_name("w0", "f", a, b)
            run.write(name, {"field": np.array([f"f{a}"], dtype=object), "pixels": pixels}, compress=("pixels",))
            batches.append(([_Item(i) for i in range(a, b)], {}, run.dir / name, np.arange(b - a)))
        commit_fields(path, run, "segment", {"bench": side}, f"bench{side}", "/data", batches, (side, side, 3),
                      [f"f{a}" for a in range(0, n, per)], [])


_ADD_KEY = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
store, n, dim, key = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def io():
    return {k: int(v) for k, v in (l.split(": ") for l in open("/proc/self/io").read().split("\n") if l)}

cfg = {"encoder": "bench", "weights_fingerprint": "x", "preprocess": {"size": 224}, "pooling": None,
       "conversion": {}, "dtype": "float32", "dim": dim}
x = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
from embedkit.views import make_layout
import sklearn.decomposition, pandas  # imported before timing: the view's cost, not the imports'
io0, t0 = io(), time.perf_counter()
try:
    from embedkit.store import Run, write_lock, fingerprint, comparable_config
    from embedkit.store.writing import commit_embedding
    with write_lock(store):
        run = Run(store, "embed", key)
        run.start({"config": cfg}, fingerprint(comparable_config(cfg)))
        ids = np.array([f"c{i:07d}" for i in range(n)], dtype=object)
        for a in range(0, n, 1024):
            b = min(n, a + 1024)
            run.write(Run.shard_name("w0", "r", a, b), {"rows": np.arange(a, b), "ids": ids[a:b], "vectors": x[a:b],
                      "bad": np.array([""] * (b - a), dtype=object), "paths": ids[a:b]})
        commit_embedding(store, run, key, dim, "float32", cfg, [])
except ImportError:  # an older embedkit: one transaction that writes the vectors into the file
    from embedkit.store import transaction, write_lock, ensure_embedding
    with write_lock(store), transaction(store) as f:
        g = ensure_embedding(f, key, dim, "float32", cfg)
        g["vectors"][:] = x
        g["done"][:] = True
io1, t1 = io(), time.perf_counter()
make_layout(store, key, "pca")
io2, t2 = io(), time.perf_counter()
print(json.dumps({"key_bytes": io1["write_bytes"] - io0["write_bytes"], "key_seconds": t1 - t0,
                  "view_bytes": io2["write_bytes"] - io1["write_bytes"], "view_seconds": t2 - t1}))
"""


def add_key_and_view(code: Path, store: Path, n: int, dim: int, key: str = "bench") -> dict:
    out = subprocess.run([sys.executable, "-c", _ADD_KEY, str(code), str(store), str(n), str(dim), key], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_writes(work: Path, n: int, dim: int, pixel_gb: float, repeats: int = 3) -> tuple[dict, Path]:
    """(a) bytes and seconds to add a key and a view, store without vs with pixels (medians of ``repeats``)."""
    small, big = work / "small" / "s.h5", work / "big" / "s.h5"
    for p in (small, big):
        p.parent.mkdir(parents=True)
    make_store(small, n, 0)
    t = time.perf_counter()
    make_store(big, n, pixel_gb)
    build = time.perf_counter() - t
    os.sync()  # the pixel store's dirty pages are flushed now, not during the timed writes
    runs: dict = {"small": [], "big": []}
    for r in range(repeats):  # alternating, so that load on a shared machine hits both stores alike
        for name, store in (("small", small), ("big", big)):
            runs[name].append(add_key_and_view(ROOT, store, n, dim, key=f"bench{r}"))
    a, b = ({k: float(np.median([x[k] for x in runs[name]])) for k in runs[name][0]} for name in ("small", "big"))
    res = {"n_items": n, "dim": dim, "pixel_bytes": store_size(big) - store_size(small), "build_seconds": build,
           "repeats": repeats, "small": a, "big": b, "runs": runs}
    for what in ("key", "view"):
        res[f"{what}_bytes_ratio"] = b[f"{what}_bytes"] / max(1, a[f"{what}_bytes"])
        res[f"{what}_seconds_ratio"] = b[f"{what}_seconds"] / max(1e-9, a[f"{what}_seconds"])
    total_a = a["key_bytes"] + a["view_bytes"]
    total_b = b["key_bytes"] + b["view_bytes"]
    res["bytes_ratio"] = total_b / max(1, total_a)
    res["seconds_ratio"] = (b["key_seconds"] + b["view_seconds"]) / max(1e-9, a["key_seconds"] + a["view_seconds"])
    res["targets_met"] = abs(res["bytes_ratio"] - 1) <= 0.10 and abs(res["seconds_ratio"] - 1) <= 0.20
    return res, big


def bench_baseline_writes(code: Path, small: Path, single: Path, n: int, dim: int) -> dict:
    """(a) with an older embedkit on the single-file layout: a small store and the packed big one."""
    import h5py

    small1 = small.parent / "s1.h5"
    shutil.copy(small, small1)
    with h5py.File(small1, "r+") as f:
        f.attrs["schema_version"] = 1
    a = add_key_and_view(code, small1, n, dim, "bench_old")
    b = add_key_and_view(code, single, n, dim, "bench_old")
    return {"small": a, "big": b, "bytes_ratio": (b["key_bytes"] + b["view_bytes"]) / max(1, a["key_bytes"] + a["view_bytes"]),
            "seconds_ratio": (b["key_seconds"] + b["view_seconds"]) / max(1e-9, a["key_seconds"] + a["view_seconds"])}


def bench_reads(big: Path, work: Path, repeats: int = 7, baseline: Path | None = None, n: int = 0, dim: int = 0) -> dict:
    single = work / "single.h5"
    t = time.perf_counter()
    pack(big, single)
    pack_seconds = time.perf_counter() - t
    import h5py

    with h5py.File(single, "r+") as f:  # the packed file is exactly today's single-file layout
        f.attrs["schema_version"] = 1
    rng = np.random.default_rng(2)
    out = {"pack_seconds": pack_seconds}
    paths = {"sharded": big, "single_file": single}
    with Store(big) as s:
        n_rows = len(s)
    rows = rng.choice(n_rows, size=min(200, n_rows), replace=False)
    for name, path in paths.items():  # warm the page cache: both layouts read from memory, not from disk
        with Store(path) as s:
            v, p = s.vectors("bench0"), s.pixels(rows)
    for mode in ("open_handle", "fresh_handle"):
        # open_handle: one Store per layout, read repeatedly (a probe or a notebook); fresh_handle: a new Store
        # per read, so open costs and no HDF5 chunk cache carried over are included (a command reading once)
        times: dict = {name: {"vectors": [], "pixels": []} for name in paths}
        held = {name: Store(path) for name, path in paths.items()} if mode == "open_handle" else {}
        for _ in range(repeats):  # interleaved, so that load on a shared machine hits both layouts alike
            for name, path in paths.items():
                for what, read in (("vectors", lambda s: s.vectors("bench0")), ("pixels", lambda s: s.pixels(rows))):
                    s = held[name] if name in held else Store(path)
                    t = time.perf_counter()
                    read(s)
                    times[name][what].append(time.perf_counter() - t)
                    if name not in held:
                        s.close()
        for s in held.values():
            s.close()
        res = out.setdefault(mode, {})
        for name in paths:
            tv, tp = float(np.median(times[name]["vectors"])), float(np.median(times[name]["pixels"]))
            res[name] = {"vectors_seconds": tv, "vectors_mb_per_s": v.nbytes / 1e6 / tv, "random_pixel_rows": len(rows),
                         "pixels_seconds": tp, "pixels_mb_per_s": p.nbytes / 1e6 / tp}
        res["vectors_throughput_ratio"] = res["sharded"]["vectors_mb_per_s"] / res["single_file"]["vectors_mb_per_s"]
        res["pixels_throughput_ratio"] = res["sharded"]["pixels_mb_per_s"] / res["single_file"]["pixels_mb_per_s"]
        res["targets_met"] = res["vectors_throughput_ratio"] >= 0.9 and res["pixels_throughput_ratio"] >= 0.9
    with h5py.File(single, "r") as f:  # how embedkit read that layout before: one fancy-indexed h5py read
        uniq = np.unique(rows)
        old = []
        for _ in range(1):  # slow: once is enough
            t = time.perf_counter()
            p = f["pixels"][uniq]
            old.append(time.perf_counter() - t)
    out["single_file_old_reader"] = {"pixels_seconds": float(np.median(old)), "pixels_mb_per_s": p.nbytes / 1e6 / float(np.median(old))}
    if baseline is not None:
        out["baseline_writes"] = bench_baseline_writes(baseline, work / "small" / "s.h5", single, n, dim)
    single.unlink()
    return out


def bench_segment(code: Path, work: Path, n_fields: int) -> dict:
    """Peak disk use of a watershed segment run over its final store size."""
    import tifffile

    img = tifffile.imread(ROOT / "tests" / "data" / "stardist" / "img2d.tif")
    fields = work / "fields"
    fields.mkdir(parents=True, exist_ok=True)
    for k in range(n_fields):  # flips and rotations of the real field, so every field has real nuclei
        tifffile.imwrite(fields / f"f{k:03d}.tif", np.rot90(img if k % 2 else img[::-1], k % 4).copy())
    store = work / "seg" / "cells.h5"
    store.parent.mkdir()
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, store_size(store) + _partial_size(store))
            except FileNotFoundError:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "embedkit.cli", "segment", str(fields), "--out", str(store), "--backend",
                    "watershed", "--crop", "96", "--quiet"], check=True, capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}, cwd=str(code))
    seconds = time.perf_counter() - t
    stop.set()
    th.join()
    final = store_size(store)
    n_cells = len(Store(store)) if code == ROOT else None
    return {"n_fields": n_fields, "n_cells": n_cells, "seconds": seconds, "final_bytes": final, "peak_bytes": peak,
            "peak_over_final": peak / max(1, final), "target_met": peak / max(1, final) <= 1.3}


def _partial_size(store: Path) -> int:
    """Bytes an older embedkit journals beside the store (``S.h5.partial``)."""
    part = Path(f"{store}.partial")
    return sum(p.stat().st_size for p in part.rglob("*") if p.is_file()) if part.is_dir() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/store.json")
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--pixel-gb", type=float, default=2.1)
    ap.add_argument("--fields", type=int, default=24, help="Fields (512 x 512) in the segment run.")
    ap.add_argument("--workdir", help="Scratch folder [default: a temp folder, deleted after].")
    ap.add_argument("--baseline-code", help="Checkout of an older embedkit to measure (a) and (b) with too.")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_store_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"cpus": os.cpu_count()}}
    try:
        res["writes"], big = bench_writes(work / "w", args.items, args.dim, args.pixel_gb)
        print(json.dumps(res["writes"], indent=1), flush=True)
        base = Path(args.baseline_code).resolve() if args.baseline_code else None
        res["reads"] = bench_reads(big, work / "w", baseline=base, n=args.items, dim=args.dim)
        if base is not None:
            res["baseline_writes"] = res["reads"].pop("baseline_writes")
        print(json.dumps(res["reads"], indent=1), flush=True)
        shutil.rmtree(work / "w")
        res["segment"] = bench_segment(ROOT, work / "s", args.fields)
        print(json.dumps(res["segment"], indent=1), flush=True)
        if base is not None:
            res["baseline_segment"] = bench_segment(base, work / "s0", args.fields)
            print(json.dumps(res["baseline_segment"], indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
