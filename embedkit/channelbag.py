"""``--channels bag|mean``: every channel of a multichannel image goes through the encoder on its own.

Each channel is rescaled alone, replicated to the encoder's three input channels and normalised as a
grayscale image (the bag-of-channels practice of Cell Painting and CHAMMI-style evaluation). ``bag``
concatenates the C pooled vectors in channel order (dim x C); ``mean`` averages them (dim). The channel count is
fixed per run by the first image, and the channel names (from the file's metadata where it has them) go into
the key's provenance.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .errors import BadImageError, EmbedkitError
from .images import Conversion


def split_channels(x: torch.Tensor) -> torch.Tensor:
    """[B, 3C, S, S] (each channel replicated to three) -> [B*C, 3, S, S], one grayscale image per channel."""
    b, planes, h, w = x.shape
    return x.reshape(b * (planes // 3), 3, h, w)


def fold_channels(v: torch.Tensor, batch: int, mode: str) -> torch.Tensor:
    """Per-channel vectors [B*C, D] -> [B, C*D] ('bag', channel after channel) or [B, D] ('mean')."""
    per = v.reshape(batch, v.shape[0] // batch, v.shape[1])
    return per.reshape(batch, -1) if mode == "bag" else per.mean(dim=1)


def output_dim(dim: int, conv: Conversion) -> int:
    """The stored vector size of an encoder output of size ``dim`` under ``conv``."""
    return dim * int(conv.channel_count or 1) if conv.per_channel == "bag" else dim


def channel_names(path: str, count: int) -> list[str]:
    """The channel names in a microscopy file's metadata, else C0, C1, ..."""
    from . import formats

    if path and formats.handles(path):
        try:
            loc = formats.parse(str(path))
            names = list(formats.describe(loc.file, loc.scene).channel_names)
        except (BadImageError, OSError, ValueError):
            names = []
        if len(names) == count and all(names):
            return [str(n) for n in names]
    return [f"C{i}" for i in range(count)]


def fix_channels(conv: Conversion, first_pixels, first_path: str) -> tuple[Conversion, dict]:
    """``conv`` with the channel count of the run's first image, and the provenance record (mode, count, names)."""
    if conv.per_channel is None:
        return conv, {}
    if conv.per_channel not in ("bag", "mean"):
        raise EmbedkitError(f"--channels {conv.per_channel!r}: choose bag or mean")
    arr = np.asarray(first_pixels)
    count = int(arr.shape[2]) if arr.ndim == 3 else 1
    if conv.channel_count is not None and conv.channel_count != count:
        raise EmbedkitError(f"--channels {conv.per_channel}: {first_path} has {count} channel(s), the key was made with "
                            f"{conv.channel_count}")
    names = channel_names(first_path, count)
    return replace(conv, channel_count=count), {"mode": conv.per_channel, "count": count, "names": names,
                                                "from": first_path}
