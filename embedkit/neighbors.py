"""Nearest-neighbour search on embeddings by cosine similarity (FAISS inner product on L2-normalised rows).

``search`` is the batched API other modules use (the kNN probe, views, leak checks).
"""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length, as float32 (FAISS's type)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def faiss_gpu_available() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def search(database: np.ndarray, queries: np.ndarray, k: int, *, exclude_self: bool = False, batch: int = 16384,
           use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-NN: for each query, the ``k`` most similar database rows as (similarities, indices).

    ``exclude_self`` drops the match with the query's own row index (when queries are the database).
    Queries are processed in batches so memory stays bounded. Missing neighbours get index -1.
    """
    import faiss

    db = l2_normalize(database)
    index = faiss.IndexFlatIP(db.shape[1])
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(db)
    kk = min(k + (1 if exclude_self else 0), db.shape[0])
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    idx = np.full((len(queries), k), -1, dtype=np.int64)
    for s in range(0, len(queries), batch):
        q = l2_normalize(queries[s:s + batch])
        d, i = index.search(q, kk)
        if exclude_self:
            own = np.arange(s, s + len(q))[:, None]
            mask = i != own
            d = np.where(mask, d, -np.inf)
            order = np.argsort(-d, axis=1, kind="stable")[:, :k]
            d = np.take_along_axis(d, order, 1)
            i = np.take_along_axis(np.where(mask, i, -1), order, 1)
        n = min(k, d.shape[1])
        sims[s:s + len(q), :n] = d[:, :n]
        idx[s:s + len(q), :n] = i[:, :n]
    return sims, idx
