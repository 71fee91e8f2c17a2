"""AnnData export of a store: every key in obsm, items in obs, views and centroids; scanpy runs on it."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA, invoke_cli


@pytest.fixture(scope="module")
def cell_store(tmp_path_factory):
    """A quarter of the real nuclei image segmented (watershed), embedded with lite0, and a PCA view saved."""
    import tifffile

    tmp = tmp_path_factory.mktemp("ad")
    tifffile.imwrite(tmp / "field.tif", tifffile.imread(DATA / "stardist" / "img2d.tif")[:256, :256])
    store = tmp / "cells.h5"
    invoke_cli("segment", tmp / "field.tif", "--out", store, "--backend", "watershed", "--crop", "32", "--quiet")
    invoke_cli("embed", store, "--store", store, "--quiet")
    invoke_cli("view", store, "--method", "pca", "--out", tmp / "pca.png", "--quiet")
    return store


def test_to_anndata_layout(cell_store):
    from embedkit.anndata_io import to_anndata
    from embedkit.store import Store

    s = Store(cell_store)
    ad = to_anndata(s)
    n = int(s.done(s.keys[0]).sum())
    assert ad.n_obs == n > 10 and ad.X.shape == (n, 1280)
    assert set(ad.obsm) == {"X_efficientnet_lite0", "X_pca2", "spatial"}
    np.testing.assert_allclose(ad.obsm["spatial"], s.column("centroid")[:, ::-1])
    assert list(ad.obs_names) == list(s.ids)
    assert {"label", "group", "mask_id", "area"} <= set(ad.obs.columns)


def test_scanpy_neighbors_and_leiden_run(cell_store):
    sc = pytest.importorskip("scanpy", reason="scanpy is not installed (pip install 'embedkit[scverse]')")
    pytest.importorskip("leidenalg", reason="leidenalg is not installed (pip install 'embedkit[scverse]')")
    from embedkit.anndata_io import to_anndata

    ad = to_anndata(cell_store)
    sc.pp.neighbors(ad, use_rep="X_efficientnet_lite0", n_neighbors=5)
    sc.tl.leiden(ad, resolution=0.5, flavor="igraph", n_iterations=2, directed=False)
    assert ad.obs["leiden"].nunique() >= 2
    assert ad.obsp["connectivities"].shape == (ad.n_obs, ad.n_obs)
