"""The one item model and the one reader of "the pixels of item i".

An :class:`Item` is one image or cell: a unique id, its image file, a label ('' when unknown), a group (the
unit that must never straddle splits) and free-form metadata; ``row`` is its row in a store when it is one
of the store's items. An :class:`ItemSet` holds many items column by column (a store's, a source's, or a
chosen few) and reads the pixels of item ``i``: the store's ``/pixels`` row when the store holds crops,
otherwise the item's image file. Stages that read pixels (finetune, explain, sheets, lookup) go through it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import BadImageError, EmbedkitError
from .images import Conversion, read_image, to_rgb

if TYPE_CHECKING:  # store.py imports this module (through sources.Item); import it lazily at run time
    from .sources import Source
    from .store import Store

#: Item columns every store and source has; other columns are metadata.
ITEM_COLUMNS = ("id", "path", "label", "group")


@dataclass
class Item:
    """One image (or cell): what to embed, train on, explain or show."""

    id: str
    path: str  # image file: relative to its source's or store's root, or absolute
    label: str = ""
    group: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    row: int | None = None  # its row in a store, when it is one of the store's items


def as_store(store: "Store | str | os.PathLike") -> "Store":
    """A :class:`~embedkit.store.Store` for a path (the API boundary); a Store is returned as it is."""
    from .store import Store

    return store if isinstance(store, Store) else Store(store)


def is_store_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is an HDF5 file (an embedkit store), not an image folder, manifest or image."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


#: ``--group-by leaks:FILE``: the grouping written by ``embedkit leaks STORE --suggest-groups FILE``.
LEAKS_GROUPING = "leaks:"


def store_groups(store: "Store", group_by: str | None = None) -> tuple[np.ndarray, str]:
    """Group of every store row and the rule's name: the group column, a ``leaks:FILE`` grouping, another item
    column, or a preset/regex over paths."""
    from .sources import group_from_path, group_rule

    if group_by is None or group_by == "group":
        return np.asarray(store.groups, dtype=object), "group"
    if group_by.startswith(LEAKS_GROUPING):
        from .leaks import load_leak_groups

        return load_leak_groups(store, group_by[len(LEAKS_GROUPING):]), group_by
    if group_by in store.columns():
        return np.asarray(store.column(group_by), dtype=object).astype(str).astype(object), group_by
    rx = group_rule(group_by)
    return np.array([group_from_path(rx, str(p)) for p in store.column("path")], dtype=object), group_by


class ItemSet:
    """Items column by column (ids, labels, groups, absolute paths, store rows) and their pixels.

    Columns of a store are read on first use, so a set over a million-row store costs nothing until asked.
    ``rows[i]`` is item ``i``'s store row, or -1 for an item that is only a file.
    """

    def __init__(self, ids: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                 groups: Sequence[str] | None = None, paths: Sequence[str] | None = None, *,
                 store: "Store | None" = None, rows: Sequence[int] | None = None, kind: str = "",
                 meta: dict[str, Sequence[str]] | None = None, group_by: str = "group"):
        self.store = store
        self.kind = kind
        self.group_by = group_by
        self._cols: dict[str, np.ndarray | None] = {
            "id": _objects(ids), "label": _objects(labels), "group": _objects(groups), "path": _objects(paths)}
        if rows is not None:
            self.rows = np.asarray(rows, dtype=np.int64)
        elif store is not None and ids is None:
            self.rows = np.arange(len(store), dtype=np.int64)
        else:
            self.rows = np.full(len(self._cols["id"]), -1, dtype=np.int64)
        self.meta = {k: _objects(v) for k, v in (meta or {}).items()}
        self._has_pixels: bool | None = None
        self._index: dict[str, int] | None = None
        self._file_index: dict[str, int] | None = None

    # ---------------------------------------------------------------------------------- building
    @classmethod
    def from_store(cls, store: "Store", group_by: str | None = None) -> "ItemSet":
        """Every item of a store, in row order; ``group_by`` overrides the stored groups (see :func:`store_groups`)."""
        groups, name = (None, "group") if group_by in (None, "group") else store_groups(store, group_by)
        pixels = store.has_pixels
        out = cls(groups=groups, store=store, kind="store pixels" if pixels else "store files", group_by=name)
        out._has_pixels = pixels and len(out) > 0
        return out

    @classmethod
    def from_source(cls, source: "Source") -> "ItemSet":
        """The items of a class-folder, manifest or file-list source (pixels from their files)."""
        its = source.items
        return cls([it.id for it in its], [it.label for it in its], [it.group for it in its],
                   [source.abspath(it) for it in its], kind=source.kind.replace("_", " "),
                   meta={k: [it.meta.get(k, "") for it in its] for k in sorted({k for it in its for k in it.meta})})

    @classmethod
    def from_items(cls, items: Sequence[Item], store: "Store | None" = None, kind: str = "items") -> "ItemSet":
        """A chosen list of items: store items (``row`` set) read from ``store``, the others from their files."""
        keys = sorted({k for it in items for k in it.meta})
        return cls([it.id for it in items], [it.label for it in items], [it.group for it in items],
                   [it.path for it in items], store=store, rows=[-1 if it.row is None else it.row for it in items],
                   kind=kind, meta={k: [it.meta.get(k, "") for it in items] for k in keys})

    @classmethod
    def open(cls, source: "Store | Source | str | os.PathLike | Sequence", group_by: str | None = None) -> "ItemSet":
        """The API boundary: a Store, a store file, or anything :func:`embedkit.sources.discover` reads."""
        from .sources import Source, discover
        from .store import Store

        if isinstance(source, ItemSet):
            return source
        if isinstance(source, Store) or (isinstance(source, (str, os.PathLike)) and is_store_file(source)):
            store = as_store(source)
            if not len(store):
                raise EmbedkitError(f"{store.path}: the store holds no items")
            return cls.from_store(store, group_by)
        return cls.from_source(source if isinstance(source, Source) else discover(source, group_by=group_by))

    def subset(self, positions: Sequence[int]) -> "ItemSet":
        """The items at ``positions``, in that order (store rows and pixel source kept)."""
        pos = np.asarray(positions, dtype=np.int64)
        out = ItemSet(self.ids[pos], self.labels[pos], self.groups[pos], None if self._cols["path"] is None else self.paths[pos],
                      store=self.store, rows=self.rows[pos], kind=self.kind,
                      meta={k: v[pos] for k, v in self.meta.items()}, group_by=self.group_by)
        out._has_pixels = self._has_pixels
        return out

    # ---------------------------------------------------------------------------------- columns
    def __len__(self) -> int:
        return len(self.rows)

    def _column(self, name: str) -> np.ndarray:
        col = self._cols[name]
        if col is None:
            if self.store is None:
                col = np.full(len(self), "", dtype=object)
            else:
                col = np.asarray(self.store.column(name), dtype=object)[self.rows]
                if name == "path":
                    col = np.array([self.store.abspath(str(p)) for p in col], dtype=object)
            self._cols[name] = col
        return col

    @property
    def ids(self) -> np.ndarray:
        return self._column("id")

    @property
    def labels(self) -> np.ndarray:
        return self._column("label")

    @property
    def groups(self) -> np.ndarray:
        return self._column("group")

    @property
    def paths(self) -> np.ndarray:
        """Absolute image file of each item (for store items: the file the store lists)."""
        return self._column("path")

    def item(self, i: int) -> Item:
        """Item ``i`` as an :class:`Item` (absolute path; ``row`` set for store items)."""
        r = int(self.rows[i])
        return Item(str(self.ids[i]), str(self.paths[i]), str(self.labels[i]), str(self.groups[i]),
                    {k: str(v[i]) for k, v in self.meta.items()}, None if r < 0 else r)

    # ---------------------------------------------------------------------------------- finding items
    @property
    def index(self) -> dict[str, int]:
        """Position of each id."""
        if self._index is None:
            self._index = {str(i): p for p, i in enumerate(self.ids)}
        return self._index

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """Position of each id, in the order given."""
        return np.array([self.index[str(i)] for i in ids], dtype=np.int64)

    def position_of_file(self, path: str | os.PathLike) -> int | None:
        """Position of the item whose image file is ``path`` (compared after resolving links), or None."""
        if self._file_index is None:
            self._file_index = {os.path.realpath(str(p)): n for n, p in enumerate(self.paths)}
        return self._file_index.get(os.path.realpath(str(path)))

    def id_hint(self, name: str) -> str:
        """'; did you mean ...?' for an unknown id: ids starting with it, else close matches, else an example id."""
        ids = self.ids
        starting = [str(i) for i in ids[:200_000] if str(i).startswith(name)] if name else []
        if starting:
            more = f" (or one of {len(starting) - 1} more ids starting so)" if len(starting) > 1 else ""
            return f"; did you mean {starting[0]!r}{more}?"
        if 0 < len(ids) <= 50_000:
            close = difflib.get_close_matches(name, [str(i) for i in ids], n=3, cutoff=0.6)
            if close:
                return f"; did you mean {', '.join(repr(c) for c in close)}?"
        return f"; ids look like {str(ids[0])!r}" if len(ids) else ""

    # ---------------------------------------------------------------------------------- pixels
    @property
    def has_pixels(self) -> bool:
        """True when store items read their crops from the store's /pixels rather than their files."""
        if self._has_pixels is None:
            self._has_pixels = self.store is not None and bool((self.rows >= 0).any()) and self.store.has_pixels
        return self._has_pixels

    def _from_store(self, i: int) -> bool:
        return self.has_pixels and self.rows[i] >= 0

    def where(self, i: int) -> str:
        """Where item ``i``'s pixels come from, for messages: 'store.h5[row]' or the file."""
        return f"{self.store.path}[{int(self.rows[i])}]" if self._from_store(i) else str(self.paths[i])

    def raw(self, i: int) -> np.ndarray:
        """Item ``i``'s pixels as stored, (H, W, C): its /pixels row, else its decoded file (BadImageError if unreadable)."""
        if self._from_store(i):
            return self.store.pixels(int(self.rows[i]))
        return read_image(self.paths[i])

    def rgb(self, i: int, conv: Conversion = Conversion()) -> np.ndarray:
        """Item ``i`` as float32 RGB in [0, 1], converted with ``conv`` (the conversion its vectors were made with)."""
        return to_rgb(self.raw(i), conv, self.where(i))

    def rgbs(self, positions: Sequence[int], conv: Conversion = Conversion()) -> list[np.ndarray | None]:
        """RGB of several items (None where unreadable); store crops are read in one sorted batch."""
        positions = np.asarray(positions, dtype=np.int64)
        out: list[np.ndarray | None] = [None] * len(positions)
        stored = np.array([self._from_store(int(p)) for p in positions], dtype=bool)
        if stored.any():
            rows = self.rows[positions[stored]]
            uniq, inverse = np.unique(rows, return_inverse=True)
            crops = self.store.pixels(uniq)
            for k, j in zip(np.flatnonzero(stored), inverse.ravel()):
                out[k] = to_rgb(crops[j], conv, self.where(int(positions[k])))
        for k in np.flatnonzero(~stored):
            try:
                out[k] = self.rgb(int(positions[k]), conv)
            except BadImageError:
                out[k] = None
        return out

    def missing_files(self, positions: Sequence[int]) -> list[str]:
        """Image files of the items at ``positions`` that do not exist (items read from the store never miss)."""
        return [str(self.paths[p]) for p in positions if not self._from_store(int(p)) and not os.path.exists(self.paths[p])]


def _objects(values: Sequence | None) -> np.ndarray | None:
    return None if values is None else np.asarray(list(values) if not isinstance(values, np.ndarray) else values,
                                                   dtype=object)
