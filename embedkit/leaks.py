"""Leak check: copies of one cell on both sides of a split make test scores lie.

Public cell datasets often ship each source cell as many augmented copies (rotated by any angle,
shifted, sheared, zoomed, brightened, re-compressed). If the grouping does not know about them, a split
puts copies of one cell in train and in test. For every test item this finds its candidates among the
items a model learns from (train, and val, which selects it) and verifies each candidate by aligning it
onto the test item (:mod:`embedkit.duplicates`), lists the confirmed copies and ends with a one-line
verdict. Groups that straddle parts are reported as leaks too.

Two ways to compare (``by``):

* ``pixels`` (default): the two-stage duplicate detector (rotation-, shift-, shear-, zoom- and
  intensity-robust; thresholds in :class:`embedkit.duplicates.search.Thresholds`).
* ``embedding``: cosine of the store key's vectors at or above a threshold (0.99). Catches copies the
  encoder itself cannot tell apart, but not rotated ones with CNN features.

The suggested grouping (:func:`suggest_groups`) is the connected components of the duplicate graph of
all items, joined with the store's own groups; ``probe --group-by leaks:FILE`` reads it back with
:func:`load_leak_groups`. :func:`auto_leak_check` is the fast check ``probe`` runs when the grouping
looks suspicious (:func:`suspicious_grouping`); it runs :func:`quick_leak_check` with bounded cost.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .duplicates.search import (K, Catalog, Thresholds, Verified, available_cores, build_catalog, duplicate_pairs,
                                 find_copies)
from .errors import EmbedkitError
from .images import Conversion
from .neighbors import knn, l2_normalize
from .splits import PARTS, Splits
from .store import Store
from .store_index import load_vectors

BY = ("pixels", "embedding")
EMBEDDING_THRESHOLD = 0.99
PAIR_COLUMNS = ["fold", "test_id", "test_label", "test_group", "seen_part", "seen_id", "seen_label", "seen_group",
                "similarity", "fine", "flat", "embedding_cosine"]
GROUP_COLUMNS = ["id", "group", "previous_group", "copies"]
#: Groups whose median size is at most this look too fine to hold the copies of one cell.
FEW_PER_GROUP = 1.5


@dataclass
class LeakReport:
    """Confirmed copy pairs, per-fold summaries, groups straddling parts, and the verdict."""

    pairs: object
    by: str
    threshold: float
    folds: list[dict] = field(default_factory=list)
    group_leaks: list[tuple[int, str, str]] = field(default_factory=list)
    grouping_note: str | None = None
    n_unchecked: int = 0

    @property
    def leaking(self) -> bool:
        return len(self.pairs) > 0 or bool(self.group_leaks)

    @property
    def measure(self) -> str:
        return "aligned pixel correlation" if self.by == "pixels" else "embedding cosine"

    @property
    def criterion(self) -> str:
        return "verified copy" if self.by == "pixels" else f"embedding cosine >= {self.threshold:.3f}"

    @property
    def verdict(self) -> str:
        n_folds = len(self.folds)
        where = f" across {n_folds} folds" if n_folds > 1 else ""
        parts = []
        if len(self.pairs):
            n_items = int(self.pairs.groupby("fold")["test_id"].nunique().sum())
            n_test = sum(f["n_test"] for f in self.folds)
            parts.append(f"{n_items} of {n_test} test items{where} have a copy in train/val ({self.criterion})")
        if self.group_leaks:
            parts.append(f"{len(self.group_leaks)} group(s) sit on both sides of the split "
                         f"(e.g. {self.group_leaks[0][1]!r} in fold {self.group_leaks[0][0]})")
        if parts:
            fix = ("regroup with the suggested grouping (--suggest-groups FILE, then probe --group-by leaks:FILE)"
                   if len(self.pairs) else "regroup")
            return "LEAK: " + "; ".join(parts) + f". Test scores on these splits are inflated; {fix}."
        tops = [f for f in self.folds if f["max_pair"]]
        top = max(tops, key=lambda f: f["max_similarity"]) if tops else None
        closest = (f"; closest candidate {top['max_similarity']:.3f} ({top['max_pair'][0]} ~ {top['max_pair'][1]})"
                   if top else "")
        line = f"clean: no test item has a copy in train/val ({self.criterion}){where}{closest}"
        if self.n_unchecked:
            line += f"; {self.n_unchecked} items too small to check"
        if self.grouping_note:
            line += (f". Note: {self.grouping_note}; this check sees copies, not other cells of the same image, "
                     f"movie or well")
        return line


# --------------------------------------------------------------------------- reading items


def item_conversion(store: Store, key: str | None) -> Conversion:
    """The channel conversion the key's encoder saw; without a key, the store's only key's (or the default)."""
    if key is None and len(store.keys) == 1:
        key = store.keys[0]
    return Conversion.from_dict(store.config(store.resolve_key(key)).get("conversion")) if key else Conversion()


