"""T, C, Z selection: which plane of a 5-D microscopy file an item is, and channels by name.

``--z max|mid|<index>`` reduces a Z-stack to one plane (maximum projection, middle plane, or a given
plane); ``--t`` picks time points of a series (every frame becomes its own item by default); channel
names from the file's metadata can stand wherever ``--channels`` takes an index.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import BadImageError, EmbedkitError

Z_RULES = ("max", "mid")


def parse_z(spec: str | int | None) -> str | None:
    """'max', 'mid' or a plane index (as text); None keeps the default (max projection of a Z-stack)."""
    if spec is None or str(spec).strip() == "":
        return None
    s = str(spec).strip().lower()
    if s in Z_RULES or s.isdigit():
        return s
    raise EmbedkitError(f"--z {spec!r}: use max (maximum projection), mid (middle plane) or a plane index such as 3")


def parse_t(spec: str | None) -> list[int] | None:
    """Time points: '0,5,9', '0:10' (start:stop, stop excluded, optional :step) or 'all'/None for every frame."""
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in str(spec).split(","))):
            if ":" in part:
                bits = [int(b) if b else None for b in part.split(":")]
                if len(bits) > 3 or bits[1] is None:
                    raise ValueError(part)
                out += list(range(bits[0] or 0, bits[1], bits[2] if len(bits) == 3 and bits[2] else 1))
            else:
                out.append(int(part))
    except ValueError:
        raise EmbedkitError(f"--t {spec!r}: give frame indices such as 0,5,9 or a range START:STOP[:STEP], or 'all'") from None
    if not out or min(out) < 0:
        raise EmbedkitError(f"--t {spec!r}: selects no frame (indices start at 0)")
    return sorted(set(out))


def z_index(rule: str | None, n_z: int, path: str) -> int | None:
    """The plane index a rule picks (None: maximum projection)."""
    if n_z <= 1:
        return 0
    if rule is None or rule == "max":
        return None
    if rule == "mid":
        return n_z // 2
    z = int(rule)
    if z >= n_z:
        raise BadImageError(path, f"has {n_z} Z planes but --z asks for plane {z}")
    return z


def reduce_z(stack: np.ndarray, rule: str | None, path: str) -> np.ndarray:
    """(Z, C, Y, X) -> (C, Y, X) by the Z rule."""
    z = z_index(rule, stack.shape[0], path)
    return stack.max(axis=0) if z is None else stack[z]


def resolve_channels(channels: Sequence[int | str | None], names: Sequence[str] | None, path: str) -> tuple[int | None, ...]:
    """Replace channel names by their index in ``names`` (exact match first, then case-insensitive)."""
    names = [str(n) for n in (names or [])]
    out: list[int | None] = []
    for c in channels:
        if c is None or isinstance(c, (int, np.integer)):
            out.append(None if c is None else int(c))
            continue
        if not names:
            raise BadImageError(path, f"has no channel names in its metadata, so --channels cannot use {c!r}; use indices")
        hits = [i for i, n in enumerate(names) if n == c] or [i for i, n in enumerate(names) if n.lower() == str(c).lower()]
        if len(hits) != 1:
            what = "is not" if not hits else "matches several"
            raise BadImageError(path, f"channel {c!r} {what} one of its channels ({', '.join(names)})")
        out.append(hits[0])
    return tuple(out)
