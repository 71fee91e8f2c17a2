"""ImageNet CNNs from torchvision (ResNet, EfficientNet-B3, Inception-v3, SqueezeNet) as frozen encoders."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import WeightsNotFoundError
from .base import Encoder, EncoderSpec, file_fingerprint, state_dict_fingerprint
from .catalogue import torchvision_cache_path
from .checkpoints import load_checked, read_state_dict
from .layers import module_taps

_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "efficientnet_b3": "EfficientNet_B3_Weights.IMAGENET1K_V1",
    "inception_v3": "Inception_V3_Weights.IMAGENET1K_V1",
    "squeezenet1_1": "SqueezeNet1_1_Weights.IMAGENET1K_V1",
}


def _weights_enum(spec: EncoderSpec):
    import torchvision.models as tvm

    cls_name, member = _WEIGHTS[spec.arch].split(".")
    return getattr(getattr(tvm, cls_name), member)


def _architecture(arch: str, random_init: bool) -> nn.Module:
    import torchvision.models as tvm

    if arch == "inception_v3":
        return tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=random_init)
    return getattr(tvm, arch)(weights=None)


def _strip_head(arch: str, model: nn.Module) -> nn.Module:
    if arch.startswith("resnet") or arch == "inception_v3":
        model.fc = nn.Identity()
    elif arch.startswith("efficientnet"):
        model.classifier = nn.Identity()
    elif arch.startswith("squeezenet"):
        model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return model


def stage_modules(arch: str, model: nn.Module) -> list[str]:
    """The modules whose outputs are the network's stages, in order (ResNet layer1-4, EfficientNet and SqueezeNet
    ``features`` children, Inception's Mixed blocks)."""
    if arch.startswith("resnet"):
        return ["layer1", "layer2", "layer3", "layer4"]
    if arch == "inception_v3":
        return [n for n, _ in model.named_children() if n.startswith("Mixed")]
    return [f"features.{n}" for n, _ in model.features.named_children()]


def build_torchvision(spec: EncoderSpec, weights: str | None, image_size: int | None, pretrained: bool) -> Encoder:
    model = _architecture(spec.arch, random_init=not (pretrained or weights))
    source = "random-init"
    if weights:
        load_checked(model, read_state_dict(weights), str(weights))
        source = f"file:{weights}"
    elif pretrained:
        enum = _weights_enum(spec)
        cache = torchvision_cache_path(spec)
        try:
            state = enum.get_state_dict(progress=True, check_hash=False)
        except Exception:
            raise WeightsNotFoundError(
                f"{spec.name}: weights not found at {cache} and {enum.url} is unreachable; "
                f"download that file to {cache}, or pass --weights PATH") from None
        model.load_state_dict(state, strict=True)
        source = f"torchvision:{_WEIGHTS[spec.arch]}"
    model = _strip_head(spec.arch, model)

    def features(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out.logits if hasattr(out, "logits") else out

    fp = file_fingerprint(weights) if weights else state_dict_fingerprint(model)
    return Encoder(spec, model, features, spec.preprocess.with_size(image_size), None, 0, int(spec.dim), source, fp,
                   taps=module_taps(model, stage_modules(spec.arch, model), features))
