"""embedkit: embeddings, probes, neighbours and explanations for cell microscopy.

``import embedkit as ek`` is the Python front door (docs/python.md). Names load on first use, so
importing embedkit (and ``embedkit --help``) pulls in no torch.
"""

from __future__ import annotations

import importlib
import sys
import types

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


def _front_door(name: str):
    return getattr(importlib.import_module(_WHERE[name]), name)


class _Package(types.ModuleType):
    """The embedkit package: ``ek.probe``, ``ek.embed``... are the API functions even after the
    subpackages of the same name are imported (``import embedkit.probe`` still finds the subpackage)."""

    def __getattribute__(self, name: str):
        if name in _WHERE:
            return _front_door(name)
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_WHERE))


sys.modules[__name__].__class__ = _Package
