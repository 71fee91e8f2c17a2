"""embedkit: embeddings, probes, neighbours and explanations for cell microscopy.

``import embedkit as ek`` is the Python front door (docs/python.md). Names load on first use, so
importing embedkit (and ``embedkit --help``) pulls in no torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Store": "embedkit.store",
    "EmbedkitError": "embedkit.errors",
    "SplitSpec": "embedkit.splits",
    "Splits": "embedkit.splits",
    "LogRegProbe": "embedkit.probe.estimators",
    "SVMProbe": "embedkit.probe.estimators",
    "KNNProbe": "embedkit.probe.estimators",
    **{name: "embedkit.api" for name in ("ProbeResults", "compare", "create_encoder", "embed", "explain", "finetune",
                                         "list_encoders", "load_probe", "neighbors", "probe", "segment", "view")},
}

__all__ = ["__version__", *sorted(_WHERE)]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'embedkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
