"""Geometry: ViT tokens -> a spatial grid, and a map on the model's input back onto the original image.

The token grid is derived from the model (its patch size and the actual input size) on every call, so
any input size and non-square grids work; the CLS and register tokens (``num_prefix_tokens``) are
dropped. Nothing assumes 14 x 14.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import Preprocess
from ..errors import EmbedkitError


@dataclass
class TokenLayout:
    """How a token model lays out its sequence: prefix tokens, then patches row by row."""

    num_prefix_tokens: int
    patch_size: tuple[int, int]
    grid_fn: Callable[[tuple[int, int]], tuple[int, int]]

    def grid(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(int(v) for v in self.grid_fn(tuple(int(s) for s in input_hw)))


def token_layout(backbone: nn.Module, num_prefix_tokens: int | None = None) -> TokenLayout | None:
    """The token layout of a timm or transformers ViT, or None for networks with spatial feature maps."""
    pe = getattr(backbone, "patch_embed", None)
    if pe is not None and hasattr(pe, "patch_size") and hasattr(backbone, "blocks"):  # timm VisionTransformer & co
        patch = _pair(pe.patch_size)
        prefix = num_prefix_tokens if num_prefix_tokens is not None else int(getattr(backbone, "num_prefix_tokens", 1))
        if hasattr(pe, "dynamic_feat_size"):
            return TokenLayout(prefix, patch, pe.dynamic_feat_size)
        return TokenLayout(prefix, patch, lambda hw: (hw[0] // patch[0], hw[1] // patch[1]))
    cfg = getattr(backbone, "config", None)
    if cfg is not None and getattr(cfg, "patch_size", None) and getattr(cfg, "num_attention_heads", None):  # transformers ViTs
        patch = _pair(cfg.patch_size)
        prefix = num_prefix_tokens if num_prefix_tokens is not None else 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        return TokenLayout(prefix, patch, lambda hw: (hw[0] // patch[0], hw[1] // patch[1]))
    return None


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


class TokensToGrid:
    """pytorch-grad-cam reshape transform: [B, T, D] tokens -> [B, D, gh, gw] for the current input size.

    Call :meth:`set_input` with the input's (H, W) before each forward pass. 4-D activations (a conv
    layer picked with --layer) pass through, turned channels-first when they are channels-last.
    """

    def __init__(self, layout: TokenLayout):
        self.layout = layout
        self.input_hw: tuple[int, int] | None = None

    def set_input(self, input_hw: tuple[int, int]) -> None:
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(tokens, (tuple, list)):
            tokens = tokens[0]
        if tokens.ndim == 4:  # a conv map; timm's dynamic-size patch embedding gives channels-last (NHWC)
            if self.input_hw is not None and tuple(tokens.shape[1:3]) == self.layout.grid(self.input_hw) \
                    and tokens.shape[3] != tokens.shape[2]:
                return tokens.permute(0, 3, 1, 2).contiguous()
            return tokens
        if tokens.ndim != 3:
            raise EmbedkitError(f"the chosen layer outputs shape {tuple(tokens.shape)}; a ViT layer must output tokens "
                                f"[B, T, D]; pick a block's norm1 or a block itself with --layer")
        if self.input_hw is None:
            raise RuntimeError("TokensToGrid.set_input was not called before the forward pass")
        gh, gw = self.layout.grid(self.input_hw)
        p = self.layout.num_prefix_tokens
        n = tokens.shape[1] - p
        if n != gh * gw:
            raise EmbedkitError(f"the layer's {tokens.shape[1]} tokens are not {p} prefix tokens + a {gh}x{gw} patch grid "
                                f"for input {self.input_hw[0]}x{self.input_hw[1]} (patch {self.layout.patch_size}); "
                                f"pick a transformer block layer with --layer")
        grid = tokens[:, p:, :].reshape(tokens.shape[0], gh, gw, tokens.shape[2])
        return grid.permute(0, 3, 1, 2).contiguous()


def to_image_geometry(cam: np.ndarray, image_hw: tuple[int, int], pre: Preprocess) -> np.ndarray:
    """Map a [S, S] map on the model's input back onto the original (H, W) image.

    Undoes ``embed.to_tensor``: with ``resize='pad'`` the image was padded to a centred square before
    resizing, so the map is resized to that square and the padding cropped away.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    if pre.resize == "pad" and h != w:
        s = max(h, w)
        sq = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        top, left = (s - h) // 2, (s - w) // 2
        out = sq[..., top:top + h, left:left + w]
    else:
        out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()
