#!/usr/bin/env python
"""Benchmark `embedkit explain` on real MitoCheck cells: faithfulness against chance, and cost.

The real pipeline: a sample of cells is embedded with efficientnet_lite0, `run_probe` fits a logreg probe
on group splits (plate + position), and `explain` loads the saved probe (frozen encoder + head) and
explains test cells, chosen per class from the probe's own predictions.csv.

* Faithfulness: deletion / insertion AUC per method with 95% group-bootstrap CIs, next to the random
  reference of the same run. Target: every gradient method's paired gain over random has a CI above 0.
* Cost: seconds per image per method, next to the baseline of one plain forward + backward pass of the
  same network on the same batch (measured in this run). Target: gradient methods within 2x of it.

Needs ../shared/data/mitocheck (skips with a message, exit 0, when absent). Writes bench/explain.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sample_cells(data: Path, per_class: int, seed: int):
    """Up to ``per_class`` cells of each class, as a Source (labels from folders, groups = movies)."""
    from embedkit.sources import discover

    src = discover(data, group_by="mitocheck")
    rng = np.random.default_rng(seed)
    keep = []
    for label in sorted({it.label for it in src.items}):
        mine = [it for it in src.items if it.label == label]
        keep += [mine[i] for i in sorted(rng.permutation(len(mine))[:per_class])]
    src.items = keep
    return src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="shared data folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "explain.json"))
    ap.add_argument("--per-class", type=int, default=40, help="cells per class to embed and fit on")
    ap.add_argument("--per-class-explain", type=int, default=2, help="test cells to explain per class")
    ap.add_argument("--methods", default="gradcam,hirescam,gradcam++,eigencam")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = Path(args.data) / "mitocheck"
    if not data.is_dir():
        print(f"bench_explain: {data} not found; skipping (needs the shared MitoCheck data)")
        return 0

    import torch

    from embedkit.device import resolve_device
    from embedkit.embed import embed, to_tensor
    from embedkit.encoders import create_encoder
    from embedkit.explain import (compute_cam, explain, load_model, parse_methods, resolve_layer, select_items,
                                  trace_layers)
    from embedkit.items import ItemSet
    from embedkit.probe import ProbeSettings, run_probe
    from embedkit.splits import SplitSpec
    from embedkit.store import Store

    methods = parse_methods(args.methods)
    bench = Path(args.out).parent
    bench.mkdir(parents=True, exist_ok=True)
    src = sample_cells(data, args.per_class, args.seed)
    store = bench / f"explain_lite0_{args.per_class}.h5"
    embed(src, store, create_encoder("efficientnet_lite0"), progress=True)
    report = run_probe(store, bench / "explain_probe", settings=ProbeSettings(heads=("logreg",), split=SplitSpec(seed=args.seed)),
                       progress=True)
    record = report.results[0].record
    model = load_model(bench / "explain_probe" / "logreg")
    dev = resolve_device(args.device)
    model.to(dev)
    cells = Store(store)
    items = ItemSet.from_items(select_items(bench / "explain_probe" / "logreg" / "predictions.csv", "per-class",
                                            args.per_class_explain, ItemSet.from_store(cells)), cells)

    # cost: each method against one forward + backward of the same batch
    xb = torch.stack([to_tensor(items.rgb(i, model.conversion), model.preprocess)
                      for i in range(min(8, len(items)))]).to(dev)
    _, layer = resolve_layer(model, None, trace_layers(model, xb[:1]))
    targets = [0] * len(xb)

    def fwd_bwd():
        x = xb.clone().requires_grad_(True)
        model.net(x)[:, 0].sum().backward()

    runs = {"baseline_forward_backward": fwd_bwd}
    runs.update({m: (lambda m=m: compute_cam(model.net, xb, m, layer, targets)) for m in methods if m != "scorecam"})
    cost = {name: float("inf") for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(5):  # interleaved rounds, best of each: robust to other processes on shared cores
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            cost[name] = min(cost[name], (time.perf_counter() - t0) / len(xb))
    ratio = {m: cost[m] / cost["baseline_forward_backward"] for m in methods if m in cost}

    t0 = time.perf_counter()
    res = explain(model, items, bench / "explain_out", methods=methods, faithfulness=True,
                  steps=args.steps, device=args.device, progress=True)
    run_seconds = time.perf_counter() - t0
    faith = {r["method"]: r for r in res.faithfulness}
    beats = {m: faith[m]["vs_random_ci"][0] > 0 for m in methods if m != "eigencam"}
    out = {
        "cells_embedded": len(cells.ids), "classes": len(model.classes),
        "probe_test_balanced_accuracy": record["metrics"]["balanced_accuracy"], "explained": len(items),
        "layer": res.layer, "steps": args.steps, "device": str(dev),
        "faithfulness": faith, "target_gradient_methods_beat_random": beats,
        "seconds_per_image": cost, "ratio_to_forward_backward": ratio,
        "target_ratio_below_2": {m: r < 2.0 for m, r in ratio.items()},
        "explain_run_seconds": run_seconds,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("probe_test_balanced_accuracy", "layer", "ratio_to_forward_backward",
                                          "target_gradient_methods_beat_random")}, indent=1))
    for m, r in faith.items():
        gain = f"  gain vs random {r['vs_random']:.3f} [{r['vs_random_ci'][0]:.3f}, {r['vs_random_ci'][1]:.3f}]" if "vs_random" in r else ""
        print(f"{m:10s} ins-del {r['insertion_minus_deletion']:.3f} "
              f"[{r['insertion_minus_deletion_ci'][0]:.3f}, {r['insertion_minus_deletion_ci'][1]:.3f}]{gain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
