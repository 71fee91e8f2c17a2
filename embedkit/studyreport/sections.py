"""What each part of the study report shows, gathered from the store and the result folders.

Every function returns plain data (dicts, lists, :class:`~embedkit.studyreport.pictures.Picture`) for the
template; nothing here writes HTML. Tables and paired tests come from :mod:`embedkit.report` (the same
code as ``embedkit compare``), maps from :mod:`embedkit.views`, contact sheets from :mod:`embedkit.sheets`.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import report as cmp
from ..errors import EmbedkitError
from ..store import Store
from .pictures import Picture, figure_picture, file_picture

#: Libraries whose versions the provenance section lists (when installed).
LIBRARIES = ("embedkit", "torch", "torchvision", "timm", "transformers", "numpy", "scikit-learn", "faiss-cpu", "h5py",
             "openTSNE", "umap-learn", "cellpose", "grad-cam", "bioio", "matplotlib", "jinja2")

#: Split settings shown on the page (from splits.json's meta).
SPLIT_SETTINGS = ("test_size", "val_size", "folds", "seeds")


@dataclass
class Options:
    """Report settings: map method and size, how many mistakes get neighbour sheets, leak check, paired tests."""

    method: str = "tsne"
    max_thumbnails: int = 150
    n_misclassified: int = 4
    k: int = 6
    leaks: bool = True
    allow_different_splits: bool = False
    n_boot: int = 2000
    title: str | None = None
    selfcheck: bool = False
    command: str = ""
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- results and the table


def load_results(paths: Sequence[str], allow_different_splits: bool) -> tuple[list[cmp.Result], list[str]]:
    """Every result folder below ``paths``, named as ``compare`` names them, and the splits warning (if any)."""
    results = [cmp.load_result(p) for p in cmp.find_results(paths)]
    cmp._name_results(results)
    return results, cmp.check_splits_match(results, allow_different_splits)


def table_section(results: list[cmp.Result], n_boot: int) -> dict:
    """The comparison table, the chance row, paired tests of every row against the best, and the forest plot."""
    rows = cmp.summary_rows(results)
    by_name = {r.name: r for r in results}
    best = by_name[rows[0]["name"]]
    pairs = [cmp.paired_test(best, by_name[r["name"]], n_boot=n_boot) for r in rows[1:]]
    pair_of = {p["b"]: p for p in pairs}
    cells = cmp.table_cells(rows)
    for row, cell in zip(rows, cells):
        p = pair_of.get(row["name"])
        cell.append("best" if p is None else _pair_text(p))
    classes = best.classes
    return {"head": cmp.TABLE_HEAD + ["vs best: Δ balanced acc. [95% CI], p (group bootstrap)"], "cells": cells,
            "pair_head": cmp.PAIR_HEAD, "pair_cells": cmp.pair_cells(pairs), "best": best.name,
            "chance": chance_row(best), "n_classes": len(classes),
            "forest": Picture("data:image/png;base64," + cmp.forest_plot(rows), "balanced accuracy with 95% CIs",
                              "forest plot of balanced accuracy"),
            "rows": rows}


def _pair_text(p: dict) -> str:
    if "ci" not in p:
        return p["note"] or "n/a"
    return (f"{p['diff_balanced_accuracy']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}], "
            f"p={cmp._fmt_p(p['p_boot'])}")  # resamples whole groups; McNemar treats cells of one group as independent


def chance_row(result: cmp.Result) -> dict:
    """What guessing scores on these test items: balanced accuracy 1/K, and macro-F1 of always the majority class."""
    true = result.pred.drop_duplicates("id")["true"]
    counts = Counter(true)
    k = len(result.classes) or len(counts)
    majority = counts.most_common(1)[0][0] if counts else ""
    f1_major = 2 * counts[majority] / (len(true) + counts[majority]) if len(true) else float("nan")
    return {"balanced_accuracy": 1.0 / k if k else float("nan"), "macro_f1": f1_major / k if k else float("nan"),
            "auroc": 0.5, "majority": majority, "n": len(true)}


def model_figures(results: list[cmp.Result], rows: list[dict]) -> list[dict]:
    """Per model (in table order): confusion matrix, ROC and training curve pictures, and its headline numbers."""
    by_name = {r.name: r for r in results}
    out = []
    for row in rows:
        r = by_name[row["name"]]
        pics = [p for p in (file_picture(r.path / f, f"{r.name}: {f[:-4].replace('_', ' ')}") for f in cmp.FIGURES) if p]
        out.append({"name": r.name, "path": str(r.path), "pictures": pics, "kind": row["kind"],
                    "bal": cmp._fmt_ci(row["balanced_accuracy"], row["balanced_accuracy_lo"], row["balanced_accuracy_hi"])})
    return out


# --------------------------------------------------------------------------- data and splits


def dataset_section(store: Store, results: list[cmp.Result]) -> dict:
    """Classes with item and group counts, and how items were grouped."""
    labels = np.asarray(store.labels, dtype=object)
    groups = np.asarray(store.groups, dtype=object)
    labelled = labels != ""
    classes = []
    for c in sorted(set(labels[labelled])):
        sel = labels == c
        classes.append({"name": c, "n_items": int(sel.sum()), "n_groups": int(len(set(groups[sel])))})
    group_by = sorted({str(r.record.get("group_by")) for r in results if r.record.get("group_by")})
    return {"n_items": int(len(labels)), "n_labelled": int(labelled.sum()), "n_groups": int(len(set(groups))),
            "classes": classes, "group_by": ", ".join(group_by) or "group", "store": str(store.path),
            "embedding_keys": list(store.keys)}


def find_splits(results: list[cmp.Result]) -> Path | None:
    """The splits.json beside the first result that has one (probe writes it one folder up)."""
    for r in results:
        for p in (r.path / "splits.json", r.path.parent / "splits.json"):
            if p.is_file():
                return p
    return None


def splits_section(store: Store, results: list[cmp.Result]) -> dict | None:
    """How the split was made: rule, sizes per part (items and groups) per fold, and the group-straddling check."""
    from ..splits import Splits, check_splits

    path = find_splits(results)
    if path is None:
        return None
    splits = Splits.load(path)
    group_of = dict(zip(map(str, store.ids), map(str, store.groups)))
    label_of = dict(zip(map(str, store.ids), map(str, store.labels)))
    folds = []
    for k, fold in enumerate(splits.folds):
        part = {}
        for name in ("train", "val", "test"):
            ids = fold.part(name)
            part[name] = {"n_items": len(ids), "n_groups": len({group_of.get(i, "") for i in ids})}
        folds.append({"fold": k, **part})
    meta = {k.replace("_", " "): v for k, v in splits.meta.items() if k in SPLIT_SETTINGS}
    return {"path": str(path), "group_by": splits.group_by, "seed": splits.seed, "meta": meta, "folds": folds,
            "fingerprint": splits.fingerprint(), "problems": check_splits(splits, group_of, label_of), "splits": splits}


def leaks_section(store: Store, key: str | None, splits) -> dict:
    """The leak check's verdict (pixel fingerprints across train/val and test)."""
    from ..leaks import find_leaks

    try:
        rep = find_leaks(str(store.path), key, splits, by="pixels", progress=False)
    except EmbedkitError as exc:
        return {"verdict": f"not checked: {exc}", "leaking": None}
    return {"verdict": rep.verdict, "leaking": rep.leaking, "n_pairs": int(len(rep.pairs))}


