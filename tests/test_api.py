"""The Python front door: docs/python.md runs as written, the estimators pass check_estimator, imports stay light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from conftest import ROOT


def _blocks(path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_python_walkthrough_runs_as_written(tmp_path, monkeypatch):
    """Every python block of docs/python.md, in order, in one namespace, from a copy of the repository root."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    blocks = _blocks(ROOT / "docs" / "python.md")
    assert len(blocks) >= 6
    for code in blocks:
        exec(compile(code, "docs/python.md", "exec"), ns)
    assert ns["result"].n_embedded == 320
    m = ns["probes"].metrics
    assert set(m.index) == {"logreg", "knn"} and (m["balanced_accuracy"] > 0.2).all()  # 16 classes: chance is 0.06
    assert len(ns["probes"].predictions) > 0 and (tmp_path / "results/lite0/splits.json").exists()
    assert (tmp_path / "results/comparison/comparison.md").exists()
    assert len(ns["comparison"].rows) == 3  # logreg, knn and the fine-tuned model
    assert ns["adata"].n_obs == 320
    assert list(ns["saved"].predict(ns["X"][:3])) == list(ns["logreg"].predict(ns["X"][:3]))


def test_import_embedkit_loads_no_torch():
    code = "import sys, embedkit as ek; ek.Store; ek.probe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False", out.stderr


def _check(est) -> list[dict]:
    from sklearn.utils.estimator_checks import check_estimator

    from embedkit.probe.estimators import SKIPPED_CHECKS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return check_estimator(est, on_fail=None, expected_failed_checks=SKIPPED_CHECKS)


@pytest.mark.parametrize("name", ["LogRegProbe", "SVMProbe", "KNNProbe"])
def test_estimators_pass_check_estimator(name):
    import embedkit as ek

    est = {"LogRegProbe": lambda: ek.LogRegProbe(max_iter=20, tol=1e-4), "SVMProbe": lambda: ek.SVMProbe(max_iter=20),
           "KNNProbe": lambda: ek.KNNProbe(k=5)}[name]()
    results = _check(est)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed
    assert len(results) > 50


def test_estimator_in_pipeline_saves_and_matches_the_cli_head(lite0_store_ro, tmp_path):
    """In a Pipeline with a group split; saved and loaded it predicts the same; equals the head ek.probe fits."""
    from sklearn.model_selection import GroupShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    import embedkit as ek

    s = ek.Store(lite0_store_ro)
    key = s.resolve_key(None)
    X, y, g = s.vectors(key), s.labels, s.groups
    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=0).split(X, y, g))
    pipe = make_pipeline(FunctionTransformer(), ek.SVMProbe(C=0.1, class_weight="balanced")).fit(X[tr], y[tr])
    pred = pipe.predict(X[te])
    assert set(pred) <= set(y) and (pred == y[te]).mean() > 0.2
    est = pipe[-1]
    est.save(tmp_path / "svm")
    again = ek.SVMProbe.load(tmp_path / "svm")
    assert again.get_params()["C"] == 0.1
    np.testing.assert_allclose(again.predict_proba(X[te]), est.predict_proba(X[te]), atol=1e-6)
    assert ek.load_probe(tmp_path / "svm").head == "svm"
    with pytest.raises(ek.EmbedkitError, match="not a knn"):
        ek.KNNProbe.load(tmp_path / "svm")


def test_help_and_encoders_import_no_torch():
    """`embedkit --help` and `embedkit encoders` answer from specs alone (start-up stays fast)."""
    code = ("import sys; from embedkit.cli import main; main([sys.argv[1]]); "
            "print('TORCH', any(m == 'torch' or m.startswith('torchvision') for m in sys.modules))")
    for arg in ("--help", "encoders"):
        out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert "TORCH False" in out.stdout, (arg, out.stderr[-500:])
    assert "efficientnet_lite0" in out.stdout and "present" in out.stdout


def test_torchvision_weight_file_names_match_torchvision():
    """The torch-free catalogue names the same files torchvision downloads."""
    from embedkit.encoders import get_spec
    from embedkit.encoders.catalogue import TORCHVISION_FILES
    from embedkit.encoders.torchvision_backend import _weights_enum

    for arch, name in TORCHVISION_FILES.items():
        assert os.path.basename(_weights_enum(get_spec(arch)).url) == name
