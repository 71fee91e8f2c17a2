"""End to end: `embedkit probe`, `embedkit predict` on the bundled MitoCheck sample (real lite0 embeddings)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import MITOCHECK, invoke_cli, run_cli
from embedkit.errors import EmbedkitError
from embedkit.probe import HEADS, load_probe
from embedkit.splits import PARTS, Splits
from embedkit.store import Store

CONTRACT = ("kind", "name", "encoder", "encoder_config_fingerprint", "head", "splits_fingerprint", "group_by",
            "fit_seconds", "predict_items_per_second", "hyperparameters")


@pytest.fixture(scope="module")
def demo(lite0_store_ro, tmp_path_factory):
    """The README demo: every head on the 320-cell sample."""
    out = tmp_path_factory.mktemp("probe") / "demo"
    proc = invoke_cli("probe", lite0_store_ro, "--heads", "all", "--seeds", "1", "--out", out, "--quiet")
    return out, proc.stdout


def test_demo_prints_table_and_writes_every_result_file(demo):
    out, stdout = demo
    assert "leak check" not in stdout  # movie groups of several cells each look safe: no automatic check
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("head"))
    assert [line.split()[0] for line in lines[header + 1:header + 4]] == list(HEADS)
    assert "balanced acc [95% CI]" in lines[header]
    assert "SINGLE-SPLIT QUICK LOOK (--seeds 1)" in stdout
    assert (out / "splits.json").exists() and (out / "summary.md").exists()
    for head in HEADS:
        for name in ("metrics.json", "predictions.csv", "confusion.png", "roc.png", "summary.md",
                     "probe/probe.json", "probe/probe.safetensors"):
            assert (out / head / name).stat().st_size > 0, (head, name)


def test_metrics_carry_the_contract_other_stages_read(demo, lite0_store_ro):
    out, _ = demo
    splits = Splits.load(out / "splits.json")
    cfg = Store(lite0_store_ro).config("efficientnet_lite0")
    for head in HEADS:
        rec = json.loads((out / head / "metrics.json").read_text())
        assert all(k in rec for k in CONTRACT), [k for k in CONTRACT if k not in rec]
        assert rec["kind"] == "probe" and rec["head"] == head and rec["name"] == f"efficientnet_lite0/{head}"
        assert rec["splits_fingerprint"] == splits.fingerprint()
        assert rec["fit_seconds"] > 0 and rec["predict_items_per_second"] > 0
        assert ("k" if head == "knn" else "C") in rec["hyperparameters"]
        meta = json.loads((out / head / "probe" / "probe.json").read_text())
        assert meta["format"] == "embedkit-probe" and meta["version"] == 1 and meta["head"] == head
        assert meta["encoder_config"] == cfg and meta["config_fingerprint"] == rec["encoder_config_fingerprint"]
        # the 95% CI brackets its point estimate for every headline metric
        for m, (lo, hi) in rec["ci"].items():
            assert lo <= rec["metrics"][m] <= hi, (head, m)


def test_splits_never_put_one_movie_in_two_parts(demo, lite0_store_ro):
    out, _ = demo
    s = Store(lite0_store_ro)
    group_of = dict(zip(s.ids, s.groups))
    fold = Splits.load(out / "splits.json").folds[0]
    parts = {p: {group_of[i] for i in fold.part(p)} for p in PARTS}
    assert parts["train"] and parts["val"] and parts["test"]
    assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
    assert sum(len(fold.part(p)) for p in PARTS) == 320
    pred = pd.read_csv(out / "logreg" / "predictions.csv", keep_default_na=False)
    assert set(pred["id"]) == set(fold.test)  # every scored item is a test item


def test_saved_probes_round_trip_to_the_same_probabilities(demo, lite0_store_ro):
    import torch

    out, _ = demo
    s = Store(lite0_store_ro)
    row_of = {i: r for r, i in enumerate(s.ids)}
    for head in HEADS:
        pred = pd.read_csv(out / head / "predictions.csv", keep_default_na=False)
        probe = load_probe(out / head / "probe")
        x = s.vectors("efficientnet_lite0", np.array([row_of[i] for i in pred["id"]]))
        again = probe.predict_proba(x)
        np.testing.assert_allclose(again, pred[[f"p_{c}" for c in probe.classes]].to_numpy(), atol=1e-5)  # float32 sums
        if head == "knn":
            with pytest.raises(EmbedkitError, match="not differentiable"):
                probe.torch_module()
        else:  # the differentiable module the explain stage composes with the encoder gives the same answer
            with torch.no_grad():
                logits = probe.torch_module()(torch.from_numpy(x))
            np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), again, atol=1e-5)


def test_predict_refuses_embeddings_of_another_encoder_configuration(demo, lite0_store, tmp_path):
    from embedkit.embed import embed
    from embedkit.encoders import create_encoder
    from embedkit.sources import discover

    out, _ = demo
    src = discover(MITOCHECK, group_by="mitocheck")
    src.items = src.items[::10]  # a few cells are enough for a second key
    embed(src, lite0_store, create_encoder("efficientnet_lite0", image_size=64), key="lite0_64", progress=False)
    bad = run_cli("predict", lite0_store, "--probe", out / "logreg" / "probe", "--encoder", "lite0_64",
                  "--out", tmp_path / "p.csv", check=False)
    assert bad.returncode == 2 and not (tmp_path / "p.csv").exists()
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and "another encoder configuration" in err[0] and "'size': 64" in err[0]
    ok = invoke_cli("predict", lite0_store, "--probe", out / "logreg" / "probe", "--out", tmp_path / "p.csv")
    assert "key 'efficientnet_lite0'" in ok.stdout  # the matching key is found, never guessed
    pred = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(pred) == 320 and set(pred["pred"]) <= set(load_probe(out / "logreg" / "probe").classes)


def test_bad_input_gets_one_clear_line(lite0_store_ro, tmp_path):
    proc = run_cli("probe", lite0_store_ro, "--heads", "logreg,forest", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "embedkit: error: unknown head 'forest'; choose from logreg, svm, knn or all"
    assert not (tmp_path / "o").exists()
    proc = run_cli("predict", lite0_store_ro, "--probe", tmp_path, "--out", tmp_path / "p.csv", check=False)
    assert proc.returncode == 2 and "not a saved probe" in proc.stderr


def test_unsafe_groups_trigger_the_automatic_leak_check(lite0_store_ro, tmp_path):
    """Every file its own group is the grouping that hides copies: probe checks a sample and says what it found."""
    args = ("probe", lite0_store_ro, "--encoder", "efficientnet_lite0", "--heads", "logreg", "--seeds", "1",
            "--no-baselines", "--group-by", "file", "--quiet")
    checked = invoke_cli(*args, "--out", tmp_path / "a").stdout
    line = next(x for x in checked.splitlines() if x.startswith("leak check (every item is its own group)"))
    assert "test items" in line and ("clean" in line or "LEAK" in line)
    assert line in (tmp_path / "a" / "summary.md").read_text()
    assert "leak check" not in invoke_cli(*args, "--no-leak-check", "--out", tmp_path / "b").stdout
