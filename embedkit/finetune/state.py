"""The resumable training state of one fold, as safetensors + JSON (never pickle).

Model, optimiser and AMP-scaler state are nested dicts of tensors and plain values. Every tensor is stored
under its path (``optimizer/state/3/exp_avg``); everything else goes into a JSON document in the file's
header, with tuples and non-string keys spelled out so that the state loads back exactly as it was saved.
One file, written atomically, so a kill leaves the previous epoch's state or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import EmbedkitError

STATE_FILE = "train_state.safetensors"
LEGACY_STATE_FILE = "train_state.pt"  # pickled by older versions: refused, never unpickled
FORMAT = "embedkit-train-state"
VERSION = 1


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__items__": [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path} in a training state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return obj


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (nested dicts/lists/tuples of tensors and JSON values) to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, "", tensors)
    meta = {"format": FORMAT, "version": str(VERSION), "state": json.dumps(doc)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state(path: str | os.PathLike) -> dict:
    """Read a state written by :func:`save_state`; anything else is refused with one line."""
    from safetensors import safe_open

    hint = "pass --restart to discard it and train this fold from the start"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        if int(meta.get("version", 0)) > VERSION:
            raise EmbedkitError(f"{path}: written by a newer embedkit (state version {meta['version']}); upgrade, or {hint}")
        state = _decode(json.loads(meta["state"]), tensors)
    except EmbedkitError:
        raise
    except Exception as exc:  # a torn, truncated or foreign file: all mean "not a state this run can resume"
        raise EmbedkitError(f"{path}: not a readable training state ({type(exc).__name__}: {str(exc)[:120]}); {hint}") from None
    if not isinstance(state, dict):
        raise EmbedkitError(f"{path}: not a readable training state; {hint}")
    return state


def refuse_legacy(directory: Path) -> None:
    """Refuse a pickled ``train_state.pt`` from an older embedkit: it is never unpickled."""
    legacy = Path(directory) / LEGACY_STATE_FILE
    if legacy.exists():
        raise EmbedkitError(f"{legacy}: a training state pickled by an older embedkit, which is not loaded for safety; "
                            f"pass --restart to discard it and train this fold again")
