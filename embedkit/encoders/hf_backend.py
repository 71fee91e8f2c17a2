"""Encoders loaded through Hugging Face transformers (DINOv2, DINOv3, any ``hf:<repo>``).

Official checkpoint files (``.pth``/``.safetensors`` in Meta's key layout) are loaded through timm's
ports of the same architectures (``spec.local_arch``), whose checkpoint filters understand those keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import EmbedkitError, WeightsNotFoundError
from .base import Encoder, EncoderSpec, Preprocess, state_dict_fingerprint
from .checkpoints import check_keys, first_line
from .layers import HiddenStateTaps


def hf_spec(name: str) -> EncoderSpec:
    """Passthrough spec for ``hf:<repo id or folder>``; preprocessing comes from its processor config."""
    repo = name[3:]
    if not repo:
        raise EmbedkitError("hf: needs a repo id or a local folder, e.g. hf:facebook/dinov2-small")
    return EncoderSpec(name, "hf", repo, None, Preprocess(224), "cls", weights=f"Hugging Face {repo}",
                       family="hf", description=f"transformers AutoModel {repo}")


def _processor_preprocess(source: str, base: Preprocess) -> Preprocess:
    """Read mean/std/size from a local preprocessor_config.json when there is one."""
    p = Path(source) / "preprocessor_config.json"
    if not p.exists():
        return base
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise EmbedkitError(f"{p}: not a readable preprocessor config ({exc})") from None
    size = cfg.get("crop_size") or cfg.get("size") or {}
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or base.size
    mean = tuple(cfg.get("image_mean", base.mean))
    std = tuple(cfg.get("image_std", base.std))
    return replace(base, size=int(size or base.size), mean=mean, std=std)


def _is_official_checkpoint(path: str) -> bool:
    return os.path.isfile(path) and not (Path(path).parent / "config.json").exists()


def build_hf(spec: EncoderSpec, weights: str | None, pooling: str | None, image_size: int | None,
             pretrained: bool) -> Encoder:
    if weights is not None and _is_official_checkpoint(str(weights)):
        if spec.local_arch is None:
            raise EmbedkitError(f"{spec.name}: a single weights file needs a known architecture; pass the folder "
                                f"holding config.json and the weights instead")
        from .timm_backend import build_timm

        return build_timm(replace(spec, arch=spec.local_arch), weights, pooling, image_size, pretrained)
    source = str(Path(weights).parent if weights and os.path.isfile(weights) else (weights or spec.arch))
    preprocess = _processor_preprocess(source, spec.preprocess) if os.path.isdir(source) else spec.preprocess
    try:
        model = _load_hf(spec, source, pretrained)
    except WeightsNotFoundError:
        if pretrained or weights is not None or spec.local_arch is None:
            raise
        # a random network needs no download: the same architecture from timm's built-in configuration
        from .timm_backend import build_timm

        return build_timm(replace(spec, arch=spec.local_arch), None, pooling, image_size, False)
    cfg = model.config
    num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    dim = _hf_dim(cfg, pooling or spec.pooling)
    size = image_size or preprocess.size

    def features(x: torch.Tensor) -> torch.Tensor:
        # DINOv2 interpolates its position embeddings to any input size; DINOv3 uses RoPE.
        return model(pixel_values=x).last_hidden_state

    return Encoder(spec, model, features, preprocess.with_size(size), pooling or spec.pooling, num_prefix, dim,
                   weights_source=f"transformers:{source}" if pretrained else "random-init",
                   weights_fingerprint=state_dict_fingerprint(model), taps=_hf_taps(model))


def _hf_taps(model: torch.nn.Module) -> HiddenStateTaps | None:
    """Blocks of a transformers ViT (final norm applied, as to its last hidden state), or stages of a ConvNeXt."""
    cfg = model.config
    if getattr(cfg, "depths", None):  # ConvNeXt-style: one hidden state per stage
        return HiddenStateTaps("stage", model, len(cfg.depths), None)
    n = getattr(cfg, "num_hidden_layers", None)
    if not n:
        return None
    norm = getattr(model, "layernorm", None) or getattr(model, "norm", None)
    return HiddenStateTaps("block", model, int(n), norm)


def _load_hf(spec: EncoderSpec, source: str, pretrained: bool) -> torch.nn.Module:
    """AutoModel from a folder or the hub cache, refusing a checkpoint that leaves any weight random."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    verbosity, bars_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report would go to stderr; check_keys says what matters
    hf_logging.disable_progress_bar()
    try:
        if not pretrained:
            return AutoModel.from_config(AutoConfig.from_pretrained(source))
        model, info = AutoModel.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as exc:
        if os.path.isdir(source):
            raise EmbedkitError(f"{source}: not a loadable transformers model folder ({str(exc).splitlines()[0]})") from None
        raise WeightsNotFoundError(
            f"{spec.name}: weights not found locally and the hub is unreachable (wanted hub id {source}); "
            f"download it elsewhere with 'huggingface-cli download {source}' and copy the cache, or pass --weights FOLDER") from None
    except Exception as exc:  # corrupt safetensors, unknown model types, bad configs
        raise EmbedkitError(f"{source}: its transformers weights or config cannot be read ({first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()
    check_keys(source, info["missing_keys"], info["unexpected_keys"], len(model.state_dict()),
               info.get("mismatched_keys", ()))
    return model


def _hf_dim(cfg, pooling: str | None) -> int:
    hidden = getattr(cfg, "hidden_size", None)
    if hidden is None and getattr(cfg, "hidden_sizes", None):
        hidden = cfg.hidden_sizes[-1]
    if hidden is None:
        raise EmbedkitError(f"cannot tell the feature size of model type {getattr(cfg, 'model_type', '?')}")
    return int(hidden) * (2 if pooling == "cls+mean" else 1)
