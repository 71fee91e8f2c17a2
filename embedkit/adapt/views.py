"""Views for self-supervised training on microscopy: crops with small scale jitter, the 8 symmetries, mild intensity.

Cells have no preferred orientation in a dish, so every view draws one of the 8 rotations/flips. Intensity
changes (contrast, brightness, gamma) are applied alike to every channel: a fluorescence channel's colour is
its stain, and jittering channels apart would teach the encoder to ignore the stain. DINO's multi-crop adds
small local crops that the student must match to the teacher's global view.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..embed import to_tensor
from ..encoders import Preprocess
from ..errors import BadImageError
from ..finetune.data import Augment, CellDataset
from ..items import ItemSet
from ..images import Conversion


@dataclass(frozen=True)
class ViewConfig:
    """How the views of one image are drawn (all recorded with the adapted encoder)."""

    global_size: int | None = None  # None: the encoder's input size
    n_global: int = 2
    global_scale: tuple[float, float] = (0.7, 1.0)  # fraction of the image's area kept: small scale jitter
    n_local: int = 4  # DINO's multi-crop; SimCLR uses none
    local_size: int | None = None  # None: half the global size
    local_scale: tuple[float, float] = (0.2, 0.5)
    rotate_flip: bool = True
    contrast: float = 0.2
    brightness: float = 0.1
    gamma: float = 0.2  # gamma drawn log-uniformly in [1/(1+g), 1+g]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["global_scale"], d["local_scale"] = list(self.global_scale), list(self.local_scale)
        return d


def random_crop(rgb: np.ndarray, scale: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A square-ish crop covering a random fraction ``scale`` of the image area (aspect ratio 3/4 to 4/3)."""
    h, w = rgb.shape[:2]
    area = h * w * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = int(round(min(h, max(1.0, math.sqrt(area / ratio)))))
    cw = int(round(min(w, max(1.0, math.sqrt(area * ratio)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return rgb[top:top + ch, left:left + cw]


def gamma_jitter(rgb: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Raise intensities in [0, 1] to one random power, the same for every channel."""
    if not gamma:
        return rgb
    g = math.exp(rng.uniform(-math.log1p(gamma), math.log1p(gamma)))
    return np.power(np.clip(rgb, 0.0, 1.0), g, dtype=np.float32)


class MicroscopyViews:
    """``views(rgb, rng)`` -> the global views, then the local ones, as normalised tensors."""

    def __init__(self, cfg: ViewConfig, pre: Preprocess):
        self.cfg = cfg
        self.augment = Augment(cfg.rotate_flip, cfg.contrast, cfg.brightness)
        self.global_pre = pre.with_size(cfg.global_size)
        self.local_pre = pre.with_size(cfg.local_size)

    def _one(self, rgb: np.ndarray, scale: tuple[float, float], pre: Preprocess, rng: np.random.Generator) -> torch.Tensor:
        out = self.augment(random_crop(rgb, scale, rng), rng)
        return to_tensor(gamma_jitter(out, self.cfg.gamma, rng), pre)

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> list[torch.Tensor]:
        c = self.cfg
        return ([self._one(rgb, c.global_scale, self.global_pre, rng) for _ in range(c.n_global)]
                + [self._one(rgb, c.local_scale, self.local_pre, rng) for _ in range(c.n_local)])


class ViewDataset(CellDataset):
    """Unlabelled images turned into views; the views of a draw depend only on (seed, epoch, draw).

    Keys are ``(index, draw)`` pairs from the sampler, so a resumed epoch draws exactly the same views.
    Unreadable images come back as ``None`` with the reason, so the main process raises one clear error.
    """

    def __init__(self, items: ItemSet, rows: np.ndarray, views: MicroscopyViews, conv: Conversion, seed: int = 0):
        super().__init__(items, rows, np.zeros(len(rows), dtype=np.int64), views.global_pre, conv, None, seed)
        self.views = views

    def __getitem__(self, key: int | tuple[int, int]):
        i, draw = key if isinstance(key, tuple) else (key, key)
        try:
            rgb = self.items.rgb(i, self.conv)
        except BadImageError as exc:
            return None, f"{exc.path}: {exc.reason}"
        return self.views(rgb, np.random.default_rng([self.seed, self.epoch, draw])), None


def collate_views(batch) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
    """Stack view k of every readable image into one tensor per view; (position, 'path: reason') for the rest."""
    good = [b[0] for b in batch if b[0] is not None]
    bad = [(k, b[1]) for k, b in enumerate(batch) if b[0] is None]
    stacked = [torch.stack([g[k] for g in good]) for k in range(len(good[0]))] if good else []
    return stacked, bad
