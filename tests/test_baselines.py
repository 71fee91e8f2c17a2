"""Baselines every probe is anchored to (random-init, handcrafted, prior) and the preprocessing self-test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MITOCHECK, invoke_cli
from embedkit.baselines.handcrafted import FEATURE_NAMES, cell_features
from embedkit.baselines.random_init import random_encoder
from embedkit.embed import to_tensor
from embedkit.encoders import create_encoder, encoder_from_config
from embedkit.errors import EmbedkitError
from embedkit.images import Conversion, load_rgb
from embedkit.report import compare_results
from embedkit.selftest import preprocess_selftest
from embedkit.store import Store


def test_random_init_is_seeded_random_and_rebuildable():
    a, b, c = (random_encoder("efficientnet_lite0", s) for s in (0, 0, 1))
    trained = create_encoder("efficientnet_lite0")
    assert a.weights_fingerprint == b.weights_fingerprint != c.weights_fingerprint
    assert a.weights_fingerprint != trained.weights_fingerprint
    assert a.config["random_seed"] == 0 and a.config["weights"] == "random-init"
    assert encoder_from_config(a.config).weights_fingerprint == a.weights_fingerprint


def test_store_holds_baseline_keys_with_provenance(lite0_store_ro):
    s = Store(lite0_store_ro)
    assert s.resolve_key(None) == "efficientnet_lite0"  # baseline keys do not make the store ambiguous
    rnd, real = s.config("efficientnet_lite0@random-init"), s.config("efficientnet_lite0")
    assert rnd["random_seed"] == 0 and rnd["weights_fingerprint"] != real["weights_fingerprint"]
    assert rnd["preprocess"] == real["preprocess"] and rnd["conversion"] == real["conversion"]
    assert not np.allclose(s.vectors("efficientnet_lite0@random-init")[:5], s.vectors("efficientnet_lite0")[:5])
    hc = s.config("handcrafted")
    assert hc["feature_names"] == list(FEATURE_NAMES) and s.done("handcrafted").all()
    assert real["selftest"]["passed"] and real["selftest"]["determinism"]["passed"]


def test_handcrafted_features_of_a_real_cell():
    path = sorted((MITOCHECK / "Interphase").glob("*.png"))[0]
    v = cell_features(load_rgb(str(path)))
    assert v.shape == (len(FEATURE_NAMES),) and np.isfinite(v).all()
    area = v[FEATURE_NAMES.index("shape_area")]
    h, w = load_rgb(str(path)).shape[:2]
    assert 0 < area < h * w  # an Otsu mask, not the whole crop


def test_self_test_catches_planted_preprocessing_bugs():
    enc = random_encoder("efficientnet_lite0", 0)
    assert preprocess_selftest(enc, Conversion())["passed"]
    with pytest.raises(EmbedkitError, match="double rescaling"):
        preprocess_selftest(enc, Conversion(), transform=lambda rgb, pre: to_tensor(rgb / 255.0, pre))
    with pytest.raises(EmbedkitError, match="outside the expected range"):
        preprocess_selftest(enc, Conversion(), transform=lambda rgb, pre: to_tensor(rgb, pre) * 255.0)
    with pytest.raises(EmbedkitError, match="constant"):
        preprocess_selftest(enc, Conversion(), transform=lambda rgb, pre: to_tensor(rgb * np.array([1, 1, 0.0]), pre))


@pytest.fixture(scope="module")
def anchored(lite0_store_ro, tmp_path_factory):
    out = tmp_path_factory.mktemp("anchored") / "res"
    proc = invoke_cli("probe", lite0_store_ro, "--heads", "logreg", "--seeds", "1", "--out", out, "--quiet")
    return out, proc.stdout


def test_baselines_are_rows_with_paired_differences(anchored):
    out, stdout = anchored
    for name in ("baseline random-init (logreg)", "baseline handcrafted (logreg)", "baseline prior"):
        assert name in stdout, name
    sentences = [line for line in stdout.splitlines() if line.startswith("efficientnet_lite0/logreg ")]
    assert len(sentences) == 3 and all(("beat" in s or "WORSE" in s) and "Holm" in s for s in sentences)
    prior = json.loads((out / "baselines" / "prior" / "metrics.json").read_text())
    present = sum(1 for v in prior["metrics"]["per_class"].values() if v["support"] > 0)
    assert prior["metrics"]["balanced_accuracy"] == pytest.approx(1 / present)
    enc = json.loads((out / "logreg" / "metrics.json").read_text())
    for name in ("random-init", "handcrafted"):
        rec = json.loads(next((out / "baselines" / name).rglob("metrics.json")).read_text())
        assert rec["splits_fingerprint"] == enc["splits_fingerprint"] and rec["baseline"] == name


def test_baselines_appear_in_compare(anchored, tmp_path):
    out, _ = anchored
    rep = compare_results([out], out=tmp_path / "cmp", n_boot=200)
    kinds = [r["kind"] for r in rep.rows]
    assert kinds.count("baseline") == 3 and kinds.count("probe") == 1
    assert "Holm" in rep.markdown or "Holm" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_no_baselines_flag(lite0_store_ro, tmp_path):
    proc = invoke_cli("probe", lite0_store_ro, "--heads", "knn", "--seeds", "1", "--no-baselines", "--out", tmp_path / "r",
                      "--quiet")
    assert "baseline random-init" not in proc.stdout and "beat" not in proc.stdout and not (tmp_path / "r" / "baselines").exists()
