"""What to explain: image files, item ids in a store, or a selection from a ``predictions.csv``."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EmbedkitError
from ..images import Conversion, load_rgb, to_rgb

SELECTIONS = ("misclassified", "per-class")


@dataclass
class ExplainItem:
    """One image to explain; ``label`` is '' when the true class is unknown."""

    id: str
    label: str = ""
    group: str = ""
    path: str | None = None  # an image file (absolute)
    store_row: int | None = None  # or a row of the store
    recorded_pred: str = ""  # the prediction in predictions.csv, when selected from one


class StoreItems:
    """Item lookup and pixel access for one store (pixels saved by segment, or the files it points to)."""

    def __init__(self, path: str | os.PathLike):
        from ..store import Store

        self.store = Store(path)
        self.ids = [str(i) for i in self.store.ids]
        self.row = {i: r for r, i in enumerate(self.ids)}
        self.labels = self.store.labels
        self.groups = self.store.groups
        self.paths = self.store.column("path")
        self.has_pixels = self.store.has_pixels

    def item(self, item_id: str, recorded_pred: str = "") -> ExplainItem:
        if item_id not in self.row:
            raise EmbedkitError(self._missing_message(item_id))
        r = self.row[item_id]
        return ExplainItem(item_id, str(self.labels[r]), str(self.groups[r]), None if self.has_pixels else
                           self.store.abspath(str(self.paths[r])), r, recorded_pred)

    def _missing_message(self, item_id: str) -> str:
        close = difflib.get_close_matches(item_id, self.ids, n=3, cutoff=0.6) if len(self.ids) <= 50_000 else []
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f" (ids look like {self.ids[0]!r})" if self.ids else ""
        return f"item {item_id!r} is not in store {self.store.path} ({len(self.ids)} items){hint}"

    def rgb(self, item: ExplainItem, conv: Conversion) -> np.ndarray:
        if self.has_pixels and item.store_row is not None:
            return to_rgb(self.store.pixels(int(item.store_row)), conv, f"{self.store.path}[{item.id}]")
        return load_rgb(item.path, conv)


def load_item_rgb(item: ExplainItem, conv: Conversion, store: StoreItems | None) -> np.ndarray:
    """The item's pixels as float RGB in [0, 1], converted exactly as the model's training data was."""
    if item.path is not None and item.store_row is None:
        return load_rgb(item.path, conv)
    if store is None:
        raise ValueError(f"item {item.id!r} lives in a store, but no store was given")
    return store.rgb(item, conv)


def resolve_items(args: Sequence[str], store: StoreItems | None) -> list[ExplainItem]:
    """ITEMS on the command line: store ids (with --store), image files, or folders of images."""
    from ..sources import discover

    out: list[ExplainItem] = []
    for arg in args:
        if store is not None and arg in store.row:
            out.append(store.item(arg))
            continue
        p = Path(arg)
        if p.exists():
            src = discover(p)
            for it in src.items:
                path = src.abspath(it)
                out.append(ExplainItem(arg if p.is_file() else os.path.join(arg, it.path), it.label, it.group or path, path))
            continue
        if store is not None:
            raise EmbedkitError(store._missing_message(arg) + "; nor is it an image file")
        raise EmbedkitError(f"{arg}: no such image file or folder; to explain items of a store, pass --store STORE.h5")
    names = [Path(it.id).name for it in out if it.path is not None and it.store_row is None]
    for it in out:  # image files are named by their file name when that is unambiguous
        if it.path is not None and it.store_row is None and names.count(Path(it.id).name) == 1:
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


def select_items(predictions: str | os.PathLike, how: str, n: int, store: StoreItems | None) -> list[ExplainItem]:
    """Items chosen from a predictions.csv (see :func:`select_rows`); their pixels come from the store."""
    if store is None:
        raise EmbedkitError("--select reads the selected items' pixels from a store; pass --store STORE.h5 "
                            "(the store the predictions were made on)")
    rows = select_rows(read_predictions(predictions), how, n)
    absent = [i for i in rows["id"] if i not in store.row]
    if absent:
        raise EmbedkitError(f"{predictions} lists {len(absent)} selected id(s) not in store {store.store.path} "
                            f"(e.g. {absent[0]!r}); pass the store the predictions were made on")
    return [store.item(r["id"], recorded_pred=r["pred"]) for _, r in rows.iterrows()]
