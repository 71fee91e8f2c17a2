"""Scoring the baselines on the encoder's own splits and comparing them with every encoder row.

Each baseline is probed with logistic regression on the runs in ``OUT/splits.json`` (so its test items are the
encoder's), ``prior`` predicts the training part's class frequencies. Differences are paired on the same test
items and their CIs resample whole groups; their p-values are Holm-adjusted over the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..metrics import holm, paired_bootstrap
from ..atomic import atomic_write_text
from ..results import json_text, predictions_frame, write_results

BASELINE_HEAD = "logreg"


@dataclass
class BaselineRow:
    name: str
    folder: Path
    record: dict
    head: str = BASELINE_HEAD


@dataclass
class Anchoring:
    rows: list[BaselineRow]
    comparisons: list[dict]  # encoder row, baseline, diff, ci, p, p_holm
    notes: list[str] = field(default_factory=list)


def read_predictions(folder: Path) -> pd.DataFrame:
    """A result folder's test predictions (scored rows only)."""
    df = pd.read_csv(folder / "predictions.csv", keep_default_na=False, dtype={"id": str, "group": str, "true": str,
                                                                                "pred": str, "run": str})
    return df[df["true"] != ""]


def prior_frame(report) -> pd.DataFrame:
    """Predictions of the prior baseline: every test item gets its run's training class frequencies."""
    classes = report.classes
    label_of = dict(zip(report.data.ids, report.data.labels))
    group_of = dict(zip(report.data.ids, report.data.groups))
    frames = []
    for fold, name in zip(report.splits.folds, report.run_names):
        counts = pd.Series([label_of[i] for i in fold.train]).value_counts()
        freq = np.array([counts.get(c, 0) for c in classes], dtype=np.float64)
        proba = np.tile(freq / freq.sum(), (len(fold.test), 1))
        frames.append(predictions_frame(list(fold.test), [group_of[i] for i in fold.test],
                                        [label_of[i] for i in fold.test], proba, classes, run=name))
    return pd.concat(frames, ignore_index=True)


def score_baselines(report, settings, names: Sequence[str], group_by: str | None, device: str = "auto",
                    progress: bool = True) -> Anchoring:
    """Fit or compute every baseline in ``names`` on ``report``'s runs; write ``OUT/baselines/<name>/``."""
    from ..probe.evaluate import run_probe
    from . import ensure_baselines

    data = report.data
    out = report.out / "baselines"
    keys, notes = ensure_baselines(data.store, data.key, names, device=device, progress=progress)
    rows = []
    for name in names:
        folder = out / name
        if name == "prior":
            info = {"kind": "probe", "name": "baseline/prior", "encoder": "prior", "head": "prior",
                    "group_by": data.group_by, "splits_fingerprint": report.splits.fingerprint(),
                    "run_names": report.run_names, "fit_seconds": 0.0, "predict_items_per_second": None,
                    "hyperparameters": {"predicts": "training class frequencies (majority class)"},
                    "baseline": "prior"}
            record = write_results(folder, prior_frame(report), report.classes, info, n_boot=settings.n_boot,
                                   title="baseline: prior")
        else:
            sub = replace(settings, heads=[BASELINE_HEAD], baselines=(), leak_check=False, split=replace(settings.split, seeds=1, folds=None))
            rep = run_probe(data.store, folder, key=keys[name], group_by=group_by, splits_path=str(report.out / "splits.json"),
                            settings=sub, progress=progress)
            notes += [f"baseline {name}: {n}" for n in rep.notes if n not in report.notes]
            record = rep.results[0].record | {"baseline": name}
            folder = rep.results[0].folder
            atomic_write_text(folder / "metrics.json", json_text(record))  # marks the row a baseline for compare
        rows.append(BaselineRow(name=name, folder=folder, record=record))
    comparisons = compare_rows([(f"{data.key}/{r.head}", r.folder) for r in report.results],
                               [(b.name, b.folder) for b in rows], report.classes, settings.n_boot)
    return Anchoring(rows=rows, comparisons=comparisons, notes=notes)


def compare_rows(encoders: Sequence[tuple[str, Path]], baselines: Sequence[tuple[str, Path]], classes: Sequence[str],
                 n_boot: int = 1000) -> list[dict]:
    """Paired differences (encoder − baseline) in balanced accuracy on shared test items, group-bootstrap CIs."""
    index = {c: k for k, c in enumerate(classes)}
    frames = {name: read_predictions(folder) for name, folder in list(encoders) + list(baselines)}
    out = []
    for e, _ in encoders:
        for b, _ in baselines:
            m = frames[e].merge(frames[b], on=["id", "run"], suffixes=("_e", "_b"))
            if m.empty:
                continue
            res = paired_bootstrap(m["true_e"].map(index).to_numpy(), m["pred_b"].map(index).to_numpy(),
                                   m["pred_e"].map(index).to_numpy(), m["group_e"].to_numpy(), len(classes), n_boot=n_boot)
            out.append({"encoder": e, "baseline": b, "diff": res["diff_balanced_accuracy"], "ci": res["ci"],
                        "p": res["p_boot"], "n_items": int(len(m)), "test": "group-paired bootstrap"})
    for c, p in zip(out, holm([c["p"] for c in out])):
        c["p_holm"] = p
    return out


def _p(p: float) -> str:
    """A bootstrap p-value as text (0 means below the bootstrap's resolution)."""
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def verdict(c: dict) -> str:
    """One plain sentence: does the encoder row beat the baseline?"""
    lo, hi = c["ci"]
    text = f"{c['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}] balanced accuracy (Holm p {_p(c['p_holm'])})"
    if lo > 0:
        return f"{c['encoder']} beats {c['baseline']} by {text}"
    if hi < 0:
        return f"{c['encoder']} is WORSE than {c['baseline']}: {text}"
    return f"{c['encoder']} does not clearly beat {c['baseline']}: {text}; the CI includes 0"


def difference_table(anch: Anchoring) -> list[list[str]]:
    """Header plus one row per baseline, one column per encoder row: Δ [95% CI] (Holm p)."""
    encoders = list(dict.fromkeys(c["encoder"] for c in anch.comparisons))
    rows = [["encoder − baseline"] + encoders]
    for b in anch.rows:
        cells = []
        for e in encoders:
            c = next((c for c in anch.comparisons if c["encoder"] == e and c["baseline"] == b.name), None)
            cells.append("" if c is None else f"{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] p{_p(c['p_holm']).replace(' ', '')}")
        rows.append([b.name] + cells)
    return rows
