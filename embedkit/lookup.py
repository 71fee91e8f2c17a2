""""Show me the cells that look like this one": queries (item ids, image files, CSV lists) and their neighbours.

An image file is embedded with exactly the configuration recorded for the store key (encoder, weights,
input size, pooling, channel conversion); a configuration that cannot be rebuilt is refused, since its
vectors would not be comparable. Search uses the key's saved index when it is fresh, and otherwise an
exact scan of the store in blocks (memory stays bounded however large the store is).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import EmbedkitError
from .images import IMAGE_SUFFIXES, Conversion, is_image_file
from .items import ItemSet
from .neighbors import l2_normalize
from .store import COMPARED_FIELDS, Store, comparable_config, fingerprint
from .store_index import SavedIndex, load_vectors

CSV_SUFFIXES = (".csv", ".tsv", ".txt")


@dataclass
class Query:
    """One parsed QUERY: a store item (``row``) or an image file (``path``; ``row`` set when it is a store item's file).

    A query is a request, not an item: the items and their pixels come from :class:`~embedkit.items.ItemSet`.
    """

    name: str
    kind: str
    row: int | None = None
    path: str | None = None

    @property
    def is_item(self) -> bool:
        return self.kind == "item"


def _unknown(items: ItemSet, name: str, where: str = "") -> EmbedkitError:
    return EmbedkitError(f"{where}{name!r} is neither an item id in {items.store.path.name} nor an existing image or "
                         f"CSV file{items.id_hint(name)}")


def parse_queries(store: Store, spec: str) -> list[Query]:
    """Resolve QUERY: an item id, an image file, or a CSV whose ``id`` or ``path`` column (or first column) lists them."""
    items = ItemSet.from_store(store)
    if spec in items.index:
        return [Query(spec, "item", row=items.index[spec])]
    p = Path(spec)
    if p.is_dir():
        raise EmbedkitError(f"QUERY {spec} is a folder; give an image file, an item id, or a CSV listing them")
    if not p.exists():
        raise _unknown(items, spec, "QUERY ")
    if p.suffix.lower() in CSV_SUFFIXES:
        return _csv_queries(items, p)
    if is_image_file(p):
        return [Query(spec, "image", row=items.position_of_file(p), path=str(p))]
    raise EmbedkitError(f"QUERY {spec}: not an image ({', '.join(IMAGE_SUFFIXES)}) nor a CSV of ids or image paths")


def _csv_queries(items: ItemSet, path: Path) -> list[Query]:
    try:
        with open(path, newline="") as fh:
            sample = fh.read(4096)
            fh.seek(0)
            delim = "\t" if path.suffix.lower() == ".tsv" or ("\t" in sample and "," not in sample) else ","
            rows = [r for r in csv.reader(fh, delimiter=delim) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EmbedkitError(f"{path}: cannot read it as a CSV of queries ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise EmbedkitError(f"{path}: empty; list item ids (column 'id') or image files (column 'path'), one per line")
    header = [c.strip().lower() for c in rows[0]]
    base = path.parent
    if "id" in header or "path" in header or "image" in header:
        col = header.index("id") if "id" in header else header.index("path" if "path" in header else "image")
        only = "id" if header[col] == "id" else "path"
        entries = [r[col].strip() for r in rows[1:] if col < len(r) and r[col].strip()]
    else:
        only, entries = None, [r[0].strip() for r in rows]
    if not entries:
        raise EmbedkitError(f"{path}: no queries listed under its header")
    out = []
    for n, e in enumerate(entries):
        where = f"{path.name} entry {n + 1}: "
        if only != "path" and e in items.index:
            out.append(Query(e, "item", row=items.index[e]))
            continue
        if only == "id":
            raise _unknown(items, e, where)
        f = Path(e) if Path(e).is_absolute() else base / e
        if f.is_file() and is_image_file(f):
            out.append(Query(e, "image", row=items.position_of_file(f), path=str(f)))
        elif f.exists():
            raise EmbedkitError(f"{where}{e}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        else:
            raise _unknown(items, e, where)
    return out


# --------------------------------------------------------------------------- query vectors


def encoder_for_queries(store: Store, key: str, weights: str | os.PathLike | None = None):
    """(encoder, conversion) that reproduce ``key``'s vectors; refuse any configuration that differs."""
    from .embed import run_config
    from .encoders import encoder_from_config

    config = store.config(key)
    enc = encoder_from_config(config, weights)
    conv = Conversion.from_dict(config.get("conversion"))
    now = run_config(enc, conv, config.get("dtype", "float32"))
    if fingerprint(comparable_config(now)) != fingerprint(comparable_config(config)):
        if config.get("weights") == "random-init":
            raise EmbedkitError(f"key {key!r} was made with randomly initialised weights ({config.get('encoder')} "
                                f"--random-init), which cannot be rebuilt, so an image cannot be embedded comparably; "
                                f"query by item id instead")
        diffs = "; ".join(f"{k}: {config.get(k)!r} in store vs {now.get(k)!r} here" for k in COMPARED_FIELDS
                          if config.get(k) != now.get(k))
        raise EmbedkitError(f"the encoder rebuilt for key {key!r} differs from the one the store was made with "
                            f"({diffs[:300]}); image queries are refused because their vectors would not be comparable")
    return enc, conv


def query_vectors(store: Store, key: str, queries: Sequence[Query], *, weights: str | os.PathLike | None = None,
                  device: str = "cpu") -> np.ndarray:
    """Vectors of the queries: stored vectors for items, freshly embedded ones (as the key was made) for images."""
    cfg = store.config(key)
    out = np.zeros((len(queries), int(cfg.get("dim") or 0)), dtype=np.float32)
    done = store.done(key)
    ids = store.ids
    item_pos = [n for n, q in enumerate(queries) if q.is_item]
    if item_pos:
        rows = np.array([queries[n].row for n in item_pos], dtype=np.int64)
        missing = [str(ids[r]) for r in rows if not done[r]]
        if missing:
            raise EmbedkitError(f"item {missing[0]!r} has no vector under key {key!r} yet; run 'embedkit embed' to finish it")
        uniq, inverse = np.unique(rows, return_inverse=True)
        _, vecs = load_vectors(store, key, uniq)
        out = np.zeros((len(queries), vecs.shape[1]), dtype=np.float32)
        out[item_pos] = vecs[inverse]
    image_pos = [n for n, q in enumerate(queries) if not q.is_item]
    if image_pos:
        from .embed import embed_images
        from .images import read_image

        for n in image_pos:  # a broken file fails here, before the encoder is built
            read_image(queries[n].path)
        enc, conv = encoder_for_queries(store, key, weights)
        vecs = embed_images(enc, [queries[n].path for n in image_pos], conv, device=device)
        if out.shape[1] != vecs.shape[1]:
            out = np.zeros((len(queries), vecs.shape[1]), dtype=np.float32)
        out[image_pos] = vecs.astype(cfg.get("dtype", "float32")).astype(np.float32)  # the store's rounding
    return out


# --------------------------------------------------------------------------- search


def search_store(store: Store, key: str, qvecs: np.ndarray, k: int, *, exclude_groups: Sequence[str | None] | None = None,
                 index: SavedIndex | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (similarities, store rows) per query vector among the done rows of ``key``.

    ``exclude_groups[i]`` hides rows of that group from query ``i`` (None: hide nothing). A fresh saved
    ``index`` is used when given; otherwise the store is scanned exactly in blocks.
    """
    if k < 1:
        raise EmbedkitError("-k must be at least 1")
    groups = store.groups if exclude_groups is not None and any(g is not None for g in exclude_groups) else None
    if index is not None:
        return _search_index(index, qvecs, k, groups, exclude_groups)
    return _scan(store, key, qvecs, k, groups, exclude_groups)


def _search_index(saved: SavedIndex, qvecs: np.ndarray, k: int, groups, exclude_groups) -> tuple[np.ndarray, np.ndarray]:
    total = saved.built.ntotal
    kk = min(total, k if groups is None else 2 * k + 16)
    while True:
        sims, rows = saved.built.search(qvecs, kk)
        if groups is None:
            return sims[:, :k], rows[:, :k]
        out_s = np.full((len(qvecs), k), -np.inf, dtype=np.float32)
        out_r = np.full((len(qvecs), k), -1, dtype=np.int64)
        short = False
        for q in range(len(qvecs)):
            ok = rows[q] >= 0
            if exclude_groups[q] is not None:
                ok &= groups[np.where(rows[q] >= 0, rows[q], 0)] != exclude_groups[q]
            keep = np.flatnonzero(ok)[:k]
            out_s[q, :len(keep)], out_r[q, :len(keep)] = sims[q, keep], rows[q, keep]
            short |= len(keep) < k
        if not short or kk >= total:
            return out_s, out_r
        kk = min(total, kk * 4)


def _scan(store: Store, key: str, qvecs: np.ndarray, k: int, groups, exclude_groups) -> tuple[np.ndarray, np.ndarray]:
    q = l2_normalize(qvecs)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_r = np.full((len(q), k), -1, dtype=np.int64)
    done = store.done(key)
    excl = None
    if groups is not None:
        excl = np.array(["" if g is None else g for g in exclude_groups], dtype=object)
        has_excl = np.array([g is not None for g in exclude_groups])
    batch = int(max(1024, min(65536, 2 ** 26 // max(1, len(q)))))
    for s, block in store.iter_vectors(key, batch):
        ok = np.flatnonzero(done[s:s + len(block)])
        if len(ok) == 0:
            continue
        sims = q @ l2_normalize(block[ok]).T
        rows = ok + s
        if excl is not None:
            same = (groups[rows][None, :] == excl[:, None]) & has_excl[:, None]
            sims[same] = -np.inf
        all_s = np.concatenate([best_s, sims], axis=1)
        all_r = np.concatenate([best_r, np.broadcast_to(rows, sims.shape)], axis=1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k] if all_s.shape[1] > k else np.argsort(-all_s, axis=1)
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(all_s, top, 1), axis=1, kind="stable"), 1)
        best_s, best_r = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_r, top, 1)
    best_r[~np.isfinite(best_s)] = -1
    return best_s, best_r


def neighbors_frame(store: Store, queries: Sequence[Query], sims: np.ndarray, rows: np.ndarray):
    """One row per (query, rank): query, rank, id, label, group, similarity."""
    import pandas as pd

    ids, labels, groups = store.ids, store.labels, store.groups
    recs = []
    for q, srow, rrow in zip(queries, sims, rows):
        for rank, (s, r) in enumerate(zip(srow, rrow), start=1):
            if r < 0:
                continue
            recs.append({"query": q.name, "rank": rank, "id": str(ids[r]), "label": str(labels[r]),
                         "group": str(groups[r]), "similarity": float(s)})
    return pd.DataFrame(recs, columns=["query", "rank", "id", "label", "group", "similarity"])


@dataclass
class NeighborResult:
    """Neighbours of each query: similarities and store rows [Q, k], the table, and how they were found."""

    queries: list[Query]
    sims: np.ndarray
    rows: np.ndarray
    table: "object"
    how: str
    excluded: list[str | None] | None
    notes: list[str]


def find_neighbors(store: Store, query: str, key: str | None = None, k: int = 12, *, exclude_same_group: bool = False,
                   index_path: str | os.PathLike | None = None, exact: bool = False,
                   weights: str | os.PathLike | None = None, device: str = "cpu") -> NeighborResult:
    """The ``k`` nearest items of each query (item id, image file or CSV), by a fresh saved index or an exact scan."""
    from .store_index import open_index, stale_message

    key = store.resolve_key(key)
    queries = parse_queries(store, query)
    notes: list[str] = []
    saved = None
    if not exact:
        saved = open_index(store.path, key, index_path)
        if saved is not None and not saved.fresh:
            notes.append(f"warning: {stale_message(saved)}; searching exactly instead")
            saved = None
    qvecs = query_vectors(store, key, queries, weights=weights, device=device)
    groups = store.groups
    excl = [str(groups[q.row]) if q.row is not None else None for q in queries] if exclude_same_group else None
    if exclude_same_group and any(q.row is None for q in queries):
        notes.append("note: --exclude-same-group: image files that are not items of the store have no group; "
                     "nothing hidden for them")
    sims, rows = search_store(store, key, qvecs, k, exclude_groups=excl, index=saved)
    how = f"index {saved.path.name} ({saved.record['kind']})" if saved is not None else "exact scan"
    return NeighborResult(queries, sims, rows, neighbors_frame(store, queries, sims, rows), how, excl, notes)
