"""Nearest-neighbour search on embeddings by cosine similarity (FAISS inner product on L2-normalised rows).

This is the batched API other modules use (the kNN probe, views, leak checks, lookups):

* :func:`search` exact k-NN of queries in a database (brute force, batched, bounded memory);
* :func:`knn` the same question, answered exactly for small problems and with a calibrated IVF index for
  large ones (``method="auto"``);
* :func:`knn_graph` every row's neighbours among the other rows (t-SNE / UMAP affinities);
* :func:`build_index` a FAISS index of one of :data:`KINDS`, whose search depth (IVF ``nprobe``, HNSW
  ``efSearch``) is raised until a measured Recall@10 against exact search reaches a target (0.95).

Similarities are cosines in [-1, 1]; missing neighbours get index -1 and similarity -inf.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import EmbedkitError

#: Index kinds ``embedkit index --kind`` offers (``auto`` chooses between flat and ivf).
KINDS = ("flat", "ivf", "hnsw", "ivfpq")
#: Below this many rows ``auto`` searches exactly: a query scans every row in milliseconds and nothing needs training.
AUTO_FLAT_MAX = 50_000
#: Recall@10 against exact search that approximate indexes are tuned to reach by default.
TARGET_RECALL = 0.95
#: Recall is measured with this many neighbours.
RECALL_K = 10
#: Exact k-NN is used by :func:`knn` while queries x database stays below this many similarity evaluations.
EXACT_PAIRS_MAX = 2_000_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
#: IVF lists train on at most this many points per list (FAISS warns below 39).
TRAIN_PER_LIST = 64


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length, as float32 (FAISS's type)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def faiss_gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def _faiss():
    import faiss

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        faiss.omp_set_num_threads(int(threads))
    return faiss


def _check_finite(x: np.ndarray, what: str) -> None:
    if x.size and not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise EmbedkitError(f"{bad} {what} vector(s) contain NaN or inf; only finished (done) rows can be searched")


def search(database: np.ndarray, queries: np.ndarray, k: int, *, exclude_self: bool = False, batch: int = 16384,
           use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-NN: for each query, the ``k`` most similar database rows as (similarities, indices).

    ``exclude_self`` drops the match with the query's own row index (when queries are the database).
    Queries are processed in batches so memory stays bounded. Missing neighbours get index -1.
    """
    faiss = _faiss()
    db = l2_normalize(database)
    index = faiss.IndexFlatIP(db.shape[1])
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(db)
    return _batched_search(index, queries, k, exclude_self=exclude_self, batch=batch)


