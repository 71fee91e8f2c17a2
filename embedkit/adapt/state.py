"""A training run's resumable state in one safetensors file: tensors, plus everything else as JSON in its header.

Model and optimiser tensors go into the file's tensors; the optimiser's scalar settings, the AMP scaler,
the epoch and the history go into its JSON metadata. One file written atomically means a kill can never
leave tensors from one epoch beside bookkeeping from another, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os

import torch

from ..atomic import atomic_write_bytes
from ..errors import EmbedkitError

META_KEY = "embedkit_state"


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, scalars in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(path: str | os.PathLike, module: torch.nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, meta: dict) -> None:
    """Write ``module``'s state dict, the optimiser and the scaler, with ``meta`` (JSON-able), atomically."""
    from safetensors.torch import save

    tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_split(opt)
    tensors.update(opt_tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"meta": meta, "optimizer": opt_meta, "scaler": scaler.state_dict()}
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(header)}))


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON ``meta`` of a saved state, without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads(fh.metadata()[META_KEY])["meta"]
    except Exception as exc:
        raise EmbedkitError(f"{path}: unreadable training state ({type(exc).__name__}); pass --restart to discard it") from None


def load_state(path: str | os.PathLike, module: torch.nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> dict:
    """Restore ``module``, ``opt`` and ``scaler`` from ``path`` (strictly) and return its ``meta``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()[META_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    module.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("module.")}, strict=True)
    opt.load_state_dict(_optimizer_join({k: v for k, v in tensors.items() if k.startswith("optimizer.")},
                                        header["optimizer"]))
    if header["scaler"]:
        scaler.load_state_dict(header["scaler"])
    return header["meta"]
