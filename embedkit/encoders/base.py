"""The Encoder module every backend returns: a frozen network, its preprocessing and its pooling."""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch
from torch import nn

from .specs import IMAGENET_MEAN, IMAGENET_STD, POOLINGS, EncoderSpec, Preprocess  # noqa: F401 (re-exported)


class Encoder(nn.Module):
    """A frozen feature extractor: ``forward(images) -> [B, D]`` on normalised input tensors.

    ``features(x)`` returns the backbone output before pooling (tokens [B, T, D] or maps [B, C, H, W]);
    ``pool`` turns it into one vector per image. ``config`` is the provenance recorded in the store.
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, features: Callable[[torch.Tensor], torch.Tensor],
                 preprocess: Preprocess, pooling: str | None, num_prefix_tokens: int, dim: int,
                 weights_source: str, weights_fingerprint: str):
        super().__init__()
        self.spec = spec
        self.model = model
        self._features = features
        self.preprocess = preprocess
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.dim = dim
        self.weights_source = weights_source
        self.weights_fingerprint = weights_fingerprint
        self.extra_config: dict = {}  # provenance added by wrappers (random-init seed, layer)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """Pool tokens by cls/mean/cls+mean (register tokens excluded), or average-pool feature maps."""
        if feats.ndim == 4:
            return feats.mean(dim=(2, 3))
        if feats.ndim == 2:
            return feats
        cls = feats[:, 0]
        patches = feats[:, self.num_prefix_tokens:]
        if self.pooling in (None, "cls"):
            return cls
        if self.pooling == "mean":
            return patches.mean(dim=1)
        return torch.cat([cls, patches.mean(dim=1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))

    @property
    def config(self) -> dict:
        """Provenance: everything that determines the vectors, plus library versions."""
        from importlib.metadata import version

        return {
            "encoder": self.spec.name,
            "backend": self.spec.backend,
            "arch": self.spec.arch,
            "weights": self.weights_source,
            "weights_fingerprint": self.weights_fingerprint,
            "preprocess": self.preprocess.to_dict(),
            "pooling": self.pooling,
            "num_prefix_tokens": self.num_prefix_tokens,
            "dim": self.dim,
            "versions": {"torch": torch.__version__, "timm": version("timm"), "transformers": version("transformers")},
            **self.extra_config,
        }


def state_dict_fingerprint(model: nn.Module) -> str:
    """Hash of all parameters and buffers: identical weights give identical fingerprints whatever the file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "num_batches_tracked" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    """Hash of a weights file's bytes (used when the weights come from a file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]
