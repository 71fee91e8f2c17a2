"""What a probe reads from a store: the items that have vectors, their labels and groups, and the vectors.

Only rows whose ``done`` mask is set have vectors. Vectors are read in sequential blocks and kept in the
store's own dtype (float16 stays float16), so a million-row store costs its size on disk in memory, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import EmbedkitError
from ..sources import group_from_path, group_rule
from ..store import Store, comparable_config, fingerprint

@dataclass
class ProbeData:
    """Items of one embedding key that have vectors, with labels ('' = unlabelled) and groups."""

    store_path: str
    key: str
    config: dict
    ids: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    rows: np.ndarray  # row of each item in the store
    group_by: str
    n_items: int
    notes: list[str] = field(default_factory=list)

    @property
    def config_fingerprint(self) -> str:
        return fingerprint(comparable_config(self.config))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config.get("dtype") or "float32")

    def vectors(self, positions: np.ndarray | None = None) -> np.ndarray:
        """Vectors of the items at ``positions`` (all by default), in the store's dtype."""
        rows = self.rows if positions is None else self.rows[np.asarray(positions)]
        return Store(self.store_path).vectors(self.key, rows, dtype=self.dtype)


def item_groups(store: Store, group_by: str | None) -> tuple[np.ndarray, str]:
    """Groups per store row: the store's group column, another item column, or a preset/regex over paths."""
    if group_by is None or group_by == "group":
        return store.groups, "group"
    if group_by in store.columns():
        return np.asarray(store.column(group_by), dtype=object).astype(str).astype(object), group_by
    rx = group_rule(group_by)
    return np.array([group_from_path(rx, p) for p in store.column("path")], dtype=object), group_by


def load_probe_data(store_path: str, key: str | None = None, group_by: str | None = None) -> ProbeData:
    """Items of ``key`` that have vectors, with labels and groups (``--group-by`` overrides the stored group)."""
    store = Store(store_path)
    key = store.resolve_key(key)
    done = store.done(key)
    groups, group_name = item_groups(store, group_by)
    ids, labels = store.ids, store.labels
    notes = []
    missing = int((~done).sum())
    if missing:
        notes.append(f"{missing} of {len(done)} items have no vectors under {key!r} (not embedded yet, or unreadable) "
                     f"and are left out")
    if not done.any():
        raise EmbedkitError(f"{store_path}: no item has vectors under key {key!r}; run 'embedkit embed' to finish it")
    rows = np.flatnonzero(done)
    groups = np.asarray(groups, dtype=object)[rows]
    empty = groups == ""
    if empty.any():
        groups = np.where(empty, ids[rows], groups)
        notes.append(f"{int(empty.sum())} items have no group; each became its own group (set one with --group-by)")
    n_groups = len(set(groups))
    if n_groups == len(rows) and len(rows) > 1:
        notes.append(f"every item is its own group under {group_name!r}; if several cells come from one image, "
                     f"movie or well, pass --group-by so they never straddle train and test")
    return ProbeData(store_path=str(store_path), key=key, config=store.config(key), ids=ids[rows],
                     labels=np.asarray(labels, dtype=object)[rows], groups=groups, rows=rows, group_by=group_name,
                     n_items=len(done), notes=notes)
