"""What a store is: schema version, key names, configuration fingerprints and the checks that refuse bad files."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from typing import Any

import h5py

from ..configdiff import describe_differences
from ..errors import EmbedkitError

#: 1: everything in one file. 2: big arrays may live in shard files beside it (see docs/store.md).
SCHEMA_VERSION = 2
STR = h5py.string_dtype("utf-8")
ITEM_FIELDS = ("id", "path", "label", "group")
#: Fields of an encoder run that change the vectors; library versions and devices are provenance only.
COMPARED_FIELDS = ("encoder", "weights_fingerprint", "preprocess", "pooling", "conversion", "dtype", "dim")
_KEY_RE = re.compile(r"^[A-Za-z0-9._@+-]+$")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (configs, id lists)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def key_for(encoder_name: str) -> str:
    """Default embedding key for an encoder name: 'timm:vit_small' -> 'timm_vit_small'."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", encoder_name).strip("_.")


def validate_key(key: str) -> str:
    """Refuse a key that is not one safe name (keys become HDF5 group and folder names)."""
    if not key or key in (".", "..") or ".." in key or os.path.isabs(key) or not _KEY_RE.match(key):
        raise EmbedkitError(f"--key {key!r}: a key is one name of letters, digits and . _ @ + - "
                            f"(no '/', no '..'), e.g. lite0_128")
    return key


def comparable_config(config: dict) -> dict:
    return {k: config.get(k) for k in COMPARED_FIELDS}


def config_mismatch_message(key: str, old: dict, new: dict) -> str:
    return (f"embedding key {key!r} was made with a different encoder configuration "
            f"({describe_differences(old, new, COMPARED_FIELDS)}); use another --key to keep both")


def schema_version(path: str | os.PathLike) -> int:
    """The schema version of an embedkit store; refuse files that are not stores or come from a newer schema."""
    try:
        with h5py.File(path, "r") as f:
            return file_schema_version(f, path)
    except OSError as exc:
        raise EmbedkitError(f"{path}: not a readable HDF5 store ({exc})") from None


def file_schema_version(f: h5py.File, path: str | os.PathLike) -> int:
    """:func:`schema_version` of an open file."""
    version = f.attrs.get("schema_version")
    has_items = "items" in f
    if version is None:
        raise EmbedkitError(f"{path}: an HDF5 file, but not an embedkit store (no schema_version attribute)")
    if isinstance(version, bytes):
        version = version.decode("utf-8", "replace")
    try:
        number = int(version)
        if number != float(version) or number < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise EmbedkitError(f"{path}: schema_version {version!r} is not a whole number; "
                            f"this file was not written by embedkit") from None
    if number > SCHEMA_VERSION:
        raise EmbedkitError(f"{path}: store schema {number} is newer than this embedkit understands "
                            f"({SCHEMA_VERSION}); upgrade embedkit")
    if not has_items:
        raise EmbedkitError(f"{path}: an embedkit store without an /items group; it is damaged or was not "
                            f"written by embedkit")
    return number


def check_schema(path: str | os.PathLike) -> None:
    """Refuse files that are not embedkit stores, or that come from a newer schema."""
    schema_version(path)


def upgrade_message(path: str | os.PathLike) -> str:
    return (f"{path} uses store schema 1, where every write copies the whole file; upgrade it once with "
            f"'embedkit store upgrade {path}' and run the command again")
