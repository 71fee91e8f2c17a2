"""Resize and normalise images as tensor batches, on whichever device the encoder runs on.

One implementation serves both paths: the loader path (``embed.to_tensor`` in CPU worker processes) and the
device path, where crops travel to the GPU as the uint8 arrays they are stored as and are converted there.
CPU decoding and resizing is the usual bottleneck of GPU embedding, and uint8 crops are 4x smaller than
float32 ones and much smaller than resized ones.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders import Preprocess

#: (positions in the batch, images of one shape stacked as [n, H, W, 3] uint8 or float32)
Group = tuple[torch.Tensor, torch.Tensor]


def resize_normalise(x: torch.Tensor, pre: Preprocess, per_channel: bool = False) -> torch.Tensor:
    """RGB float [0, 1] batch [B, 3, H, W] -> normalised [B, 3, S, S] (pad to square, antialiased resize).

    ``per_channel`` (``--channels bag|mean``): [B, C, H, W] of any C -> [B, 3C, S, S], each channel replicated to
    the encoder's three input channels and normalised as a grayscale image.
    """
    h, w = x.shape[2:]
    if pre.resize == "pad" and h != w:
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        x = F.pad(x, (left, s - w - left, top, s - h - top))
    if x.shape[2] != pre.size or x.shape[3] != pre.size:
        mode = pre.interpolation if pre.interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
        kw = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        x = F.interpolate(x, size=(pre.size, pre.size), mode=mode, **kw)
        if mode == "bicubic":
            x = x.clamp_(0.0, 1.0)
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(pre.std, dtype=torch.float32, device=x.device)[:, None, None]
    if per_channel:
        b, c, s, _ = x.shape
        return ((x[:, :, None] - mean) / std).reshape(b, 3 * c, s, s)
    return (x - mean) / std


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 values -> float32 value / 255 (bit-identical to ``images.to_rgb``); float input is returned as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def group_by_shape(images: Sequence[np.ndarray]) -> list[Group]:
    """Stack (H, W, C) images of equal shape and dtype into groups, keeping each image's batch position."""
    groups: dict[tuple, list[int]] = {}
    for k, im in enumerate(images):
        groups.setdefault((im.shape, im.dtype.str), []).append(k)
    return [(torch.tensor(pos, dtype=torch.int64), torch.from_numpy(np.stack([images[k] for k in pos])))
            for pos in groups.values()]


def device_batch(groups: Sequence[Group], n: int, pre: Preprocess, device: torch.device,
                 per_channel: bool = False) -> torch.Tensor:
    """Encoder input [n, 3, S, S] ([n, 3C, S, S] with ``per_channel``) on ``device`` from groups of native-size
    images, converted on the device."""
    planes = 3 * groups[0][1].shape[3] if per_channel else 3
    out = torch.empty((n, planes, pre.size, pre.size), dtype=torch.float32, device=device)
    cuda = device.type == "cuda"
    for pos, imgs in groups:
        x = imgs.to(device, non_blocking=cuda).permute(0, 3, 1, 2)
        out[pos.to(device)] = resize_normalise(unit_float(x), pre, per_channel)
    return out
