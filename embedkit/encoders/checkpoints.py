"""Reading checkpoint files and loading them strictly, so that weights never silently fall back to random.

Every backend loads with :func:`load_checked` (or checks transformers' loading report with
:func:`check_keys`): a key the model needs but the file lacks, or a key the file holds that the model
has no place for, is an error naming the first few keys. Only the keys in :data:`ALLOWED_EXTRA_OR_MISSING`
may differ: classifier heads, which encoders drop, and tensors that inference never reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import EmbedkitError

#: Keys that may be missing from, or left over in, a checkpoint without changing any embedding:
#: classifier heads (encoders take the features before them; fine-tuning replaces them), Inception's
#: auxiliary head, the masked-image-modelling token of DINOv2/DINOv3/iBOT, transformers' unused pooler,
#: and BatchNorm's step counter.
ALLOWED_EXTRA_OR_MISSING = re.compile(
    r"^(?:(?:head|heads|fc|classifier|_fc|lm_head|AuxLogits|pooler|head_drop)(?:\.|$)"
    r"|(?:.*\.)?mask_token$"
    r"|.*num_batches_tracked$)")

SHOWN = 3  # how many offending keys an error names


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, short enough for a one-line error."""
    text = (str(exc).strip().splitlines() or [""])[0][:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _named(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_keys(source: str, missing: Iterable[str], unexpected: Iterable[str], total: int,
               mismatched: Iterable[tuple[str, tuple, tuple]] = ()) -> None:
    """Refuse a load whose missing, unexpected or wrongly shaped keys go beyond the allow-list.

    ``mismatched`` holds (key, shape in the file, shape in the model) triples.
    """
    missing = sorted(k for k in missing if not ALLOWED_EXTRA_OR_MISSING.match(k))
    unexpected = sorted(k for k in unexpected if not ALLOWED_EXTRA_OR_MISSING.match(k))
    mismatched = sorted(mismatched)
    if mismatched:
        k, file_shape, model_shape = mismatched[0]
        raise EmbedkitError(f"weights {source}: {len(mismatched)} tensors have the wrong shape for this model "
                            f"(e.g. {k}: {tuple(file_shape)} in the file, {tuple(model_shape)} in the model); "
                            f"they were made for another architecture or size")
    if missing:
        raise EmbedkitError(f"weights {source}: {len(missing)} of the model's {total} tensors are missing "
                            f"({_named(missing)}); they would stay random. Pass the complete checkpoint of this architecture")
    if unexpected:
        raise EmbedkitError(f"weights {source}: {len(unexpected)} tensors have no place in this model "
                            f"({_named(unexpected)}); it was made for another architecture")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth`` state dict (never unpickling code), unwrapped and without ``module.``."""
    p = Path(path)
    if p.is_dir():
        what = "an empty folder" if not any(p.iterdir()) else "a folder"
        raise EmbedkitError(f"--weights {p}: {what}; pass the checkpoint file itself (.pth or .safetensors), "
                            f"or for a transformers encoder a folder with config.json and model.safetensors")
    if p.stat().st_size == 0:
        raise EmbedkitError(f"--weights {p}: the file is empty (0 bytes)")
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip readers raise many types; all mean "unreadable"
        kind = "safetensors" if p.suffix.lower() == ".safetensors" else "PyTorch"
        raise EmbedkitError(f"--weights {p}: not a readable {kind} checkpoint ({first_line(exc)})") from None
    return _unwrap(state, p)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in ("state_dict", "model", "teacher"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise EmbedkitError(f"--weights {path}: holds a {type(state).__name__}, not a state dict of named tensors")
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EmbedkitError(f"--weights {path}: holds no weight tensors")
    return tensors


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, refusing missing, unexpected or wrongly shaped tensors (see check_keys)."""
    own = model.state_dict()
    mismatched = [(k, v.shape, own[k].shape) for k, v in state.items() if k in own and v.shape != own[k].shape]
    check_keys(source, [], [], len(own), mismatched)
    result = model.load_state_dict(state, strict=False)
    check_keys(source, result.missing_keys, result.unexpected_keys, len(own))
