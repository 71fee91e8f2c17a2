"""Class fractions per population (image, well, pool) from fitted probes, as in mixed-population studies.

Three estimators per population:

* ``classify_count``: the fraction of items predicted as each class;
* ``probability_average``: the mean predicted probability of each class;
* ``adjusted_count``: classify-and-count corrected with the validation confusion matrix ``M`` (row i: how
  items of class i are predicted): solve ``M^T p = q`` for fractions ``p >= 0`` summing to one.

Several probes (heads or encoders) form an ensemble by averaging their probabilities. When the true labels
of a population are known, the RMSE of the estimated fractions against them is reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..atomic import atomic_path, atomic_write_json
from ..errors import EmbedkitError
from ..figures import pyplot, save_figure
from ..items import as_store, store_groups
from ..metrics import confusion
from ..store import Store
from .data import finite_vectors
from .saved import Probe, align_classes

METHODS = ("classify_count", "probability_average", "adjusted_count")


def row_normalised(cm: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """P(predicted j | true i); classes absent from validation get an identity row (listed in the return)."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=1)
    m = np.divide(cm, support[:, None], out=np.zeros_like(cm), where=support[:, None] > 0)
    absent = [i for i in range(len(cm)) if support[i] == 0]
    for i in absent:
        m[i, i] = 1.0
    return m, absent


