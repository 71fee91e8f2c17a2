#!/usr/bin/env python
"""Benchmark embedkit's neighbour search and t-SNE on real embeddings; writes JSON (default bench/neighbors.json).

Data: the 3,277 MitoCheck cells (``--data``/mitocheck) embedded once with efficientnet_lite0 and cached
under bench/. The vectors are tiled with Gaussian noise to ``--rows`` rows; ``--queries`` further noisy
copies, not in the database, are the queries. Every approximate number is compared with a baseline
measured in the same run:

* Recall@10 and query latency per 1,000 queries of IVF, HNSW and IVF-PQ at the defaults
  ``embedkit index`` chooses (search depth calibrated to Recall@10 >= 0.95), against exact flat search;
  plus a small nprobe / efSearch sweep. Tiling makes neighbourhoods of copies of one cell (the share is
  recorded), so IVF and HNSW are also measured on the 3,277 real cells alone.
* t-SNE wall time on ``--tsne-rows`` points: openTSNE on FAISS k-NN affinities (embedkit.views) against
  openTSNE's own default neighbour search (Annoy), same perplexity, initialisation and iterations, with
  the k-NN preservation of both (share of each sampled point's 10 cosine neighbours kept among its 10
  nearest points in the 2-D map).
* Leak-check threshold evidence: cosine similarity of flipped/rotated/intensity-changed copies of real
  cells to their originals, against nearest distinct cells from other movies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# OpenMP threads that spin while waiting slow FAISS down several-fold on a shared, busy machine
# (IVF-PQ training: 66 s spinning vs 13 s passive with 2 threads here); set before FAISS loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def log(msg: str) -> None:
    print(f"[bench_neighbors {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def embedded_mitocheck(data: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], str]:
    """(vectors, labels, groups, paths, store) of MitoCheck embedded with efficientnet_lite0, cached in ``cache``."""
    from embedkit.embed import embed
    from embedkit.encoders import create_encoder
    from embedkit.sources import discover
    from embedkit.store import Store
    from embedkit.store_index import load_vectors

    src = discover(str(data / "mitocheck"), group_by="mitocheck")
    store = Store(cache) if cache.exists() else None
    if store is None or "efficientnet_lite0" not in store.keys or not store.done("efficientnet_lite0").all() \
            or len(store) != len(src.items):
        log(f"embedding {len(src.items)} MitoCheck cells with efficientnet_lite0 into {cache} (once; a few minutes)")
        embed(src, cache, create_encoder("efficientnet_lite0"), progress=True)
        store = Store(cache)
    rows, x = load_vectors(store, "efficientnet_lite0")
    paths = [store.abspath(p) for p in store.column("path")]
    return x, store.labels[rows], store.groups[rows], [paths[r] for r in rows], str(cache)


def tile(base: np.ndarray, n: int, sigma: float, rng: np.random.Generator, start_copy: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows: copies of the normalised base rows plus N(0, sigma^2) noise per dimension; and each row's source."""
    src = (np.arange(n) + start_copy * len(base)) % len(base)
    out = base[src].copy()
    first = np.arange(n) + start_copy * len(base) < len(base)  # the first copy of each cell stays exact
    noise = rng.standard_normal((int((~first).sum()), base.shape[1]), dtype=np.float32) * sigma
    out[~first] += noise
    return out, src


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def bench_search(db: np.ndarray, queries: np.ndarray, args, out: dict) -> None:
    import faiss

    from embedkit.neighbors import (RECALL_K, _batched_search, build_index, l2_normalize, recall_at_k, recall_ci,
                                    recall_per_query, set_depth)

    k = RECALL_K
    flat = faiss.IndexFlatIP(db.shape[1])
    flat.add(l2_normalize(db))
    (exact_s, exact_i), t_flat = timed(_batched_search, flat, queries, k, exclude_self=False, batch=1000)
    per1k = lambda t: round(1000 * t / len(queries), 4)  # noqa: E731
    out["exact_flat"] = {"seconds_per_1000_queries": per1k(t_flat), "recall_at_10": 1.0}
    log(f"exact flat: {per1k(t_flat):.3f} s per 1000 queries")
    for kind in args.kinds:
        built, t_build = timed(build_index, db, kind, target_recall=0.95, seed=0, log=log)
        (s, i), t_q = timed(built.search, queries, k, batch=1000)
        hits = recall_per_query(i, exact_i, k)
        rec, ci = float(hits.mean()), recall_ci(hits)
        entry = {"params": {k_: v for k_, v in built.params.items() if k_ != "reason"}, "build_seconds": round(t_build, 2),
                 "calibration_recall_at_10": round(built.recall, 4),
                 "calibration_recall_at_10_ci95": [round(v, 4) for v in built.recall_interval],
                 "recall_at_10": round(rec, 4), "recall_at_10_ci95": [round(v, 4) for v in ci],
                 "seconds_per_1000_queries": per1k(t_q), "speedup_vs_exact": round(t_flat / t_q, 2) if t_q else None,
                 "meets_0.95": rec >= 0.95}
        depth = "efSearch" if kind == "hnsw" else "nprobe"
        chosen = built.params[depth]
        sweep = []
        for v in sorted({max(1, chosen // 4), max(1, chosen // 2), chosen, chosen * 2}):
            set_depth(built, v)
            (s2, i2), t2 = timed(built.search, queries, k, batch=1000)
            sweep.append({depth: v, "recall_at_10": round(recall_at_k(i2, exact_i, k), 4), "seconds_per_1000_queries": per1k(t2)})
        set_depth(built, chosen)
        entry["sweep"] = sweep
        out[kind] = entry
        log(f"{kind}: {depth}={chosen}, Recall@10 {rec:.4f} (calibration {built.recall:.4f}), "
            f"{per1k(t_q):.3f} s per 1000 queries, build {t_build:.1f} s")
        del built


def bench_real_cells(base_n: np.ndarray, args, out: dict) -> None:
    """IVF and HNSW at their defaults on the 3,277 real cells alone (each cell queried, itself excluded)."""
    from embedkit.neighbors import build_index, recall_ci, recall_per_query, search

    _, exact = search(base_n, base_n, 10, exclude_self=True)
    res = {"rows": len(base_n), "queries": "every real cell, excluding itself"}
    for kind in ("ivf", "hnsw"):
        built = build_index(base_n, kind, seed=0)
        _, found = built.search(base_n, 10, exclude_self=True)
        hits = recall_per_query(found, exact, 10)
        res[kind] = {"params": {k: v for k, v in built.params.items() if k != "reason"},
                     "recall_at_10": round(float(hits.mean()), 4), "recall_at_10_ci95": [round(v, 4) for v in recall_ci(hits)]}
        log(f"real cells only, {kind}: Recall@10 {hits.mean():.4f} at {res[kind]['params']}")
    out["real_cells_only"] = res


def knn_preservation(x: np.ndarray, emb: np.ndarray, sample: np.ndarray, k: int = 10) -> float:
    """Share of each sampled point's k cosine neighbours (high-D, exact) among its k nearest in the 2-D map."""
    from sklearn.neighbors import NearestNeighbors

    from embedkit.neighbors import search

    _, hi = search(x, x[sample], k + 1)
    nn2 = NearestNeighbors(n_neighbors=k + 1).fit(emb)
    _, lo = nn2.kneighbors(emb[sample])
    keep = []
    for s, h, l_ in zip(sample, hi, lo):
        h = [j for j in h if j != s][:k]
        l_ = [j for j in l_ if j != s][:k]
        keep.append(len(set(h) & set(l_)) / k)
    return float(np.mean(keep))


def bench_tsne(x: np.ndarray, args, out: dict) -> None:
    from openTSNE import TSNE, initialization

    from embedkit.neighbors import l2_normalize
    from embedkit.views import n_jobs, tsne_affinities

    x = l2_normalize(x)
    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(len(x), min(1000, len(x)), replace=False))
    init = initialization.pca(x, random_state=0)
    res = {"rows": len(x), "perplexity": 30, "iterations": "openTSNE defaults (250 early exaggeration + 500)",
           "threads": n_jobs(), "knn_preservation_k": 10, "knn_preservation_sample": len(sample)}

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    aff = tsne_affinities(x, 30, log=log)
    t_aff = time.perf_counter() - t0
    emb = np.asarray(TSNE(n_jobs=n_jobs(), random_state=0).fit(affinities=aff, initialization=init))
    t_total = time.perf_counter() - t0
    res["faiss_affinities"] = {"seconds": round(t_total, 1), "affinity_seconds": round(t_aff, 1),
                               "knn_preservation": round(knn_preservation(x, emb, sample), 4),
                               "load_average_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    log(f"t-SNE with FAISS affinities: {t_total:.0f} s (kNN + affinities {t_aff:.0f} s)")
    del aff, emb

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    tsne = TSNE(n_jobs=n_jobs(), random_state=0, metric="cosine", perplexity=30)
    emb = np.asarray(tsne.fit(x, initialization=init))
    t_total = time.perf_counter() - t0
    res["opentsne_default_neighbors"] = {"seconds": round(t_total, 1), "neighbors": "auto (Annoy for N >= 1000)",
                                         "metric": "cosine",
                                         "knn_preservation": round(knn_preservation(x, emb, sample), 4),
                                         "load_average_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    log(f"t-SNE with openTSNE's own neighbour search: {t_total:.0f} s")
    res["speedup"] = round(res["opentsne_default_neighbors"]["seconds"] / res["faiss_affinities"]["seconds"], 2)
    out["tsne"] = res


def bench_leak_threshold(x: np.ndarray, groups: np.ndarray, paths: list[str], args, out: dict) -> None:
    """Augmented copies vs distinct cells of other movies, by pixel fingerprints and by lite0 embedding cosine."""
    from embedkit.embed import embed_images
    from embedkit.encoders import create_encoder
    from embedkit.fingerprints import dihedral, fingerprint
    from embedkit.images import Conversion, load_rgb
    from embedkit.leaks import DEFAULT_THRESHOLDS
    from embedkit.neighbors import knn, l2_normalize

    rng = np.random.default_rng(2)
    pick = np.sort(rng.choice(len(x), min(args.leak_cells, len(x)), replace=False))
    augs = {"hflip": lambda a: a[:, ::-1], "vflip": lambda a: a[::-1], "rot90": lambda a: np.rot90(a),
            "rot180": lambda a: np.rot90(a, 2), "bright+10%": lambda a: np.clip(a * 1.1, 0, 1),
            "dim-10%": lambda a: a * 0.9, "gamma0.9": lambda a: a ** 0.9, "rot270+dim-10%": lambda a: np.rot90(a, 3) * 0.9,
            "noise(sd 2/255)": lambda a: np.clip(a + rng.normal(0, 2 / 255, a.shape), 0, 1).astype(np.float32)}
    imgs = [load_rgb(p_, Conversion()) for p_ in paths]
    fps = np.stack([fingerprint(a) for a in imgs])
    enc = create_encoder("efficientnet_lite0")
    xn = l2_normalize(x)
    copies = {"pixels": {}, "embedding": {}}
    for name, f in augs.items():
        aug = [np.ascontiguousarray(f(imgs[i])).astype(np.float32) for i in pick]
        v = l2_normalize(embed_images(enc, aug, Conversion()))
        copies["embedding"][name] = np.sum(v * xn[pick], axis=1)
        copies["pixels"][name] = np.array([float((dihedral(fingerprint(a)) @ fps[i]).max()) for a, i in zip(aug, pick)])
    # nearest distinct cell of another movie (group), for every cell
    nearest = {}
    s_e, i_e = knn(xn, xn, 60, exclude_self=True)
    nearest["embedding"] = np.where(groups[i_e] != groups[:, None], s_e, -np.inf).max(axis=1)
    variants = np.concatenate([dihedral(f_) for f_ in fps])
    s_p, i_p = knn(fps, variants, 60)
    s_p, i_p = s_p.reshape(len(fps), -1), i_p.reshape(len(fps), -1)
    own = i_p == np.arange(len(fps))[:, None]
    nearest["pixels"] = np.where((groups[i_p] != groups[:, None]) & ~own, s_p, -np.inf).max(axis=1)
    res = {"cells": len(pick), "augmentations": list(augs), "all_cells_for_distinct": len(x)}
    r4 = lambda v: round(float(v), 4)  # noqa: E731
    for by in ("pixels", "embedding"):
        allc = np.concatenate(list(copies[by].values()))
        near = nearest[by]
        thr = DEFAULT_THRESHOLDS[by]
        res[by] = {"copy_to_original": {"min": r4(allc.min()), "p1": r4(np.percentile(allc, 1)), "median": r4(np.median(allc)),
                                        "per_augmentation_min": {k: r4(v.min()) for k, v in copies[by].items()}},
                   "nearest_other_movie_cell": {"max": r4(near.max()), "p99.9": r4(np.percentile(near, 99.9)),
                                                "p99": r4(np.percentile(near, 99)), "median": r4(np.median(near))},
                   "default_threshold": thr, "copies_caught_at_default": r4((allc >= thr).mean()),
                   "distinct_cells_flagged_at_default": int((near >= thr).sum())}
        log(f"leak evidence ({by}): copies min {allc.min():.4f} / p1 {np.percentile(allc, 1):.4f}; nearest other-movie "
            f"cell max {near.max():.4f} / p99.9 {np.percentile(near, 99.9):.4f}; at {thr}: "
            f"{100 * (allc >= thr).mean():.1f}% of copies caught, {int((near >= thr).sum())} distinct cells flagged")
    out["leak_threshold"] = res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="Shared data folder (with mitocheck/).")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "neighbors.json")
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / "mitocheck_lite0.h5", help="Cached embedded store.")
    p.add_argument("--rows", type=int, default=102_400, help="Database rows after tiling.")
    p.add_argument("--queries", type=int, default=2000, help="Query rows (noisy copies not in the database).")
    p.add_argument("--noise", type=float, default=1.0,
                   help="Noise per copy, as a fraction of the median distance between a real cell and its nearest other cell.")
    p.add_argument("--kinds", nargs="+", default=["ivf", "hnsw", "ivfpq"])
    p.add_argument("--tsne-rows", type=int, default=100_000, help="Points for the t-SNE comparison (0 skips it).")
    p.add_argument("--leak-cells", type=int, default=100, help="Real cells augmented for the leak-threshold evidence (0 skips).")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1))
    args = p.parse_args(argv)

    if not (args.data / "mitocheck").is_dir():
        print(f"bench_neighbors: skipped: no MitoCheck data at {args.data / 'mitocheck'} (pass --data)", file=sys.stderr)
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base, labels, groups, paths, store = embedded_mitocheck(args.data, args.cache)
    from embedkit.neighbors import l2_normalize, search

    base_n = l2_normalize(base)
    d1, _ = search(base_n, base_n, 1, exclude_self=True)
    nn_dist = float(np.median(np.sqrt(np.clip(2 - 2 * d1[:, 0], 0, None))))
    sigma = args.noise * nn_dist / np.sqrt(base.shape[1])
    rng = np.random.default_rng(0)
    db, db_src = tile(base_n, args.rows, sigma, rng)
    q_src = rng.choice(len(base_n), args.queries)
    queries = base_n[q_src] + rng.standard_normal((args.queries, base.shape[1]), dtype=np.float32) * sigma
    out = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "machine": {"platform": platform.platform(),
           "cpu_count": os.cpu_count(), "threads": args.threads, "faiss": faiss.__version__,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "load_average_at_start": os.getloadavg()[0]},
           "data": {"store": store, "encoder": "efficientnet_lite0", "real_cells": len(base), "dim": int(base.shape[1]),
                    "rows": len(db), "queries": len(queries), "noise_fraction_of_nn_distance": args.noise,
                    "median_nn_distance": round(nn_dist, 4), "noise_sigma_per_dim": float(sigma)}}
    _, ex = search(db, queries, 10)
    out["data"]["share_of_true_top10_that_are_copies_of_the_query_cell"] = round(float(np.mean(db_src[ex] == q_src[:, None])), 4)
    log(f"database {db.shape}, {len(queries)} queries, noise sigma {sigma:.5f}/dim (median nn distance {nn_dist:.4f})")

    bench_real_cells(base_n, args, out)
    bench_search(db, queries, args, out)
    _write(args.out, out)
    if args.leak_cells:
        bench_leak_threshold(base, groups, paths, args, out)
        _write(args.out, out)
    if args.tsne_rows:
        bench_tsne(db[:args.tsne_rows], args, out)
    out["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _write(args.out, out)
    log(f"wrote {args.out} ({out['total_seconds']:.0f} s)")
    return 0


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
