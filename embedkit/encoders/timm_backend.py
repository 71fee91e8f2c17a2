"""Encoders built with timm: DINO, official DINOv2/DINOv3 checkpoint files, and any ``timm:<name>``."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import EmbedkitError, WeightsNotFoundError
from .base import Encoder, EncoderSpec, Preprocess, state_dict_fingerprint
from .checkpoints import first_line, load_checked, read_state_dict
from .layers import timm_taps


def timm_spec(name: str) -> EncoderSpec:
    """Passthrough spec for ``timm:<model name>``; preprocessing comes from timm's pretrained config."""
    import timm

    arch = name[5:]
    if not arch or not timm.is_model(arch.split(".")[0]):
        raise EmbedkitError(f"{name}: timm has no model {arch!r}; see timm.list_models()")
    return EncoderSpec(name, "timm", arch, None, _timm_preprocess(arch), None, weights=f"timm hub {arch}",
                       family="timm", description=f"timm model {arch}")


def _timm_preprocess(arch: str) -> Preprocess:
    import timm

    try:
        cfg = timm.get_pretrained_cfg(arch)
    except Exception:
        cfg = None
    if cfg is None:
        return Preprocess()
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return Preprocess(int(cfg.get("input_size", (3, 224, 224))[-1]), tuple(cfg.get("mean", Preprocess.mean)),
                      tuple(cfg.get("std", Preprocess.std)), cfg.get("interpolation", "bicubic") or "bicubic")


def create_timm_model(arch: str, size: int, pretrained: bool, weights: str | None, num_classes: int = 0) -> torch.nn.Module:
    """timm.create_model with ViT-friendly options when the model accepts them, loading weights strictly.

    A local ``weights`` file goes through timm's checkpoint filter for the architecture (official DINOv2/
    DINOv3 key layouts) and then :func:`load_checked`; hub weights load with timm's own strict check.
    """
    model = _create(arch, size, pretrained and weights is None, num_classes)
    if weights is not None:
        state = _filtered(arch, read_state_dict(weights), model, str(weights))
        load_checked(model, state, str(weights))
    return model


def _create(arch: str, size: int, hub: bool, num_classes: int) -> torch.nn.Module:
    import timm

    last: Exception | None = None
    for extra in (dict(img_size=size, dynamic_img_size=True), {}):
        try:
            if not hub:
                return timm.create_model(arch, pretrained=False, num_classes=num_classes, **extra)
            # With the pretrained head's class count timm loads strictly; the head is replaced afterwards.
            model = timm.create_model(arch, pretrained=True, **extra)
            model.reset_classifier(num_classes)
            return model
        except TypeError as exc:  # architecture does not take img_size / dynamic_img_size
            last = exc
            continue
        except RuntimeError as exc:
            if hub and "state_dict" in str(exc):
                raise EmbedkitError(f"{arch}: the cached hub weights do not fit the architecture "
                                    f"({first_line(exc)}); delete the cache entry and download again") from None
            raise
        except Exception:  # hub errors come in many types
            if not hub:
                raise
            raise WeightsNotFoundError(
                f"{arch}: pretrained weights not found locally and the hub is unreachable (wanted timm/{arch}); "
                f"pass a local checkpoint with --weights PATH") from None
    raise EmbedkitError(f"could not build timm model {arch}: {last}")


def _filtered(arch: str, state: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Apply the architecture module's ``checkpoint_filter_fn`` (key renames, position-embedding resizing)."""
    import sys

    from timm.models import model_entrypoint

    module = sys.modules[model_entrypoint(arch.split(".")[0]).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except Exception as exc:  # the filters assume the layout they were written for
        raise EmbedkitError(f"weights {source}: not a checkpoint of {arch} ({first_line(exc)})") from None


def build_timm(spec: EncoderSpec, weights: str | None, pooling: str | None, image_size: int | None,
               pretrained: bool) -> Encoder:
    preprocess = spec.preprocess.with_size(image_size)
    model = create_timm_model(spec.arch, preprocess.size, pretrained, weights)
    tokens = hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks")
    if tokens:
        has_cls = getattr(model, "cls_token", None) is not None
        pool = pooling or spec.pooling or ("cls" if has_cls else "mean")
        if pool != "mean" and not has_cls:
            raise EmbedkitError(f"{spec.name} has no class token; use --pooling mean")
        num_prefix = int(model.num_prefix_tokens)

        def features(x: torch.Tensor) -> torch.Tensor:
            return model.forward_features(x)

        dim = int(model.num_features) * (2 if pool == "cls+mean" else 1)
    else:
        if pooling is not None:
            raise EmbedkitError(f"--pooling applies to ViT encoders; {spec.name} is a CNN and is average-pooled")
        pool, num_prefix = None, 0

        def features(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.forward_features(x), pre_logits=True)

        dim = int(model.num_features)
    source = f"file:{weights}" if weights else (f"timm-hub:{spec.arch}" if pretrained else "random-init")
    return Encoder(replace(spec, dim=dim), model, features, preprocess, pool, num_prefix, dim, source,
                   state_dict_fingerprint(model), taps=timm_taps(model, tokens, features))