def adjusted_count(observed: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Fractions p >= 0, sum 1, that best explain observed predicted fractions q = M^T p (least squares)."""
    from scipy.optimize import nnls

    k = len(observed)
    weight = 10.0 * k  # enforce the sum-to-one row strongly
    a = np.vstack([m.T, weight * np.ones((1, k))])
    b = np.concatenate([observed, [weight]])
    p, _ = nnls(a, b)
    total = p.sum()
    return p / total if total > 0 else np.full(k, 1.0 / k)


@dataclass
class Proportions:
    """Estimates per population and method, truths where known, and RMSE per method."""

    classes: list[str]
    table: pd.DataFrame  # population, n, method, est_<class>..., true_<class>... (NaN when unknown)
    rmse: dict[str, float | None]
    n_with_truth: int
    notes: list[str] = field(default_factory=list)


def estimate_proportions(proba: np.ndarray, populations: dict[str, np.ndarray], classes: Sequence[str],
                         val_confusion: np.ndarray, labels: Sequence[str] | None = None) -> Proportions:
    """Estimate class fractions of each population (positions into ``proba``) three ways; score against labels."""
    classes = list(classes)
    k = len(classes)
    m, absent = row_normalised(val_confusion)
    notes = []
    if absent:
        notes.append(f"classes without validation items ({', '.join(classes[i] for i in absent)}) are assumed "
                     f"perfectly recognised by the adjusted count")
    index = {c: i for i, c in enumerate(classes)}
    labels = None if labels is None else np.asarray(labels, dtype=object)
    rows = []
    errors: dict[str, list[np.ndarray]] = {mth: [] for mth in METHODS}
    n_truth = 0
    pred = proba.argmax(axis=1)
    for name, pos in populations.items():
        pos = np.asarray(pos, dtype=np.int64)
        if len(pos) == 0:
            continue
        cc = np.bincount(pred[pos], minlength=k) / len(pos)
        est = {"classify_count": cc, "probability_average": proba[pos].mean(axis=0),
               "adjusted_count": adjusted_count(cc, m)}
        truth = None
        if labels is not None and all(lab in index for lab in labels[pos]):
            truth = np.bincount([index[lab] for lab in labels[pos]], minlength=k) / len(pos)
            n_truth += 1
        for mth in METHODS:
            row = {"population": name, "n": len(pos), "method": mth}
            row.update({f"est_{c}": float(v) for c, v in zip(classes, est[mth])})
            row.update({f"true_{c}": (float(v) if truth is not None else np.nan)
                        for c, v in zip(classes, truth if truth is not None else np.zeros(k))})
            rows.append(row)
            if truth is not None:
                errors[mth].append(est[mth] - truth)
    if not rows:
        raise EmbedkitError("no population has any item with vectors; nothing to estimate")
    rmse = {mth: (float(np.sqrt(np.mean(np.square(errors[mth])))) if errors[mth] else None) for mth in METHODS}
    return Proportions(classes=classes, table=pd.DataFrame(rows), rmse=rmse, n_with_truth=n_truth, notes=notes)


# --------------------------------------------------------------------------- applying probes to a store


def key_for_probe(store: Store, probe: Probe, key: str | None = None) -> str:
    """The store key holding embeddings of the probe's encoder configuration (checked, never guessed)."""
    if key is not None:
        key = store.resolve_key(key)
        probe.check_config(store.config(key))
        return key
    matching = []
    for k in store.keys:
        try:
            probe.check_config(store.config(k))
            matching.append(k)
        except EmbedkitError:
            continue
    if not matching:
        if not store.keys:
            raise EmbedkitError(f"{store.path}: holds no embeddings; run 'embedkit embed' first")
        if len(store.keys) == 1:
            probe.check_config(store.config(store.keys[0]))  # raises, naming what differs
        raise EmbedkitError(f"{store.path}: no embedding key matches the encoder configuration of probe "
                            f"{probe.name} (keys here: {', '.join(store.keys)}); embed with that encoder first")
    if probe.encoder_key in matching:
        return probe.encoder_key
    return matching[0]


def apply_probes(store: Store, probes: Sequence[Probe], key: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Averaged probabilities over items that have vectors under every probe's key.

    Returns (store rows, probabilities [N, K], classes, keys used). Finished rows holding NaN are refused.
    """
    classes = align_classes(probes)
    if key is not None and len(probes) > 1:
        raise EmbedkitError("--encoder picks the key of a single probe; with several probes each finds its own key")
    keys = [key_for_probe(store, p, key) for p in probes]
    done = np.ones(len(store), dtype=bool)
    for k in keys:
        done &= store.done(k)
    rows = np.flatnonzero(done)
    if len(rows) == 0:
        raise EmbedkitError(f"{store.path}: no item has vectors under {', '.join(sorted(set(keys)))}")
    total = np.zeros((len(rows), len(classes)))
    for p, k in zip(probes, keys):
        x = finite_vectors(store, k, rows, dtype=np.dtype(store.config(k).get("dtype") or "float32"))
        order = [p.classes.index(c) for c in classes]
        total += p.predict_proba(x)[:, order]
    return rows, total / len(probes), classes, keys


def ensemble_validation_confusion(probes: Sequence[Probe], classes: Sequence[str]) -> tuple[np.ndarray, str]:
    """Validation confusion of the ensemble: from averaged validation probabilities when every probe saw the
    same validation items, otherwise the mean of the probes' own (row-normalised) matrices."""
    classes = list(classes)
    fps = {p.validation.get("ids_fingerprint") for p in probes}
    if len(probes) == 1 or (len(fps) == 1 and None not in fps and all("val_proba" in p.arrays for p in probes)):
        p0 = probes[0]
        avg = np.zeros((len(p0.arrays["val_labels"]), len(classes)))
        for p in probes:
            avg += p.arrays["val_proba"][:, [p.classes.index(c) for c in classes]]
        y = np.array([classes.index(p0.classes[i]) for i in p0.arrays["val_labels"]], dtype=np.int64)
        how = "ensemble validation predictions" if len(probes) > 1 else "validation predictions"
        return confusion(y, avg.argmax(1), len(classes)), how
    mats = []
    for p in probes:
        order = [p.classes.index(c) for c in classes]
        cm = np.asarray(p.validation["confusion"], dtype=float)[np.ix_(order, order)]
        mats.append(row_normalised(cm)[0])
    return np.mean(mats, axis=0), "mean of each probe's validation confusion (probes saw different validation items)"


def read_populations(path: str, ids: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """A CSV with columns id,population (an id may belong to several populations) -> positions into ``ids``.

    Read by :func:`embedkit.sources.read_csv_rows`: a BOM is accepted, other encodings are named, and a row with
    more fields than the header is refused, naming its line.
    """
    from ..sources import read_csv_rows

    pos_of = {i: p for p, i in enumerate(ids)}
    pops: dict[str, list[int]] = {}
    missing = 0
    _, rows = read_csv_rows(path, ("id", "population"), what="populations file")
    for _, row in rows:
        if row["id"] in pos_of:
            pops.setdefault(row["population"], []).append(pos_of[row["id"]])
        else:
            missing += 1
    notes = [f"{missing} rows of {path} name items without vectors here and are left out"] if missing else []
    if not pops:
        raise EmbedkitError(f"{path}: none of its ids has vectors in this store")
    return {k: np.asarray(v) for k, v in pops.items()}, notes


def run_proportions(store, probes: Sequence[Probe], *, key: str | None = None, group_by: str | None = None,
                    populations_csv: str | None = None, out: str | os.PathLike | None = None) -> Proportions:
    """Apply (an ensemble of) probes to a store (a Store or its path) and estimate class fractions per population."""
    store = as_store(store)
    rows, proba, classes, keys = apply_probes(store, probes, key)
    ids = store.ids[rows]
    labels = store.labels[rows]
    if populations_csv:
        pops, notes = read_populations(populations_csv, ids)
    else:
        groups, _ = store_groups(store, group_by)
        groups = np.asarray(groups, dtype=object)[rows]
        pops = {g: np.flatnonzero(groups == g) for g in sorted(set(groups))}
        notes = []
    val_cm, how = ensemble_validation_confusion(probes, classes)
    res = estimate_proportions(proba, pops, classes, val_cm, labels)
    res.notes = notes + [f"adjusted count uses the {how}"] + res.notes
    if out is not None:
        write_proportions(res, out, {"store": os.path.abspath(store.path), "keys": keys,
                                     "probes": [p.name for p in probes], "n_items": int(len(rows))})
    return res


def write_proportions(res: Proportions, out: str | os.PathLike, info: dict) -> None:
    """proportions.csv, proportions.json and (with truths) proportions.png, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "proportions.csv") as tmp:
        res.table.to_csv(tmp, index=False)
    record = {**info, "classes": res.classes, "methods": list(METHODS), "rmse": res.rmse,
              "n_populations": int(res.table["population"].nunique()), "n_with_truth": res.n_with_truth,
              "notes": res.notes}
    atomic_write_json(out / "proportions.json", record)
    if res.n_with_truth:
        plot_proportions(res, out / "proportions.png")


def plot_proportions(res: Proportions, path: Path) -> None:
    """Estimated against true fraction, one panel per method, every (population, class) a point."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 4), sharex=True, sharey=True)
    for ax, mth in zip(axes, METHODS):
        df = res.table[res.table["method"] == mth]
        for c in res.classes:
            ax.scatter(df[f"true_{c}"], df[f"est_{c}"], s=12, alpha=0.7, label=c)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        rmse = res.rmse[mth]
        ax.set_title(f"{mth.replace('_', ' ')}\nRMSE {rmse:.3f}" if rmse is not None else mth, fontsize=10)
        ax.set_xlabel("true fraction")
    axes[0].set_ylabel("estimated fraction")
    if len(res.classes) <= 12:
        axes[-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def rmse_table(res: Proportions) -> str:
    lines = [f"{'method':<22}RMSE vs true fractions ({res.n_with_truth} populations with known labels)"]
    for mth in METHODS:
        v = res.rmse[mth]
        lines.append(f"{mth:<22}{v:.3f}" if v is not None else f"{mth:<22}n/a (no population is fully labelled)")
    return "\n".join(lines)
