#!/usr/bin/env python
"""Benchmark segmentation on the DSB 2018 sample (../shared/data/dsb2018): quality per modality and speed.

For each modality (fluorescence, bright-field, H&E) it reports the mean per-image DSB score
(TP / (TP + FP + FN)) at IoU 0.5 and averaged over IoU 0.5:0.95, and objects segmented per second, for

* ``baseline``: plain Otsu + distance-transform watershed, measured in the same run as the reference;
* ``watershed``: embedkit's tuned classical backend (always);
* ``cellpose``: Cellpose 4 (cpsam, or --cellpose-model PATH) when its weights are on this machine.

Writes JSON (default bench/segment.json). Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedkit.segment.scoring import dsb_scores  # noqa: E402
from embedkit.segment.watershed import WatershedSegmenter, intensity  # noqa: E402

MODALITY_NAMES = {"fluo": "fluorescence", "bright": "bright-field", "he": "H&E"}


def baseline_otsu_watershed(image: np.ndarray) -> np.ndarray:
    """The untuned reference: Otsu on the (polarity-corrected) gray image, seeds 5 px apart, watershed."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    plane, _ = intensity(image.mean(-1))
    fg = plane > threshold_otsu(plane)
    dist = ndi.distance_transform_edt(fg)
    cc, _ = ndi.label(fg)
    peaks = peak_local_max(dist, min_distance=5, labels=cc, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=fg)


def load(data: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    import tifffile
    from PIL import Image

    img = np.asarray(Image.open(data / "images" / f"{image_id}.png"))[..., :3].astype(np.float32) / 255.0
    return img, tifffile.imread(data / "labels" / f"{image_id}.tif")


def evaluate(method, images: list[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    s50, smean, n_obj, seconds = [], [], 0, 0.0
    for _, img, truth in images:
        t0 = time.perf_counter()
        pred = method(img)
        seconds += time.perf_counter() - t0
        sc = dsb_scores(truth, pred)
        s50.append(sc[0.5])
        smean.append(float(np.mean(list(sc.values()))))
        n_obj += int(len(np.unique(pred)) - (1 if (pred == 0).any() else 0))
    s50, smean = np.array(s50), np.array(smean)
    return {"n_images": len(images), "dsb_iou50": round(float(s50.mean()), 4),
            "dsb_iou50_ci95": bootstrap_ci(s50), "dsb_iou50_95": round(float(smean.mean()), 4),
            "dsb_iou50_95_ci95": bootstrap_ci(smean), "objects": n_obj, "seconds": round(seconds, 3),
            "objects_per_second": round(n_obj / seconds, 1) if seconds else None,
            "images_per_second": round(len(images) / seconds, 2) if seconds else None}


def bootstrap_ci(x: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean over images."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(axis=1)
    return [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])]


def cellpose_method(model: str | None):
    """A Cellpose segmenter if real weights are here, else (None, reason)."""
    from embedkit.errors import EmbedkitError
    from embedkit.segment.cellpose_backend import CellposeSegmenter, models_dir

    name = model or "cpsam"
    if model is None and not (models_dir() / name).is_file():
        return None, f"no Cellpose weights here ({models_dir() / name} is missing; pass --cellpose-model PATH)"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        seg = CellposeSegmenter(model=name, device="auto")
    except EmbedkitError as exc:
        return None, str(exc)
    return seg.segment, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder holding dsb2018/")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "segment.json")
    ap.add_argument("--limit", type=int, help="at most this many images per modality (quick runs)")
    ap.add_argument("--cellpose-model", help="a Cellpose 4 model file to benchmark as well")
    args = ap.parse_args(argv)
    data = args.data / "dsb2018"
    if not (data / "modality.csv").is_file():
        print(f"bench_segment: {data} not found; nothing to benchmark (pass --data)")
        return 0
    with open(data / "modality.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_mod: dict[str, list[str]] = {}
    for r in rows:
        by_mod.setdefault(r["modality"], []).append(r["image"])
    methods = {"baseline": baseline_otsu_watershed, "watershed": WatershedSegmenter().segment}
    cp, reason = cellpose_method(args.cellpose_model)
    if cp is not None:
        methods["cellpose"] = cp
    result = {"data": str(data), "metric": "DSB 2018: TP/(TP+FP+FN) per image, mean over images; CI: bootstrap over images",
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "omp_threads": os.environ.get("OMP_NUM_THREADS")},
              "cellpose": {"run": cp is not None, "reason": reason}, "modalities": {}}
    for mod, ids in sorted(by_mod.items()):
        ids = sorted(ids)[:args.limit] if args.limit else sorted(ids)
        images = [(i, *load(data, i)) for i in ids]
        result["modalities"][MODALITY_NAMES.get(mod, mod)] = {name: evaluate(fn, images) for name, fn in methods.items()}
        line = "  ".join(f"{name} {r['dsb_iou50']:.3f}/{r['dsb_iou50_95']:.3f} ({r['objects_per_second']} obj/s)"
                         for name, r in result["modalities"][MODALITY_NAMES.get(mod, mod)].items())
        print(f"{MODALITY_NAMES.get(mod, mod):>13} ({len(ids)} images), DSB@0.5/@0.5:0.95: {line}", flush=True)
    if cp is None:
        print(f"cellpose not benchmarked: {reason}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