def store_catalog(store: Store, rows: Sequence[int], conv: Conversion = Conversion(), progress: bool = False,
                  workers: int = 1) -> Catalog:
    """Duplicate-detector catalog of store items (catalog position i = ``rows[i]``); descriptors of large sets
    in ``workers`` processes."""
    from .fingerprints import iter_item_images

    rows = np.asarray(rows, dtype=np.int64)
    images = iter_item_images(store, rows, conv, what="the duplicate check")
    return build_catalog((img for _, img in _in_order(images, len(rows))), n=len(rows), progress=progress, workers=workers)


def _in_order(pairs, n: int):
    """(position, item) pairs in position order (store pixels arrive sorted by row within each chunk)."""
    pending: dict[int, object] = {}
    nxt = 0
    for j, item in pairs:
        pending[j] = item
        while nxt in pending:
            yield nxt, pending.pop(nxt)
            nxt += 1
    if nxt != n:
        raise EmbedkitError(f"only {nxt} of {n} item images were read")


# --------------------------------------------------------------------------- grouping checks


def suspicious_grouping(groups: Sequence[str]) -> str | None:
    """Why these groups may not keep copies of one cell together, or None when they look plausible.

    Suspicious: no group at all (empty strings), every item its own group, or very few items per group
    (median group size <= 1.5)."""
    g = np.asarray(groups, dtype=object).astype(str)
    if len(g) < 2:
        return None
    if (g == "").all():
        return "the items have no group column"
    sizes = np.unique(g, return_counts=True)[1]
    if len(sizes) == len(g):
        return "every item is its own group"
    if np.median(sizes) <= FEW_PER_GROUP:
        return f"most groups hold a single item ({len(sizes):,} groups for {len(g):,} items)"
    return None


#: The automatic check's bounds: test items verified, and train/val items searched (sampled beyond that).
AUTO_MAX_ITEMS = 200
AUTO_MAX_POOL = 10_000


@dataclass
class LeakVerdict:
    """Result of the quick check: ``status`` is 'leak' or 'clean'; ``line`` is the one line to print.

    ``reason`` says why the automatic check ran (:func:`suspicious_grouping`); empty when it was asked for."""

    status: str
    line: str
    n_checked: int
    n_flagged: int
    examples: list[tuple[str, str]]
    seconds: float
    reason: str = ""
    n_pool: int = 0

    @property
    def leaking(self) -> bool:
        return self.status == "leak"


