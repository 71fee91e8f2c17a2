"""What an encoder is, without building it: registry entries and preprocessing (no torch import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("cls", "mean", "cls+mean")


@dataclass(frozen=True)
class Preprocess:
    """How an RGB float image in [0, 1] becomes the encoder's input tensor."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    resize: str = "pad"  # 'pad': pad to square then resize (keeps aspect); 'stretch': resize as is

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def with_size(self, size: int | None) -> "Preprocess":
        return self if size is None else replace(self, size=int(size))


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry: how to build a network, where its weights come from, and how to feed it."""

    name: str
    backend: str  # 'timm', 'hf', 'torchvision', 'lite'
    arch: str  # timm model name, Hugging Face repo id, torchvision builder, or lite package variant
    dim: int | None
    preprocess: Preprocess = field(default_factory=Preprocess)
    pooling: str | None = None  # default pooling for token models; None for CNNs
    weights: str = ""  # human description of the default weights' source
    local_arch: str | None = None  # timm architecture for official local checkpoint files (DINOv2/DINOv3)
    family: str = "cnn"
    description: str = ""

    @property
    def is_vit(self) -> bool:
        return self.pooling is not None
