"""Benchmark `embed`: files-to-store throughput against the bare model, and peak memory as input grows.

Throughput: efficientnet_lite0 at 224 px, PNG files on disk -> finished store, compared in the same run
with the bare model's forward pass on pre-made tensors under the best CPU settings (channels_last,
inference_mode, all cores). Target: pipeline >= 0.9x bare.

Memory: peak RSS of a whole `embedkit embed` process for N and 10N images (the same cells listed
repeatedly under distinct ids). Target: the 10x run costs at most 1.2x the peak RSS.

Usage: python scripts/bench_embed.py [--data ../shared/data] [--out bench/embed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bare_forward(encoder, images: int, batch: int, channels_last: bool) -> float:
    """Images per second of the encoder alone on pre-made tensors."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = encoder.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, encoder.preprocess.size, encoder.preprocess.size).contiguous(memory_format=fmt)
    with torch.inference_mode():
        model(x)  # warm-up
        t = time.perf_counter()
        for _ in range(max(1, images // batch)):
            model(x)
        return max(1, images // batch) * batch / (time.perf_counter() - t)


def pipeline(files: list[Path], root: Path, encoder, batch: int, workdir: Path) -> tuple[float, float]:
    """Images per second of embed() from PNG files to a committed store; also returns seconds."""
    from embedkit.embed import embed
    from embedkit.sources import Item, Source

    src = Source(str(root), [Item(id=str(f.relative_to(root)), path=str(f.relative_to(root))) for f in files], "files")
    store = workdir / f"bench_{time.time_ns()}.h5"
    t = time.perf_counter()
    embed(src, store, encoder, batch_size=batch, progress=False)
    dt = time.perf_counter() - t
    return len(files) / dt, dt


def peak_rss_mb(manifest: Path, store: Path, batch: int) -> float:
    """Peak RSS (MB) of a full `embedkit embed` run in its own process tree."""
    code = (
        "import resource, subprocess, sys\n"
        f"r = subprocess.run([sys.executable, '-m', 'embedkit.cli', 'embed', {str(manifest)!r}, '--store', {str(store)!r}, "
        f"'--batch-size', '{batch}', '--quiet'], capture_output=True, text=True)\n"
        "assert r.returncode == 0, r.stderr\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    return int(out.strip().splitlines()[-1]) / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "embed.json"))
    ap.add_argument("--images", type=int, default=640, help="images for the throughput comparison")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each is kept")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mem-images", type=int, default=300, help="N for the memory test (10N is also run)")
    args = ap.parse_args()

    data = Path(args.data) / "mitocheck"
    if not data.is_dir():
        print(f"skip: MitoCheck data not found at {data} (pass --data)")
        return 0
    from embedkit.encoders import create_encoder

    files = sorted(data.glob("*/*.png"))
    enc = create_encoder("efficientnet_lite0")
    sel = files[: args.images]
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "encoder": "efficientnet_lite0",
                    "image_size": enc.preprocess.size, "batch_size": args.batch_size, "images": len(sel)}
    bare, bare_plain, piped, seconds = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):
            bare.append(bare_forward(enc, len(sel), args.batch_size, channels_last=True))
            bare_plain.append(bare_forward(enc, len(sel), args.batch_size, channels_last=False))
            ips, dt = pipeline(sel, data, enc, args.batch_size, tmp)
            piped.append(ips)
            seconds.append(dt)
            print(f"repeat {r}: bare channels_last {bare[-1]:.1f} img/s, bare default {bare_plain[-1]:.1f} img/s, "
                  f"files->store {ips:.1f} img/s", flush=True)
        result["throughput"] = {
            "bare_forward_channels_last_img_s": max(bare), "bare_forward_default_img_s": max(bare_plain),
            "files_to_store_img_s": max(piped), "all_runs": {"bare": bare, "bare_default": bare_plain, "pipeline": piped},
            "ratio_vs_best_bare": max(piped) / max(bare), "target_ratio": 0.9,
        }
        result["throughput"]["meets_target"] = result["throughput"]["ratio_vs_best_bare"] >= 0.9

        mem = {}
        for n in (args.mem_images, 10 * args.mem_images):
            manifest = tmp / f"m{n}.csv"
            rows = ["id,path,label,group"]
            for i in range(n):
                f = files[i % len(files)]
                rows.append(f"cell{i:07d},{f},{f.parent.name},{f.name[4:11]}")
            manifest.write_text("\n".join(rows) + "\n")
            mem[n] = peak_rss_mb(manifest, tmp / f"mem{n}.h5", args.batch_size)
            print(f"peak RSS for {n} images: {mem[n]:.0f} MB", flush=True)
        small, big = args.mem_images, 10 * args.mem_images
        result["memory"] = {"images_small": small, "images_large": big, "peak_rss_mb_small": mem[small],
                            "peak_rss_mb_large": mem[big], "ratio": mem[big] / mem[small], "target_ratio": 1.2,
                            "meets_target": mem[big] / mem[small] <= 1.2}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"throughput_ratio": round(result["throughput"]["ratio_vs_best_bare"], 3),
                      "memory_ratio": round(result["memory"]["ratio"], 3), "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
