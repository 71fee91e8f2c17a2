"""``embedkit view``: t-SNE / UMAP / PCA maps of real lite0 vectors, saved in the store and redrawn, coloured by predictions."""

from __future__ import annotations

import json

import h5py
import numpy as np
from conftest import invoke_cli, run_cli

KEY = "efficientnet_lite0"


def _png(path, min_width: int = 800) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_width
        assert np.asarray(im.convert("L")).std() > 10


def _preserved(x: np.ndarray, coords: np.ndarray, k: int = 10) -> float:
    """Share of each point's k cosine neighbours that are among its k nearest points on the map."""
    from sklearn.neighbors import NearestNeighbors

    from embedkit.neighbors import knn_graph

    _, hi = knn_graph(x, k)
    _, lo = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)
    return float(np.mean([len(set(h) & set(l_[1:])) / k for h, l_ in zip(hi, lo)]))


def test_tsne_is_saved_in_the_store_and_redrawn_without_recomputing(lite0_store, tmp_path):
    from embedkit.store import Store
    from embedkit.store_index import load_vectors

    out = invoke_cli("view", lite0_store, "--method", "tsne", "--out", tmp_path / "tsne.png", "--quiet").stdout
    assert "computed t-SNE of 320 rows" in out and f"saved to /views/{KEY}/tsne" in out
    with h5py.File(lite0_store, "r") as f:
        ds = f["views"][KEY]["tsne"]
        coords = ds[:]
        assert json.loads(ds.attrs["params"]) == {"perplexity": 30.0, "seed": 0}
    assert coords.shape == (320, 2) and np.isfinite(coords).all()
    _, x = load_vectors(Store(lite0_store), KEY)
    assert _preserved(x, coords) > 0.3  # a map that keeps neighbourhoods (a random one keeps about 0.03)
    _png(tmp_path / "tsne.png")
    again = invoke_cli("view", lite0_store, "--method", "tsne", "--color", "group", "--thumbnails", "--max-thumbnails",
                       "100", "--out", tmp_path / "thumbs.png").stdout
    assert "reusing the saved t-SNE" in again
    with h5py.File(lite0_store, "r") as f:
        assert np.array_equal(f["views"][KEY]["tsne"][:], coords)
    _png(tmp_path / "thumbs.png", min_width=1200)


def test_umap_and_pca_coloured_by_probe_predictions(lite0_store, tmp_path):
    from embedkit.neighbors import knn_graph
    from embedkit.results import predictions_frame
    from embedkit.store import Store
    from embedkit.store_index import load_vectors

    s = Store(lite0_store)
    rows, x = load_vectors(s, KEY)
    labels, groups = s.labels[rows], s.groups[rows]
    classes = sorted(set(labels))
    # real predictions: a 10-NN vote among cells of other movies
    _, nn = knn_graph(x, 60)
    proba = np.zeros((len(x), len(classes)))
    for i, row in enumerate(nn):
        votes = [labels[j] for j in row if groups[j] != groups[i]][:10]
        for v in votes:
            proba[i, classes.index(v)] += 1 / len(votes)
    pred = predictions_frame(s.ids[rows][:200], groups[:200], labels[:200], proba[:200], classes)
    pred.to_csv(tmp_path / "predictions.csv", index=False)
    wrong = int((pred["pred"] != pred["true"]).sum())
    out = invoke_cli("view", lite0_store, "--method", "pca", "--predictions", tmp_path / "predictions.csv",
                     "--out", tmp_path / "pca.png").stdout
    assert "200 predicted items" in out and f"{wrong} misclassified items marked" in out and 0 < wrong < 200
    _png(tmp_path / "pca.png")
    out = invoke_cli("view", lite0_store, "--method", "umap", "--n-neighbors", "10", "--out", tmp_path / "umap.png",
                     "--quiet").stdout
    assert "computed UMAP of 320 rows" in out
    with h5py.File(lite0_store, "r") as f:
        assert set(f["views"][KEY]) == {"pca", "umap"}
        umap_xy = f["views"][KEY]["umap"][:]
        assert json.loads(f["views"][KEY]["umap"].attrs["params"])["n_neighbors"] == 10
    assert _preserved(x, umap_xy) > 0.3
    _png(tmp_path / "umap.png")
    bad = run_cli("view", lite0_store, "--method", "pca", "--color", "plate", check=False)
    assert bad.returncode == 2 and "--color 'plate'" in bad.stderr
    bad = run_cli("view", lite0_store, "--color", "prediction", check=False)
    assert bad.returncode == 2 and "needs --predictions" in bad.stderr
