#!/usr/bin/env python
"""Benchmark microscopy formats: reading throughput, and peak memory of segmenting a huge field lazily.

1. **Reading 1,000 crops** (96 x 96, two 16-bit channels cut from the bundled StarDist nuclei image) through
   ``embedkit.images.load_rgb`` -- the path ``embed`` takes -- from PNG (8-bit, the baseline), plain TIFF,
   OME-TIFF and OME-Zarr (one file or folder per crop). Reported as crops per second and relative to PNG.
2. **Peak RSS of ``embedkit segment``** (watershed) on a synthetic 20,000 x 20,000 OME-Zarr field, read and
   segmented tile by tile, next to the same command on a 4,000 x 4,000 field that is read whole (the
   baseline, measured in the same run). Each runs in its own process; peak RSS is that process's maxrss.

Writes JSON (default bench/formats.json). The big field takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedkit.formats import writers  # noqa: E402
from embedkit.images import load_rgb  # noqa: E402


def crops(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    """``n`` two-channel uint16 crops (C, Y, X) cut at random from the real nuclei image."""
    import tifffile

    img = tifffile.imread(ROOT / "tests" / "data" / "stardist" / "img2d.tif").astype(np.uint16)
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, img.shape[0] - size, n), rng.integers(0, img.shape[1] - size, n)
    return np.stack([np.stack([img[y:y + size, x:x + size], (img.max() - img)[y:y + size, x:x + size]]) for y, x in zip(ys, xs)])


def write_crops(folder: Path, data: np.ndarray) -> dict[str, list[Path]]:
    import tifffile
    from PIL import Image

    out: dict[str, list[Path]] = {"png": [], "tiff": [], "ome-tiff": [], "ome-zarr": []}
    for k, c in enumerate(data):
        rgb = np.stack([c[0], c[1], np.zeros_like(c[0])], -1)
        p = folder / f"c{k:04d}.png"
        Image.fromarray(np.clip(rgb // 1, 0, 255).astype(np.uint8)).save(p)
        out["png"].append(p)
        p = folder / f"c{k:04d}.tif"
        tifffile.imwrite(p, c)
        out["tiff"].append(p)
        out["ome-tiff"].append(Path(writers.write_ome_tiff(folder / f"c{k:04d}.ome.tiff", c, "CYX", ["DAPI", "inv"], 0.65)))
        out["ome-zarr"].append(Path(writers.write_ome_zarr(folder / f"c{k:04d}.ome.zarr", c[None, :, None], ["DAPI", "inv"], 0.65)))
    return out


def read_throughput(files: dict[str, list[Path]]) -> dict:
    from embedkit.formats import plugins
    from embedkit.images import Conversion

    conv = Conversion(channels=(0, 1, None))
    res = {}
    for kind, paths in files.items():
        plugins._open.cache_clear()
        t0 = time.perf_counter()
        for p in paths:
            load_rgb(p, conv if kind != "png" else Conversion())
        dt = time.perf_counter() - t0
        res[kind] = {"crops": len(paths), "seconds": round(dt, 3), "crops_per_second": round(len(paths) / dt, 1)}
    base = res["png"]["crops_per_second"]
    for kind in res:
        res[kind]["relative_to_png"] = round(res[kind]["crops_per_second"] / base, 3)
    return res


def synthetic_field(path: Path, side: int, spacing: int = 64, radius: float = 6.0, seed: int = 0) -> int:
    """Write a side x side uint16 OME-Zarr of Gaussian nuclei on a jittered grid, chunk by chunk; return the count."""
    rng = np.random.default_rng(seed)
    g = np.arange(spacing // 2, side - spacing // 2, spacing)
    cy, cx = np.meshgrid(g, g, indexing="ij")
    centres = np.stack([cy.ravel(), cx.ravel()], 1) + rng.integers(-spacing // 5, spacing // 5 + 1, (cy.size, 2))
    amp = rng.uniform(800, 3000, len(centres))
    half = int(3 * radius)
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    blob = np.exp(-(yy ** 2 + xx ** 2) / (2 * radius ** 2))
    arr = writers.ome_zarr_array(path, (1, 1, 1, side, side), "uint16", ["DAPI"], 0.65, chunks=(1024, 1024))
    chunk = 2048
    for y0 in range(0, side, chunk):
        for x0 in range(0, side, chunk):
            h, w = min(chunk, side - y0), min(chunk, side - x0)
            tile = rng.normal(200, 20, (h + 2 * half, w + 2 * half)).astype(np.float32)
            sel = np.flatnonzero((centres[:, 0] >= y0 - half) & (centres[:, 0] < y0 + h + half)
                                 & (centres[:, 1] >= x0 - half) & (centres[:, 1] < x0 + w + half))
            for i in sel:
                ly, lx = centres[i, 0] - y0 + half, centres[i, 1] - x0 + half
                tile[ly - half:ly + half + 1, lx - half:lx + half + 1] += amp[i] * blob
            arr[0, 0, 0, y0:y0 + h, x0:x0 + w] = np.clip(tile[half:half + h, half:half + w], 0, 65535).astype(np.uint16)
    return len(centres)


def segment_peak_rss(field: Path, store: Path) -> dict:
    """Run 'embedkit segment' on a field in a child process and return its wall time, peak RSS and output."""
    cmd = [sys.executable, "-c", "import resource,sys; from embedkit.cli import main\n"
           "try:\n main(sys.argv[1:])\nfinally:\n print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)",
           "segment", str(field), "--out", str(store), "--backend", "watershed", "--diameter", "12", "--crop", "32",
           "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"segment failed:\n{proc.stderr[-2000:]}")
    kb = int([ln for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS_KB")][-1].split()[1])
    return {"seconds": round(dt, 1), "peak_rss_gb": round(kb / 2 ** 20, 3), "summary": proc.stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "formats.json"))
    ap.add_argument("--crops", type=int, default=1000)
    ap.add_argument("--side", type=int, default=20_000, help="side of the big synthetic field")
    ap.add_argument("--baseline-side", type=int, default=4_000, help="side of the field read whole, for comparison")
    ap.add_argument("--skip-big", action="store_true", help="only the reading benchmark")
    args = ap.parse_args()
    report: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "crops").mkdir()
        files = write_crops(tmp / "crops", crops(args.crops))
        report["read_1000_crops"] = read_throughput(files)
        print(json.dumps(report["read_1000_crops"], indent=1))
        if not args.skip_big:
            for name, side in (("whole_field_baseline", args.baseline_side), ("lazy_tiled", args.side)):
                field = tmp / f"field{side}.ome.zarr"
                t0 = time.perf_counter()
                n = synthetic_field(field, side)
                made = time.perf_counter() - t0
                run = segment_peak_rss(field, tmp / f"cells{side}.h5")
                report[f"segment_{name}"] = {"side": side, "pixels": side * side, "nuclei_drawn": n,
                                             "field_write_seconds": round(made, 1), **run}
                print(name, json.dumps(report[f"segment_{name}"], indent=1))
            big = report["segment_lazy_tiled"]["peak_rss_gb"]
            report["verdict"] = {"target_peak_rss_gb": 4.0, "lazy_20k_peak_rss_gb": big, "under_target": big < 4.0,
                                 "field_uint16_gb": round(args.side ** 2 * 2 / 2 ** 30, 2),
                                 "field_float32_rgb_gb": round(args.side ** 2 * 12 / 2 ** 30, 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
