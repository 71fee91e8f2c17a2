"""What to embed: a folder of class folders, a CSV manifest (path,label,group,...), or plain image files.

Every source becomes a list of :class:`Item` rows with a unique id, a path relative to a root, a label
('' when unknown), a group (the unit that must never straddle splits) and free-form metadata.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import EmbedkitError
from .images import IMAGE_SUFFIXES, is_image_file
from .items import LEAKS_GROUPING, Item

#: Named group rules. MitoCheck cells of one plate + position come from one time-lapse movie.
GROUP_PRESETS: dict[str, str] = {
    "mitocheck": r"PLLT(\d+_\d+)--.*?___P(\d+_\d+)___",
    "parent": r"^(?:(.*)/)?[^/]+$",
    "file": r"^(.*)$",
}


@dataclass
class Source:
    """Items plus the root their paths are relative to."""

    root: str
    items: list[Item]
    kind: str

    @property
    def labelled(self) -> bool:
        return any(it.label for it in self.items)

    def abspath(self, item: Item) -> str:
        return os.path.join(self.root, item.path)


def group_rule(group_by: str | None) -> re.Pattern | None:
    """Turn --group-by (a preset name or a regex with capture groups) into a compiled pattern.

    ``leaks:FILE`` groupings apply to store items only (:func:`embedkit.items.store_groups`)."""
    if group_by is None:
        return None
    if group_by.startswith(LEAKS_GROUPING):
        raise EmbedkitError(f"--group-by {group_by}: a leaks grouping lists a store's items; use it with the store "
                            f"(e.g. embedkit probe STORE --group-by {group_by})")
    pattern = GROUP_PRESETS.get(group_by, group_by)
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise EmbedkitError(f"--group-by {group_by!r} is neither a preset ({', '.join(GROUP_PRESETS)}), "
                            f"a manifest column, nor a valid regex: {exc}") from None
    return rx


def group_from_path(rx: re.Pattern, path: str) -> str:
    """Join a regex's capture groups (or its whole match) found in ``path``."""
    m = rx.search(path.replace(os.sep, "/"))
    if m is None:
        raise EmbedkitError(f"--group-by pattern {rx.pattern!r} does not match {path!r}; every item needs a group")
    group = "_".join(g for g in m.groups() if g is not None) if m.groups() else m.group(0)
    return group or "."


def _apply_groups(items: list[Item], group_by: str | None, columns: Sequence[str] = ()) -> None:
    if group_by is not None and group_by in columns:
        for it in items:
            it.group = it.meta.get(group_by, "")
        return
    rx = group_rule(group_by)
    for it in items:
        if rx is not None:
            it.group = group_from_path(rx, it.path)
        elif not it.group:
            it.group = it.path  # each file is its own group unless told otherwise


def _image_files(folder: Path) -> list[Path]:
    from .formats import zarr_root  # an OME-Zarr folder is one image (embedkit.formats)

    files = [p for p in folder.rglob("*") if not p.name.startswith(".") and is_image_file(p)
             and (p.is_file() or p.suffix.lower() == ".zarr") and zarr_root(p.relative_to(folder).parent) is None]
    return sorted(files)


def from_class_folders(root: Path) -> list[Item]:
    """Each sub-folder of ``root`` is a class; its images (at any depth) are items with that label."""
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in _image_files(class_dir):
            rel = f.relative_to(root).as_posix()
            items.append(Item(id=rel, path=rel, label=class_dir.name))
    return items


