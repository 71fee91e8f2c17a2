"""What a probe reads from a store: the items that have vectors, their labels and groups, and the vectors.

Only rows whose ``done`` mask is set have vectors. Vectors are read in sequential blocks and kept in the
store's own dtype (float16 stays float16), so a million-row store costs its size on disk in memory, once.
A finished row whose vector holds NaN or infinity is refused by name: no probe is fitted or applied on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import EmbedkitError
from ..items import ItemSet
from ..store import Store, comparable_config, fingerprint

#: Rows checked for finite values at a time (bounds the temporary mask's memory).
CHECK_BLOCK = 65536


@dataclass
class ProbeData:
    """Items of one embedding key that have vectors, with labels ('' = unlabelled) and groups."""

    store: Store
    key: str
    config: dict
    items: ItemSet  # the items with vectors; items.rows are their store rows
    group_by: str
    n_items: int
    notes: list[str] = field(default_factory=list)

    @property
    def store_path(self) -> str:
        return str(self.store.path)

    @property
    def ids(self) -> np.ndarray:
        return self.items.ids

    @property
    def labels(self) -> np.ndarray:
        return self.items.labels

    @property
    def groups(self) -> np.ndarray:
        return self.items.groups

    @property
    def rows(self) -> np.ndarray:
        return self.items.rows

    @property
    def config_fingerprint(self) -> str:
        return fingerprint(comparable_config(self.config))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config.get("dtype") or "float32")

    def vectors(self, positions: np.ndarray | None = None) -> np.ndarray:
        """Vectors of the items at ``positions`` (all by default), in the store's dtype; NaN rows are refused."""
        rows = self.rows if positions is None else self.rows[np.asarray(positions)]
        return finite_vectors(self.store, self.key, rows, self.dtype)


def finite_vectors(store: Store, key: str, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Vectors of finished ``rows`` of ``key``; refuse, naming them, rows holding NaN or infinite values."""
    x = store.vectors(key, rows, dtype=dtype)
    bad = np.concatenate([~np.isfinite(x[s:s + CHECK_BLOCK]).all(axis=1) for s in range(0, len(x), CHECK_BLOCK)]
                         or [np.zeros(0, bool)])
    if bad.any():
        where = np.asarray(rows)[bad]
        ids = store.ids
        shown = ", ".join(f"{int(r)} ({ids[int(r)]!r})" for r in where[:5]) + (" ..." if len(where) > 5 else "")
        raise EmbedkitError(f"{store.path}: {len(where)} finished row(s) of key {key!r} hold NaN or infinite values "
                            f"(row {shown}); re-embed them under a new --key, or leave them out of the store")
    return x


def load_probe_data(store: Store, key: str | None = None, group_by: str | None = None) -> ProbeData:
    """Items of ``key`` that have vectors, with labels and groups (``--group-by`` overrides the stored group)."""
    key = store.resolve_key(key)
    done = store.done(key)
    notes = []
    missing = int((~done).sum())
    if missing:
        notes.append(f"{missing} of {len(done)} items have no vectors under {key!r} (not embedded yet, or unreadable) "
                     f"and are left out")
    if not done.any():
        raise EmbedkitError(f"{store.path}: no item has vectors under key {key!r}; run 'embedkit embed' to finish it")
    items = ItemSet.from_store(store, group_by)
    group_name = items.group_by
    items = items.subset(np.flatnonzero(done))
    groups = items.groups
    empty = groups == ""
    if empty.any():
        items = ItemSet(items.ids, items.labels, np.where(empty, items.ids, groups), store=store, rows=items.rows,
                        kind=items.kind, group_by=group_name)
        notes.append(f"{int(empty.sum())} items have no group; each became its own group (set one with --group-by)")
    if len(set(items.groups)) == len(items) and len(items) > 1:
        notes.append(f"every item is its own group under {group_name!r}; if several cells come from one image, "
                     f"movie or well, pass --group-by so they never straddle train and test")
    return ProbeData(store=store, key=key, config=store.config(key), items=items, group_by=group_name,
                     n_items=len(done), notes=notes)
