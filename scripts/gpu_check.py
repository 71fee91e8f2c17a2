"""One prepared GPU check: embed, fine-tune and search throughput on one NVIDIA GPU, in one JSON file.

Run it through ``scripts/gpu_check.sh``, which installs the project first. It needs no network and finishes in a
few minutes on one GPU:

1. synthetic fields -> ``embedkit patches`` -> a store of 20,000 96-px crops (two classes, one group per field);
2. ``embedkit embed`` of the store's crops with efficientnet_lite0 (real weights) and with a randomly initialised
   dinov2_vits14, batch 256, bf16 autocast (uint8 crops resized and normalised on the GPU); each against the bare
   model forward on pre-made GPU tensors of the same batch, measured here (target: embed >= 0.8x bare; ViT-S/14 at
   224 px > 2,000 img/s on an H100/H200-class GPU);
3. one epoch of ``embedkit finetune --model efficientnet_b3 --random-init`` with AMP, in images/s;
4. exact and IVF FAISS search over the lite0 vectors, on the GPU when faiss-gpu is installed, else on the CPU
   (the JSON says which).

``--cpu-smoke`` runs the same steps at tiny sizes on the CPU: the dry run the test suite runs.

Usage: scripts/gpu_check.sh [--out bench/gpu_check.json] [--cpu-smoke] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """What one check embeds and trains."""

    fields_per_class: int
    grid: tuple[int, int]  # crops per field (rows, columns)
    crop: int
    batch: int
    lite_size: int | None  # None: the encoder's own input size
    vit_size: int | None
    finetune_size: int | None
    finetune_batch: int
    bare_batches: int
    queries: int

    @property
    def n_crops(self) -> int:
        return 2 * self.fields_per_class * self.grid[0] * self.grid[1]


FULL = Sizes(fields_per_class=50, grid=(10, 20), crop=96, batch=256, lite_size=None, vit_size=None, finetune_size=None,
             finetune_batch=128, bare_batches=40, queries=2000)
SMOKE = Sizes(fields_per_class=5, grid=(2, 2), crop=32, batch=8, lite_size=32, vit_size=28, finetune_size=32,
              finetune_batch=8, bare_batches=2, queries=20)


def cli(*args: object) -> tuple[str, float]:
    """Run ``embedkit ARGS`` as the installed package; return (stdout, wall seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"embedkit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t


def make_fields(root: Path, sizes: Sizes, seed: int = 0) -> Path:
    """Two class folders of 8-bit fields: smooth background, bright discs (cells) and camera noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = sizes.grid[0] * sizes.crop, sizes.grid[1] * sizes.crop
    yy, xx = np.mgrid[:h, :w]
    for cls, level in (("low", 90), ("high", 150)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(sizes.fields_per_class):
            img = 20 + 10 * np.sin(yy / 37.0 + k) * np.cos(xx / 53.0)
            for cy, cx in zip(rng.integers(0, h, h * w // 900), rng.integers(0, w, h * w // 900)):
                r = sizes.crop // 8
                img[max(0, cy - r):cy + r, max(0, cx - r):cx + r] += level
            img += rng.normal(0, 4, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / cls / f"field{k:03d}.png")
    return root


def bare_forward(encoder_name: str, image_size: int | None, batch: int, n_batches: int, device: str) -> dict:
    """Images/s of the encoder alone on pre-made tensors on ``device`` (bf16 autocast on CUDA), as embed runs it."""
    import torch

    from embedkit.device import autocast
    from embedkit.encoders import create_encoder

    dev = torch.device(device)
    enc = create_encoder(encoder_name, image_size=image_size, pretrained=encoder_name == "efficientnet_lite0")
    model = enc.to(dev).to(memory_format=torch.channels_last)
    s = enc.preprocess.size
    x = torch.randn(batch, 3, s, s, device=dev).contiguous(memory_format=torch.channels_last)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), autocast(dev):
        for _ in range(3):
            model(x)
        sync()
        t = time.perf_counter()
        for _ in range(n_batches):
            model(x).float()
        sync()
        dt = time.perf_counter() - t
    return {"images_per_second": n_batches * batch / dt, "batch": batch, "input_px": s, "batches": n_batches}


def embed_run(store: Path, encoder: str, image_size: int | None, sizes: Sizes, device: str, random_init: bool) -> dict:
    """The whole ``embedkit embed`` of the store's crops: images/s as embed reports it, and the process wall time."""
    args = ["embed", store, "--store", store, "--encoder", encoder, "--batch-size", sizes.batch, "--device", device,
            "--key", f"check_{encoder}", "--quiet"]
    if image_size:
        args += ["--image-size", image_size]
    if random_init:
        args.append("--random-init")
    out, wall = cli(*args)
    m = re.search(r"embedded (\d+) images .*\(([\d.]+) img/s, dim (\d+)\)", out)
    if not m:
        raise SystemExit(f"unexpected embed output: {out}")
    return {"images": int(m.group(1)), "images_per_second": float(m.group(2)), "dim": int(m.group(3)),
            "process_seconds": wall, "random_init": random_init}


def finetune_run(store: Path, out: Path, sizes: Sizes, device: str) -> dict:
    """One epoch of efficientnet_b3 from random weights (AMP on GPU): training and inference images/s."""
    args = ["finetune", store, "--model", "efficientnet_b3", "--random-init", "--epochs", "1", "--batch-size",
            sizes.finetune_batch, "--device", device, "--out", out, "--quiet"]
    if sizes.finetune_size:
        args += ["--image-size", sizes.finetune_size]
    _, wall = cli(*args)
    info = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())["history"]
    splits = json.loads((out / "splits.json").read_text())
    fold = splits["folds"][0]
    n_train, n_val = len(fold["train"]), len(fold["val"])
    epoch = history[0]["seconds"]
    return {"train_images": n_train, "val_images": n_val, "epoch_seconds": epoch,
            "epoch_images_per_second": (n_train + n_val) / epoch,
            "note": "epoch = one pass over the training draws plus validation, from stored crops",
            "predict_images_per_second": info["predict_items_per_second"], "input_px": info["preprocess"]["size"],
            "amp": info["hyperparameters"]["amp"], "device": info["device"], "process_seconds": wall}


