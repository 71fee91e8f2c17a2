"""Leak check: near-duplicate items on both sides of a split make test scores lie.

Group-aware splits keep one movie or well in one part, but the same cell can still reach both sides
as a copy: an image saved twice, a flipped or rotated augmentation exported with the data, a crop
re-segmented from an overlapping field. For every test item this finds its most similar items in the
parts a model learns from (train, and val, which selects it) and lists pairs at or above a cosine
threshold, with a one-line verdict. Splits whose groups straddle parts are reported as leaks too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import EmbedkitError
from .neighbors import knn
from .splits import PARTS, Splits
from .store import Store
from .store_index import load_vectors

#: Default cosine threshold, chosen on real MitoCheck cells with efficientnet_lite0 (docs/neighbors.md):
#: flipped, rotated and +-10 % intensity copies of a cell stay at >= 0.97 (lowest seen 0.974), while
#: distinct cells from different movies reach at most 0.955 (99.9th percentile of nearest neighbours 0.94).
DEFAULT_THRESHOLD = 0.965
#: Neighbours examined per test item (pairs above the threshold beyond this many are not listed).
PAIRS_PER_ITEM = 5
PAIR_COLUMNS = ["fold", "test_id", "test_label", "test_group", "seen_part", "seen_id", "seen_label", "seen_group",
                "similarity"]


@dataclass
class LeakReport:
    """Pairs at or above the threshold, per-fold summaries and the verdict."""

    pairs: object
    threshold: float
    folds: list[dict] = field(default_factory=list)
    group_leaks: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def leaking(self) -> bool:
        return len(self.pairs) > 0 or bool(self.group_leaks)

    @property
    def verdict(self) -> str:
        n_folds = len(self.folds)
        where = f" across {n_folds} folds" if n_folds > 1 else ""
        parts = []
        if len(self.pairs):
            n_items = self.pairs.groupby("fold")["test_id"].nunique().sum()
            n_test = sum(f["n_test"] for f in self.folds)
            parts.append(f"{n_items} of {n_test} test items{where} have a near-duplicate in train/val "
                         f"(cosine >= {self.threshold:.3f}, top {self.pairs['similarity'].max():.3f})")
        if self.group_leaks:
            parts.append(f"{len(self.group_leaks)} group(s) sit on both sides of the split "
                         f"(e.g. {self.group_leaks[0][1]!r} in fold {self.group_leaks[0][0]})")
        if parts:
            return "LEAK: " + "; ".join(parts) + ". Test scores on these splits are inflated; remove the duplicates or regroup."
        top = max(self.folds, key=lambda f: f["max_similarity"]) if self.folds else None
        closest = (f"; the closest train/test pair has cosine {top['max_similarity']:.3f} "
                   f"({top['max_pair'][0]} ~ {top['max_pair'][1]})") if top and top["max_pair"] else ""
        return f"clean: no test item has a train/val near-duplicate at cosine >= {self.threshold:.3f}{where}{closest}"


def find_leaks(store_path: str, key: str | None, splits: Splits, *, threshold: float = DEFAULT_THRESHOLD,
               folds: Sequence[int] | None = None, pairs_per_item: int = PAIRS_PER_ITEM, against: Sequence[str] = ("train", "val"),
               progress: bool = False, log: Callable[[str], None] | None = None) -> LeakReport:
    """Compare every test item of each fold with the ``against`` parts and collect near-duplicate pairs."""
    import pandas as pd

    if not -1.0 <= threshold <= 1.0:
        raise EmbedkitError(f"--threshold {threshold}: a cosine similarity lies between -1 and 1")
    bad = [p for p in against if p not in PARTS or p == "test"]
    if bad:
        raise EmbedkitError(f"cannot compare test against {bad}; choose among train and val")
    store = Store(store_path)
    key = store.resolve_key(key)
    ids, labels, groups = store.ids, store.labels, store.groups
    row_of = {str(i): r for r, i in enumerate(ids)}
    done = store.done(key)
    fold_ids = list(range(len(splits.folds))) if folds is None else list(folds)
    for f in fold_ids:
        if not 0 <= f < len(splits.folds):
            raise EmbedkitError(f"--fold {f}: the splits have folds 0..{len(splits.folds) - 1}")
    records, summaries, group_leaks = [], [], []
    for f in fold_ids:
        fold = splits.folds[f]
        test_rows = _rows(fold.test, row_of, done, key, f, "test")
        seen_parts = [(p, _rows(fold.part(p), row_of, done, key, f, p)) for p in against]
        seen_rows = np.concatenate([r for _, r in seen_parts]) if seen_parts else np.zeros(0, np.int64)
        seen_part = np.concatenate([[p] * len(r) for p, r in seen_parts]) if seen_parts else np.zeros(0, object)
        test_groups = set(groups[test_rows])
        for g in sorted(test_groups & set(groups[seen_rows])):
            if g:
                group_leaks.append((f, str(g), "test/" + "/".join(sorted({str(p) for p, r in seen_parts if g in set(groups[r])}))))
        summary = {"fold": f, "n_test": int(len(test_rows)), "n_seen": int(len(seen_rows)), "n_leaking": 0,
                   "max_similarity": float("nan"), "max_pair": None}
        if len(test_rows) and len(seen_rows):
            all_rows = np.unique(np.concatenate([test_rows, seen_rows]))
            _, vecs = load_vectors(store, key, all_rows)
            pos = np.searchsorted(all_rows, test_rows), np.searchsorted(all_rows, seen_rows)
            kk = min(pairs_per_item, len(seen_rows))
            sims, nn = knn(vecs[pos[1]], vecs[pos[0]], kk, progress=progress, log=log)
            best = int(np.argmax(sims[:, 0]))
            summary["max_similarity"] = float(sims[best, 0])
            summary["max_pair"] = (str(ids[test_rows[best]]), str(ids[seen_rows[nn[best, 0]]]))
            hit_q, hit_j = np.nonzero((sims >= threshold) & (nn >= 0))
            summary["n_leaking"] = int(len(np.unique(hit_q)))
            for q, j in zip(hit_q, hit_j):
                t, s = test_rows[q], seen_rows[nn[q, j]]
                records.append((f, str(ids[t]), str(labels[t]), str(groups[t]), str(seen_part[nn[q, j]]), str(ids[s]),
                                str(labels[s]), str(groups[s]), float(sims[q, j])))
        summaries.append(summary)
    pairs = pd.DataFrame.from_records(records, columns=PAIR_COLUMNS).sort_values("similarity", ascending=False,
                                                                                 ignore_index=True)
    return LeakReport(pairs, threshold, summaries, group_leaks)


def _rows(item_ids: Sequence[str], row_of: dict[str, int], done: np.ndarray, key: str, fold: int, part: str) -> np.ndarray:
    missing = [i for i in item_ids if i not in row_of]
    if missing:
        raise EmbedkitError(f"splits fold {fold} {part}: item {missing[0]!r} is not in the store "
                            f"({len(missing)} unknown); were these splits made for another store?")
    rows = np.array(sorted(row_of[i] for i in item_ids), dtype=np.int64)
    not_done = rows[~done[rows]] if len(rows) else rows
    if len(not_done):
        raise EmbedkitError(f"splits fold {fold} {part}: {len(not_done)} items have no vector under key {key!r}; "
                            f"run 'embedkit embed' to finish them")
    return rows
