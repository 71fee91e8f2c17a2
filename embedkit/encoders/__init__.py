"""Encoder registry and builders: ``create_encoder(name, weights=..., pooling=...)``."""

from .base import POOLINGS, Encoder, EncoderSpec, Preprocess
from .registry import DEFAULT_ENCODER, REGISTRY, create_encoder, encoder_from_config, get_spec, list_encoders, weights_status

__all__ = ["POOLINGS", "Encoder", "EncoderSpec", "Preprocess", "DEFAULT_ENCODER", "REGISTRY", "create_encoder", "encoder_from_config",
           "get_spec", "list_encoders", "weights_status"]
