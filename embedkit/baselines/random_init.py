"""The random-init baseline: the same architecture and preprocessing as an encoder key, random weights from a seed.

Its vectors go under their own key (``<key>@random-init``); the seed is recorded in that key's config
(``random_seed``), so the weights fingerprint differs from the trained encoder's and the key can be rebuilt.
"""

from __future__ import annotations

import torch

from ..encoders import Encoder, create_encoder
from ..encoders.registry import get_spec
from ..errors import EmbedkitError
from ..items import Item
from ..store import Store

#: The seed a random-init baseline uses unless told otherwise (recorded in provenance).
RANDOM_SEED = 0
SUFFIX = "@random-init"


def random_encoder(name: str, seed: int = RANDOM_SEED, pooling: str | None = None,
                   image_size: int | None = None) -> Encoder:
    """Encoder ``name`` with weights drawn from torch's generator seeded with ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        enc = create_encoder(name, pooling=pooling, image_size=image_size, pretrained=False)
    enc.extra_config["random_seed"] = int(seed)
    return enc


def random_init_key(key: str) -> str:
    """The store key of ``key``'s random-init baseline; of a layer key ``<k>@block-N``, ``<k>@random-init@block-N``."""
    from ..encoders.layers import split_layer_key

    base, layer = split_layer_key(key)
    if base.endswith(SUFFIX):
        return key
    return f"{base}{SUFFIX}@{layer}" if layer else f"{key}{SUFFIX}"


def store_source(store: Store):
    """The store's items as a file source (for stores without /pixels), so ``embed`` reads their files."""
    from ..sources import Source

    items = [Item(id=str(i), path=str(p), label=str(lab), group=str(g))
             for i, p, lab, g in zip(store.ids, store.column("path"), store.labels, store.groups)]
    return Source(root=store.root, items=items, kind="store files")


def embed_random_init(store: Store, key: str, seed: int = RANDOM_SEED, device: str = "auto",
                      progress: bool = True) -> str:
    """Embed every item of ``store`` with a seeded random-init copy of key ``key``'s encoder; return the new key."""
    from ..embed import embed
    from ..images import Conversion

    cfg = store.config(key)
    if cfg.get("weights") == "random-init" or cfg.get("random_seed") is not None:
        raise EmbedkitError(f"key {key!r} is itself randomly initialised; a random-init baseline needs a trained encoder")
    if str(cfg.get("encoder", "")).startswith("local:") or "encoder" not in cfg:
        raise EmbedkitError(f"key {key!r} (encoder {cfg.get('encoder')!r}) cannot be rebuilt with random weights")
    spec = get_spec(cfg["encoder"])
    enc = random_encoder(cfg["encoder"], seed, pooling=cfg.get("pooling") if spec.is_vit else None,
                         image_size=int(cfg["preprocess"]["size"]))
    source = store.path if store.has_pixels else store_source(store)
    layer = cfg.get("layer")  # a layer key: the same layer of the random network (its plain key comes with it)
    base = random_init_key(layer["of_key"]) if layer else random_init_key(key)
    embed(source, store.path, enc, key=base, conv=Conversion.from_dict(cfg.get("conversion")), device=device,
          dtype=cfg.get("dtype") or "float32", skip_bad=True, progress=progress,
          layers=str(layer["index"]) if layer else None)
    return random_init_key(key)
