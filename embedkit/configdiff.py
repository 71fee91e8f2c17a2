"""The one way embedkit says how two configurations differ, for refusals that name the changed fields."""

from __future__ import annotations

from typing import Any, Sequence


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b': value}."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: dict, new: dict, fields: Sequence[str] | None = None, ignore: Sequence[str] = ("versions",)) -> list[str]:
    """'field: old before vs new now' for each differing (nested) field, restricted to ``fields`` if given."""
    if fields is not None:
        old = {k: old.get(k) for k in fields}
        new = {k: new.get(k) for k in fields}
    a = {k: v for k, v in flatten(old).items() if k.split(".")[0] not in ignore}
    b = {k: v for k, v in flatten(new).items() if k.split(".")[0] not in ignore}
    return [f"{k}: {a.get(k)!r} before vs {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def describe_differences(old: dict, new: dict, fields: Sequence[str] | None = None, limit: int = 300) -> str:
    """One short line listing the differing fields (for error messages)."""
    return "; ".join(differences(old, new, fields))[:limit] or "no visible difference"
