"""Classification metrics with group-bootstrap confidence intervals, and paired comparisons.

Cells of one image or movie are not independent, so every interval resamples whole test groups.
Accuracy, balanced accuracy and macro-F1 are computed from summed per-group confusion matrices, which
makes thousands of bootstrap replicates cheap; AUROC uses the bootstrap counts as sample weights.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CI_LEVEL = 0.95
POINT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrix (rows: true class index, columns: predicted), optionally weighted."""
    cm = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(cm, (y_true, y_pred), 1.0 if weights is None else weights)
    return cm


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (NaN without rows)."""
    classes = np.unique(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in classes])) if len(classes) else float("nan")


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-probability of the true class (clipped at 1e-12; NaN without rows)."""
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None)))) if len(y) else float("nan")


def _from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over classes present) and macro-F1 from a confusion matrix."""
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
    }


class _RankedScores:
    """One-vs-rest scores sorted once, so weighted AUROCs (bootstrap replicates) cost O(N) each."""

    def __init__(self, y_true: np.ndarray, proba: np.ndarray):
        self.targets = [1] if proba.shape[1] == 2 else list(range(proba.shape[1]))
        self.blocks = []
        for c in self.targets:
            pos = (y_true == c).astype(np.float64)
            _, block = np.unique(proba[:, c], return_inverse=True)
            self.blocks.append((pos, block.ravel(), int(block.max()) + 1 if len(block) else 0))

    def auroc(self, weights: np.ndarray | None = None) -> float:
        w = np.ones(len(self.blocks[0][0])) if weights is None else np.asarray(weights, dtype=np.float64)
        scores = []
        for pos, block, nb in self.blocks:
            wp = np.bincount(block, weights=w * pos, minlength=nb)
            wn = np.bincount(block, weights=w * (1 - pos), minlength=nb)
            tp, tn = wp.sum(), wn.sum()
            if tp <= 0 or tn <= 0:
                continue
            below = np.cumsum(wn) - wn
            scores.append(float((wp * (below + 0.5 * wn)).sum() / (tp * tn)))
        return float(np.mean(scores)) if scores else float("nan")


def auroc(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Plain AUROC for two classes; one-vs-rest macro AUROC over the classes present otherwise (ties count half)."""
    return _RankedScores(y_true, proba).auroc(weights)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict:
    """All point metrics for integer labels ``y_true`` and class probabilities ``proba`` [N, K]."""
    k = len(classes)
    y_pred = proba.argmax(axis=1)
    cm = confusion(y_true, y_pred, k)
    out: dict = _from_confusion(cm)
    out["auroc"] = auroc(y_true, proba)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    per_class = {}
    for i, c in enumerate(classes):
        p = tp[i] / predicted[i] if predicted[i] else 0.0
        r = tp[i] / support[i] if support[i] else 0.0
        per_class[str(c)] = {"precision": float(p), "recall": float(r),
                             "f1": float(2 * p * r / (p + r)) if p + r else 0.0, "support": int(support[i])}
    out["per_class"] = per_class
    out["confusion"] = cm.astype(int).tolist()
    out["n"] = int(len(y_true))
    return out


def _group_replicates(y_true: np.ndarray, proba: np.ndarray, groups: Sequence[str], n_boot: int,
                      rng: np.random.Generator, with_auroc: bool) -> dict[str, np.ndarray]:
    """Bootstrap replicates of each metric, resampling whole groups with replacement."""
    k = proba.shape[1]
    y_pred = proba.argmax(axis=1)
    _, g_idx = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(g_idx.max()) + 1
    per_group = np.zeros((n_groups, k, k))
    np.add.at(per_group, (g_idx, y_true, y_pred), 1.0)
    draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)  # [B, G] counts
    values: dict[str, list[float]] = {m: [] for m in POINT_METRICS}
    ranked = _RankedScores(y_true, proba) if with_auroc else None
    if with_auroc:
        values["auroc"] = []
    for counts in draws:
        cm = np.tensordot(counts, per_group, axes=1)
        for m, v in _from_confusion(cm).items():
            values[m].append(v)
        if with_auroc:
            values["auroc"].append(ranked.auroc(counts[g_idx].astype(float)))
    return {m: np.asarray(v) for m, v in values.items()}