def quick_leak_check(store: Store | str, splits_or_groups: Splits | Sequence[str], *, key: str | None = None,
                     max_items: int = 1000, max_pool: int | None = None, k: int = 5, seed: int = 0,
                     reason: str = "", progress: bool = False, log: Callable[[str], None] | None = None) -> LeakVerdict:
    """Fast copy check for ``probe``: do copies of one cell straddle the split (or the groups)?

    With splits: up to ``max_items`` test items of fold 0 against that fold's train and val items (a random
    ``max_pool`` of them when there are more). With groups (aligned to store rows): up to ``max_items``
    sampled items against all items of other groups. ``reason`` (why it runs) opens the verdict line."""
    t0 = time.perf_counter()
    store = store if isinstance(store, Store) else Store(store)
    ids = store.ids
    rng = np.random.default_rng(seed)
    if isinstance(splits_or_groups, Splits):
        fold = splits_or_groups.folds[0]
        row_of = {str(i): r for r, i in enumerate(ids)}
        test = np.array([row_of[i] for i in fold.test if i in row_of], dtype=np.int64)
        seen = np.array([row_of[i] for i in (*fold.train, *fold.val) if i in row_of], dtype=np.int64)
        queries = np.sort(rng.choice(test, min(max_items, len(test)), replace=False)) if len(test) else test
        if max_pool is not None and len(seen) > max_pool:
            seen = np.sort(rng.choice(seen, max_pool, replace=False))
        rows = np.union1d(queries, seen)
        exclude = None
        what = "test items"
        where = "train/val" + (f" ({len(seen):,} sampled)" if max_pool is not None and len(seen) == max_pool else "")
    else:
        groups = np.asarray(splits_or_groups, dtype=object).astype(str)
        if len(groups) != len(ids):
            raise EmbedkitError(f"quick_leak_check: {len(groups)} groups for {len(ids)} store items")
        rows = np.arange(len(ids))
        queries = np.sort(rng.choice(rows, min(max_items, len(rows)), replace=False))
        exclude = _same_group(groups, rows)
        what = "sampled items"
        where = "another group"
    cat = store_catalog(store, rows, item_conversion(store, key), progress=progress)
    pos = {int(r): p for p, r in enumerate(rows)}
    q_pos = np.array([pos[int(r)] for r in queries], dtype=np.int64)
    pool_pos = np.array([pos[int(r)] for r in (seen if exclude is None else rows)], dtype=np.int64)
    found = [v for v in find_copies(cat, q_pos, pool_pos, k=k, exclude=exclude, log=log) if v.copy]
    flagged = {v.query for v in found}
    examples = [(str(ids[rows[v.query]]), str(ids[rows[v.match]])) for v in found[:3]]
    seconds = time.perf_counter() - t0
    head = f"leak check ({reason})" if reason else "leak check"
    if flagged:
        eg = f" (e.g. {examples[0][0]} ~ {examples[0][1]})"
        line = (f"{head}: LEAK: {len(flagged)} of {len(q_pos)} {what} have a verified copy in {where}{eg}. "
                f"Test scores are inflated; run 'embedkit leaks {store.path} --suggest-groups groups.csv' "
                f"and probe again with --group-by leaks:groups.csv")
        return LeakVerdict("leak", line, len(q_pos), len(flagged), examples, seconds, reason, len(pool_pos))
    line = f"{head}: clean: no copies found for {len(q_pos)} {what} in {where} ({seconds:.0f} s)"
    if reason:
        line += "; copies only: other cells of one image, movie or well can still leak under this grouping"
    return LeakVerdict("clean", line, len(q_pos), 0, [], seconds, reason, len(pool_pos))