def faiss_run(vectors: np.ndarray, n_queries: int, k: int = 10) -> dict:
    """Exact (flat) and IVF search of ``n_queries`` rows among all, on the GPU when faiss-gpu is present."""
    import faiss

    from embedkit.neighbors import default_nlist, faiss_gpu_available, l2_normalize

    gpu = faiss_gpu_available()
    x = l2_normalize(vectors.astype(np.float32))
    q = x[:n_queries]
    out = {"device": "gpu" if gpu else "cpu", "faiss_gpu_installed": hasattr(faiss, "StandardGpuResources"),
           "rows": len(x), "dim": int(x.shape[1]), "queries": len(q), "k": k}

    def on_device(index):
        return faiss.index_cpu_to_all_gpus(index) if gpu else index

    def timed_search(index) -> tuple[np.ndarray, float]:
        index.search(q[:8], k)  # warm-up
        t = time.perf_counter()
        _, idx = index.search(q, k)
        return idx, time.perf_counter() - t

    flat = on_device(faiss.IndexFlatIP(x.shape[1]))
    flat.add(x)
    exact, dt = timed_search(flat)
    out["exact"] = {"seconds": dt, "queries_per_second": len(q) / dt}
    nlist = default_nlist(len(x))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    ivf = on_device(ivf)
    t = time.perf_counter()
    ivf.train(x)
    ivf.add(x)
    build = time.perf_counter() - t
    ivf.nprobe = min(16, nlist)
    approx, dt = timed_search(ivf)
    recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))
    out["ivf"] = {"nlist": nlist, "nprobe": int(ivf.nprobe), "build_seconds": build, "seconds": dt,
                  "queries_per_second": len(q) / dt, f"recall_at_{k}": recall}
    return out


def environment(device: str) -> dict:
    import torch

    import embedkit

    env = {"python": platform.python_version(), "torch": torch.__version__, "embedkit": embedkit.__version__,
           "embedkit_from": str(Path(embedkit.__file__).parent), "cpu_count": os.cpu_count(), "device": device}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported(), gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the dry run the tests run)")
    ap.add_argument("--work", help="working folder [default: a temporary one, removed afterwards]")
    args = ap.parse_args(argv)

    import torch

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible here; run with --cpu-smoke for the dry run")
    sizes = SMOKE if args.cpu_smoke else FULL
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.work) as tmp:
        work = Path(tmp)
        fields = make_fields(work / "fields", sizes)
        store = work / "crops.h5"
        out, wall = cli("patches", fields, "--out", store, "--size", sizes.crop, "--stride", sizes.crop,
                        "--filter", "none", "--quiet")
        from embedkit.store import Store

        n = len(Store(store))
        if n != sizes.n_crops:
            raise SystemExit(f"expected {sizes.n_crops} crops, the store holds {n}")
        report: dict = {"smoke": args.cpu_smoke, "environment": environment(device),
                        "data": {"crops": n, "crop_px": sizes.crop, "fields": 2 * sizes.fields_per_class,
                                 "patches_seconds": wall}}
        report["embed"] = {}
        for name, size, random_init in (("efficientnet_lite0", sizes.lite_size, False),
                                        ("dinov2_vits14", sizes.vit_size, True)):
            run = embed_run(store, name, size, sizes, device, random_init)
            bare = bare_forward(name, size, sizes.batch, sizes.bare_batches, device)
            run["bare_forward"] = bare
            run["embed_vs_bare"] = run["images_per_second"] / bare["images_per_second"]
            report["embed"][name] = run
        report["targets"] = {"embed_vs_bare_min": 0.8, "vit_s14_224_images_per_second_min": 2000,
                             "reference": "clip-retrieval: 1,100 img/s ViT-B/16 on one A100"}
        report["finetune"] = finetune_run(store, work / "finetune", sizes, device)
        report["faiss"] = faiss_run(Store(store).vectors("check_efficientnet_lite0"), min(sizes.queries, n))
    report["total_seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("embed", "finetune", "faiss")}, indent=1))
    print(f"wrote {args.out} in {report['total_seconds']:.0f}s")
    return report


if __name__ == "__main__":
    main()
