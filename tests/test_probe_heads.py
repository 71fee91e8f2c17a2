"""Heads, preprocessing, hyper-parameter choice and error handling, through the Python API on real embeddings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from embedkit.errors import EmbedkitError
from embedkit.metrics import group_bootstrap
from embedkit.probe import HeadOptions, ProbeSettings, load_probe, run_probe
from embedkit.probe.features import Preprocessor, balance, threads_for
from embedkit.probe.heads import LinearProblem
from embedkit.splits import SplitSpec
from embedkit.probe.saved import linear_scores, softmax
from embedkit.splits import Splits
from embedkit.store import Store, transaction, write_lock

KEY = "efficientnet_lite0"
FAST = HeadOptions(c_grid=(1e-3, 1e-2, 0.1, 1.0), k_grid=(1, 5, 20), max_iter=100)


def settings(**kw) -> ProbeSettings:
    return ProbeSettings(**{"heads": ("logreg", "svm", "knn"), "head_options": FAST, "n_boot": 200, "baselines": (),
                            "split": SplitSpec(seeds=1), **kw})


def edit_items(path, **columns) -> None:
    """Overwrite item columns (label/group: {row: value}) or the done mask (done: rows) in a store copy."""
    with write_lock(path), transaction(path) as f:
        for name, values in columns.items():
            if name == "done":
                f["embeddings"][KEY]["done"][np.sort(values)] = False
                continue
            ds = f["items"][name]
            for row, value in values.items():
                ds[row] = value


def arrays(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = Store(path)
    return s.vectors(KEY), s.labels, s.groups


def test_logreg_matches_scikit_learn_on_real_embeddings(lite0_store_ro):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x, labels, _ = arrays(lite0_store_ro)
    classes = sorted(set(labels))
    y = np.array([classes.index(lab) for lab in labels])
    train, test = np.arange(0, 320, 2), np.arange(1, 320, 2)
    pre = Preprocessor().fit(x, train)
    with threads_for(0), threadpool_limits(1):
        w, b, _ = LinearProblem(x, train, y[train], None, pre, len(classes)).fit(0.1, "softmax")
        ours = softmax(linear_scores(x, pre, w, b, test))
        z = pre.transform(x)
        ref = LogisticRegression(C=0.1, tol=1e-6, max_iter=2000).fit(z[train], y[train]).predict_proba(z[test])
    np.testing.assert_allclose(ours, ref, atol=5e-3)
    assert (ours.argmax(1) == ref.argmax(1)).all()


def test_preprocessing_uses_train_statistics_and_folds_exactly(lite0_store_ro):
    x, _, _ = arrays(lite0_store_ro)
    train = np.arange(100)
    with threads_for(0):
        pre = Preprocessor(l2=True, pca_whiten=True).fit(x, train)
    xl = x[train] / np.linalg.norm(x[train], axis=1, keepdims=True)
    np.testing.assert_allclose(pre.mean, xl.mean(0), rtol=1e-4, atol=1e-6)
    z = pre.transform(x, train)
    np.testing.assert_allclose(np.cov(z.T), np.eye(z.shape[1]), atol=1e-3)  # whitened on train
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, pre.out_dim)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    np.testing.assert_allclose(linear_scores(x, pre, w, b), pre.transform(x) @ w.T + b, rtol=1e-3, atol=1e-3)


def test_balancing_modes():
    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    rng = np.random.default_rng(0)
    pos, w = balance(y, "weights", rng)
    assert len(pos) == 45 and np.allclose(np.bincount(y, weights=w), 15)
    pos, w = balance(y, "oversample", rng)
    assert w is None and np.bincount(y[pos]).tolist() == [30, 30, 30] and set(pos) == set(range(45))
    pos, _ = balance(y, "undersample", rng)
    assert np.bincount(y[pos]).tolist() == [5, 5, 5] and len(set(pos)) == 15
    with pytest.raises(EmbedkitError, match="unknown --balance"):
        balance(y, "smote", rng)


def test_hyperparameters_are_chosen_without_touching_test(lite0_store, tmp_path):
    first = run_probe(lite0_store, tmp_path / "a", settings=settings(), progress=False)
    fold = first.splits.folds[0]
    row_of = {i: r for r, i in enumerate(Store(lite0_store).ids)}
    classes = first.classes
    # scramble every test label (each test cell now claims a different class); train and val stay as they are
    true = Store(lite0_store).labels
    edit_items(lite0_store, label={row_of[i]: classes[(classes.index(true[row_of[i]]) + 5) % len(classes)]
                                   for i in fold.test})
    second = run_probe(lite0_store, tmp_path / "b", splits_path=str(tmp_path / "a" / "splits.json"),
                       settings=settings(), progress=False)
    for a, b in zip(first.results, second.results):
        assert a.record["hyperparameters"] == b.record["hyperparameters"], a.head
        assert a.record["splits_fingerprint"] == b.record["splits_fingerprint"]
        for name in ("weight", "bias", "bank", "bank_labels"):
            if name in a.probe.arrays:
                assert np.array_equal(a.probe.arrays[name], b.probe.arrays[name]), (a.head, name)
        assert b.record["metrics"]["accuracy"] < a.record["metrics"]["accuracy"]  # test labels did change


def test_confidence_interval_widens_with_fewer_groups(lite0_store_ro, tmp_path):
    rep = run_probe(lite0_store_ro, tmp_path, settings=settings(heads=("logreg",)), progress=False)
    rec = rep.results[0].record
    pred = pd.read_csv(tmp_path / "logreg" / "predictions.csv", keep_default_na=False)
    assert rec["n_test_groups"] == pred["group"].nunique() == 16
    classes = rep.classes
    y = pred["true"].map(classes.index).to_numpy()
    p = pred[[f"p_{c}" for c in classes]].to_numpy()
    lo, hi = group_bootstrap(y, p, pred["group"].to_numpy(), n_boot=500)["balanced_accuracy"]
    assert lo <= rec["metrics"]["balanced_accuracy"] <= hi
    # The same 64 predictions, grouped so that cells of one group share their outcome (as near-duplicate
    # cells of one movie do): the fewer the independent groups, the wider an honest interval must be.
    correct = p.argmax(1) == y
    rank = np.empty(len(y), dtype=int)
    rank[np.argsort(correct, kind="stable")] = np.arange(len(y))
    widths = []
    for n_groups in (64, 16, 4):
        groups = (rank * n_groups // len(y)).astype(str)
        lo, hi = group_bootstrap(y, p, groups, n_boot=500, with_auroc=False)["balanced_accuracy"]
        assert lo <= rec["metrics"]["balanced_accuracy"] <= hi
        widths.append(hi - lo)
    assert np.all(np.diff(widths) > 0), widths


def test_multiple_runs_give_mean_and_sd(lite0_store_ro, tmp_path):
    rep = run_probe(lite0_store_ro, tmp_path, settings=settings(heads=("logreg",), split=SplitSpec(folds=3)), progress=False)
    rec = rep.results[0].record
    assert rep.run_names == ["fold0", "fold1", "fold2"] and len(rec["runs"]) == 3
    assert rec["across_runs"]["balanced_accuracy"]["sd"] > 0
    pred = pd.read_csv(tmp_path / "logreg" / "predictions.csv", keep_default_na=False)
    assert len(pred) == 320 and pred["id"].is_unique  # K-fold: every labelled cell is tested exactly once
    splits = Splits.load(tmp_path / "splits.json")
    assert len(splits.folds) == 3 and splits.meta["runs"] == rep.run_names


def test_unlabelled_and_unembedded_items(lite0_store, tmp_path):
    edit_items(lite0_store, label={r: "" for r in range(0, 320, 16)}, done=np.arange(1, 320, 32))
    rep = run_probe(lite0_store, tmp_path, settings=settings(heads=("logreg",)), progress=False)
    assert any("10 of 320 items have no vectors" in n for n in rep.notes)
    ids = Store(lite0_store).ids
    unlabelled, missing = set(ids[::16]), set(ids[1::32])
    split_ids = {i for f in rep.splits.folds for part in ("train", "val", "test") for i in f.part(part)}
    assert not split_ids & (unlabelled | missing)
    pred = pd.read_csv(tmp_path / "logreg" / "predictions.csv", keep_default_na=False)
    assert set(pred.loc[pred["true"] == "", "id"]) == unlabelled  # predicted, never scored
    assert not set(pred["id"]) & missing
    rec = json.loads((tmp_path / "logreg" / "metrics.json").read_text())
    assert rec["metrics"]["n"] == len(rep.splits.folds[0].test)


def test_clear_errors(lite0_store, lite0_store_ro, tmp_path):
    s = settings(heads=("logreg",))
    with pytest.raises(EmbedkitError, match="unknown head 'tree'"):
        run_probe(lite0_store_ro, tmp_path, settings=settings(heads=("logreg", "tree")), progress=False)
    with pytest.raises(EmbedkitError, match=r"'Mitosis' have no labelled items"):
        run_probe(lite0_store_ro, tmp_path, settings=settings(classes=("Interphase", "Mitosis")), progress=False)
    with pytest.raises(EmbedkitError, match="only one class"):
        run_probe(lite0_store_ro, tmp_path, settings=settings(classes=("Interphase",)), progress=False)
    # a class whose cells all come from one movie cannot be both trained on and tested
    labels = Store(lite0_store).labels
    edit_items(lite0_store, group={r: "one-movie" for r in np.flatnonzero(labels == "Folded")})
    with pytest.raises(EmbedkitError, match="class 'Folded' has no training items .* 1 group"):
        run_probe(lite0_store, tmp_path, settings=s, progress=False)
    edit_items(lite0_store, label={r: "" for r in range(320)})
    with pytest.raises(EmbedkitError, match="has a label"):
        run_probe(lite0_store, tmp_path, settings=s, progress=False)


def test_leaky_splits_file_is_refused_naming_the_group(lite0_store_ro, tmp_path):
    rep = run_probe(lite0_store_ro, tmp_path / "a", settings=settings(heads=("knn",)), progress=False)
    d = json.loads((tmp_path / "a" / "splits.json").read_text())
    moved = d["folds"][0]["test"].pop()
    d["folds"][0]["train"].append(moved)
    (tmp_path / "leaky.json").write_text(json.dumps(d))
    group = dict(zip(rep.data.ids, rep.data.groups))[moved]
    with pytest.raises(EmbedkitError, match=f"leak .*{group}"):
        run_probe(lite0_store_ro, tmp_path / "b", splits_path=str(tmp_path / "leaky.json"),
                  settings=settings(heads=("knn",)), progress=False)
    with pytest.raises(EmbedkitError, match="--splits fixes the runs"):
        run_probe(lite0_store_ro, tmp_path / "b", splits_path=str(tmp_path / "a" / "splits.json"),
                  settings=settings(heads=("knn",), split=SplitSpec(seeds=2)), progress=False)


def test_group_by_regex_regroups_the_splits(lite0_store_ro, tmp_path):
    plate = r"PLLT(\d+)_"
    rep = run_probe(lite0_store_ro, tmp_path, group_by=plate, settings=settings(heads=("knn",)), progress=False)
    assert rep.data.group_by == plate
    path_of = dict(zip(Store(lite0_store_ro).ids, Store(lite0_store_ro).column("path")))
    fold = rep.splits.folds[0]
    plates = {p: {path_of[i].split("PLLT")[1][:4] for i in fold.part(p)} for p in ("train", "val", "test")}
    assert not plates["train"] & plates["test"] and not plates["val"] & plates["test"]


def test_saved_probe_refuses_other_configs_and_bad_files(lite0_store_ro, tmp_path):
    rep = run_probe(lite0_store_ro, tmp_path, settings=settings(heads=("svm",)), progress=False)
    probe = load_probe(tmp_path / "svm" / "probe")
    cfg = dict(Store(lite0_store_ro).config(KEY))
    probe.check_config(cfg)
    assert probe.calibration["method"] == "temperature" and probe.calibration["temperature"] > 0
    cfg["pooling"] = "mean"
    with pytest.raises(EmbedkitError, match="pooling"):
        probe.check_config(cfg)
    meta = json.loads((tmp_path / "svm" / "probe" / "probe.json").read_text())
    meta["version"] = 99
    (tmp_path / "svm" / "probe" / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(EmbedkitError, match="newer"):
        load_probe(tmp_path / "svm" / "probe")
    assert rep.results[0].probe.head == "svm"
