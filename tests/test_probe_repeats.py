"""Repeated splits by default, CIs over splits and groups, --refit trainval, non-convergence in the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import invoke_cli
from embedkit.baselines import BASELINES
from embedkit.metrics import group_bootstrap, split_group_bootstrap
from embedkit.probe import HeadOptions, ProbeSettings, load_probe, run_probe, summary_table
from embedkit.splits import Splits, SplitSpec

TWO_C = HeadOptions(c_grid=(1e-2, 1.0), k_grid=(5,), max_iter=100)


def _run(correct_rate: float, n_groups: int, rng: np.random.Generator, name: str):
    """Binary predictions of one run: 10 cells per group, each right with ``correct_rate``."""
    y = rng.integers(0, 2, n_groups * 10)
    right = rng.random(len(y)) < correct_rate
    pred = np.where(right, y, 1 - y)
    proba = np.eye(2)[pred] * 0.8 + 0.1
    groups = np.repeat([f"{name}-g{i}" for i in range(n_groups)], 10)
    return y, proba, groups, np.full(len(y), name)


def test_pooled_ci_holds_split_to_split_variance():
    rng = np.random.default_rng(0)
    runs = [_run(0.95, 40, rng, "a"), _run(0.60, 40, rng, "b")]
    y, proba, groups, names = (np.concatenate(parts) for parts in zip(*runs))
    pooled = split_group_bootstrap(y, proba, groups, names, n_boot=400, with_auroc=False)["balanced_accuracy"]
    within = [group_bootstrap(r[0], r[1], r[2], n_boot=400, with_auroc=False)["balanced_accuracy"] for r in runs]
    # each run's own interval is narrow and excludes the other run; the pooled one spans both runs
    assert within[0][0] > within[1][1]
    assert pooled[0] <= within[1][1] and pooled[1] >= within[0][0]
    one_run = group_bootstrap(y, proba, groups, n_boot=400, with_auroc=False)["balanced_accuracy"]
    assert pooled[1] - pooled[0] > one_run[1] - one_run[0]  # wider than treating all items as one split


def test_python_defaults_match_the_cli():
    s = ProbeSettings()
    assert tuple(s.baselines) == BASELINES and s.split.seeds is None
    assert s.split.repeated(5).seeds == 5 and SplitSpec(folds=5).repeated(5).seeds is None


def test_probe_runs_five_grouped_splits_by_default(lite0_store_ro, tmp_path):
    out = tmp_path / "r"
    proc = invoke_cli("probe", lite0_store_ro, "--heads", "logreg", "--no-baselines", "--C", "0.01,1", "--n-boot", "100",
                      "--out", out, "--quiet")
    splits = Splits.load(out / "splits.json")
    assert len(splits.folds) == 5 and splits.meta["runs"] == [f"seed{i}" for i in range(5)]
    assert "mean of 5 runs" in proc.stdout and "QUICK LOOK" not in proc.stdout
    rec = json.loads((out / "logreg" / "metrics.json").read_text())
    per_run = [r["balanced_accuracy"] for r in rec["runs"].values()]
    assert len(per_run) == 5 and len(set(per_run)) > 1
    assert rec["metrics"]["balanced_accuracy"] == pytest.approx(np.mean(per_run))
    lo, hi = rec["ci"]["balanced_accuracy"]
    assert lo <= rec["metrics"]["balanced_accuracy"] <= hi and "pooled over runs" in rec["ci_method"]


def test_refit_trainval_retrains_with_the_chosen_value(lite0_store_ro, tmp_path):
    base = dict(heads=("logreg",), head_options=TWO_C, n_boot=100, baselines=(), split=SplitSpec(seeds=1))
    plain = run_probe(lite0_store_ro, tmp_path / "a", settings=ProbeSettings(**base), progress=False)
    refit = run_probe(lite0_store_ro, tmp_path / "b", settings=ProbeSettings(**base, refit="trainval"), progress=False)
    fold = refit.splits.folds[0]
    a, b = load_probe(tmp_path / "a" / "logreg" / "probe"), load_probe(tmp_path / "b" / "logreg" / "probe")
    assert a.params["C"] == b.params["C"] and b.params["refit"] == "train+val"
    assert a.provenance["n_train"] == len(fold.train)
    assert b.provenance["n_train"] == len(fold.train) + len(fold.val)
    assert not np.allclose(a.arrays["weight"], b.arrays["weight"])
    assert refit.results[0].record["refit"] == "train+val" and plain.results[0].record["refit"] == "train only"


def test_non_convergence_is_printed_in_the_table(lite0_store_ro, tmp_path):
    opts = HeadOptions(c_grid=(1.0, 100.0), max_iter=2)
    rep = run_probe(lite0_store_ro, tmp_path, progress=False, settings=ProbeSettings(
        heads=("svm",), head_options=opts, n_boot=100, baselines=(), split=SplitSpec(seeds=1)))
    assert "NOT CONVERGED (1/1 runs)" in summary_table(rep)
    assert any("did NOT converge" in n for n in rep.notes)
    assert "NOT CONVERGED" in (tmp_path / "summary.md").read_text()


def test_seeds_give_different_grouped_splits_even_when_shuffling_cannot():
    """Groups with distinct class spreads: StratifiedGroupKFold's shuffle alone would return one partition."""
    from embedkit.splits import make_splits

    rng = np.random.default_rng(0)
    groups = np.repeat([f"g{i}" for i in range(30)], 20)
    labels = np.array([f"c{int(v)}" for v in (rng.random(600) * (1 + np.repeat(np.arange(30), 20) % 4)).astype(int)])
    ids = [f"i{k}" for k in range(600)]
    tests = [frozenset(make_splits(ids, labels, groups, seed=s).folds[0].test) for s in range(5)]
    assert len(set(tests)) == 5
    assert all(not (a & b) for k, a in enumerate(tests) for b in tests[k + 1:])  # disjoint, like 5-fold CV
