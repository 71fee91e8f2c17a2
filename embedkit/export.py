"""Export a store's embeddings to AnnData (.h5ad), CSV or NumPy, with the item table alongside."""

from __future__ import annotations

import os

import numpy as np

from .atomic import atomic_path, atomic_write_text
from .errors import EmbedkitError
from .store import Store


def export_embeddings(store_path: str, key: str | None, fmt: str, out: str | None = None, only_done: bool = True) -> str:
    """Write vectors of ``key`` plus the items as ``fmt`` ('h5ad', 'csv' or 'npy'); return the path written."""
    s = Store(store_path)
    key = s.resolve_key(key)
    frame = s.items_frame()
    rows = np.flatnonzero(s.done(key)) if only_done else np.arange(len(frame))
    if len(rows) == 0:
        raise EmbedkitError(f"{store_path}: key {key!r} has no finished vectors to export")
    X = s.vectors(key, rows)
    obs = frame.iloc[rows].reset_index(drop=True)
    out = out or f"{os.path.splitext(store_path)[0]}.{key}.{fmt}"
    if fmt not in ("h5ad", "csv", "npy"):
        raise EmbedkitError(f"unknown export format {fmt!r}; choose h5ad, csv or npy")
    with atomic_path(out) as tmp:  # a full disk is one line and leaves no temp file
        if fmt == "h5ad":  # every key in obsm, views as X_tsne/X_umap, centroids as obsm['spatial']
            from .anndata_io import to_anndata

            to_anndata(s, key, only_done).write_h5ad(tmp)
        elif fmt == "csv":
            import pandas as pd

            vec = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
            pd.concat([obs, vec], axis=1).to_csv(tmp, index=False)
        else:
            with open(tmp, "wb") as fh:
                np.save(fh, X)
    if fmt == "npy":
        atomic_write_text(f"{os.path.splitext(out)[0]}.items.csv", obs.to_csv(index=False))
    return out
