"""The result folder every evaluated model writes (probes and fine-tuned networks alike).

Files: ``metrics.json`` (point metrics, 95% group-bootstrap CIs, mean ± sd over runs, provenance),
``predictions.csv`` (id, group, true, predicted, run, p_<class>...), ``confusion.png``, ``roc.png`` and a
short ``summary.md``. ``embedkit compare`` reads these folders, so both stages stay comparable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_path, atomic_write_text
from .figures import pyplot, save_figure
from .metrics import classification_metrics, group_bootstrap, split_group_bootstrap
from .store import now_iso

HEADLINE = ("balanced_accuracy", "accuracy", "macro_f1", "auroc")


def predictions_frame(ids: Sequence[str], groups: Sequence[str], true: Sequence[str], proba: np.ndarray,
                      classes: Sequence[str], run: int | str = 0):
    """One row per predicted item; ``true`` is '' for unlabelled items (predicted, never scored)."""
    import pandas as pd

    df = pd.DataFrame({"id": list(ids), "group": list(groups), "true": list(true),
                       "pred": [classes[i] for i in proba.argmax(axis=1)], "run": run})
    for i, c in enumerate(classes):
        df[f"p_{c}"] = proba[:, i]
    return df


def summarize(pred, classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Pooled point metrics + group-bootstrap CIs over scored rows, and mean ± sd across runs."""
    scored = pred[pred["true"] != ""]
    index = {c: i for i, c in enumerate(classes)}
    proba_cols = [f"p_{c}" for c in classes]

    def arrays(df):
        return df["true"].map(index).to_numpy(), df[proba_cols].to_numpy(dtype=np.float64)

    y, p = arrays(scored)
    out = {"metrics": classification_metrics(y, p, classes)}
    out["n_test_groups"] = int(scored["group"].nunique())
    runs = {}
    for run, df in scored.groupby("run", sort=True):
        yr, pr = arrays(df)
        m = classification_metrics(yr, pr, classes)
        runs[str(run)] = {k: m[k] for k in HEADLINE}
    out["runs"] = runs
    out["across_runs"] = {k: {"mean": float(np.nanmean([r[k] for r in runs.values()])),
                              "sd": float(np.nanstd([r[k] for r in runs.values()], ddof=1)) if len(runs) > 1 else 0.0}
                          for k in HEADLINE}
    if len(runs) > 1:  # several splits: the headline is the mean over runs, its CI holds split and group variance
        out["ci"] = split_group_bootstrap(y, p, scored["group"].to_numpy(), scored["run"].astype(str).to_numpy(),
                                          n_boot=n_boot, seed=seed)
        out["metrics"]["pooled"] = {k: out["metrics"][k] for k in HEADLINE}
        out["metrics"].update({k: out["across_runs"][k]["mean"] for k in HEADLINE})
        out["ci_method"] = f"mean over {len(runs)} runs; CI: whole test groups resampled within each run, pooled over runs"
    else:
        out["ci"] = group_bootstrap(y, p, scored["group"].to_numpy(), n_boot=n_boot, seed=seed)
        out["ci_method"] = "one run; CI: whole test groups resampled"
    return out


def write_results(out_dir: str | os.PathLike, pred, classes: Sequence[str], info: dict, *, n_boot: int = 1000,
                  title: str | None = None) -> dict:
    """Write metrics.json, predictions.csv, confusion.png, roc.png and summary.md; return the metrics dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(pred, classes, n_boot=n_boot)
    record = {"created": now_iso(), "classes": list(classes), **info, **summary}
    with atomic_path(out / "predictions.csv") as tmp:
        pred.to_csv(tmp, index=False)
    atomic_write_text(out / "metrics.json", json_text(record))
    plot_confusion(np.array(summary["metrics"]["confusion"]), classes, out / "confusion.png", title)
    scored = pred[pred["true"] != ""]
    plot_roc(scored["true"].map({c: i for i, c in enumerate(classes)}).to_numpy(),
             scored[[f"p_{c}" for c in classes]].to_numpy(dtype=float), classes, out / "roc.png", title)
    atomic_write_text(out / "summary.md", summary_markdown(record, title))
    return record


def json_default(o):
    """JSON for numpy scalars and arrays (anything else as its string)."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def json_text(obj) -> str:
    """``obj`` as indented JSON, numpy values included."""
    import json

    return json.dumps(obj, indent=1, default=json_default)


def fmt_ci(value: float, ci: Sequence[float] | None) -> str:
    if ci is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def summary_markdown(record: dict, title: str | None = None) -> str:
    m, ci = record["metrics"], record["ci"]
    lines = [f"# {title or record.get('name', 'results')}", ""]
    lines.append(f"Test items: {m['n']} in {record['n_test_groups']} groups; 95% CIs resample whole groups "
                 f"({record.get('group_by', 'group')}).")
    lines += ["", "| metric | value [95% CI] | mean ± sd over runs |", "|---|---|---|"]
    for k in HEADLINE:
        ar = record["across_runs"][k]
        lines.append(f"| {k.replace('_', ' ')} | {fmt_ci(m[k], ci.get(k))} | {ar['mean']:.3f} ± {ar['sd']:.3f} "
                     f"(n={len(record['runs'])}) |")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for c, v in m["per_class"].items():
        lines.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    return "\n".join(lines) + "\n"


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str | None = None) -> None:
    """Row-normalised confusion matrix with raw counts in each cell."""
    plt = pyplot()

    k = len(classes)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=90 if k > 4 else 0, fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title(title or "confusion (row-normalised, counts shown)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_roc(y: np.ndarray, proba: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str | None = None) -> None:
    """One-vs-rest ROC curves (the positive class only for two classes)."""
    plt = pyplot()
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6, 5))
    targets = [1] if len(classes) == 2 else range(len(classes))
    for c in targets:
        pos = y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, proba[:, c])
        ax.plot(fpr, tpr, lw=1.2, label=f"{classes[c]} ({roc_auc_score(pos, proba[:, c]):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC (one-vs-rest)", fontsize=10)
    ax.legend(fontsize=6, loc="lower right", ncol=2 if len(classes) > 8 else 1)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
