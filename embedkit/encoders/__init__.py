"""Encoder registry and builders: ``create_encoder(name, weights=..., pooling=...)``.

Names load lazily, so listing the registry (``embedkit encoders``) imports no torch.
"""

from __future__ import annotations

import importlib

_WHERE = {"POOLINGS": "specs", "EncoderSpec": "specs", "Preprocess": "specs", "Encoder": "base",
          "DEFAULT_ENCODER": "registry", "REGISTRY": "registry", "create_encoder": "registry",
          "encoder_from_config": "registry", "get_spec": "registry", "list_encoders": "registry",
          "weights_status": "catalogue", "encoder_table": "catalogue"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'embedkit.encoders' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