def auto_leak_check(store: Store | str, key: str | None, splits: Splits,
                    groups: Sequence[str] | Mapping[str, str] | None = None, *, max_items: int = AUTO_MAX_ITEMS,
                    max_pool: int = AUTO_MAX_POOL, seed: int = 0, progress: bool = False,
                    log: Callable[[str], None] | None = None) -> LeakVerdict | None:
    """The check ``probe`` runs by default: None when the grouping looks safe, else a bounded copy check.

    ``groups`` are the groups the splits were made with: aligned to store rows, or a mapping id -> group
    (default: the store's own). The grouping is judged on fold 0's items by :func:`suspicious_grouping`;
    when it is suspicious, up to ``max_items`` test items of fold 0 are verified against up to ``max_pool``
    of its train and val items (:func:`quick_leak_check`), so the cost is bounded whatever the store's size."""
    store = store if isinstance(store, Store) else Store(store)
    ids = store.ids
    if not splits.folds:
        return None
    fold = splits.folds[0]
    members = [*fold.train, *fold.val, *fold.test]
    if isinstance(groups, Mapping):
        missing = [i for i in members if i not in groups]
        if missing:
            raise EmbedkitError(f"auto_leak_check: item {missing[0]!r} of the splits has no group")
        fold_groups = [groups[i] for i in members]
    else:
        aligned = np.asarray(store.groups if groups is None else groups, dtype=object)
        if len(aligned) != len(ids):
            raise EmbedkitError(f"auto_leak_check: {len(aligned)} groups for {len(ids)} store items")
        row_of = {str(i): r for r, i in enumerate(ids)}
        fold_groups = [aligned[row_of[i]] for i in members if i in row_of]
    reason = suspicious_grouping(fold_groups) if fold_groups else None
    if reason is None or not fold.test or not (fold.train or fold.val):
        return None
    return quick_leak_check(store, splits, key=key, max_items=max_items, max_pool=max_pool, seed=seed, reason=reason,
                            progress=progress, log=log)


def _same_group(groups: np.ndarray, rows: np.ndarray) -> Callable[[int, int], bool]:
    g = groups[rows]
    return lambda a, b: g[a] == g[b]


# --------------------------------------------------------------------------- the split check


def find_leaks(store_path: str, key: str | None, splits: Splits, *, by: str = "pixels", threshold: float | None = None,
               folds: Sequence[int] | None = None, k: int = K, max_copies: int = 1,
               against: Sequence[str] = ("train", "val"), thresholds: Thresholds = Thresholds(), progress: bool = False,
               log: Callable[[str], None] | None = None, workers: int | None = None) -> LeakReport:
    """Check every test item of each fold against the ``against`` parts and collect confirmed copy pairs.

    Verification runs in ``workers`` processes (default: the cores this process may use)."""
    import pandas as pd

    if by not in BY:
        raise EmbedkitError(f"--by {by!r}: choose {' or '.join(BY)}")
    if by == "pixels" and threshold is not None:
        raise EmbedkitError("--threshold applies to --by embedding; the pixel check verifies copies by alignment")
    threshold = EMBEDDING_THRESHOLD if threshold is None else float(threshold)
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
    fold_ids = list(range(len(splits.folds))) if folds is None else list(folds)
    for f in fold_ids:
        if not 0 <= f < len(splits.folds):
            raise EmbedkitError(f"--fold {f}: the splits have folds 0..{len(splits.folds) - 1}")
    for f in fold_ids:  # unknown ids and missing vectors fail before any long step
        for p in ("test", *against):
            _rows(splits.folds[f].part(p), row_of, done if by == "embedding" else None, key, f, p)
    need = np.array(sorted({row_of[i] for f in fold_ids for p in ("test", *against) for i in splits.folds[f].part(p)}),
                    dtype=np.int64)
    pos = {int(r): n for n, r in enumerate(need)}
    emb = None
    if key and done[need].all():
        _, emb = load_vectors(store, key, need)
        emb = l2_normalize(emb)
    cat = None
    if by == "pixels":
        if log:
            log(f"duplicate descriptors of {len(need):,} items")
        cat = store_catalog(store, need, item_conversion(store, key), progress=progress,
                            workers=available_cores() if workers is None else workers)
    records, summaries, group_leaks = [], [], []
    n_unchecked = int((~cat.checkable(thresholds.min_side)).sum()) if cat is not None else 0
    for f in fold_ids:
        fold = splits.folds[f]
        test_rows = _rows(fold.test, row_of, None, key, f, "test")
        seen = [(p, _rows(fold.part(p), row_of, None, key, f, p)) for p in against]
        part_of = {int(r): p for p, rr in seen for r in rr}
        seen_rows = np.array(sorted(part_of), dtype=np.int64)
        for g in sorted(set(groups[test_rows]) & set(groups[seen_rows])):
            if g:
                sides = sorted({p for p, r in seen if g in set(groups[r])})
                group_leaks.append((f, str(g), "test and " + "/".join(sides)))
        summary = {"fold": f, "n_test": int(len(test_rows)), "n_seen": int(len(seen_rows)), "n_leaking": 0,
                   "max_similarity": float("nan"), "max_pair": None}
        if len(test_rows) and len(seen_rows):
            if by == "pixels":
                verified = find_copies(cat, [pos[int(r)] for r in test_rows], [pos[int(r)] for r in seen_rows], k=k,
                                       max_copies=max_copies, thresholds=thresholds, progress=progress, log=log,
                                       workers=available_cores() if workers is None else workers)
                hits = [(need[v.query], need[v.match], v.result.mid, v.result.fine, v.result.flat) for v in verified if v.copy]
                if verified:
                    top = max(verified, key=lambda v: v.result.mid)
                    summary["max_similarity"] = float(top.result.mid)
                    summary["max_pair"] = (str(ids[need[top.query]]), str(ids[need[top.match]]))
            else:
                hits = _embedding_hits(emb, [pos[int(r)] for r in test_rows], [pos[int(r)] for r in seen_rows], need,
                                       threshold, k, progress, log, summary, ids)
            summary["n_leaking"] = len({t for t, *_ in hits})
            for t, s, sim, fine, flat in hits:
                cos = float(emb[pos[int(t)]] @ emb[pos[int(s)]]) if emb is not None else float("nan")
                records.append((f, str(ids[t]), str(labels[t]), str(groups[t]), part_of[int(s)], str(ids[s]),
                                str(labels[s]), str(groups[s]), float(sim), fine, flat, cos))
        summaries.append(summary)
    pairs = pd.DataFrame.from_records(records, columns=PAIR_COLUMNS).sort_values("similarity", ascending=False,
                                                                                 ignore_index=True)
    note = suspicious_grouping(groups[need])
    return LeakReport(pairs, by, threshold, summaries, group_leaks, note, n_unchecked)


