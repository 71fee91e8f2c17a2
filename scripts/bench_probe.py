#!/usr/bin/env python
"""Benchmark `embedkit probe`: accuracy on real MitoCheck cells against a plain reference, and scale.

Part 1 (needs ../shared/data/mitocheck, or --data): the 3,277 cells are embedded once with efficientnet_lite0
(cached under bench/), then every head is fitted on 5 repeated group splits (plate + position) with the
baselines on the same splits (random-init lite0, handcrafted features, prior): each row's mean and CI, and
the paired differences encoder - baseline (group-paired bootstrap, Holm). In the same run, the plain
reference on run 0: standardised features and scikit-learn LogisticRegression(C=0.1, class_weight='balanced')
on the same train part, scored on the same test part. Target: the best head is at least as good.

SVM speed part (--svm-rows, default 5,000 x 1,280 synthetic features): the SVM head's whole C search in the
same run with the Newton-CG solver (after) and the L-BFGS solver it replaced (before, still selectable as
svm_solver='lbfgs'): seconds, chosen C, and the validation score at every C of both; with --svm-before DIR
also an earlier checkout.

Layers part (--layers-part, needs ../shared/data/mitocheck): all MitoCheck cells embedded with lite0 and
--layers all (cached under bench/), then probe --layers best: every stage's validation and test scores, the
stage chosen on validation per head, and its paired difference to the plain key (lite0's usual output) on the
same test items (group-paired bootstrap CI).

Part 2 (synthetic, always runs unless --skip-scale): a store of N x D float16 clustered embeddings
(default 1,000,000 x 768). `embedkit probe --heads logreg` runs in a child process whose peak RSS is
measured (os.wait4), next to two baselines from the same run: a child that only loads the vectors the probe
needs (the memory floor) and, on a subsample, scikit-learn's LogisticRegression against our solver.

Writes JSON (default bench/probe.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; return wall seconds, peak RSS (GiB) of that process alone, exit status and output tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib": round(usage.ru_maxrss / 2 ** 20, 3),
            "returncode": proc.returncode, "output_tail": out[-1500:]}


# --------------------------------------------------------------------------- part 1: MitoCheck


def mitocheck(data: Path, bench: Path, device: str, heads_wanted: tuple[str, ...], seeds: int) -> dict:
    from embedkit.embed import embed
    from embedkit.encoders import create_encoder
    from embedkit.metrics import classification_metrics, group_bootstrap, paired_bootstrap
    from embedkit.probe import HeadOptions, ProbeSettings, run_probe, summary_table
    from embedkit.probe.data import load_probe_data
    from embedkit.sources import discover
    from embedkit.splits import SplitSpec
    from embedkit.store import Store

    store = bench / "mitocheck_lite0.h5"
    src = discover(data / "mitocheck", group_by="mitocheck")
    t0 = time.perf_counter()
    res = embed(src, store, create_encoder("efficientnet_lite0"), progress=True)
    embed_seconds = time.perf_counter() - t0
    print(f"store {store}: {res.n_embedded} newly embedded, {res.n_resumed} cached", file=sys.stderr)

    t0 = time.perf_counter()
    report = run_probe(store, bench / "probe_mitocheck", settings=ProbeSettings(
        heads=heads_wanted, head_options=HeadOptions(device=device), split=SplitSpec(seeds=seeds)), progress=True)
    probe_seconds = time.perf_counter() - t0
    from embedkit.probe.evaluate import baseline_lines, summary_header

    print(summary_header(report), summary_table(report), *baseline_lines(report), sep="\n", file=sys.stderr)

    def row(rec: dict) -> dict:
        return {"balanced_accuracy": rec["metrics"]["balanced_accuracy"], "ci": rec["ci"]["balanced_accuracy"],
                "sd_over_runs": rec["across_runs"]["balanced_accuracy"]["sd"], "macro_f1": rec["metrics"]["macro_f1"],
                "auroc": rec["metrics"]["auroc"], "fit_seconds": rec["fit_seconds"],
                "hyperparameters_per_run": rec.get("hyperparameters_per_run")}

    heads = {r.head: row(r.record) for r in report.results}
    anchoring = report.anchoring
    baselines = {b.name: row(b.record) for b in anchoring.rows} if anchoring else {}
    paired = [{k: c[k] for k in ("encoder", "baseline", "diff", "ci", "p", "p_holm", "n_items", "test")}
              for c in (anchoring.comparisons if anchoring else [])]

    # the plain reference on exactly the same items
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data_ = load_probe_data(Store(store))
    fold = report.splits.folds[0]
    pos = {i: p for p, i in enumerate(data_.ids)}
    tr = np.array([pos[i] for i in fold.train])
    te = np.array([pos[i] for i in fold.test])
    x = data_.vectors()
    classes = report.classes
    y = np.array([classes.index(lab) if lab in classes else -1 for lab in data_.labels])
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(x[tr])
    ref = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(scaler.transform(x[tr]), y[tr])
    ref_seconds = time.perf_counter() - t0
    p_ref = ref.predict_proba(scaler.transform(x[te]))
    groups = data_.groups[te]
    m_ref = classification_metrics(y[te], p_ref, classes)
    ci_ref = group_bootstrap(y[te], p_ref, groups)
    reference = {"balanced_accuracy": m_ref["balanced_accuracy"], "ci": ci_ref["balanced_accuracy"],
                 "macro_f1": m_ref["macro_f1"], "auroc": m_ref["auroc"], "fit_seconds": ref_seconds,
                 "model": "StandardScaler + LogisticRegression(C=0.1, class_weight='balanced')"}

    best = max(heads, key=lambda h: heads[h]["balanced_accuracy"])
    import pandas as pd

    run0 = report.run_names[0]
    pred = pd.read_csv(bench / "probe_mitocheck" / best / "predictions.csv", keep_default_na=False, dtype={"run": str})
    pred = pred[pred["run"] == run0].set_index("id")
    p_best = pred.loc[list(fold.test), [f"p_{c}" for c in classes]].to_numpy()
    vs_reference = paired_bootstrap(y[te], p_ref.argmax(1), p_best.argmax(1), groups, len(classes))
    best_run0 = next(r for r in report.results if r.head == best).record["runs"][run0]["balanced_accuracy"]
    return {"store": str(store), "embed_seconds_this_run": round(embed_seconds, 1), "n_items": int(len(data_.ids)),
            "n_classes": len(classes), "n_groups": int(len(set(data_.groups))), "n_test": int(len(te)),
            "n_test_groups": int(len(set(groups))), "splits_fingerprint": report.splits.fingerprint(),
            "runs": report.run_names, "probe_seconds_with_baselines": round(probe_seconds, 1),
            "ci_method": report.results[0].record.get("ci_method"),
            "heads": heads, "baselines": baselines, "paired_differences": paired,
            "best_layer_vs_last": "see the layers part (--layers-part)",
            "reference_on_run0": reference, "best_head": best,
            "best_minus_reference_on_run0": vs_reference,
            "target_best_at_least_reference_on_run0": best_run0 >= reference["balanced_accuracy"]}


# --------------------------------------------------------------------------- SVM speed

CHILD_SVM = """
import json, sys, time, numpy as np
from embedkit.probe.features import Preprocessor
from embedkit.probe.heads import FitInput, HeadOptions, fit_head
n, d, k, impl, solver = int(sys.argv[1]), int(sys.argv[2]), 10, sys.argv[3], sys.argv[4]
rng = np.random.default_rng(0); y = rng.integers(0, k, n)
x = rng.normal(size=(k, d)).astype(np.float32)[y] * 0.08 + rng.normal(size=(n, d)).astype(np.float32)
tr, va = np.arange(int(n * 0.8)), np.arange(int(n * 0.8), n)
grid = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100, 1e3, 1e4, 1e5)
t, cpu = time.perf_counter(), time.process_time()
if impl == "sklearn":
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    sc = StandardScaler().fit(x[tr]); best = (-1, None); conv = 0
    import warnings
    for c in grid:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = LinearSVC(C=c, max_iter=1000).fit(sc.transform(x[tr]), y[tr])
        conv += not any("converge" in str(v.message) for v in w)
        acc = float((m.predict(sc.transform(x[va])) == y[va]).mean()); best = max(best, (acc, c))
    out = {"val_accuracy": best[0], "C": best[1], "converged": conv}
