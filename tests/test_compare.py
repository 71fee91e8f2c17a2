"""embedkit compare: one table over result folders, paired tests, and refusal of mismatched splits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from embedkit.errors import EmbedkitError
from embedkit.report import compare_results
from embedkit.results import predictions_frame, write_results
from embedkit.splits import make_splits


def _logreg_result(store_path: Path, out: Path, *, seed: int = 0, shuffle_labels: bool = False, name: str) -> Path:
    """A probe-style result folder: logistic regression on the store's real lite0 vectors, written by write_results."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from embedkit.store import Store

    s = Store(store_path)
    ids, labels, groups = s.ids, s.labels, s.groups
    splits = make_splits(ids, labels, groups, seed=seed, group_by="mitocheck")
    fold = splits.folds[0]
    row = {i: r for r, i in enumerate(ids)}
    tr, te = [row[i] for i in fold.train], [row[i] for i in fold.test]
    x = s.vectors(s.keys[0])
    y_train = labels[tr].copy()
    if shuffle_labels:
        np.random.default_rng(0).shuffle(y_train)
    classes = sorted(set(labels[tr + te]))
    with threadpool_limits(1):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[tr], y_train)
    proba = np.zeros((len(te), len(classes)))
    proba[:, [classes.index(c) for c in clf.classes_]] = clf.predict_proba(x[te])
    write_results(out, predictions_frame(list(fold.test), groups[te], labels[te], proba, classes), classes,
                  {"kind": "probe", "name": name, "encoder": "efficientnet_lite0", "head": "logreg",
                   "splits_fingerprint": splits.fingerprint(), "fit_seconds": 0.5, "predict_items_per_second": 2.0e4},
                  n_boot=200)
    return out


@pytest.fixture(scope="module")
def results(lite0_store_ro, tmp_path_factory) -> Path:
    """``same/`` holds three results on one split (one a verbatim copy); ``other_split`` used another seed."""
    root = tmp_path_factory.mktemp("results")
    same = root / "same"
    _logreg_result(lite0_store_ro, same / "logreg", name="lite0 + logreg")
    _logreg_result(lite0_store_ro, same / "shuffled", shuffle_labels=True, name="lite0 + logreg on shuffled labels")
    _logreg_result(lite0_store_ro, root / "other_split", seed=1, name="lite0 + logreg, other split")
    shutil.copytree(same / "logreg", same / "logreg_copy")
    rec = json.loads((same / "logreg_copy" / "metrics.json").read_text())
    rec["name"] = "lite0 + logreg (copy)"
    (same / "logreg_copy" / "metrics.json").write_text(json.dumps(rec))
    return root


def test_identical_results_pair_to_a_ci_containing_zero(results, tmp_path):
    rep = compare_results([results / "same" / "logreg", results / "same" / "logreg_copy"], out=tmp_path,
                          pairs=[("lite0 + logreg", "lite0 + logreg (copy)")])
    (p,) = rep.pairs
    assert p["n_paired"] == rep.rows[0]["n_test"]
    assert p["ci"][0] <= 0.0 <= p["ci"][1]
    assert p["diff_balanced_accuracy"] == 0.0
    assert p["mcnemar"]["p_value"] == 1.0


def test_a_real_difference_is_detected(results, tmp_path):
    rep = compare_results([results / "same" / "logreg", results / "same" / "shuffled"], out=tmp_path)
    assert rep.rows[0]["name"] == "lite0 + logreg"  # best first
    (p,) = rep.pairs  # default: every row against the best; Δ = row − best
    assert p["a"] == "lite0 + logreg" and p["b"] == "lite0 + logreg on shuffled labels"
    assert p["ci"][1] < 0, p  # learning from shuffled labels is clearly worse
    assert p["mcnemar"]["a_only_correct"] > p["mcnemar"]["b_only_correct"]


def test_outputs_table_csv_json_and_self_contained_html(results, tmp_path):
    rep = compare_results([results / "same"], out=tmp_path / "cmp", pairs=[("logreg", "shuffled")], n_boot=300)
    assert {r["name"] for r in rep.rows} == {"lite0 + logreg", "lite0 + logreg (copy)", "lite0 + logreg on shuffled labels"}
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "balanced accuracy [95% CI]" in md and "training time" in md and "inference" in md
    csv = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert {"balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi", "macro_f1", "auroc", "fit_seconds",
            "predict_items_per_second"} <= set(csv.columns)
    assert (csv["balanced_accuracy_lo"] <= csv["balanced_accuracy"]).all()
    assert (csv["balanced_accuracy"] <= csv["balanced_accuracy_hi"]).all()
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 + 2 * len(csv)  # forest + pairs plots, each result's figures
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "the page must not reference external files"
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["pairs"][0]["b"] == "lite0 + logreg on shuffled labels"


def test_mismatched_splits_are_refused_unless_allowed(results, tmp_path):
    proc = run_cli("compare", results / "same" / "logreg", results / "other_split", "--out", tmp_path / "refused", check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "same splits" in proc.stderr and "--allow-different-splits" in proc.stderr
    assert not (tmp_path / "refused").exists()

    rep = compare_results([results / "same" / "logreg", results / "other_split"], out=tmp_path / "allowed",
                          allow_different_splits=True)
    assert rep.warnings and "different splits" in rep.warnings[0]
    for f in ("comparison.md", "comparison.html", "comparison.csv"):
        assert "different splits" in (tmp_path / "allowed" / f).read_text(), f


def test_results_without_recorded_splits_are_refused(results, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(results / "same" / "logreg", bare)
    rec = json.loads((bare / "metrics.json").read_text())
    del rec["splits_fingerprint"]
    (bare / "metrics.json").write_text(json.dumps(rec))
    with pytest.raises(EmbedkitError, match="none recorded"):
        compare_results([results / "same" / "logreg", bare], out=tmp_path / "x")


def test_bad_inputs_fail_clearly(results, tmp_path):
    with pytest.raises(EmbedkitError, match="no result folders"):
        compare_results([tmp_path], out=tmp_path / "x")
    with pytest.raises(EmbedkitError, match="matches no result"):
        compare_results([results / "same" / "logreg", results / "same" / "shuffled"], out=tmp_path / "x", pairs=[("logreg", "nope")])