def _percentiles(values: dict[str, np.ndarray], level: float) -> dict[str, list[float]]:
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {m: [float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))] for m, v in values.items()}


def group_bootstrap(y_true: np.ndarray, proba: np.ndarray, groups: Sequence[str], *, n_boot: int = 1000,
                    seed: int = 0, level: float = CI_LEVEL, with_auroc: bool = True) -> dict[str, list[float]]:
    """Percentile CIs of accuracy, balanced accuracy, macro-F1 (and AUROC) by resampling whole groups."""
    rng = np.random.default_rng(seed)
    return _percentiles(_group_replicates(y_true, proba, groups, n_boot, rng, with_auroc), level)


def split_group_bootstrap(y_true: np.ndarray, proba: np.ndarray, groups: Sequence[str], runs: Sequence[str], *,
                          n_boot: int = 1000, seed: int = 0, level: float = CI_LEVEL,
                          with_auroc: bool = True) -> dict[str, list[float]]:
    """CIs over repeated splits: whole test groups are resampled within each run and the replicates of all runs pooled.

    The pooled distribution is a mixture of the runs' bootstrap distributions, so its spread holds both the
    group resampling within a split and the split-to-split variance (the runs' centres differ).
    """
    rng = np.random.default_rng(seed)
    runs = np.asarray(runs, dtype=object).astype(str)
    names = list(dict.fromkeys(runs))
    per_run = max(200, int(np.ceil(n_boot / len(names))))  # about n_boot replicates in all
    pooled: dict[str, list[np.ndarray]] = {}
    for name in names:
        sel = runs == name
        for m, v in _group_replicates(y_true[sel], proba[sel], np.asarray(groups, dtype=object)[sel], per_run, rng,
                                      with_auroc).items():
            pooled.setdefault(m, []).append(v)
    return _percentiles({m: np.concatenate(v) for m, v in pooled.items()}, level)


def paired_bootstrap(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, groups: Sequence[str], n_classes: int,
                     *, n_boot: int = 2000, seed: int = 0, level: float = CI_LEVEL) -> dict:
    """Difference in balanced accuracy (B - A) on the same test items, with a group-bootstrap CI."""
    rng = np.random.default_rng(seed)
    _, g_idx = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(g_idx.max()) + 1
    ca = np.zeros((n_groups, n_classes, n_classes))
    cb = np.zeros((n_groups, n_classes, n_classes))
    np.add.at(ca, (g_idx, y_true, pred_a), 1.0)
    np.add.at(cb, (g_idx, y_true, pred_b), 1.0)
    point = _from_confusion(cb.sum(0))["balanced_accuracy"] - _from_confusion(ca.sum(0))["balanced_accuracy"]
    draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    diffs = np.array([_from_confusion(np.tensordot(c, cb, axes=1))["balanced_accuracy"]
                      - _from_confusion(np.tensordot(c, ca, axes=1))["balanced_accuracy"] for c in draws])
    lo, hi = np.percentile(diffs, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return {"diff_balanced_accuracy": float(point), "ci": [float(lo), float(hi)],
            "p_boot": float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))}


def mcnemar(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """McNemar's test on discordant items (exact binomial when there are fewer than 25 of them)."""
    from scipy.stats import binomtest, chi2

    a_ok = pred_a == y_true
    b_ok = pred_b == y_true
    n01 = int((a_ok & ~b_ok).sum())
    n10 = int((~a_ok & b_ok).sum())
    n = n01 + n10
    if n == 0:
        return {"a_only_correct": n01, "b_only_correct": n10, "statistic": 0.0, "p_value": 1.0, "method": "none discordant"}
    if n < 25:
        p = binomtest(n01, n, 0.5).pvalue
        return {"a_only_correct": n01, "b_only_correct": n10, "statistic": float(min(n01, n10)), "p_value": float(p),
                "method": "exact binomial"}
    stat = (abs(n01 - n10) - 1) ** 2 / n
    return {"a_only_correct": n01, "b_only_correct": n10, "statistic": float(stat), "p_value": float(chi2.sf(stat, 1)),
            "method": "chi-squared with continuity correction"}


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