else:
    pre = Preprocessor().fit(x, tr)
    fi = FitInput(x=x, y=y, train=tr, train_weight=None, val=va, classes=[str(i) for i in range(k)])
    opts = HeadOptions(c_grid=grid, device="cpu", **({} if solver == "default" else {"svm_solver": solver}))
    p = fit_head("svm", fi, pre, opts)
    out = {"solver": solver, "val_balanced_accuracy": max(r["val_balanced_accuracy"] for r in p.params["search"]),
           "C": p.params["C"], "converged": sum(bool(r["converged"]) for r in p.params["search"]),
           "iterations": sum(r["iterations"] for r in p.params["search"]),
           "val_balanced_accuracy_per_C": [round(r["val_balanced_accuracy"], 4) for r in p.params["search"]]}
print("JSON " + json.dumps({"seconds": round(time.perf_counter() - t, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
                            "grid": len(grid), **out}))
"""


def svm_speed(n: int, dim: int, before: str | None, with_sklearn: bool) -> dict:
    """The SVM head's whole 12-value C search on N x D synthetic features: Newton-CG (after) and L-BFGS (before) in
    this code, optionally an earlier checkout and LinearSVC."""
    runs = {"after": (str(ROOT), "newton"), "before": (str(ROOT), "lbfgs")}
    runs |= {"before_checkout": (before, "default")} if before else {}
    runs |= {"sklearn_linearsvc": (str(ROOT), "default")} if with_sklearn else {}
    out: dict = {"rows": n, "dim": dim, "classes": 10, "train_val": "80/20"}
    for name, (code, solver) in runs.items():
        r = child([sys.executable, "-c", CHILD_SVM, str(n), str(dim), "sklearn" if name.startswith("sklearn") else "embedkit",
                   solver], env={"PYTHONPATH": code})
        line = next((ln for ln in r["output_tail"].splitlines() if ln.startswith("JSON ")), None)
        out[name] = json.loads(line[5:]) if line else {"returncode": r["returncode"], "output_tail": r["output_tail"]}
        out[name]["code"] = code
    if "seconds" in out["before"] and "seconds" in out["after"]:
        out["speedup_after_vs_before"] = round(out["before"]["seconds"] / out["after"]["seconds"], 2)
        out["cpu_speedup_after_vs_before"] = round(out["before"]["cpu_seconds"] / out["after"]["cpu_seconds"], 2)
        a, b = out["after"]["val_balanced_accuracy_per_C"], out["before"]["val_balanced_accuracy_per_C"]
        out["same_chosen_C"] = out["after"]["C"] == out["before"]["C"]
        out["max_abs_val_difference_over_grid"] = round(max(abs(x - y) for x, y in zip(a, b)), 4)
    return out


# --------------------------------------------------------------------------- layers: best stage of lite0 vs its last


def layers_part(data: Path, bench: Path, device: str, heads: tuple[str, ...], seeds: int) -> dict:
    """lite0 with every stage stored (one key per stage), probe --layers best on the same splits."""
    from embedkit.embed import embed
    from embedkit.encoders import create_encoder
    from embedkit.probe import HeadOptions, ProbeSettings, run_probe
    from embedkit.probe.layers import choice_lines, choice_record
    from embedkit.sources import discover
    from embedkit.splits import SplitSpec

    store = bench / "mitocheck_lite0.h5"
    t0 = time.perf_counter()
    res = embed(discover(data / "mitocheck", group_by="mitocheck"), store, create_encoder("efficientnet_lite0"),
                layers="all", progress=True)
    embed_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = run_probe(store, bench / "probe_layers", settings=ProbeSettings(
        heads=heads, head_options=HeadOptions(device=device), split=SplitSpec(seeds=seeds), baselines=(),
        leak_check=False, layers="best"), progress=True)
    print(*choice_lines(report.layers), sep="\n", file=sys.stderr)
    return {"store": str(store), "keys": res.keys, "dims": res.dims, "embed_seconds_this_run": round(embed_seconds, 1),
            "probe_seconds": round(time.perf_counter() - t0, 1), "runs": report.run_names,
            "splits_fingerprint": report.splits.fingerprint(), **choice_record(report.layers),
            "summary": choice_lines(report.layers)}


# --------------------------------------------------------------------------- part 2: scale


def synthetic_store(path: Path, n: int, dim: int, n_classes: int = 16, group_size: int = 500, seed: int = 0) -> None:
    """N x D float16 vectors in K Gaussian clusters, with a per-group offset (cells of one movie look alike)."""
    from embedkit.sources import Item
    from embedkit.store import ensure_embedding, transaction, write_items, write_lock

    if path.exists():
        from embedkit.store import Store

        s = Store(path)
        if len(s) == n and s.keys == ["synthetic"] and int(s.config("synthetic")["dim"]) == dim and s.done("synthetic").all():
            return
        path.unlink()
    rng = np.random.default_rng(seed)
    n_groups = max(10, n // group_size)
    group_class = rng.integers(0, n_classes, n_groups)  # each movie shows mostly one phenotype
    groups = rng.integers(0, n_groups, n)
    labels = np.where(rng.random(n) < 0.7, group_class[groups], rng.integers(0, n_classes, n))
    centers = rng.normal(size=(n_classes, dim)).astype(np.float32) * 0.1
    offsets = rng.normal(size=(n_groups, dim)).astype(np.float32) * 0.25
    items = [Item(id=f"c{i:07d}", path=f"synthetic/c{i:07d}.png", label=f"class{labels[i]:02d}", group=f"g{groups[i]:05d}")
             for i in range(n)]
    cfg = {"encoder": "synthetic-clusters", "dim": dim, "dtype": "float16", "weights_fingerprint": f"seed{seed}",
           "preprocess": None, "pooling": None, "conversion": None}
    with write_lock(path), transaction(path) as f:
        write_items(f, items, str(path.parent))
        g = ensure_embedding(f, "synthetic", dim, "float16", cfg)
        step = 65536
        for s in range(0, n, step):
            e = min(n, s + step)
            block = centers[labels[s:e]] + offsets[groups[s:e]] + rng.normal(size=(e - s, dim)).astype(np.float32)
            g["vectors"][s:e] = block.astype(np.float16)
        g["done"][:] = True


CHILD_LOAD = """
import sys, time, numpy as np
from embedkit.probe.data import load_probe_data
from embedkit.store import Store
t = time.perf_counter(); d = load_probe_data(Store(sys.argv[1])); x = d.vectors()
print(f"loaded {x.shape} {x.dtype} in {time.perf_counter() - t:.1f}s")
"""

CHILD_SUBSAMPLE = """
import sys, time, numpy as np
from embedkit.probe.data import load_probe_data
from embedkit.probe.features import Preprocessor
from embedkit.store import Store
d = load_probe_data(Store(sys.argv[1])); n = int(sys.argv[3]); rng = np.random.default_rng(0)
pos = np.sort(rng.choice(len(d.ids), n, replace=False)); x = d.vectors(pos)
classes = sorted(set(d.labels)); y = np.array([classes.index(l) for l in d.labels[pos]])
t = time.perf_counter()
if sys.argv[2] == "sklearn":
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    z = StandardScaler().fit_transform(x)
    m = LogisticRegression(C=0.1, max_iter=300).fit(z, y); it = int(m.n_iter_.max())
else:
    from embedkit.probe.heads import LinearProblem
    pre = Preprocessor().fit(x, np.arange(n))
    w, b, it = LinearProblem(x, np.arange(n), y, None, pre, len(classes)).fit(0.1, "softmax", max_iter=300)
print(f"FIT {time.perf_counter() - t:.2f} ITER {it}")
"""


def scale(bench: Path, n: int, dim: int, subsample: int, device: str, max_iter: int) -> dict:
    store = bench / f"synthetic_{n}x{dim}.h5"
    t0 = time.perf_counter()
    synthetic_store(store, n, dim)
    make_seconds = time.perf_counter() - t0
    py = sys.executable
    out_dir = bench / "probe_scale"
    probe = child([py, "-m", "embedkit.cli", "probe", str(store), "--heads", "logreg", "--C", "0.1", "--n-boot", "200",
                   "--max-iter", str(max_iter), "--device", device, "--out", str(out_dir), "--quiet"])
    rec = json.loads((out_dir / "logreg" / "metrics.json").read_text()) if probe["returncode"] == 0 else {}
    floor = child([py, "-c", CHILD_LOAD, str(store)])
    sub = {}
    for impl in ("embedkit", "sklearn"):
        r = child([py, "-c", CHILD_SUBSAMPLE, str(store), impl, str(subsample)])
        words = r["output_tail"].split()
        if "FIT" in words:
            r["fit_seconds"] = float(words[words.index("FIT") + 1])
            r["iterations"] = int(words[words.index("ITER") + 1])
        sub[impl] = {k: v for k, v in r.items() if k != "output_tail" or r["returncode"] != 0}
    return {
        "rows": n, "dim": dim, "dtype": "float16", "store": str(store), "store_gib": round(store.stat().st_size / 2 ** 30, 3),
        "make_store_seconds": round(make_seconds, 1),
        "probe_cli": {"command": "embedkit probe --heads logreg --C 0.1 --n-boot 200", **{k: v for k, v in probe.items()
                                                                                        if k != "output_tail" or probe["returncode"] != 0}},
        "fit_seconds": rec.get("fit_seconds"), "iterations": (rec.get("validation_search") or [{}])[0].get("iterations"),
        "balanced_accuracy": rec.get("metrics", {}).get("balanced_accuracy"),
        "ci": rec.get("ci", {}).get("balanced_accuracy"), "device": rec.get("device"),
        "peak_rss_gib": probe["peak_rss_gib"], "target_peak_rss_gib": 24.0,
        "target_met": probe["returncode"] == 0 and probe["peak_rss_gib"] < 24.0,
        "baseline_load_only": {"seconds": floor["seconds"], "peak_rss_gib": floor["peak_rss_gib"]},
        "subsample_rows": subsample, "subsample_fit": sub,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="shared data folder [../shared/data]")
    ap.add_argument("--out", default=str(ROOT / "bench" / "probe.json"))
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows for the scale part")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--subsample", type=int, default=50_000, help="rows for the scikit-learn vs embedkit solver baseline")
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-mitocheck", action="store_true")
    ap.add_argument("--heads", default="logreg,svm,knn", help="heads of the MitoCheck part")
    ap.add_argument("--seeds", type=int, default=5, help="repeated grouped splits of the MitoCheck part")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--svm-rows", type=int, default=5000, help="rows of the SVM speed part (0 skips it)")
    ap.add_argument("--svm-dim", type=int, default=1280)
    ap.add_argument("--svm-before", help="a checkout of an earlier embedkit to time the same SVM search against")
    ap.add_argument("--svm-sklearn", action="store_true", help="also time scikit-learn's LinearSVC over the same grid")
    ap.add_argument("--layers-part", action="store_true", help="best lite0 stage against its usual output on MitoCheck")
    ap.add_argument("--layers-heads", default="logreg", help="heads of the layers part")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bench = Path(args.out).resolve().parent
    bench.mkdir(parents=True, exist_ok=True)
    result: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count()}
    data = Path(args.data)
    if args.skip_mitocheck:
        result["mitocheck"] = "skipped (--skip-mitocheck)"
    elif not (data / "mitocheck").is_dir():
        print(f"bench_probe: error: {data / 'mitocheck'} not found; pass --data SHARED_DATA_FOLDER, "
              f"or --skip-mitocheck to run the synthetic parts only", file=sys.stderr)
        sys.exit(2)
    else:
        result["mitocheck"] = mitocheck(data, bench, args.device, tuple(args.heads.split(",")), args.seeds)
    if args.layers_part and (data / "mitocheck").is_dir():
        result["layers"] = layers_part(data, bench, args.device, tuple(args.layers_heads.split(",")), args.seeds)
    elif args.layers_part:
        result["layers"] = f"skipped: {data / 'mitocheck'} not found"
    if args.svm_rows:
        result["svm_speed"] = svm_speed(args.svm_rows, args.svm_dim, args.svm_before, args.svm_sklearn)
    if args.skip_scale:
        result["scale"] = "skipped (--skip-scale)"
    else:
        result["scale"] = scale(bench, args.rows, args.dim, args.subsample, args.device, args.max_iter)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, args.out)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
