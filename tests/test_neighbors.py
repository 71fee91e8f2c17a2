"""Neighbour search API, saved indexes and lookups (``embedkit index`` / ``embedkit neighbors``) on real lite0 vectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke_cli, run_cli

KEY = "efficientnet_lite0"


def _table(stdout: str) -> list[dict]:
    """Rows of the neighbours table printed by ``embedkit neighbors``."""
    rows = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0].isdigit():
            rows.append({"rank": int(parts[0]), "similarity": float(parts[1]), "label": parts[2], "group": parts[3],
                         "id": parts[4]})
    return rows


@pytest.fixture(scope="module")
def lite0(lite0_store_ro):
    from embedkit.store import Store
    from embedkit.store_index import load_vectors

    s = Store(lite0_store_ro)
    rows, x = load_vectors(s, KEY)
    return s, rows, x


def test_search_api_is_exact_and_approximate_indexes_reach_target_recall(lite0):
    from embedkit.errors import EmbedkitError
    from embedkit.neighbors import build_index, knn, knn_graph, recall_at_k, search

    _, _, x = lite0
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    brute = xn[:20] @ xn.T
    sims, idx = search(x, x[:20], 5)
    assert np.array_equal(idx[:, 0], np.arange(20))  # each row is its own nearest neighbour
    assert np.allclose(sims, -np.sort(-brute, axis=1)[:, :5], atol=1e-5)
    g_sims, g_idx = knn_graph(x, 10)
    assert not (g_idx == np.arange(len(x))[:, None]).any()  # the graph never links a row to itself
    assert np.allclose(g_sims[:20, 0], -np.sort(-np.where(np.eye(20, len(x), dtype=bool), -np.inf, brute), axis=1)[:, 0], atol=1e-5)
    for kind in ("ivf", "hnsw"):
        built = build_index(x, kind, ids=np.arange(len(x)) + 1000)
        assert built.recall >= 0.95, kind
        s2, i2 = built.search(x, 11)
        found = np.array([[j - 1000 for j in row if j - 1000 != q][:10] for q, row in enumerate(i2)])
        assert recall_at_k(found, g_idx, 10) >= 0.95, kind  # recall measured again through the public search
        assert (i2[:, 0] == np.arange(len(x)) + 1000).mean() > 0.99  # ids are the ones given at build time
    with pytest.raises(EmbedkitError, match="ivfpq needs at least"):
        build_index(x, "ivfpq")
    # k larger than the few IVF lists a query probes hold: those queries are answered exactly, no holes
    s3, i3 = knn(x, x, 200, method="ivf", exclude_self=True)
    e3, j3 = knn(x, x, 200, method="exact", exclude_self=True)
    assert (i3 >= 0).all() and not (i3 == np.arange(len(x))[:, None]).any()
    assert recall_at_k(i3, j3, 200) > 0.95 and np.all(s3 <= e3 + 1e-5)


def test_item_lookup_returns_itself_first_with_sheet_csv_and_group_exclusion(lite0, lite0_store_ro, tmp_path):
    s, _, _ = lite0
    item, group = str(s.ids[7]), str(s.groups[7])
    out = invoke_cli("neighbors", lite0_store_ro, item, "-k", "6", "--sheet", tmp_path / "sheet.png", "--out", tmp_path / "nn.csv")
    rows = _table(out.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["id"] == item and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert all(a["similarity"] >= b["similarity"] for a, b in zip(rows, rows[1:]))
    assert "exact scan" in out.stdout  # no index was built for this store
    _assert_png(tmp_path / "sheet.png", min_width=600)
    import pandas as pd

    table = pd.read_csv(tmp_path / "nn.csv")
    assert list(table.columns) == ["query", "rank", "id", "label", "group", "similarity"] and len(table) == 6
    hidden = _table(invoke_cli("neighbors", lite0_store_ro, item, "-k", "6", "--exclude-same-group").stdout)
    assert len(hidden) == 6 and all(r["group"] != group for r in hidden)
    assert hidden[0]["id"] == next(r["id"] for r in rows if r["group"] != group)


def test_image_file_and_csv_queries_are_embedded_like_the_store(lite0, lite0_store_ro, tmp_path):
    s, _, _ = lite0
    a, b = 3, 250
    for n in (a, b):
        shutil.copy(s.abspath(str(s.column("path")[n])), tmp_path / f"q{n}.png")
    (tmp_path / "queries.csv").write_text(f"path,note\nq{a}.png,x\nq{b}.png,y\n")
    out = invoke_cli("neighbors", lite0_store_ro, tmp_path / "queries.csv", "-k", "2", "--sheet", tmp_path / "s.png").stdout
    firsts = [r for r in _table(out) if r["rank"] == 1]
    assert [r["id"] for r in firsts] == [str(s.ids[a]), str(s.ids[b])]
    assert all(r["similarity"] > 0.9999 for r in firsts)  # the files of store items give back their own vectors
    _assert_png(tmp_path / "s.png", min_width=300)
    (tmp_path / "ids.csv").write_text(f"id\n{s.ids[b]}\n")
    assert _table(invoke_cli("neighbors", lite0_store_ro, tmp_path / "ids.csv", "-k", "1").stdout)[0]["id"] == str(s.ids[b])


def test_index_is_saved_with_a_record_and_goes_stale_when_rows_are_added(lite0_store, mitocheck_dir, tmp_path):
    out = invoke_cli("index", lite0_store).stdout
    assert "auto: 320 rows < 50,000: exact flat search" in out
    record = json.loads(Path(str(lite0_store).replace(".h5", f".{KEY}.faiss.json")).read_text())
    assert record["kind"] == "flat" and record["n_rows"] == 320 and record["key"] == KEY
    assert "up to date" in invoke_cli("index", lite0_store, "--status").stdout
    out = invoke_cli("index", lite0_store, "--kind", "hnsw").stdout
    assert "hnsw index of 320 rows" in out
    rec = json.loads(Path(str(lite0_store).replace(".h5", f".{KEY}.faiss.json")).read_text())
    assert rec["recall_at_10"] >= 0.95 and rec["params"]["efSearch"] >= 16
    from embedkit.store import Store

    item = str(Store(lite0_store).ids[0])
    assert "computed PCA of 320 rows" in invoke_cli("view", lite0_store, "--method", "pca", "--out", tmp_path / "p.png").stdout
    used = invoke_cli("neighbors", lite0_store, item, "-k", "3")
    assert "(hnsw)" in used.stdout and _table(used.stdout)[0]["id"] == item
    # two more cells arrive in the store: the saved index no longer covers it
    extra = tmp_path / "more" / "Interphase"
    extra.mkdir(parents=True)
    for f in sorted((mitocheck_dir / "Interphase").glob("*.png"))[:2]:
        shutil.copy(f, extra / f"new_{f.name}")
    invoke_cli("embed", extra.parent, "--store", lite0_store, "--quiet")
    status = run_cli("index", lite0_store, "--status", check=False)
    assert status.returncode == 1 and "stale" in status.stdout and "+2 embedded rows" in status.stdout
    new_id = f"Interphase/new_{sorted((mitocheck_dir / 'Interphase').glob('*.png'))[0].name}"
    looked = invoke_cli("neighbors", lite0_store, new_id, "-k", "2")
    assert "is stale" in looked.stderr and "searching exactly" in looked.stderr
    assert _table(looked.stdout)[0]["id"] == new_id  # the new row is found although the index lacks it
    invoke_cli("index", lite0_store)
    assert "up to date" in invoke_cli("index", lite0_store, "--status").stdout
    # the saved PCA view is stale too: it is recomputed, not reused
    assert "computed PCA of 322 rows" in invoke_cli("view", lite0_store, "--method", "pca", "--out", tmp_path / "p.png").stdout


def test_image_queries_use_the_keys_configuration_and_refuse_unrebuildable_weights(mitocheck_dir, tmp_path):
    from embedkit.embed import embed
    from embedkit.encoders import create_encoder
    from embedkit.sources import discover

    src = tmp_path / "cells" / "Prometaphase"
    src.mkdir(parents=True)
    files = sorted((mitocheck_dir / "Prometaphase").glob("*.png"))[:6]
    for f in files:
        shutil.copy(f, src / f.name)
    store = tmp_path / "small.h5"
    source = discover(str(src.parent), group_by="mitocheck")
    embed(source, store, create_encoder("efficientnet_lite0", image_size=160), key="lite0_160", device="cpu", progress=False)
    embed(source, store, create_encoder("timm:resnet10t", image_size=64, pretrained=False), device="cpu", progress=False)
    query = src / files[2].name
    rows = _table(invoke_cli("neighbors", store, query, "--encoder", "lite0_160", "-k", "2").stdout)
    # embedded at 160 px as the key was: identical vector (at 224 px the same cell gives cosine ~0.85)
    assert rows[0]["id"] == f"Prometaphase/{files[2].name}" and rows[0]["similarity"] > 0.9999
    refused = run_cli("neighbors", store, query, "--encoder", "timm_resnet10t", check=False)
    assert refused.returncode == 2 and "randomly initialised" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    by_id = _table(invoke_cli("neighbors", store, f"Prometaphase/{files[2].name}", "--encoder", "timm_resnet10t", "-k", "1").stdout)
    assert by_id[0]["similarity"] == pytest.approx(1.0, abs=1e-4)  # stored vectors still work


def test_clear_errors_for_unknown_ids_and_unreadable_queries(lite0_store_ro, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "unknown.csv").write_text("id\nAnaphase/nope.png\n")
    (tmp_path / "notes.json").write_text("{}")
    cases = [("Anaphase/PLLT0017_19--does-not-exist.png", "neither an item id"),
             (bad, "not a readable image"),
             (tmp_path, "is a folder"),
             (tmp_path / "empty.csv", "empty"),
             (tmp_path / "unknown.csv", "unknown.csv entry 1"),
             (tmp_path / "notes.json", "not an image")]
    for query, message in cases:
        proc = run_cli("neighbors", lite0_store_ro, query, check=False)
        assert proc.returncode == 2, query
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_cli("neighbors", lite0_store_ro, "x", "--encoder", "dinov2_vits14", check=False)
    assert proc.returncode == 2 and "no embeddings for 'dinov2_vits14'" in proc.stderr


def _assert_png(path: Path, min_width: int) -> None:
    from PIL import Image

    assert path.exists()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_width
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 10  # a drawn picture, not a blank canvas