def _batched_search(index, queries: np.ndarray, k: int, *, exclude_self: bool, batch: int,
                    progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search ``index`` (whose ids are database row numbers) in query batches; optional self exclusion."""
    kk = min(k + (1 if exclude_self else 0), index.ntotal)
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    idx = np.full((len(queries), k), -1, dtype=np.int64)
    for s in range(0, len(queries), batch):
        q = l2_normalize(queries[s:s + batch])
        d, i = index.search(q, kk) if kk > 0 else (np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64))
        if exclude_self:
            own = np.arange(s, s + len(q))[:, None]
            mask = (i != own) & (i >= 0)
            d = np.where(mask, d, -np.inf)
            order = np.argsort(-d, axis=1, kind="stable")[:, :k]
            d = np.take_along_axis(d, order, 1)
            i = np.take_along_axis(np.where(mask, i, -1), order, 1)
        n = min(k, d.shape[1])
        sims[s:s + len(q), :n] = d[:, :n]
        idx[s:s + len(q), :n] = i[:, :n]
        if progress is not None:
            progress(len(q))
    idx[~np.isfinite(sims)] = -1
    return sims, idx


def recall_per_query(approx: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """Fraction of each query's exact top-``k`` that the approximate top-``k`` also found."""
    a, e = approx[:, :k], exact[:, :k]
    return np.array([len(set(x[x >= 0]) & set(y[y >= 0])) / max(1, int((y >= 0).sum())) for x, y in zip(a, e)])


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> float:
    """Recall@k: mean fraction of each query's exact top-``k`` that the approximate top-``k`` also found."""
    hits = recall_per_query(approx, exact, k)
    return float(hits.mean()) if len(hits) else 1.0


def recall_ci(hits: np.ndarray) -> tuple[float, float]:
    """Normal-approximation 95% confidence interval of a mean recall over independent queries."""
    if len(hits) < 2:
        return float(hits.mean()) if len(hits) else 1.0, 1.0
    half = 1.96 * float(hits.std(ddof=1)) / float(np.sqrt(len(hits)))
    return float(max(0.0, hits.mean() - half)), float(min(1.0, hits.mean() + half))


# --------------------------------------------------------------------------- index kinds


def choose_kind(n: int) -> tuple[str, str]:
    """``--kind auto``: the kind for ``n`` rows and one sentence saying why."""
    if n < AUTO_FLAT_MAX:
        return "flat", (f"{n:,} rows < {AUTO_FLAT_MAX:,}: exact flat search, since scanning every row takes "
                        f"milliseconds per query at this size and needs no training")
    return "ivf", (f"{n:,} rows >= {AUTO_FLAT_MAX:,}: IVF, which scans only the nearest clusters of rows; its depth "
                   f"(nprobe) is tuned until Recall@{RECALL_K} against exact search reaches {TARGET_RECALL}")


def default_nlist(n: int) -> int:
    """IVF list count: about 4 sqrt(N) (FAISS's guideline), with at least 39 training points per list."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def pq_subquantizers(dim: int) -> int:
    """IVF-PQ code size in bytes: the largest divisor of ``dim`` up to 64 (8 bits per sub-vector)."""
    return max(m for m in range(1, min(64, dim) + 1) if dim % m == 0)


@dataclass
class BuiltIndex:
    """A FAISS index over database rows plus how it was made and how accurate it measured."""

    index: object
    kind: str
    params: dict = field(default_factory=dict)
    recall: float | None = None
    seconds: float = 0.0
    recall_interval: tuple[float, float] | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, *, batch: int = 4096, exclude_self: bool = False,
               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (similarities, ids) of each query; ids are the ones given at build time."""
        return _batched_search(self.index, queries, k, exclude_self=exclude_self, batch=batch, progress=progress)


def build_index(vectors: np.ndarray, kind: str = "auto", ids: np.ndarray | None = None, *, nlist: int | None = None,
                target_recall: float = TARGET_RECALL, calibrate_queries: int = 500, use_gpu: bool | None = None,
                seed: int = 0, log: Callable[[str], None] | None = None) -> BuiltIndex:
    """Build a cosine index of ``kind`` over ``vectors`` (rows get ``ids``, default 0..N-1).

    Approximate kinds are trained on a sample, then their search depth is raised until Recall@10 on
    ``calibrate_queries`` database rows (each excluding itself) reaches ``target_recall``; the measured
    recall is returned with the index, so a saved index can say how exact it is.
    """
    faiss = _faiss()
    t0 = time.perf_counter()
    n = len(vectors)
    if n == 0:
        raise EmbedkitError("nothing to index: no embedded rows")
    reason = None
    if kind == "auto":
        kind, reason = choose_kind(n)
    if kind not in KINDS:
        raise EmbedkitError(f"--kind {kind!r}: choose auto or one of {', '.join(KINDS)}")
    x = l2_normalize(vectors)
    _check_finite(x, "database")
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    d = x.shape[1]
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    rng = np.random.default_rng(seed)
    params: dict = {"metric": "cosine"}
    if kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(d))
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = faiss.IndexIDMap(base)
        params.update(M=HNSW_M, efConstruction=HNSW_EF_CONSTRUCTION)
    else:
        nl = int(nlist or default_nlist(n))
        if nl < 1 or nl > n:
            raise EmbedkitError(f"--nlist {nl}: must lie between 1 and the number of rows ({n})")
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
        else:
            m = pq_subquantizers(d)
            if n < 256 * 39:
                raise EmbedkitError(f"ivfpq needs at least {256 * 39:,} rows to train its codebooks (have {n:,}); "
                                    f"use --kind flat or ivf")
            index = faiss.IndexIVFPQ(quantizer, d, nl, m, 8, faiss.METRIC_INNER_PRODUCT)
            params.update(pq_bytes=m)
        index.cp.seed = seed
        index.cp.niter = 20
        params["nlist"] = nl
        n_train = min(n, max(TRAIN_PER_LIST * nl, 256 * 39 if kind == "ivfpq" else 0))
        train = x[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else x
        if log:
            log(f"training {kind} ({nl} lists) on {len(train):,} rows")
        if use_gpu and kind != "ivfpq":
            gpu = faiss.index_cpu_to_all_gpus(index)
            gpu.train(train)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            index.train(train)
    _add_in_batches(index, x, ids, log)
    built = BuiltIndex(index, kind, params)
    if reason:
        built.params["reason"] = reason
    if kind != "flat":
        calibrate(built, x, ids, target_recall=target_recall, n_queries=calibrate_queries, seed=seed, log=log)
    else:
        built.recall, built.recall_interval = 1.0, (1.0, 1.0)
    built.seconds = time.perf_counter() - t0
    return built


def _add_in_batches(index, x: np.ndarray, ids: np.ndarray, log: Callable[[str], None] | None, batch: int = 65536) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(x), unit="row", desc="adding to index", disable=log is None or len(x) < 200_000,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for s in range(0, len(x), batch):
            index.add_with_ids(x[s:s + batch], ids[s:s + batch])
            bar.update(min(batch, len(x) - s))


def depth_parameter(kind: str) -> str | None:
    """The FAISS search-time parameter that trades speed for recall in ``kind``."""
    return {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(kind)


def set_depth(built: BuiltIndex, value: int) -> None:
    """Set the search depth (nprobe / efSearch) of an index, through any ID-map wrapper."""
    faiss = _faiss()
    name = depth_parameter(built.kind)
    if name:
        faiss.ParameterSpace().set_index_parameter(built.index, name, int(value))
        built.params[name] = int(value)


def depth_ladder(built: BuiltIndex) -> list[int]:
    if built.kind == "hnsw":
        return [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048]
    nl = int(built.params["nlist"])
    ladder = sorted({min(nl, v) for v in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, nl)})
    return ladder


def calibrate(built: BuiltIndex, x: np.ndarray, ids: np.ndarray, *, target_recall: float = TARGET_RECALL,
              n_queries: int = 500, k: int = RECALL_K, seed: int = 0, log: Callable[[str], None] | None = None) -> float:
    """Raise the index's search depth until Recall@k on sampled database rows reaches ``target_recall``.

    The target counts as reached when the lower end of the recall's 95% confidence interval over the
    sampled queries is at or above it, so the promise holds for queries beyond the sample too. ``x`` must
    be the normalised database the index holds, ``ids`` its ids. Returns the measured recall (also stored
    on ``built`` with its interval); when even the deepest setting misses the target (IVF-PQ's lossy codes
    plateau), the best setting is kept.
    """
    n = len(x)
    rng = np.random.default_rng(seed + 1)
    sample = np.sort(rng.choice(n, min(n, n_queries), replace=False))
    kk = min(k, n - 1)
    if kk < 1:
        set_depth(built, depth_ladder(built)[0])
        built.recall, built.recall_interval = 1.0, (1.0, 1.0)
        return 1.0
    _, exact_pos = _batched_search(_flat(x), x[sample], kk + 1, exclude_self=False, batch=4096)
    exact = _drop_ids(ids[np.where(exact_pos >= 0, exact_pos, 0)], exact_pos < 0, ids[sample], kk)
    best: tuple[float, int | None, tuple[float, float]] = (-1.0, None, (0.0, 0.0))
    flat_steps = 0
    for depth in depth_ladder(built):
        set_depth(built, depth)
        _, found = _batched_search(built.index, x[sample], kk + 1, exclude_self=False, batch=4096)
        hits = recall_per_query(_drop_ids(found, found < 0, ids[sample], kk), exact, kk)
        r, ci = float(hits.mean()), recall_ci(hits)
        flat_steps = flat_steps + 1 if r < best[0] + 0.002 else 0
        if r > best[0]:
            best = (r, depth, ci)
        if ci[0] >= target_recall or flat_steps >= 2:  # reached, or a plateau (IVF-PQ's compressed codes)
            break
    if best[2][0] < target_recall:
        set_depth(built, best[1])
    built.recall, built.recall_interval = best[0], best[2]
    name = depth_parameter(built.kind)
    if log:
        log(f"{name}={built.params[name]}: Recall@{kk} {best[0]:.3f} (95% CI {best[2][0]:.3f}-{best[2][1]:.3f}) "
            f"on {len(sample)} sampled rows (target {target_recall})")
    return best[0]


def _flat(x: np.ndarray):
    faiss = _faiss()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def _drop_ids(found: np.ndarray, missing: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its result row and keep ``k`` columns (-1 padded)."""
    found = np.where(missing, -1, found)
    out = np.full((len(found), k), -1, dtype=np.int64)
    for r, (row, me) in enumerate(zip(found, own)):
        keep = row[(row != me) & (row >= 0)][:k]
        out[r, :len(keep)] = keep
    return out


# --------------------------------------------------------------------------- k-NN for other modules


def knn(database: np.ndarray, queries: np.ndarray, k: int, *, method: str = "auto", exclude_self: bool = False,
        target_recall: float = TARGET_RECALL, use_gpu: bool | None = None, seed: int = 0, progress: bool = False,
        log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine k-NN of ``queries`` in ``database`` as (similarities, row indices), exact or approximate.

    ``method`` is ``exact``, ``ivf``, ``hnsw`` or ``auto`` (exact while queries x rows stays below
    :data:`EXACT_PAIRS_MAX`, else IVF calibrated to ``target_recall``). With ``exclude_self`` the
    queries are the database rows themselves and a row is never its own neighbour.
    """
    from tqdm.auto import tqdm

    n = len(database)
    if method == "auto":
        method = "exact" if n * len(queries) <= EXACT_PAIRS_MAX or n < AUTO_FLAT_MAX else "ivf"
    if method == "exact":
        faiss = _faiss()
        db = l2_normalize(database)
        _check_finite(db, "database")
        index = faiss.IndexFlatIP(db.shape[1])
        if use_gpu if use_gpu is not None else faiss_gpu_available():
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(db)
        searcher = index
    elif method in ("ivf", "hnsw"):
        built = build_index(database, method, target_recall=target_recall, use_gpu=use_gpu, seed=seed, log=log)
        searcher = built.index
    else:
        raise EmbedkitError(f"k-NN method {method!r}: choose auto, exact, ivf or hnsw")
    with tqdm(total=len(queries), unit="q", desc=f"{k}-NN search ({method})", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        sims, idx = _batched_search(searcher, queries, k, exclude_self=exclude_self, batch=4096, progress=bar.update)
    if method != "exact":
        n_short = _fill_short_rows(database, queries, sims, idx, exclude_self)
        if n_short and log:
            log(f"{n_short:,} queries found fewer than {k} neighbours in the probed lists; answered them exactly")
    return sims, idx


def _fill_short_rows(database: np.ndarray, queries: np.ndarray, sims: np.ndarray, idx: np.ndarray, exclude_self: bool) -> int:
    """Redo exactly the queries for which an approximate index returned fewer neighbours than exist.

    The few IVF lists one query probes can hold fewer than k rows; a graph with holes would corrupt
    t-SNE/UMAP, so those queries get an exact answer instead (in place).
    """
    k = idx.shape[1]
    available = len(database) - (1 if exclude_self else 0)
    short = np.flatnonzero((idx < 0).sum(axis=1) > max(0, k - available))
    if len(short) == 0:
        return 0
    faiss = _faiss()
    db = l2_normalize(database)
    flat = faiss.IndexFlatIP(db.shape[1])
    flat.add(db)
    kk = min(k + (1 if exclude_self else 0), len(db))
    d, i = flat.search(l2_normalize(queries[short]), kk)
    for r, q in enumerate(short):
        keep = (i[r] != q) & (i[r] >= 0) if exclude_self else i[r] >= 0
        dd, ii = d[r][keep][:k], i[r][keep][:k]
        sims[q], idx[q] = -np.inf, -1
        sims[q, :len(ii)], idx[q, :len(ii)] = dd, ii
    return len(short)


def knn_graph(vectors: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar other rows: (similarities [N, k], indices [N, k]); see :func:`knn`."""
    return knn(vectors, vectors, k, exclude_self=True, **kwargs)
