"""`embedkit proportions`: class fractions of synthetic mixed populations built from held-out real cells."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import invoke_cli
from embedkit.errors import EmbedkitError
from embedkit.probe import HeadOptions, ProbeSettings, run_probe
from embedkit.splits import SplitSpec
from embedkit.probe.proportions import adjusted_count, estimate_proportions
from embedkit.store import Store, transaction, write_lock

#: A binary question with enough cells per side, like chemoresistant vs parental: is a cell in mitosis?
MITOTIC = {"Prometaphase", "Metaphase", "MetaphaseAlignment", "Anaphase"}
INTERPHASE = {"Interphase", "Large", "Elongated", "Binuclear"}
CLASSES = ("mitotic", "interphase")
FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def test_adjusted_count_inverts_a_known_confusion():
    m = np.array([[0.8, 0.15, 0.05], [0.1, 0.7, 0.2], [0.0, 0.3, 0.7]])  # rows: how each true class is predicted
    truth = np.array([0.5, 0.2, 0.3])
    observed = m.T @ truth
    np.testing.assert_allclose(adjusted_count(observed, m), truth, atol=1e-6)
    assert np.abs(observed - truth).max() > 0.05  # plain classify-and-count is biased here


def test_mixed_populations_from_held_out_cells(lite0_store, tmp_path):
    labels = Store(lite0_store).labels
    binary = np.array(["mitotic" if c in MITOTIC else "interphase" if c in INTERPHASE else "" for c in labels], dtype=object)
    with write_lock(lite0_store), transaction(lite0_store) as f:
        f["items"]["label"][:] = binary
    rep = run_probe(lite0_store, tmp_path / "probe", progress=False,
                    settings=ProbeSettings(heads=("logreg", "knn"), n_boot=200, baselines=(), split=SplitSpec(seeds=1),
                                           head_options=HeadOptions(c_grid=(1e-3, 1e-2, 0.1, 1.0))))
    held_out = rep.splits.folds[0].test  # never seen in training nor in choosing C, k or the calibration
    label_of = dict(zip(Store(lite0_store).ids, binary))
    pools = {c: [i for i in held_out if label_of[i] == c] for c in CLASSES}
    assert all(len(v) >= 10 for v in pools.values())
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for f in FRACTIONS:
        for rep_i in range(2):
            name = f"mix{f:.1f}_{rep_i}"
            n_a = int(round(f * 20))
            members = list(rng.choice(pools[CLASSES[0]], n_a)) + list(rng.choice(pools[CLASSES[1]], 20 - n_a))
            rows += [{"id": i, "population": name} for i in members]
            truth[name] = n_a / 20
    with open(tmp_path / "pops.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["id", "population"])
        w.writeheader()
        w.writerows(rows)

    probes = [tmp_path / "probe" / h / "probe" for h in ("logreg", "knn")]
    proc = invoke_cli("proportions", lite0_store, "--probe", probes[0], "--probe", probes[1],
                      "--populations", tmp_path / "pops.csv", "--out", tmp_path / "prop")
    assert "adjusted_count" in proc.stdout and "RMSE" in proc.stdout
    rec = json.loads((tmp_path / "prop" / "proportions.json").read_text())
    assert rec["n_populations"] == rec["n_with_truth"] == 12 and rec["probes"] == [
        "efficientnet_lite0/logreg", "efficientnet_lite0/knn"]
    assert (tmp_path / "prop" / "proportions.png").stat().st_size > 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "prop" / "proportions.csv")
    for method, rmse in rec["rmse"].items():
        df = table[table["method"] == method]
        est = df[f"est_{CLASSES[0]}"].to_numpy()
        true = df["population"].map(truth).to_numpy()
        np.testing.assert_allclose(df[f"true_{CLASSES[0]}"], true)
        assert rmse == pytest.approx(np.sqrt(np.mean((est - true) ** 2)), abs=1e-6)  # two classes: same error twice
        assert np.corrcoef(est, true)[0, 1] > 0.9, method  # the estimates track the known mixing fractions
        assert rmse < 0.16, method  # the oral-cancer study's best (an ensemble) reached 0.16
    print("RMSE per method:", rec["rmse"])


def test_estimate_needs_items():
    with pytest.raises(EmbedkitError, match="no population"):
        estimate_proportions(np.zeros((0, 2)), {"a": np.array([], int)}, ["x", "y"], np.eye(2))
