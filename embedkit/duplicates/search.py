"""The two-stage copy search: FAISS candidates from small descriptors, then aligned verification.

A :class:`Catalog` holds every item's uint8 canvas and stage-1 descriptor. :func:`find_copies` checks
query items against a pool (a split's test items against its train and validation items);
:func:`duplicate_pairs` checks every item against all others, for the suggested grouping. Each query's
candidates are verified in the order of their descriptor similarity, and a query stops once it has
``max_copies`` confirmed copies, so the cost stays near k verifications per clean item and a few per copy.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .align import Match, match
from .descriptors import DIM, augmented_pairs, describe_canvas, fit_metric
from .prepare import Prepared, canvas

#: Candidates per query from stage 1.
K = 10
#: Queries per task when verification runs in several processes.
CHUNK = 25


@dataclass(frozen=True)
class Thresholds:
    """When an aligned pair counts as a copy.

    A copy keeps its original's outline and texture (``mid``, the band-passed correlation) and either its
    finest detail everywhere (``fine``) or its noise and texture away from outlines (``flat``). Distinct
    cells that merely look alike reach a high ``mid`` and, through their outlines, a fairly high ``fine``,
    but their noise is independent, so ``flat`` stays near 0. The rule is
    ``(mid >= strict_mid and fine >= fine) or (mid >= mid and flat >= flat)``, over a compared region
    of at least ``min_overlap`` of the query's central disc (two smooth blobs match on a sliver). A pair
    whose correlation on the small canvases stays under ``gate`` stops there. With ``both_ways`` a pair that
    fails is also tried the other way round (the candidate aligned onto the query, around its own centre),
    when its small-canvas correlation reached ``back_gate``. Crops with a side below ``min_side`` pixels
    hold too little to judge and are skipped. A pair that passes only through ``flat`` with ``mid`` under
    ``sure_mid`` (a marginal pass: two smooth look-alikes, both re-compressed, can get there one way round)
    counts only when the other direction passes too. Defaults from scripts/bench_leaks.py (docs/leaks.md)."""

    mid: float = 0.95
    flat: float = 0.25
    strict_mid: float = 0.99
    fine: float = 0.90
    gate: float = 0.90
    min_overlap: float = 0.5
    min_side: int = 12
    both_ways: bool = True
    back_gate: float = 0.9
    sure_mid: float = 0.96

    def is_copy(self, m: Match) -> bool:
        """The rule, one way round."""
        if m.overlap < self.min_overlap:
            return False
        return bool((m.mid >= self.strict_mid and m.fine >= self.fine) or (m.mid >= self.mid and m.flat >= self.flat))

    def is_sure(self, m: Match) -> bool:
        """The rule, passed by more than a margin: enough one way round."""
        return self.is_copy(m) and ((m.mid >= self.strict_mid and m.fine >= self.fine) or m.mid >= self.sure_mid)


@dataclass
class Catalog:
    """Canvases (uint8), crop shapes [N, 2] and normalised stage-1 descriptors [N, DIM] of N items."""

    canvases: list[np.ndarray]
    shapes: np.ndarray
    descriptors: np.ndarray
    cache_size: int = 4096

    def __post_init__(self):
        self._cache: OrderedDict[int, Prepared] = OrderedDict()

    def __len__(self) -> int:
        return len(self.canvases)

    def prepared(self, i: int) -> Prepared:
        """Prepared canvases of item ``i`` (kept in a small LRU cache)."""
        p = self._cache.get(i)
        if p is None:
            h, w = self.shapes[i]
            p = Prepared.from_canvas(self.canvases[i], int(h), int(w))
            self._cache[i] = p
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return p

    def checkable(self, min_side: int) -> np.ndarray:
        """Items whose crop is large enough to judge."""
        return self.shapes.min(axis=1) >= min_side


def build_catalog(images: Iterable[np.ndarray], n: int | None = None, progress: bool = False, workers: int = 1) -> Catalog:
    """Canvases and descriptors of ``images`` (any size, grey or RGB, uint8 or float); the descriptors of large
    sets are computed in ``workers`` processes."""
    from tqdm.auto import tqdm

    canvases, shapes = [], []
    for img in tqdm(images, total=n, unit="img", desc="duplicate canvases", disable=not progress, file=sys.stderr,
                    dynamic_ncols=True):
        c, h, w = canvas(img)
        canvases.append(c)
        shapes.append((h, w))
    if not canvases:
        return Catalog(canvases, np.zeros((0, 2), np.int32), np.zeros((0, DIM), np.float32))
    pair_a, pair_b = augmented_pairs(canvases)
    raw = describe_all(canvases + pair_a + pair_b, workers, progress)
    n_items, n_pairs = len(canvases), len(pair_a)
    metric = fit_metric(raw[:n_items], raw[n_items:n_items + n_pairs], raw[n_items + n_pairs:])
    return Catalog(canvases, np.asarray(shapes, dtype=np.int32), metric(raw[:n_items]))


#: Fewer canvases than this are described in this process (starting workers costs seconds).
PARALLEL_DESCRIBE = 5000
#: Canvases per task when descriptors are computed in several processes.
DESCRIBE_CHUNK = 1000


def _describe_chunk(canvases: list[np.ndarray]) -> np.ndarray:
    return np.stack([describe_canvas(c) for c in canvases])


def describe_all(canvases: list[np.ndarray], workers: int = 1, progress: bool = False) -> np.ndarray:
    """Raw descriptors [N, DIM] of uint8 canvases, in ``workers`` spawned processes when there are many."""
    from tqdm.auto import tqdm

    chunks = [canvases[a:a + DESCRIBE_CHUNK] for a in range(0, len(canvases), DESCRIBE_CHUNK)]
    out = []
    with tqdm(total=len(canvases), unit="img", desc="duplicate descriptors", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        if workers <= 1 or len(canvases) < PARALLEL_DESCRIBE:
            for chunk in chunks:
                out.append(_describe_chunk(chunk))
                bar.update(len(chunk))
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers, initializer=_single_thread) as procs:
                for chunk, part in zip(chunks, procs.imap(_describe_chunk, chunks)):
                    out.append(part)
                    bar.update(len(chunk))
    return np.concatenate(out)


def _single_thread() -> None:
    import cv2

    cv2.setNumThreads(1)


@dataclass
class Verified:
    """One verified candidate pair (catalog positions) with its stage-1 rank and similarity."""

    query: int
    match: int
    rank: int
    candidate_similarity: float
    result: Match
    copy: bool


def candidates(cat: Catalog, queries: np.ndarray, pool: np.ndarray, k: int, exclude_self: bool = False,
               log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1: (similarities, positions in ``pool``) [len(queries), k] of each query's ``k`` most similar pool
    items by descriptor (with ``exclude_self``, the queries are the pool and each skips itself); -1 pads."""
    from ..neighbors import knn

    if exclude_self:
        sims, nn = knn(cat.descriptors[pool], cat.descriptors[pool], min(k, len(pool) - 1), method="exact", exclude_self=True,
                       log=log)
    else:
        sims, nn = knn(cat.descriptors[pool], cat.descriptors[queries], min(k, len(pool)), method="exact", log=log)
    return sims, nn


