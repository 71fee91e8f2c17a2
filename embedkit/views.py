""""Show me the whole population on one picture": 2-D views (t-SNE, UMAP, PCA) of one store key.

* t-SNE runs openTSNE on affinities built from a FAISS k-NN graph (:func:`embedkit.neighbors.knn_graph`:
  exact below 50,000 rows, calibrated IVF above), so it scales past 100,000 cells.
* UMAP runs umap-learn on the same kind of precomputed k-NN graph; PCA is scikit-learn's.
* All work on L2-normalised vectors (cosine geometry, like every embedkit neighbour).

Coordinates are saved in the store at ``/views/<key>/<method>`` (float32 [N, 2], NaN for rows without a
vector) with the parameters and the rows covered as attributes, so a plot can be redrawn with other
colours or thumbnails without recomputing; rows embedded later make the saved view stale.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import EmbedkitError
from .images import Conversion
from .neighbors import knn_graph, l2_normalize
from .store import Store, now_iso, write_lock
from .store.writing import save_view
from .store_index import coverage, load_vectors

METHODS = ("tsne", "umap", "pca")
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
DEFAULTS = {"tsne": {"perplexity": 30.0, "seed": 0}, "umap": {"n_neighbors": 15, "min_dist": 0.1, "seed": 0},
            "pca": {"seed": 0}}


def n_jobs(n_rows: int | None = None) -> int:
    """Threads for layouts: OMP_NUM_THREADS when set, else every core; one below 10,000 rows, where
    openTSNE's Barnes-Hut gradient is fast single-threaded and threads only contend on a busy machine."""
    if n_rows is not None and n_rows < 10_000:
        return 1
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)


# --------------------------------------------------------------------------- layouts


def tsne_affinities(x: np.ndarray, perplexity: float = 30.0, *, knn_method: str = "auto", seed: int = 0,
                    progress: bool = False, log: Callable[[str], None] | None = None):
    """openTSNE perplexity affinities from a FAISS cosine k-NN graph (k = 3 x perplexity, as openTSNE does)."""
    from openTSNE import affinity
    from openTSNE.nearest_neighbors import KNNIndex

    n = len(x)
    k = int(min(n - 1, 3 * perplexity))
    sims, idx = knn_graph(x, k, method=knn_method, seed=seed, progress=progress, log=log)
    if (idx < 0).any():
        raise RuntimeError("k-NN graph has missing neighbours; refusing to hand it to openTSNE")
    dist = np.sqrt(np.clip(2.0 - 2.0 * sims, 0.0, None)).astype(np.float64)  # Euclidean on the unit sphere

    class FaissGraph(KNNIndex):
        """A k-NN graph computed elsewhere, handed to openTSNE as its neighbour index."""

        VALID_METRICS = ["cosine"]

        def build(self):
            return idx, dist

        def query(self, query, k):  # pragma: no cover - transforms of new points are not offered
            raise NotImplementedError("embedkit views do not place new points into a saved t-SNE")

    graph = FaissGraph(np.empty((n, 0), dtype=np.float32), k, metric="cosine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return affinity.PerplexityBasedNN(knn_index=graph, perplexity=min(perplexity, (n - 1) / 3), n_jobs=n_jobs(n),
                                          random_state=seed)


