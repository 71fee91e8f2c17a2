"""A store as an AnnData object, so scanpy and the rest of the scverse can take over.

Every embedding key becomes one ``obsm`` entry (``X_<key>``), items become ``obs``, saved 2-D views
become ``obsm['X_tsne']`` / ``obsm['X_umap']`` / ``obsm['X_pca2']``, and cell centroids from ``segment``
become ``obsm['spatial']`` (x, y, as squidpy expects). ``X`` holds the vectors of one key (the given one,
or the only one); rows without vectors in that key are left out.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .errors import EmbedkitError
from .store import Store

#: obsm names of the views that scanpy knows.
VIEW_NAMES = {"tsne": "X_tsne", "umap": "X_umap", "pca": "X_pca2"}


def obsm_name(key: str) -> str:
    """The obsm entry of an embedding key."""
    return f"X_{key}"


def _views(store: Store, key: str) -> dict[str, np.ndarray]:
    return {VIEW_NAMES.get(method, f"X_{method}"): coords for method, coords in store.views(key).items()}


def to_anndata(store: Store | str | os.PathLike, key: str | None = None, only_done: bool = True):
    """AnnData of a store: X = vectors of ``key``, obsm = every key, its views and centroids, obs = items."""
    import anndata

    store = store if isinstance(store, Store) else Store(store)
    key = store.resolve_key(key)
    rows = np.flatnonzero(store.done(key)) if only_done else np.arange(len(store))
    if len(rows) == 0:
        raise EmbedkitError(f"{store.path}: key {key!r} has no finished vectors to export")
    frame = store.items_frame().iloc[rows].reset_index(drop=True)
    obs = frame.astype({c: str for c in frame.columns if frame[c].dtype == object})
    obs.index = obs["id"].astype(str).values
    obsm = {obsm_name(k): store.vectors(k, rows) for k in store.keys}
    for name, coords in _views(store, key).items():
        obsm[name] = coords[rows]
    if "centroid" in store.columns():
        yx = store.column("centroid")[rows].astype(np.float32)
        obsm["spatial"] = yx[:, ::-1].copy()
    adata = anndata.AnnData(X=obsm[obsm_name(key)].copy(), obs=obs, obsm=obsm)
    adata.uns["embedkit"] = {"store": os.path.abspath(store.path), "key": key, "keys": list(store.keys),
                             "config": json.dumps(store.config(key), default=str),
                             "configs": json.dumps({k: store.config(k) for k in store.keys}, default=str)}
    return adata