def _embedding_hits(emb: np.ndarray, test_pos: list[int], seen_pos: list[int], need: np.ndarray, threshold: float,
                    k: int, progress: bool, log, summary: dict, ids: np.ndarray) -> list[tuple]:
    """(test row, seen row, cosine, nan, nan) of pairs whose embedding cosine reaches ``threshold``."""
    test_pos, seen_pos = np.asarray(test_pos), np.asarray(seen_pos)
    sims, nn = knn(emb[seen_pos], emb[test_pos], min(k, len(seen_pos)), progress=progress, log=log)
    best = int(np.argmax(sims[:, 0]))
    summary["max_similarity"] = float(sims[best, 0])
    summary["max_pair"] = (str(ids[need[test_pos[best]]]), str(ids[need[seen_pos[nn[best, 0]]]]))
    q, j = np.nonzero((sims >= threshold) & (nn >= 0))
    return [(need[test_pos[a]], need[seen_pos[nn[a, b]]], float(sims[a, b]), float("nan"), float("nan"))
            for a, b in zip(q, j)]


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


# --------------------------------------------------------------------------- the suggested grouping


@dataclass
class GroupSuggestion:
    """Per store row: the suggested group, the store's own group, and how many confirmed copies link it."""

    ids: np.ndarray
    groups: np.ndarray
    previous: np.ndarray
    copies: np.ndarray
    pairs: list[Verified]

    @property
    def n_merged(self) -> int:
        """Suggested groups that join items of more than one previous group."""
        import pandas as pd

        frame = pd.DataFrame({"g": self.groups, "p": self.previous})
        return int((frame.groupby("g")["p"].nunique() > 1).sum())

    def summary(self) -> str:
        n_prev = len(set(self.previous.tolist()))
        n_new = len(set(self.groups.tolist()))
        return (f"{len(self.pairs):,} confirmed copy pairs; {n_prev:,} groups became {n_new:,} "
                f"({self.n_merged:,} join items of several previous groups)")


