"""Which cells an adaptation trains on: every item of the source, minus the split parts it must not see.

Labels are never used: items are chosen by id, ordered as the source lists them, and fingerprinted by their
ids alone, so the same cells give the same run whatever their labels say.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import EmbedkitError
from ..items import ItemSet
from ..splits import PARTS, Splits
from ..store import fingerprint


@dataclass
class Unlabelled:
    """The cells to adapt on: rows of a source's items (files, or a store's /pixels), never their labels."""

    items: ItemSet
    rows: np.ndarray
    excluded: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [str(self.items.ids[r]) for r in self.rows]

    @property
    def fingerprint(self) -> str:
        """Hash of the item ids trained on (sorted): the same cells give the same fingerprint."""
        return fingerprint(sorted(self.ids))


def excluded_ids(splits_file: str | os.PathLike, parts: Sequence[str], fold: int | None) -> tuple[set[str], dict]:
    """Ids of ``parts`` of one fold of a splits file, and a record of what was excluded."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise EmbedkitError(f"--exclude-split {bad[0]!r}: choose among {', '.join(PARTS)}")
    splits = Splits.load(splits_file)
    n = len(splits.folds)
    if fold is None and n > 1:
        raise EmbedkitError(f"{splits_file} has {n} folds, and their test parts together cover every labelled item; "
                            f"pass --fold K (0..{n - 1}) and adapt one encoder per fold")
    k = fold or 0
    if not 0 <= k < n:
        raise EmbedkitError(f"--fold {k}: {splits_file} has {n} fold(s), numbered from 0")
    ids = {i for p in parts for i in splits.folds[k].part(p)}
    record = {"splits_file": os.path.abspath(splits_file), "splits_fingerprint": splits.fingerprint(), "fold": k,
              "parts": list(parts), "ids_fingerprint": fingerprint(sorted(ids))}
    return ids, record


def select_items(source: str | os.PathLike, splits_file: str | os.PathLike | None = None,
                 exclude: Sequence[str] = (), fold: int | None = None) -> Unlabelled:
    """The items of ``source`` (store, folder or manifest) less the excluded split parts, in source order."""
    from ..finetune.data import check_files, load_items

    if exclude and not splits_file:
        raise EmbedkitError("--exclude-split needs --splits splits.json (as saved by 'embedkit probe')")
    items = load_items(source)
    keep = np.ones(len(items.ids), dtype=bool)
    excluded: dict = {}
    if splits_file and exclude:
        drop, excluded = excluded_ids(splits_file, exclude, fold)
        known = set(items.ids)
        unknown = sorted(drop - known)
        if unknown:
            raise EmbedkitError(f"{splits_file}: item {unknown[0]!r} (and {len(unknown) - 1} more) is not in {source}; "
                                f"were these splits made for another store or folder?")
        keep = np.array([i not in drop for i in items.ids], dtype=bool)
        excluded["n_excluded"] = int((~keep).sum())
    rows = np.flatnonzero(keep)
    check_files(items, rows)
    if len(rows) < 2:
        raise EmbedkitError(f"{source}: only {len(rows)} item(s) left to adapt on; self-supervised training needs many cells")
    return Unlabelled(items, rows, excluded)
