"""Leak check: near-duplicate items on both sides of a split make test scores lie.

Group-aware splits keep one movie or well in one part, but the same cell can still reach both sides
as a copy: an image exported twice, a flipped or rotated augmentation saved with the data, a crop
re-segmented from an overlapping field. For every test item this finds its most similar items in the
parts a model learns from (train, and val, which selects it) with FAISS, lists the pairs at or above a
threshold, and ends with a one-line verdict. Groups that straddle parts are reported as leaks too.

Two similarities (``by``):

* ``pixels`` (default): correlation of flip-, rotation- and intensity-invariant pixel fingerprints
  (:mod:`embedkit.fingerprints`). Threshold 0.975, from MitoCheck: augmented copies of a cell score
  >= 0.993 with their original, distinct cells of other movies <= 0.96.
* ``embedding``: cosine of the store key's vectors. Catches copies the encoder itself cannot tell
  apart, but not rotated ones with CNN features (rotated copies fell to 0.78 with efficientnet_lite0),
  and its scale depends on the encoder. Threshold 0.99 (distinct MitoCheck cells of other movies reach
  0.986 with efficientnet_lite0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import EmbedkitError
from .images import Conversion
from .neighbors import knn, l2_normalize
from .splits import PARTS, Splits
from .store import Store
from .store_index import load_vectors

BY = ("pixels", "embedding")
DEFAULT_THRESHOLDS = {"pixels": 0.975, "embedding": 0.99}
#: Neighbours examined per test item (and per orientation, for pixels).
PAIRS_PER_ITEM = 5
PAIR_COLUMNS = ["fold", "test_id", "test_label", "test_group", "seen_part", "seen_id", "seen_label", "seen_group",
                "similarity", "pixel_similarity", "embedding_cosine"]


@dataclass
class LeakReport:
    """Pairs at or above the threshold, per-fold summaries and the verdict."""

    pairs: object
    by: str
    threshold: float
    folds: list[dict] = field(default_factory=list)
    group_leaks: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def leaking(self) -> bool:
        return len(self.pairs) > 0 or bool(self.group_leaks)

    @property
    def measure(self) -> str:
        return "pixel similarity" if self.by == "pixels" else "embedding cosine"

    @property
    def verdict(self) -> str:
        n_folds = len(self.folds)
        where = f" across {n_folds} folds" if n_folds > 1 else ""
        parts = []
        if len(self.pairs):
            n_items = int(self.pairs.groupby("fold")["test_id"].nunique().sum())
            n_test = sum(f["n_test"] for f in self.folds)
            parts.append(f"{n_items} of {n_test} test items{where} have a near-duplicate in train/val "
                         f"({self.measure} >= {self.threshold:.3f}, top {self.pairs['similarity'].max():.3f})")
        if self.group_leaks:
            parts.append(f"{len(self.group_leaks)} group(s) sit on both sides of the split "
                         f"(e.g. {self.group_leaks[0][1]!r} in fold {self.group_leaks[0][0]})")
        if parts:
            return "LEAK: " + "; ".join(parts) + ". Test scores on these splits are inflated; remove the copies or regroup."
        tops = [f for f in self.folds if f["max_pair"]]
        top = max(tops, key=lambda f: f["max_similarity"]) if tops else None
        closest = (f"; closest pair {top['max_similarity']:.3f} ({top['max_pair'][0]} ~ {top['max_pair'][1]})"
                   if top else "")
        return f"clean: no test item has a train/val near-duplicate ({self.measure} >= {self.threshold:.3f}){where}{closest}"


def find_leaks(store_path: str, key: str | None, splits: Splits, *, by: str = "pixels", threshold: float | None = None,
               folds: Sequence[int] | None = None, pairs_per_item: int = PAIRS_PER_ITEM, against: Sequence[str] = ("train", "val"),
               progress: bool = False, log: Callable[[str], None] | None = None) -> LeakReport:
    """Compare every test item of each fold with the ``against`` parts and collect near-duplicate pairs."""
    import pandas as pd

    from .fingerprints import dihedral, item_fingerprints

    if by not in BY:
        raise EmbedkitError(f"--by {by!r}: choose {' or '.join(BY)}")
    threshold = DEFAULT_THRESHOLDS[by] if threshold is None else float(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise EmbedkitError(f"--threshold {threshold}: a similarity lies between -1 and 1")
    bad = [p for p in against if p not in PARTS or p == "test"]
    if bad:
        raise EmbedkitError(f"cannot compare test against {bad}; choose among train and val")
    store = Store(store_path)
    key = store.resolve_key(key) if (by == "embedding" or store.keys) else None
    ids, labels, groups = store.ids, store.labels, store.groups
    row_of = {str(i): r for r, i in enumerate(ids)}
    done = store.done(key) if key else np.zeros(len(ids), dtype=bool)
    conv = Conversion.from_dict(store.config(key).get("conversion")) if key else Conversion()
    fold_ids = list(range(len(splits.folds))) if folds is None else list(folds)
    for f in fold_ids:
        if not 0 <= f < len(splits.folds):
            raise EmbedkitError(f"--fold {f}: the splits have folds 0..{len(splits.folds) - 1}")
    need = sorted({row_of[i] for f in fold_ids for p in ("test", *against) for i in splits.folds[f].part(p) if i in row_of})
    feats: dict[int, int] = {r: n for n, r in enumerate(need)}
    for f in fold_ids:  # unknown ids and missing vectors fail before any long step
        for p in ("test", *against):
            _rows(splits.folds[f].part(p), row_of, done if by == "embedding" else None, key, f, p)
    need = np.array(need, dtype=np.int64)
    if by == "pixels":
        if log:
            log(f"pixel fingerprints of {len(need):,} items")
        fps = item_fingerprints(store, need, conv, progress=progress)
    else:
        _, fps = load_vectors(store, key, need)
        fps = l2_normalize(fps)
    emb = None
    if by == "pixels" and key and done[need].all():
        _, emb = load_vectors(store, key, need)
        emb = l2_normalize(emb)
    records, summaries, group_leaks = [], [], []
    for f in fold_ids:
        fold = splits.folds[f]
        test_rows = _rows(fold.test, row_of, None, key, f, "test")
        seen = [(p, _rows(fold.part(p), row_of, None, key, f, p)) for p in against]
        seen_rows = np.concatenate([r for _, r in seen]) if seen else np.zeros(0, np.int64)
        seen_part = np.concatenate([np.array([p] * len(r), dtype=object) for p, r in seen]) if seen else np.zeros(0, object)
        for g in sorted(set(groups[test_rows]) & set(groups[seen_rows])):
            if g:
                sides = sorted({p for p, r in seen if g in set(groups[r])})
                group_leaks.append((f, str(g), "test and " + "/".join(sides)))
        summary = {"fold": f, "n_test": int(len(test_rows)), "n_seen": int(len(seen_rows)), "n_leaking": 0,
                   "max_similarity": float("nan"), "max_pair": None}
        if len(test_rows) and len(seen_rows):
            t_pos = np.array([feats[r] for r in test_rows])
            s_pos = np.array([feats[r] for r in seen_rows])
            sims, nn = _compare(fps[t_pos], fps[s_pos], by, min(pairs_per_item, len(seen_rows)), progress, log,
                                dihedral)
            best = int(np.argmax(sims[:, 0]))
            summary["max_similarity"] = float(sims[best, 0])
            summary["max_pair"] = (str(ids[test_rows[best]]), str(ids[seen_rows[nn[best, 0]]]))
            hit_q, hit_j = np.nonzero((sims >= threshold) & (nn >= 0))
            summary["n_leaking"] = int(len(np.unique(hit_q)))
            for q, j in zip(hit_q, hit_j):
                t, s = test_rows[q], seen_rows[nn[q, j]]
                sim = float(sims[q, j])
                pix = sim if by == "pixels" else _pixel_similarity(store, conv, t, s)
                cos = sim if by == "embedding" else (float(emb[feats[t]] @ emb[feats[s]]) if emb is not None else float("nan"))
                records.append((f, str(ids[t]), str(labels[t]), str(groups[t]), str(seen_part[nn[q, j]]), str(ids[s]),
                                str(labels[s]), str(groups[s]), sim, pix, cos))
        summaries.append(summary)
    pairs = pd.DataFrame.from_records(records, columns=PAIR_COLUMNS).sort_values("similarity", ascending=False,
                                                                                 ignore_index=True)
    return LeakReport(pairs, by, threshold, summaries, group_leaks)


def _compare(test: np.ndarray, seen: np.ndarray, by: str, k: int, progress: bool, log, dihedral) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (similarity, seen index) per test item; for pixels the best over the 8 orientations of the test image."""
    if by == "embedding":
        return knn(seen, test, k, progress=progress, log=log)
    variants = np.concatenate([dihedral(t) for t in test])  # [n_test * 8, d]
    sims, nn = knn(seen, variants, k, progress=progress, log=log)
    sims = sims.reshape(len(test), 8 * k)
    nn = nn.reshape(len(test), 8 * k)
    out_s = np.full((len(test), k), -np.inf, dtype=np.float32)
    out_n = np.full((len(test), k), -1, dtype=np.int64)
    order = np.argsort(-sims, axis=1, kind="stable")
    for q in range(len(test)):
        seen_j: set[int] = set()
        c = 0
        for o in order[q]:
            j = int(nn[q, o])
            if j < 0 or j in seen_j:
                continue
            seen_j.add(j)
            out_s[q, c], out_n[q, c] = sims[q, o], j
            c += 1
            if c == k:
                break
    return out_s, out_n


def _pixel_similarity(store: Store, conv: Conversion, a: int, b: int) -> float:
    """Fingerprint similarity of two items (best orientation), NaN when an image cannot be read."""
    from .fingerprints import dihedral, item_fingerprints

    try:
        fa, fb = item_fingerprints(store, [a, b], conv)
    except EmbedkitError:
        return float("nan")
    return float((dihedral(fa) @ fb).max())


def _rows(item_ids: Sequence[str], row_of: dict[str, int], done: np.ndarray | None, key: str | None, fold: int,
          part: str) -> np.ndarray:
    missing = [i for i in item_ids if i not in row_of]
    if missing:
        raise EmbedkitError(f"splits fold {fold} {part}: item {missing[0]!r} is not in the store "
                            f"({len(missing)} unknown); were these splits made for another store?")
    rows = np.array(sorted(row_of[i] for i in item_ids), dtype=np.int64)
    if done is not None and len(rows) and not done[rows].all():
        raise EmbedkitError(f"splits fold {fold} {part}: {int((~done[rows]).sum())} items have no vector under key "
                            f"{key!r}; run 'embedkit embed' to finish them, or use --by pixels")
    return rows