# --------------------------------------------------------------------------- pictures of cells


def view_key(store: Store, results: list[cmp.Result], best: str) -> str | None:
    """The embedding key the maps and neighbours use: the best encoder probe's key (baselines are yardsticks, not
    the subject), else the store's only or first key."""
    keys = store.keys
    ranked = sorted(results, key=lambda r: r.name != best)
    for r in ranked:
        if r.record.get("kind") == "probe" and not r.record.get("baseline") and r.record.get("encoder") in keys:
            return r.record["encoder"]
    return keys[0] if keys else None


def best_probe(results: list[cmp.Result], rows: list[dict], key: str) -> cmp.Result | None:
    """The best-ranked result made on ``key`` (whose predictions colour the map and pick the mistakes)."""
    by_name = {r.name: r for r in results}
    for row in rows:
        r = by_name[row["name"]]
        if r.record.get("encoder") == key:
            return r
    return None


def view_pictures(store: Store, key: str, result: cmp.Result | None, opts: Options) -> list[Picture]:
    """The map with thumbnails, coloured by label and by whether the chosen model got each item right."""
    from ..images import Conversion
    from ..views import Colouring, colouring, make_layout, plot_layout, read_predictions, view_params

    layout = make_layout(store.path, key, opts.method, view_params(opts.method), save=False)
    conv = Conversion.from_dict(store.config(key).get("conversion"))
    colours = [colouring(store, "label")]
    if result is not None:
        pred, true, note = read_predictions(result.path / cmp.PREDICTIONS_FILE, store)
        scored = (pred != "") & (true != "")
        values = np.where(~scored, "", np.where(pred == true, "correct", "misclassified")).astype(object)
        colours.append(Colouring("correctness", values, True, scored & (pred != true), f"{result.name}: {note}",
                                 ["correct", "misclassified"]))
    pics = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in colours:
            out = plot_layout(store, layout, c, Path(tmp) / f"{c.name}.png", thumbnails=True,
                              max_thumbnails=opts.max_thumbnails, thumb_size=48, conv=conv)
            pics.append(file_picture(out, f"{layout.method.upper()} of '{key}' coloured by {c.name}"))
    return [p for p in pics if p]