def _verify_query(cat: Catalog, q: int, cands: Sequence[int], sims: Sequence[float], t: Thresholds, max_copies: int,
                  skip: Callable[[int, int], bool] | None = None) -> list[Verified]:
    query = cat.prepared(q)
    out: list[Verified] = []
    found = 0
    for r, (c, s) in enumerate(zip(cands, sims)):
        c = int(c)
        if c < 0 or (skip is not None and skip(q, c)):
            continue
        cand = cat.prepared(c)
        m = match(query, [cand], gate=t.gate)[0]
        is_copy = t.is_sure(m) if t.both_ways else t.is_copy(m)
        if not is_copy and t.both_ways and m.small >= t.back_gate:  # the candidate's centre may align where the query's did not
            back = match(cand, [query], gate=t.gate)[0]
            if t.is_sure(back) or (t.is_copy(m) and t.is_copy(back)):
                m, is_copy = (back if t.is_sure(back) else m), True
        out.append(Verified(q, c, r, float(s), m, is_copy))
        found += is_copy
        if found >= max_copies:
            break
    return out


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


#: The catalog and rules a verification worker process was given (set by its initializer).
_WORK: dict = {}


def _worker_init(cat: Catalog, thresholds: Thresholds, max_copies: int) -> None:
    _single_thread()
    _WORK.update(cat=cat, thresholds=thresholds, max_copies=max_copies)


