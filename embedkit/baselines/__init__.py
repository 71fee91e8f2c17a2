"""Baselines every probe is anchored to: ``random-init`` (same network, random weights), ``handcrafted``
(per-cell morphology, intensity, texture) and ``prior`` (the majority class).

``ensure_baselines`` finds each baseline's store key, computing a missing one on demand from the store's
pixels or files (see docs/probe.md, "Baselines").
"""

from __future__ import annotations

from typing import Sequence

from ..errors import EmbedkitError
from ..store import Store

BASELINES = ("random-init", "handcrafted", "prior")


def parse_baselines(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'all'/None, 'none', or a comma list of random-init, handcrafted, prior (order kept)."""
    if spec is None:
        return BASELINES
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names in (["all"], []):
        return BASELINES if names else ()
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise EmbedkitError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}, all or none")
    return tuple(dict.fromkeys(names))


def baseline_key(store: Store, key: str, name: str) -> str | None:
    """The store key holding baseline ``name`` for encoder key ``key`` (None for 'prior', which needs no vectors)."""
    from .handcrafted import KEY
    from .random_init import random_init_key

    return {"random-init": random_init_key(key), "handcrafted": KEY}.get(name)


def ensure_baselines(store: Store, key: str, names: Sequence[str], seed: int = 0, device: str = "auto",
                     progress: bool = True) -> tuple[dict[str, str], list[str]]:
    """Baseline name -> store key for ``names`` (not 'prior'), computing missing or unfinished keys; plus notes."""
    from .handcrafted import compute_handcrafted
    from .random_init import embed_random_init

    keys, notes = {}, []
    for name in names:
        bkey = baseline_key(store, key, name)
        if bkey is None:
            continue
        complete = bkey in store.keys and bool(store.done(bkey)[store.done(key)].all())
        if not complete:
            notes.append(f"baseline {name}: computed now into key {bkey!r} of {store.path}"
                         + (f" (random weights, seed {seed})" if name == "random-init" else ""))
            if name == "random-init":
                embed_random_init(store, key, seed=seed, device=device, progress=progress)
            else:
                compute_handcrafted(store, progress=progress)
        keys[name] = bkey
    return keys, notes