def misclassified_rows(store: Store, result: cmp.Result, n: int) -> list[int]:
    """Store rows of the ``n`` most confident mistakes of a result (highest probability given to the wrong class)."""
    pred = result.pred
    wrong = pred[pred["pred"] != pred["true"]].copy()
    if wrong.empty:
        return []
    cols = [c for c in wrong.columns if c.startswith("p_")]
    wrong["conf"] = wrong[cols].max(axis=1) if cols else 0.0
    wrong = wrong.sort_values(["conf", "id"], ascending=[False, True]).drop_duplicates("id")
    row_of = {str(i): r for r, i in enumerate(store.ids)}
    return [row_of[i] for i in wrong["id"] if i in row_of][:n]


def neighbour_sheet(store: Store, key: str, result: cmp.Result, opts: Options) -> Picture | None:
    """Contact sheet: each of a few misclassified cells, then its nearest neighbours from other groups."""
    from ..lookup import Query, search_store
    from ..sheets import neighbor_sheet

    rows = misclassified_rows(store, result, opts.n_misclassified)
    if not rows:
        return None
    groups = store.groups
    ids = store.ids
    queries = [Query(str(ids[r]), "item", row=r) for r in rows]
    sims, found = search_store(store, key, store.vectors(key, np.array(rows)), opts.k,
                               exclude_groups=[groups[r] for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        out = neighbor_sheet(store, key, queries, sims, found, Path(tmp) / "neighbours.png", size=80)
        return file_picture(out, f"{len(rows)} misclassified cells of {result.name} and their {opts.k} nearest "
                                 "neighbours from other groups")


def cam_section(explain_dir: str | None, limit: int = 12) -> dict | None:
    """The CAM gallery of an ``embedkit explain`` folder: its grid and a few per-item overlays."""
    if not explain_dir:
        return None
    d = Path(explain_dir)
    if not (d / "explain.json").is_file():
        raise EmbedkitError(f"--explain {d}: not an 'embedkit explain' output folder (no explain.json)")
    info = json.loads((d / "explain.json").read_text())
    grid = file_picture(d / "grid.png", "all explained images and maps (wrong predictions in red)")
    overlays = [p for p in (file_picture(f, f.stem) for f in sorted((d / "overlays").glob("*.png"))[:limit]) if p]
    faith = file_picture(d / "faithfulness.png", "deletion and insertion curves")
    return {"path": str(d), "grid": grid, "overlays": overlays, "faithfulness": faith,
            "methods": info.get("methods"), "layer": info.get("layer"), "model": info.get("model")}


# --------------------------------------------------------------------------- provenance


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            continue
    return out


def provenance_section(store: Store, results: list[cmp.Result], command: str) -> dict:
    """Encoders (weights fingerprint, preprocessing, conversion), each result's settings, library versions, command."""
    encoders = []
    for key in store.keys:
        cfg = store.config(key)
        encoders.append({"key": key, "encoder": cfg.get("encoder", ""), "weights": cfg.get("weights_fingerprint", ""),
                         "config": json.dumps(cfg, indent=1, sort_keys=True, default=str)})
    settings = []
    for r in results:
        rec = {k: v for k, v in r.record.items() if k not in ("metrics", "ci", "runs", "across_runs")}
        settings.append({"name": r.name, "path": str(r.path), "json": json.dumps(rec, indent=1, sort_keys=True, default=str)})
    seg = {k: str(v) for k, v in store.segment_attrs().items()}
    attrs = {k: str(v) for k, v in store.attrs.items()}
    return {"encoders": encoders, "results": settings, "versions": library_versions(), "command": command,
            "store_attrs": attrs, "segment": seg}


def figure_of_counts(dataset: dict) -> Picture | None:
    """Bar chart of items per class (groups per class written on the bars)."""
    if not dataset["classes"]:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cls = dataset["classes"]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(cls) + 1.0))
    ys = np.arange(len(cls))[::-1]
    ax.barh(ys, [c["n_items"] for c in cls], color="C0")
    for y, c in zip(ys, cls):
        ax.text(c["n_items"], y, f" {c['n_groups']} groups", va="center", fontsize=7)
    ax.set_yticks(ys, [c["name"] for c in cls], fontsize=8)
    ax.set_xlabel("items")
    fig.tight_layout()
    return figure_picture(fig, "items per class")