def _verify_tasks(tasks: list[tuple[int, np.ndarray, np.ndarray]]) -> list[Verified]:
    """Verify (query, candidates, similarities) tasks in a worker process."""
    w = _WORK
    return [v for q, c, s in tasks for v in _verify_query(w["cat"], q, c, s, w["thresholds"], w["max_copies"])]


def find_copies(cat: Catalog, queries: Sequence[int], pool: Sequence[int], *, k: int = K, max_copies: int = 1,
                thresholds: Thresholds = Thresholds(), exclude: Callable[[int, int], bool] | None = None,
                progress: bool = False, log: Callable[[str], None] | None = None, workers: int = 1) -> list[Verified]:
    """Verify each query's ``k`` stage-1 candidates in ``pool``; every verified pair (copies and not).

    ``exclude(query, candidate)`` drops candidates before verification (a query itself always is). With
    ``workers`` > 1 the queries are verified in that many fresh (spawned) processes: same pairs, in query order."""
    from tqdm.auto import tqdm

    queries = np.asarray(queries, dtype=np.int64)
    pool = np.asarray(pool, dtype=np.int64)
    ok = cat.checkable(thresholds.min_side)
    queries, pool = queries[ok[queries]], pool[ok[pool]]
    if not len(queries) or not len(pool):
        return []
    sims, nn = candidates(cat, queries, pool, k, False, log)
    tasks = []
    for qi, q in enumerate(queries.tolist()):
        valid = nn[qi] >= 0
        cands = pool[nn[qi][valid]]
        keep = cands != q
        if exclude is not None:
            keep &= np.array([not exclude(q, int(c)) for c in cands], dtype=bool)
        tasks.append((q, cands[keep], sims[qi][valid][keep]))
    workers = max(1, min(int(workers), -(-len(tasks) // CHUNK)))  # a small job is not worth starting processes for
    step = max(1, min(CHUNK, -(-len(tasks) // workers)))
    chunks = [tasks[a:a + step] for a in range(0, len(tasks), step)]
    out: list[Verified] = []
    with tqdm(total=len(tasks), unit="item", desc="verifying candidates", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        if workers == 1:
            for q, c, s in tasks:
                out += _verify_query(cat, q, c, s, thresholds, max_copies)
                bar.update()
        else:  # spawned, not forked: a fork would inherit OpenCV's and OpenMP's thread pools and can hang
            import multiprocessing as mp

            shared = Catalog(cat.canvases, cat.shapes, cat.descriptors[:0])
            with mp.get_context("spawn").Pool(workers, initializer=_worker_init,
                                              initargs=(shared, thresholds, max_copies)) as procs:
                for chunk, part in zip(chunks, procs.imap(_verify_tasks, chunks)):
                    out += part
                    bar.update(len(chunk))
    return out


def duplicate_pairs(cat: Catalog, items: Sequence[int] | None = None, *, k: int = K, thresholds: Thresholds = Thresholds(),
                    progress: bool = False, log: Callable[[str], None] | None = None) -> list[Verified]:
    """Confirmed copy pairs among ``items`` (all by default): enough edges to connect every group of copies.

    Pairs whose items are already connected through confirmed copies are not verified again."""
    from tqdm.auto import tqdm

    items = np.arange(len(cat)) if items is None else np.asarray(items, dtype=np.int64)
    items = items[cat.checkable(thresholds.min_side)[items]]
    if len(items) < 2:
        return []
    sims, nn = candidates(cat, items, items, k, True, log)
    parent = np.arange(len(cat))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    verified: set[tuple[int, int]] = set()

    def skip(a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in verified or root(a) == root(b)

    out: list[Verified] = []
    for qi in tqdm(range(len(items)), unit="item", desc="verifying candidates", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True):
        q = int(items[qi])
        valid = nn[qi] >= 0
        cands = items[nn[qi][valid]]
        for v in _verify_query(cat, q, cands, sims[qi][valid], thresholds, max_copies=len(cands), skip=skip):
            verified.add((min(v.query, v.match), max(v.query, v.match)))
            if v.copy:
                parent[root(v.query)] = root(v.match)
                out.append(v)
    return out


def components(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected-component label (0..) of each of ``n`` items under the given edges, numbered by first item."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.asarray(list(pairs), dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = {}
    return np.array([first.setdefault(int(l), len(first)) for l in labels], dtype=np.int64)
