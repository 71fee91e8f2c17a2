"""An adapted encoder on disk: ``encoder.safetensors`` + ``encoder.json``, and loading it as ``local:<folder>``.

The JSON names the base encoder, the method, the data fingerprint and the epochs. Loading builds the base
architecture from the registry with no pretrained weights, loads the adapted state dict strictly, and
returns an :class:`~embedkit.encoders.Encoder` whose provenance (``weights``, ``weights_fingerprint``) is
recorded by ``embed`` like any other encoder's.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from ..encoders import Encoder
from ..encoders.base import EncoderSpec, state_dict_fingerprint
from ..errors import EmbedkitError

FORMAT = "embedkit-adapted-encoder"
VERSION = 1
WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "encoder.json"
PREFIX = "local:"


def save_adapted(directory: str | os.PathLike, enc: Encoder, config: dict) -> dict:
    """Write the encoder's weights, then its config (so the config never names weights not yet on disk)."""
    from safetensors.torch import save

    from ..atomic import atomic_write_bytes, atomic_write_json

    d = Path(directory)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in enc.model.state_dict().items()}
    config = {"format": FORMAT, "version": VERSION, **config,
              "weights_fingerprint": state_dict_fingerprint(enc.model)}
    atomic_write_bytes(d / WEIGHTS_FILE, save(state, metadata={"format": FORMAT, "base_encoder": config["base_encoder"]}))
    atomic_write_json(d / CONFIG_FILE, config)
    return config


def read_adapted_config(directory: str | os.PathLike) -> dict:
    """Read and check ``encoder.json`` of an adapted encoder folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise EmbedkitError(f"{directory}: no {CONFIG_FILE}; not a folder written by 'embedkit adapt' "
                            f"(or its run has not finished: run the same 'embedkit adapt' command to resume it)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise EmbedkitError(f"{path}: unreadable ({exc})") from None
    if cfg.get("format") != FORMAT:
        raise EmbedkitError(f"{path}: not an embedkit adapted encoder (format {cfg.get('format')!r})")
    if int(cfg.get("version", 0)) > VERSION:
        raise EmbedkitError(f"{path}: version {cfg['version']} is newer than this embedkit understands; upgrade")
    return cfg


def local_spec(name: str) -> EncoderSpec:
    """The spec of ``local:<folder>``: the base encoder's, renamed, with the adapted weights as its source."""
    from ..encoders.registry import get_spec

    folder = name[len(PREFIX):]
    if not folder:
        raise EmbedkitError("local: needs a folder written by 'embedkit adapt', e.g. local:encoders/lite0-adapted")
    cfg = read_adapted_config(folder)
    base = get_spec(cfg["base_encoder"])
    return replace(base, name=name, weights=f"{PREFIX}{os.path.abspath(folder)}", family=base.family,
                   description=f"{cfg['base_encoder']} adapted by {cfg['method']} on {cfg['data']['n_items']} cells")


def load_adapted(name: str, pooling: str | None = None, image_size: int | None = None) -> Encoder:
    """Build ``local:<folder>``: the base architecture with the adapted weights, loaded strictly."""
    from safetensors.torch import load_file

    from ..encoders.registry import create_encoder

    spec = local_spec(name)
    folder = Path(name[len(PREFIX):])
    cfg = read_adapted_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise EmbedkitError(f"{weights}: missing; the adapted encoder folder is incomplete")
    base = create_encoder(cfg["base_encoder"], pooling=pooling or cfg.get("pooling"),
                          image_size=image_size or int(cfg["preprocess"]["size"]), pretrained=False)
    try:
        base.model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise EmbedkitError(f"{weights}: does not fit {cfg['base_encoder']} ({str(exc).splitlines()[0][:200]})") from None
    return Encoder(replace(spec, dim=base.dim), base.model, base._features, base.preprocess, base.pooling,
                   base.num_prefix_tokens, base.dim, f"{PREFIX}{weights.resolve()}", state_dict_fingerprint(base.model))
