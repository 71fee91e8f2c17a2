"""What to explain: image files, item ids in a store, or a selection from a ``predictions.csv``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EmbedkitError
from ..items import Item, ItemSet

SELECTIONS = ("misclassified", "per-class")


def _not_in_store(items: ItemSet, item_id: str) -> str:
    return f"item {item_id!r} is not in store {items.store.path} ({len(items)} items){items.id_hint(item_id)}"


def resolve_items(args: Sequence[str], store: ItemSet | None) -> list[Item]:
    """ITEMS on the command line: store ids (with --store), image files, or folders of images."""
    from ..sources import discover

    out: list[Item] = []
    for arg in args:
        if store is not None and arg in store.index:
            out.append(store.item(store.index[arg]))
            continue
        p = Path(arg)
        if p.exists():
            src = discover(p)
            for it in src.items:
                path = src.abspath(it)
                out.append(Item(arg if p.is_file() else os.path.join(arg, it.path), path, it.label, it.group or path))
            continue
        if store is not None:
            raise EmbedkitError(_not_in_store(store, arg) + "; nor is it an image file")
        raise EmbedkitError(f"{arg}: no such image file or folder; to explain items of a store, pass --store STORE.h5")
    names = [Path(it.id).name for it in out if it.row is None]
    for it in out:  # image files are named by their file name when that is unambiguous
        if it.row is None and names.count(Path(it.id).name) == 1:
            it.id = Path(it.id).name
    seen: set[str] = set()
    unique = []
    for it in out:
        if it.id not in seen:
            seen.add(it.id)
            unique.append(it)
    return unique


def read_predictions(path: str | os.PathLike):
    """A predictions.csv (id, group, true, pred, run, p_<class>...) with every column read as written."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise EmbedkitError(f"{path}: not a readable predictions.csv ({exc})") from None
    missing = [c for c in ("id", "true", "pred") if c not in df.columns]
    if missing:
        raise EmbedkitError(f"{path}: not a predictions.csv from probe/finetune (no column {', '.join(missing)})")
    for c in df.columns:
        if c.startswith("p_"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def select_rows(pred, how: str, n: int):
    """Rows of a predictions frame to explain.

    ``misclassified``: the ``n`` most confidently wrong predictions. ``per-class``: for each true class,
    the ``n`` items with the highest probability for that class (its most typical members as the model
    sees them). Each id is taken once, even when several runs predicted it.
    """
    import pandas as pd

    if how not in SELECTIONS:
        raise EmbedkitError(f"--select {how!r}: choose one of {', '.join(SELECTIONS)}")
    scored = pred[pred["true"] != ""].copy()
    if scored.empty:
        raise EmbedkitError("the predictions hold no labelled items; --select needs true labels")

    def prob(row, col):
        v = row.get(f"p_{row[col]}", np.nan)
        return float(v) if v == v else 0.0

    if how == "misclassified":
        wrong = scored[scored["true"] != scored["pred"]].copy()
        wrong["_score"] = [prob(r, "pred") for _, r in wrong.iterrows()]
        wrong = wrong.sort_values("_score", ascending=False, kind="stable").drop_duplicates("id")
        return wrong.head(n)
    scored["_score"] = [prob(r, "true") for _, r in scored.iterrows()]
    parts = [g.sort_values("_score", ascending=False, kind="stable").drop_duplicates("id").head(n)
             for _, g in scored.groupby("true", sort=True)]
    return pd.concat(parts) if parts else scored.head(0)


def select_items(predictions: str | os.PathLike, how: str, n: int, store: ItemSet | None) -> list[Item]:
    """Items chosen from a predictions.csv (see :func:`select_rows`); their pixels come from the store.

    Each item's ``meta['recorded_pred']`` is the prediction the file recorded for it.
    """
    if store is None:
        raise EmbedkitError("--select reads the selected items' pixels from a store; pass --store STORE.h5 "
                            "(the store the predictions were made on)")
    rows = select_rows(read_predictions(predictions), how, n)
    absent = [i for i in rows["id"] if i not in store.index]
    if absent:
        raise EmbedkitError(f"{predictions} lists {len(absent)} selected id(s) not in store {store.store.path} "
                            f"(e.g. {absent[0]!r}); pass the store the predictions were made on")
    chosen = []
    for _, r in rows.iterrows():
        it = store.item(store.index[r["id"]])
        it.meta = {**it.meta, "recorded_pred": r["pred"]}
        chosen.append(it)
    return chosen


def find_predictions(model: str | os.PathLike) -> Path:
    """The predictions.csv that belongs to a model folder: in it, or up to two folders above."""
    model = Path(model)
    base = model if model.is_dir() else model.parent
    for folder in (base, base.parent, base.parent.parent):
        if (folder / "predictions.csv").exists():
            return folder / "predictions.csv"
    raise EmbedkitError(f"no predictions.csv in or above {model}; pass --predictions PATH")


def choose_items(model: str | os.PathLike, items: Sequence[str], store: ItemSet | None, *, select: str | None = None,
                 n: int | None = None, predictions: str | os.PathLike | None = None) -> tuple[list[Item], str]:
    """Check what was asked to explain and return the items with a line saying how they were chosen.

    Either ``items`` (image files, folders, or store ids) or ``select`` (misclassified | per-class, from
    the model's predictions.csv), never both; ``n`` and ``predictions`` go with ``select`` only.
    """
    if select is None and (n is not None or predictions is not None):
        raise EmbedkitError("--n and --predictions go with --select misclassified|per-class")
    if select is not None and items:
        raise EmbedkitError("give ITEMS or --select, not both")
    if not items and select is None:
        raise EmbedkitError("nothing to explain: give image files, store item ids (with --store), or --select")
    if select is None:
        return resolve_items(items, store), f"{len(items)} item argument(s)"
    csv_path = predictions or find_predictions(model)
    chosen = select_items(csv_path, select, n or (16 if select == "misclassified" else 4), store)
    return chosen, f"selected {len(chosen)} items ({select}) from {csv_path}"