def tsne_layout(x: np.ndarray, perplexity: float = 30.0, seed: int = 0, *, knn_method: str = "auto", progress: bool = False,
                log: Callable[[str], None] | None = None) -> np.ndarray:
    """2-D openTSNE embedding of ``x`` (PCA initialisation) on FAISS k-NN affinities."""
    from openTSNE import TSNE, initialization
    from tqdm.auto import tqdm

    x = l2_normalize(x)
    aff = tsne_affinities(x, perplexity, knn_method=knn_method, seed=seed, progress=progress, log=log)
    init = initialization.pca(x, random_state=seed)
    tsne = TSNE(n_jobs=n_jobs(len(x)), random_state=seed)
    total = tsne.early_exaggeration_iter + tsne.n_iter
    with tqdm(total=total, unit="it", desc="t-SNE", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        def tick(*_):
            bar.update(25)
            return False

        tsne.callbacks, tsne.callbacks_every_iters = [tick], 25
        return np.asarray(tsne.fit(affinities=aff, initialization=init), dtype=np.float32)


def umap_layout(x: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0, *, knn_method: str = "auto",
                progress: bool = False, log: Callable[[str], None] | None = None) -> np.ndarray:
    """2-D UMAP (umap-learn) of ``x`` on a precomputed FAISS cosine k-NN graph."""
    x = l2_normalize(x)
    n = len(x)
    nn = int(min(n_neighbors, n - 1))
    sims, idx = knn_graph(x, nn - 1, method=knn_method, seed=seed, progress=progress, log=log)
    if (idx < 0).any():
        raise RuntimeError("k-NN graph has missing neighbours; refusing to hand it to umap-learn")
    idx = np.concatenate([np.arange(n)[:, None], idx], axis=1)  # umap-learn expects each point first
    dist = np.concatenate([np.zeros((n, 1), np.float32), np.clip(1.0 - sims, 0.0, 2.0)], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap

        reducer = umap.UMAP(n_neighbors=nn, min_dist=min_dist, metric="cosine", random_state=seed,
                            precomputed_knn=(idx, dist), verbose=False, tqdm_kwds={"disable": not progress})
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def pca_layout(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """First two principal components of the normalised vectors and their explained variance ratios."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed, svd_solver="randomized" if len(x) > 20_000 else "auto")
    return np.asarray(pca.fit_transform(l2_normalize(x)), dtype=np.float32), [float(v) for v in pca.explained_variance_ratio_]


def compute_layout(x: np.ndarray, method: str, params: dict, *, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> tuple[np.ndarray, dict]:
    """(coords [n, 2], info) for ``method`` with ``params`` (see :data:`DEFAULTS`)."""
    if len(x) < 3:
        raise EmbedkitError(f"a {METHOD_NAMES.get(method, method)} view needs at least 3 embedded rows (have {len(x)})")
    if method == "tsne":
        return tsne_layout(x, params["perplexity"], params["seed"], progress=progress, log=log), {}
    if method == "umap":
        return umap_layout(x, params["n_neighbors"], params["min_dist"], params["seed"], progress=progress, log=log), {}
    if method == "pca":
        coords, evr = pca_layout(x, params["seed"])
        return coords, {"explained_variance_ratio": evr}
    raise EmbedkitError(f"--method {method!r}: choose one of {', '.join(METHODS)}")


# --------------------------------------------------------------------------- saved views


@dataclass
class Layout:
    """2-D coordinates of every store row (NaN where a row has no vector) and how they were made."""

    key: str
    method: str
    coords: np.ndarray
    params: dict
    info: dict = field(default_factory=dict)
    reused: bool = False
    seconds: float = 0.0

    @property
    def placed(self) -> np.ndarray:
        return np.isfinite(self.coords).all(axis=1)


def view_params(method: str, **overrides) -> dict:
    if method not in DEFAULTS:
        raise EmbedkitError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    params = dict(DEFAULTS[method])
    params.update({k: v for k, v in overrides.items() if k in params and v is not None})
    return params


def read_layout(store: Store, key: str, method: str) -> tuple[Layout, dict] | None:
    """The saved view of ``key``/``method`` and its attributes, or None."""
    found = store.view(key, method)
    if found is None:
        return None
    coords, attrs = found
    return Layout(key, method, coords, json.loads(attrs.get("params", "{}")), json.loads(attrs.get("info", "{}")), True,
                  float(attrs.get("seconds", 0.0))), attrs


def saved_layout(store: Store, key: str, method: str, params: dict) -> Layout | None:
    """The saved view when it was made with ``params`` from the store's current rows and vectors, else None."""
    found = read_layout(store, key, method)
    if found is None:
        return None
    layout, attrs = found
    cov = coverage(store, key)
    if (layout.params != params or attrs.get("rows_fingerprint") != cov["rows_fingerprint"]
            or attrs.get("config_fingerprint") != cov["config_fingerprint"] or len(layout.coords) != cov["n_items"]):
        return None
    return layout


def save_layout(store_path: str | os.PathLike, layout: Layout, cov: dict) -> None:
    """Write ``/views/<key>/<method>`` with its parameters in one atomic store commit."""
    attrs = {"method": layout.method, "params": json.dumps(layout.params, sort_keys=True),
             "info": json.dumps(layout.info, sort_keys=True), "rows_fingerprint": cov["rows_fingerprint"],
             "config_fingerprint": cov["config_fingerprint"], "n_rows": cov["n_rows"],
             "seconds": round(layout.seconds, 2), "created": now_iso()}
    with write_lock(store_path):
        save_view(store_path, layout.key, layout.method, layout.coords, attrs)


def make_layout(store_path: str | os.PathLike, key: str | None, method: str, params: dict | None = None, *,
                recompute: bool = False, save: bool = True, progress: bool = False,
                log: Callable[[str], None] | None = None) -> Layout:
    """The view of a store key: reuse the saved one when it is current, otherwise compute (and save) it."""
    store = Store(store_path)
    key = store.resolve_key(key)
    params = params or view_params(method)
    if not recompute:
        layout = saved_layout(store, key, method, params)
        if layout is not None:
            return layout
    cov = coverage(store, key)
    t0 = time.perf_counter()
    rows, x = load_vectors(store, key, progress=progress)
    coords, info = compute_layout(x, method, params, progress=progress, log=log)
    full = np.full((cov["n_items"], 2), np.nan, dtype=np.float32)
    full[rows] = coords
    layout = Layout(key, method, full, params, info, False, time.perf_counter() - t0)
    if save:
        save_layout(store_path, layout, cov)
    return layout


# --------------------------------------------------------------------------- colours and predictions


@dataclass
class Colouring:
    """Per-row values to colour by: categories (strings, '' = no value) or numbers (NaN = no value)."""

    name: str
    values: np.ndarray
    categorical: bool
    misclassified: np.ndarray | None = None
    note: str = ""
    categories: list[str] | None = None  # fixes each category's colour (labels and predictions share colours)


def read_predictions(path: str | os.PathLike, store: Store, run: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(predicted class per row, true class per row, note) from a probe's predictions.csv; '' where absent.

    Several runs per item (seeds, folds): ``run`` picks one, else each item gets its most frequent prediction.
    """
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise EmbedkitError(f"{path}: cannot read predictions ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ("id", "pred") if c not in df.columns]
    if missing:
        raise EmbedkitError(f"{path}: not a predictions.csv (missing column(s) {', '.join(missing)}; expected id, true, pred, run)")
    if run is not None:
        if "run" not in df.columns or run not in set(df["run"]):
            have = sorted(set(df["run"])) if "run" in df.columns else []
            raise EmbedkitError(f"--run {run}: not in {path} (runs: {', '.join(have) or 'none'})")
        df = df[df["run"] == run]
    row_of = {str(i): r for r, i in enumerate(store.ids)}
    known = df["id"].isin(row_of.keys())
    if not known.any():
        raise EmbedkitError(f"{path}: none of its ids are items of {store.path.name}; were these predictions made on another store?")
    df = df[known]
    n_runs = df.groupby("id").size().max()
    pred = (df.groupby("id")["pred"].agg(lambda s: s.value_counts().index[0]) if n_runs > 1
            else df.set_index("id")["pred"])
    true = df.groupby("id")["true"].first() if "true" in df.columns else pd.Series("", index=pred.index)
    pred_row = np.full(len(row_of), "", dtype=object)
    true_row = np.full(len(row_of), "", dtype=object)
    rows = np.array([row_of[i] for i in pred.index])
    pred_row[rows] = pred.to_numpy()
    true_row[rows] = true.reindex(pred.index).to_numpy()
    note = f"{len(pred):,} predicted items" + (f", most frequent of {n_runs} runs" if n_runs > 1 else "")
    if (~known).sum():
        note += f"; {int((~known).sum())} prediction rows for unknown ids ignored"
    return pred_row, true_row, note


def colouring(store: Store, color: str, predictions: str | os.PathLike | None = None, run: str | None = None) -> Colouring:
    """What ``--color`` means for this store: label, group, prediction, or any item column."""
    mis = None
    note = ""
    pred = None
    if predictions is not None:
        pred, true, note = read_predictions(predictions, store, run)
        mis = (pred != "") & (true != "") & (pred != true)
    classes = sorted(({str(v) for v in store.labels} | ({str(v) for v in pred} if pred is not None else set())) - {""})
    if color == "prediction":
        if pred is None:
            raise EmbedkitError("--color prediction needs --predictions PATH (a probe's predictions.csv)")
        return Colouring("prediction", pred, True, mis, note, classes)
    if color == "label":
        return Colouring("label", store.labels.astype(object), True, mis, note, classes)
    if color == "group":
        return Colouring("group", store.groups.astype(object), True, mis, note)
    frame = store.items_frame()
    if color not in frame.columns:
        cols = ", ".join(c for c in frame.columns if c not in ("id", "path"))
        raise EmbedkitError(f"--color {color!r}: not label, group, prediction or an item column (columns: {cols})")
    values = frame[color].to_numpy()
    if np.issubdtype(values.dtype, np.number) and len(np.unique(values[np.isfinite(values.astype(float))])) > 20:
        return Colouring(color, values.astype(float), False, mis, note)
    return Colouring(color, np.array([str(v) if str(v) not in ("nan", "-1") else "" for v in values], dtype=object), True,
                     mis, note)


def palette(n: int) -> list:
    """``n`` distinguishable colours, never grey (grey marks items without a value): tab10 / tab20 without
    their greys, then evenly spaced hues."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import hsv_to_rgb

    if n <= 9:
        return [plt.cm.tab10(i) for i in range(10) if i != 7][:n]
    if n <= 18:
        return [plt.cm.tab20(i) for i in range(20) if i not in (14, 15)][:n]
    golden = 0.618033988749895
    return [tuple(hsv_to_rgb(((i * golden) % 1.0, 0.65 + 0.35 * (i % 2), 0.85 - 0.25 * (i % 3 == 2)))) + (1.0,)
            for i in range(n)]


# --------------------------------------------------------------------------- drawing


def grid_cells(coords: np.ndarray, n_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One point per occupied cell of a square grid of about ``n_max`` cells (the point nearest the cell centre).

    Returns (point indices, cell centres [m, 2], cell size [2], grid origin [2]) in data units.
    """
    g = max(1, int(np.sqrt(n_max)))
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    size = span / g
    pos = (coords - lo) / size
    cell = np.clip(pos.astype(int), 0, g - 1)
    dist = np.linalg.norm(pos - (cell + 0.5), axis=1)
    flat = cell[:, 0] * g + cell[:, 1]
    order = np.lexsort((dist, flat))
    first = np.r_[True, flat[order][1:] != flat[order][:-1]]
    pick = order[first]
    centres = lo + (cell[pick] + 0.5) * size
    return pick, centres, size, lo


def plot_layout(store: Store, layout: Layout, colour: Colouring, out: str | os.PathLike, *, thumbnails: bool = False,
                max_thumbnails: int = 400, thumb_size: int = 64, conv: Conversion | None = None,
                title: str | None = None) -> Path:
    """Scatter (or thumbnail) plot of a layout coloured by ``colour``; misclassified points get a black cross."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .sheets import save_figure

    ok = layout.placed
    rows = np.flatnonzero(ok)
    xy = layout.coords[rows]
    n = len(rows)
    if n == 0:
        raise EmbedkitError(f"the {layout.method} view of '{layout.key}' places no rows")
    size = float(np.clip(600 / np.sqrt(n), 0.3, 30))
    alpha = 0.85 if n < 10_000 else 0.5
    fig, ax = plt.subplots(figsize=(10.5, 8.5) if not thumbnails else (12, 11))
    vals = colour.values[rows]
    handles = []
    colour_of_row = np.zeros((n, 4))
    if colour.categorical:
        has = vals != ""
        cats, counts = np.unique(vals[has].astype(str), return_counts=True)
        if colour.categories is not None:
            cols = dict(zip(colour.categories, palette(len(colour.categories))))
        else:
            order = np.argsort(-counts, kind="stable")  # many groups: the most common first
            cats, counts = cats[order], counts[order]
            cols = dict(zip(cats, palette(len(cats))))
        if (~has).any():
            colour_of_row[~has] = (0.7, 0.7, 0.7, 1.0)
            missing_label = "not predicted" if colour.name == "prediction" else "(none)"
            ax.scatter(xy[~has, 0], xy[~has, 1], s=size * 0.6, c=[(0.75, 0.75, 0.75)], lw=0, alpha=0.6, rasterized=True)
            handles.append(Line2D([], [], ls="", marker="o", color=(0.75, 0.75, 0.75), label=f"{missing_label} ({int((~has).sum()):,})"))
        for c, cnt in zip(cats, counts):
            sel = vals == c
            colour_of_row[sel] = cols[c]
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cols[c], lw=0, alpha=alpha, rasterized=True)
            handles.append(Line2D([], [], ls="", marker="o", color=cols[c], label=f"{c} ({cnt:,})"))
    else:
        has = np.isfinite(vals)
        ax.scatter(xy[~has, 0], xy[~has, 1], s=size * 0.6, c=[(0.75, 0.75, 0.75)], lw=0, alpha=0.6, rasterized=True)
        sc = ax.scatter(xy[has, 0], xy[has, 1], s=size, c=vals[has], cmap="viridis", lw=0, alpha=alpha, rasterized=True)
        fig.colorbar(sc, ax=ax, shrink=0.7, label=colour.name)
        colour_of_row[has] = sc.to_rgba(vals[has])
        colour_of_row[~has] = (0.7, 0.7, 0.7, 1.0)
    if colour.misclassified is not None:
        mis = colour.misclassified[rows]
        if mis.any():
            ax.scatter(xy[mis, 0], xy[mis, 1], s=size * 1.6, marker="x", c="black", lw=0.9, alpha=0.9, rasterized=True)
        handles.append(Line2D([], [], ls="", marker="x", color="black", label=f"misclassified ({int(mis.sum()):,})"))
    if thumbnails:
        _draw_thumbnails(ax, store, rows, xy, colour_of_row, max_thumbnails, thumb_size, conv or Conversion())
    name = METHOD_NAMES.get(layout.method, layout.method)
    if layout.method == "pca" and "explained_variance_ratio" in layout.info:
        evr = layout.info["explained_variance_ratio"]
        ax.set_xlabel(f"PC1 ({100 * evr[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * evr[1]:.1f}% of variance)")
    else:
        ax.set_xlabel(f"{name} 1")
        ax.set_ylabel(f"{name} 2")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title or f"{layout.key}: {name} of {n:,} items, coloured by {colour.name}", fontsize=11)
    if colour.categorical:
        if len(handles) <= 32:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                      markerscale=1.5, title=colour.name, title_fontsize=9)
        else:
            ax.text(1.01, 1.0, f"{len(handles)} {colour.name} values\n(legend omitted)", transform=ax.transAxes,
                    va="top", fontsize=8)
    elif handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    notes = [f"{layout.method} {', '.join(f'{k}={v}' for k, v in layout.params.items())}"]
    if colour.note:
        notes.append(colour.note)
    ax.text(0.0, -0.04 if layout.method != "pca" else -0.09, "; ".join(notes), transform=ax.transAxes, fontsize=7,
            color="0.4", va="top")
    fig.tight_layout()
    return save_figure(fig, out, dpi=150 if thumbnails else 130)


def _draw_thumbnails(ax, store: Store, rows: np.ndarray, xy: np.ndarray, colours: np.ndarray, max_thumbnails: int,
                     thumb_size: int, conv: Conversion) -> None:
    """Draw cell images on a grid over the map: in each occupied cell, the cell's most central item,
    framed in its point's colour (points stay visible between the tiles)."""
    from .sheets import item_thumbnails

    pick, centres, (w, h), _ = grid_cells(xy, max_thumbnails)
    w, h = w * 0.9, h * 0.9
    thumbs = item_thumbnails(store, rows[pick], conv, thumb_size)
    for j, (x, y), im in zip(pick, centres, thumbs):
        if im is None:
            continue
        ax.imshow(im, extent=(x - w / 2, x + w / 2, y - h / 2, y + h / 2), zorder=3, interpolation="bilinear")
        ax.add_patch(_frame(x - w / 2, y - h / 2, w, h, colours[j]))
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    ax.set_xlim(lo[0] - w, hi[0] + w)
    ax.set_ylim(lo[1] - h, hi[1] + h)
    ax.set_aspect("auto")


def _frame(x: float, y: float, w: float, h: float, colour: Sequence[float]):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor=colour, lw=1.8, zorder=4)


def default_plot_path(store_path: str | os.PathLike, key: str, method: str, thumbnails: bool = False) -> Path:
    p = Path(store_path)
    return p.with_name(f"{p.stem}.{key}.{method}{'.thumbs' if thumbnails else ''}.png")