def suggest_groups(store_path: str, key: str | None = None, *, k: int = K, thresholds: Thresholds = Thresholds(),
                   progress: bool = False, log: Callable[[str], None] | None = None) -> GroupSuggestion:
    """Connected components of (confirmed copy pairs + the store's own groups) over all store items."""
    from .duplicates.search import components

    store = Store(store_path)
    key = store.resolve_key(key) if store.keys else None
    ids, groups = store.ids, np.asarray(store.groups, dtype=object).astype(str)
    rows = np.arange(len(ids))
    if log:
        log(f"duplicate descriptors of {len(rows):,} items")
    cat = store_catalog(store, rows, item_conversion(store, key), progress=progress, workers=available_cores())
    pairs = duplicate_pairs(cat, k=k, thresholds=thresholds, progress=progress, log=log)
    edges = [(v.query, v.match) for v in pairs]
    first: dict[str, int] = {}
    for r, g in enumerate(groups):
        if g:
            edges.append((first.setdefault(g, r), r))
    labels = components(len(ids), edges)
    copies = np.zeros(len(ids), dtype=np.int64)
    for v in pairs:
        copies[v.query] += 1
        copies[v.match] += 1
    width = len(str(max(labels.max(initial=0), 1)))
    names = np.array([f"dup{c:0{width}d}" for c in labels], dtype=object)
    return GroupSuggestion(ids, names, groups.astype(object), copies, pairs)


def write_groups(path: str | os.PathLike, suggestion: GroupSuggestion) -> None:
    """The suggested grouping as CSV (id, group, previous_group, copies), written atomically."""
    import pandas as pd

    frame = pd.DataFrame({"id": suggestion.ids, "group": suggestion.groups, "previous_group": suggestion.previous,
                          "copies": suggestion.copies}, columns=GROUP_COLUMNS)
    tmp = f"{path}.tmp-{os.getpid()}"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def load_leak_groups(store: Store, path: str | os.PathLike) -> np.ndarray:
    """Groups from a suggested-grouping CSV (id,group,...; ``leaks --suggest-groups``), aligned to the store's rows.

    Every store item must be listed with a non-empty group; items the store no longer holds are ignored.
    Bad input (no such file, not a CSV with id and group, an item listed twice, items missing) is one
    :class:`EmbedkitError` line naming the file."""
    from .sources import read_csv_rows

    what = f"--group-by leaks:{path}"
    if not str(path):
        raise EmbedkitError("--group-by leaks:FILE needs a file: the grouping written by "
                            "'embedkit leaks STORE --suggest-groups FILE'")
    if not os.path.isfile(path):
        raise EmbedkitError(f"{what}: no such file; write it with 'embedkit leaks {store.path} --suggest-groups {path}'")
    try:
        _, rows = read_csv_rows(path, ("id", "group"), what="grouping file (from 'embedkit leaks --suggest-groups')")
    except EmbedkitError as exc:  # read_csv_rows names the file first: name the option instead
        msg = str(exc)
        raise EmbedkitError(what + (msg[len(str(path)):] if msg.startswith(str(path)) else f": {msg}")) from None
    group_of: dict[str, str] = {}
    for line, row in rows:
        if row["id"] in group_of:
            raise EmbedkitError(f"{what}:{line}: item {row['id']!r} is listed twice")
        if not row["group"]:
            raise EmbedkitError(f"{what}:{line}: item {row['id']!r} has an empty group")
        group_of[row["id"]] = row["group"]
    ids = store.ids
    missing = [str(i) for i in ids if str(i) not in group_of]
    if missing:
        raise EmbedkitError(f"{what}: {len(missing):,} of the store's {len(ids):,} items have no group, e.g. "
                            f"{missing[0]!r}; was it written for another store? Write it again with "
                            f"'embedkit leaks {store.path} --suggest-groups {path}'")
    return np.array([group_of[str(i)] for i in ids], dtype=object)
