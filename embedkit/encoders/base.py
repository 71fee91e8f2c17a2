"""The Encoder module every backend returns: a frozen network, its preprocessing and its pooling."""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch
from torch import nn

from .layers import LayerRequest, Taps, layer_key, resolve
from .specs import IMAGENET_MEAN, IMAGENET_STD, POOLINGS, EncoderSpec, Preprocess  # noqa: F401 (re-exported)


class Encoder(nn.Module):
    """A frozen feature extractor: ``forward(images) -> [B, D]`` on normalised input tensors.

    ``features(x)`` returns the backbone output before pooling (tokens [B, T, D] or maps [B, C, H, W]);
    ``pool`` turns it into one vector per image. ``config`` is the provenance recorded in the store.
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, features: Callable[[torch.Tensor], torch.Tensor],
                 preprocess: Preprocess, pooling: str | None, num_prefix_tokens: int, dim: int,
                 weights_source: str, weights_fingerprint: str, taps: Taps | None = None):
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
        self.taps = taps  # the backend's intermediate layers (blocks or stages), None when it offers none
        self.layers: tuple[int, ...] = ()  # chosen with select_layers: stored besides the usual output
        self.layer_dims: tuple[int, ...] = ()
        self.final_layer: str | None = None  # the layer the usual output is, when it is one of the taps
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

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The usual pooled output, then the pooled features of each chosen layer: one forward pass for all."""
        if not self.layers:
            return [self(x)]
        final, feats = self.taps.capture(x, self.layers)
        return [self.pool(final)] + [self.pool(f) for f in feats]

    def layer_name(self, index: int) -> str:
        return f"{self.taps.kind}-{index}"

    def select_layers(self, request: LayerRequest | None) -> list[str]:
        """Choose the intermediate layers ``outputs`` returns (refusing ones the network lacks); return their names.

        A chosen layer whose pooled features are the usual output (checked on one input) is not returned
        twice: it is recorded as ``final_layer`` and stays under the plain key.
        """
        self.layers, self.layer_dims, self.final_layer = (), (), None
        if request is None:
            return []
        chosen = resolve(request, self.taps, self.spec.name)
        probe = torch.Generator().manual_seed(0)
        size = self.preprocess.size
        x = torch.randn((2, 3, size, size), generator=probe).to(next(self.model.parameters()).device)
        with torch.inference_mode():
            self.layers = tuple(range(len(self.taps)))
            out = self.outputs(x)
        usual, pooled = out[0], out[1:]
        for i, v in enumerate(pooled):
            if v.shape == usual.shape and torch.allclose(v, usual, rtol=1e-5, atol=1e-6):
                self.final_layer = self.layer_name(i)
        keep = [i for i in chosen if self.layer_name(i) != self.final_layer]
        self.layers = tuple(keep)
        self.layer_dims = tuple(int(pooled[i].shape[1]) for i in keep)
        return [self.layer_name(i) for i in keep]

    def output_keys(self, key: str) -> list[str]:
        """Store keys of ``outputs``: ``key``, then ``key@block-N`` / ``key@stage-N`` per chosen layer."""
        return [key] + [layer_key(key, self.taps.kind, i) for i in self.layers]

    def output_configs(self, key: str, base: dict) -> list[dict]:
        """Provenance of each output's key: ``base`` (the run's config), plus the layer for layer keys."""
        out = [base]
        for i, dim in zip(self.layers, self.layer_dims):
            layer = {"name": self.layer_name(i), "kind": self.taps.kind, "index": i, "count": len(self.taps),
                     "module": self.taps.names[i], "of_key": key,
                     "plain_key_is": self.final_layer or "the encoder's usual output (after the last layer)"}
            out.append({**base, "dim": dim, "layer": layer})
        return out

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