def decode_text(path: str | os.PathLike, data: bytes) -> str:
    """Decode a text file as UTF-8 (a byte-order mark is accepted); otherwise one line naming the likely encoding."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise EmbedkitError(f"{path}: is UTF-16 text, not UTF-8; save it as UTF-8 (in Excel: 'CSV UTF-8') and run again")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        try:
            data.decode("cp1252")
            guess = "cp1252"
        except UnicodeDecodeError:
            guess = "latin-1"
        raise EmbedkitError(
            f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); it looks like {guess}. Save it as "
            f"UTF-8 (in Excel: 'CSV UTF-8'), or convert it: iconv -f {guess} -t utf-8 {Path(path).name} > fixed.csv") from None


def read_csv_rows(path: str | os.PathLike, required: Sequence[str], what: str = "manifest"
                  ) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A UTF-8 CSV's columns and its non-blank rows as (line number, {column: value}), values stripped.

    A row with more fields than the header (an unquoted comma in a label) is refused, naming its line;
    shorter rows leave their missing trailing columns ''. ``required`` columns must be in the header.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EmbedkitError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    reader = csv.reader(io.StringIO(decode_text(path, data), newline=""))
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        cols = [c.strip() for c in next(reader, [])]
        missing = [c for c in required if c not in cols]
        if missing:
            need = f"a {required[0]!r} column" if len(required) == 1 else f"{' and '.join(map(repr, required))} columns"
            raise EmbedkitError(f"{path}: a {what} needs {need} (found: {', '.join(cols) or 'none'})")
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if len(fields) > len(cols):
                raise EmbedkitError(f"{path}:{reader.line_num}: {len(fields)} fields but the header has {len(cols)} columns; "
                                    f"quote any value that holds a comma, e.g. \"Anaphase, late\"")
            fields += [""] * (len(cols) - len(fields))
            rows.append((reader.line_num, {c: f.strip() for c, f in zip(cols, fields)}))
    except csv.Error as exc:
        raise EmbedkitError(f"{path}:{reader.line_num}: not a readable CSV ({exc})") from None
    return cols, rows


def from_manifest(csv_path: Path) -> tuple[list[Item], list[str]]:
    """Read a CSV manifest: ``path`` is required; ``label``, ``group`` and ``id`` optional; other columns kept."""
    cols, rows = read_csv_rows(csv_path, ("path",))
    items = []
    for lineno, row in rows:
        if not row.get("path"):
            raise EmbedkitError(f"{csv_path}:{lineno}: empty 'path'")
        meta = {k: v for k, v in row.items() if k not in ("path", "label", "group", "id")}
        items.append(Item(id=row.get("id") or row["path"], path=row["path"], label=row.get("label", ""),
                          group=row.get("group", ""), meta=meta))
    if not items:
        raise EmbedkitError(f"{csv_path}: the manifest lists no images")
    return items, cols


def discover(source: str | os.PathLike | Sequence[str | os.PathLike], group_by: str | None = None) -> Source:
    """Find the items of a source: class folders, a CSV manifest, a plain folder, or a list of files."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        if len(paths) == 1:
            return discover(paths[0], group_by)
        return _from_files(paths, group_by)
    src = Path(source)
    if not src.exists():
        raise EmbedkitError(f"{src}: no such file or folder")
    if src.is_file() and src.suffix.lower() == ".csv":
        items, cols = from_manifest(src)
        _apply_groups(items, group_by, cols)
        return _checked(Source(root=str(src.parent.resolve()), items=items, kind="manifest"))
    if src.is_file() or src.suffix.lower() == ".zarr":
        return _from_files([src], group_by)
    has_class_dirs = any(p.is_dir() and not p.name.startswith(".") and _image_files(p) for p in src.iterdir())
    if has_class_dirs:
        items = from_class_folders(src)
        kind = "class_folders"
    else:
        items = [Item(id=f.relative_to(src).as_posix(), path=f.relative_to(src).as_posix()) for f in _image_files(src)]
        kind = "folder"
    if not items:
        raise EmbedkitError(f"{src}: no images found (looked for {', '.join(s.lstrip('.') for s in ('.png', '.jpg', '.tif'))} files)")
    _apply_groups(items, group_by)
    return _checked(Source(root=str(src.resolve()), items=items, kind=kind))


def _from_files(paths: Iterable[Path], group_by: str | None) -> Source:
    paths = [p.resolve() for p in paths]
    for p in paths:
        if not (p.is_file() or (p.is_dir() and p.suffix.lower() == ".zarr")):
            raise EmbedkitError(f"{p}: no such file")
        if p.suffix.lower() in (".h5", ".hdf5"):
            raise EmbedkitError(f"{p}: not a readable embedkit store (HDF5)")
        if not is_image_file(p):
            raise EmbedkitError(f"{p}: neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a CSV manifest")
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    items = [Item(id=p.relative_to(root).as_posix(), path=p.relative_to(root).as_posix()) for p in paths]
    _apply_groups(items, group_by)
    return _checked(Source(root=str(root), items=items, kind="files"))


def _checked(src: Source) -> Source:
    seen: set[str] = set()
    for it in src.items:
        if it.id in seen:
            raise EmbedkitError(f"duplicate item id {it.id!r}; ids (or paths) must be unique within a source")
        seen.add(it.id)
    return src
