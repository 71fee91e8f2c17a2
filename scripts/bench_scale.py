"""Benchmark scale-out: ``embed --engine ray`` against the local engine, and a scaling model for 1, 8 and 64 GPUs.

Throughput: efficientnet_lite0 at 224 px on 1,000 real MitoCheck cells (PNG files -> committed store), with the
local engine, Ray with 1 model replica and Ray with 2, measured alternately in this run (best of --repeats each;
the machine is shared). Ray runs on a local cluster started once (its start-up is reported apart). Target:
Ray with 2 replicas >= 0.85x the local engine. The vectors of every engine are compared with the local ones.

Scaling model: the per-image CPU costs of decoding, of resizing + normalising and of the model are measured
here (one thread each), and combined with published GPU figures (ViT-S/14 at 224 px > 2,000 img/s on one
H100/H200; clip-retrieval: ViT-B/16 1,100 img/s on one A100) and stated assumptions about cores, network and
storage, to project the throughput of 1, 8 and 64 GPUs and say which resource bounds it. See docs/scale.md.

Usage: python scripts/bench_scale.py [--data ../shared/data] [--out bench/scale.json] [--images 1000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Published GPU figures (img/s per GPU) and the assumptions of the scaling model; all recorded in the JSON.
GPU_FIGURES = {"vit_s14_224_h100_h200": 2000.0, "vit_b16_a100_clip_retrieval": 1100.0}
ASSUMPTIONS = {
    "gpus_per_node": 8,
    "cpu_cores_per_node": 96,  # a typical 8-GPU H100/H200 server (2 x 48 cores)
    "cores_reserved_per_node": 8,  # driver, Ray, I/O threads
    "nic_gbytes_per_s_per_node": 12.5,  # 100 Gb/s Ethernet
    "shared_storage_gbytes_per_s": 20.0,  # aggregate read bandwidth of a parallel file system serving the cluster
}


def cells(data: Path, n: int) -> list[Path]:
    """``n`` MitoCheck crops, taken round-robin over the classes so every phenotype is in."""
    by_class = [sorted(d.glob("*.png")) for d in sorted(data.iterdir()) if d.is_dir()]
    out: list[Path] = []
    for k in range(max(len(c) for c in by_class)):
        out += [c[k] for c in by_class if k < len(c)]
    return out[:n]


def run_embed(files: list[Path], root: Path, encoder, store: Path, engine) -> tuple[float, np.ndarray]:
    """Images/s of one embed() into a fresh store (as embed reports it: checks, encoding, commit), and the vectors."""
    from embedkit.embed import embed
    from embedkit.sources import Item, Source
    from embedkit.store import Store

    src = Source(str(root), [Item(id=str(f.relative_to(root)), path=str(f.relative_to(root))) for f in files], "files")
    res = embed(src, store, encoder, batch_size=32, progress=False, engine=engine)
    return res.images_per_second, Store(store).vectors(res.key)


def per_image_costs(files: list[Path], encoder, n: int = 200) -> dict:
    """Seconds per image on one CPU thread: decode (file -> uint8 RGB), preprocess (-> normalised 224 px tensor),
    model forward (batch 32), plus the bytes a crop weighs on disk, as uint8 and as a preprocessed tensor."""
    import torch

    from embedkit.embed import to_tensor
    from embedkit.encoders import create_encoder
    from embedkit.images import Conversion, read_image, to_rgb

    torch.set_num_threads(1)
    sel = files[:n]
    t = time.perf_counter()
    raw = [to_rgb(read_image(f), Conversion(), str(f), keep_uint8=True) for f in sel]
    decode = (time.perf_counter() - t) / len(sel)
    t = time.perf_counter()
    xs = [to_tensor(r.astype(np.float32) / 255.0, encoder.preprocess) for r in raw]
    preprocess = (time.perf_counter() - t) / len(sel)
    x = torch.stack(xs[:32]).contiguous(memory_format=torch.channels_last)
    model = {}
    for name, enc in (("efficientnet_lite0", encoder), ("vit_s14_random", create_encoder("dinov2_vits14", pretrained=False))):
        m = enc.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            m(x[:4])
            t = time.perf_counter()
            m(x)
            model[name] = (time.perf_counter() - t) / len(x)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"decode_s": decode, "preprocess_s": preprocess, "model_cpu_s": model,
            "file_bytes": float(np.mean([f.stat().st_size for f in sel])),
            "uint8_bytes": float(np.mean([r.nbytes for r in raw])), "tensor_bytes": float(xs[0].numel() * 4),
            "crop_px": list(raw[0].shape[:2]), "model_px": encoder.preprocess.size, "threads": 1}


def project(costs: dict, gpu_rate: float, gpus: int, preprocess_on_gpu: bool, transfer: str) -> dict:
    """Projected img/s of ``gpus`` GPUs: the smallest of the CPU (decode [+ preprocess]), network and GPU bounds."""
    a = ASSUMPTIONS
    nodes = max(1, -(-gpus // a["gpus_per_node"]))
    cores = nodes * (a["cpu_cores_per_node"] - a["cores_reserved_per_node"])
    cpu_cost = costs["decode_s"] + (0.0 if preprocess_on_gpu else costs["preprocess_s"])
    bounds = {"cpu": cores / cpu_cost, "gpu": gpus * gpu_rate}
    # crops read from shared storage; with more than one node, decoded blocks may also cross the network
    bounds["storage"] = a["shared_storage_gbytes_per_s"] * 1e9 / costs["file_bytes"]
    if nodes > 1:
        per_image = costs["uint8_bytes"] if transfer == "uint8" else costs["tensor_bytes"]
        bounds["network"] = nodes * a["nic_gbytes_per_s_per_node"] * 1e9 / per_image
    limit = min(bounds, key=bounds.get)
    return {"gpus": gpus, "nodes": nodes, "cpu_cores": cores, "bounds_img_per_s": bounds,
            "projected_img_per_s": bounds[limit], "bottleneck": limit}


def crossovers(costs: dict) -> dict:
    """Per-GPU img/s above which each other resource, not the GPU, bounds the throughput (the bottleneck moves)."""
    a = ASSUMPTIONS
    cores_per_gpu = (a["cpu_cores_per_node"] - a["cores_reserved_per_node"]) / a["gpus_per_node"]
    nic_per_gpu = a["nic_gbytes_per_s_per_node"] * 1e9 / a["gpus_per_node"]
    return {"cpu_decode_and_preprocess": cores_per_gpu / (costs["decode_s"] + costs["preprocess_s"]),
            "cpu_decode_only (gpu preprocessing)": cores_per_gpu / costs["decode_s"],
            "network_float_tensors (multi-node)": nic_per_gpu / costs["tensor_bytes"],
            "network_uint8 (multi-node)": nic_per_gpu / costs["uint8_bytes"],
            "storage_at_64_gpus": a["shared_storage_gbytes_per_s"] * 1e9 / costs["file_bytes"] / 64}


def scaling_model(costs: dict) -> dict:
    out = {"gpu_rate_where_the_bottleneck_moves_img_per_s": crossovers(costs)}
    for fig, rate in GPU_FIGURES.items():
        rows = []
        for gpus in (1, 8, 64):
            for on_gpu, transfer in ((False, "tensor"), (True, "uint8")):
                r = project(costs, rate, gpus, on_gpu, transfer)
                r["preprocessing"] = "gpu (uint8 crops sent)" if on_gpu else "cpu (float tensors sent)"
                rows.append(r)
        out[fig] = rows
    out["cpu_only_img_per_s_per_core"] = {k: 1.0 / (costs["decode_s"] + costs["preprocess_s"] + v)
                                          for k, v in costs["model_cpu_s"].items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "scale.json"))
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best of each engine is kept")
    args = ap.parse_args()
    data = Path(args.data) / "mitocheck"
    if not data.is_dir():
        print(f"skip: MitoCheck data not found at {data} (pass --data)")
        return 0
    import ray

    from embedkit.encoders import create_encoder
    from embedkit.engines.ray_engine import RayEngine

    files = cells(data, args.images)
    encoder = create_encoder("efficientnet_lite0")
    costs = per_image_costs(files, encoder)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=str(tmp / "ray"), logging_level="WARNING",
             log_to_driver=False)
    ray_start = time.perf_counter() - t
    engines = {"local": None, "ray_1_replica": RayEngine(replicas=1), "ray_2_replicas": RayEngine(replicas=2)}
    runs: dict[str, list[float]] = {k: [] for k in engines}
    diffs: dict[str, float] = {}
    ref = None
    try:
        for r in range(args.repeats):
            for name, engine in engines.items():
                store = tmp / f"{name}-{r}.h5"
                ips, vecs = run_embed(files, data, encoder, store, engine)
                runs[name].append(ips)
                ref = vecs if ref is None else ref
                diffs[name] = max(diffs.get(name, 0.0), float(np.abs(vecs - ref).max()))
                print(f"repeat {r + 1}: {name} {ips:.1f} img/s", flush=True)
                for p in tmp.glob(f"{name}-{r}.h5*"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: max(v) for k, v in runs.items()}
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "note": "shared, loaded machine"},
        "images": len(files), "encoder": "efficientnet_lite0", "image_px": encoder.preprocess.size, "batch": 32,
        "ray_start_seconds": ray_start,
        "throughput_img_per_s": {"runs": runs, "best": best},
        "ray_2_vs_local": best["ray_2_replicas"] / best["local"], "ray_1_vs_local": best["ray_1_replica"] / best["local"],
        "target_ray_2_vs_local": 0.85,
        "max_abs_diff_vs_local": diffs,
        "per_image_costs": costs, "gpu_figures_img_per_s": GPU_FIGURES, "assumptions": ASSUMPTIONS,
        "scaling_model": scaling_model(costs),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("throughput_img_per_s", "ray_2_vs_local", "max_abs_diff_vs_local")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
