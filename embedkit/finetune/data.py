"""What fine-tuning trains on: labelled items (from a store or a source), microscopy augmentations, samplers.

Every random choice (which items an epoch draws, how each image is rotated, flipped and jittered) is
derived from ``(seed, epoch, position)``. An epoch therefore draws the same batches whether it runs in one
go, in worker processes, or after a resume, which is what makes a resumed run end like an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..embed import to_tensor
from ..encoders import Preprocess
from ..balance import normalise_balance
from ..errors import BadImageError
from ..images import Conversion
from ..items import ItemSet



def load_items(source, group_by: str | None = None) -> ItemSet:
    """Items of a store (its pixels when present, else its files) or of a folder / manifest via ``discover``.

    For a store, groups are the store's own unless ``group_by`` names an item column, a preset or a regex.
    """
    return ItemSet.open(source, group_by)


def check_files(items: ItemSet, positions: np.ndarray) -> None:
    """Refuse to start training when image files are missing (one clear line naming the first)."""
    missing = items.missing_files(positions)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadImageError(missing[0], f"file not found{more}; fix the source or make splits without these items")


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augment:
    """Microscopy-safe augmentation: any of the 8 rotations/flips of the square, and mild intensity jitter.

    Orientation carries no meaning in a dish, so all eight symmetries are equally likely. Jitter scales
    contrast around the image mean and shifts brightness, both applied alike to every channel.
    """

    rotate_flip: bool = True
    contrast: float = 0.1
    brightness: float = 0.05

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = rgb
        if self.rotate_flip:
            out = np.rot90(out, k=int(rng.integers(4)), axes=(0, 1))
            if rng.random() < 0.5:
                out = out[:, ::-1]
        if self.contrast or self.brightness:
            c = 1.0 + rng.uniform(-self.contrast, self.contrast)
            b = rng.uniform(-self.brightness, self.brightness)
            mean = out.mean()
            out = np.clip((out - mean) * c + mean + b, 0.0, 1.0)
        return np.ascontiguousarray(out, dtype=np.float32)

    def to_dict(self) -> dict:
        return {"rotate_flip": self.rotate_flip, "contrast": self.contrast, "brightness": self.brightness}


class CellDataset(torch.utils.data.Dataset):
    """Decoded, optionally augmented, model-ready images with their class index.

    Keys are item indices, or ``(index, draw)`` pairs from :class:`BalancedSampler`; the augmentation of a
    draw depends only on (seed, epoch, draw), so an item drawn twice in an epoch is augmented differently.
    Unreadable images come back as ``None`` with the reason, so the main process raises one clear error.
    """

    def __init__(self, items: ItemSet, positions: np.ndarray, targets: np.ndarray, pre: Preprocess, conv: Conversion,
                 augment: Augment | None = None, seed: int = 0):
        self.items = items.subset(positions)
        self.pre, self.conv = pre, conv
        self.targets = np.asarray(targets, dtype=np.int64)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, key: int | tuple[int, int]):
        i, draw = key if isinstance(key, tuple) else (key, key)
        try:
            rgb = self.items.rgb(i, self.conv)
        except BadImageError as exc:
            return i, None, int(self.targets[i]), f"{exc.path}: {exc.reason}"
        if self.augment is not None:
            rgb = self.augment(rgb, np.random.default_rng([self.seed, self.epoch, draw]))
        return i, to_tensor(rgb, self.pre), int(self.targets[i]), None


def collate(batch):
    """Stack a batch; unreadable images are returned separately as (index, reason)."""
    bad = [(b[0], b[3]) for b in batch if b[1] is None]
    good = [b for b in batch if b[1] is not None]
    idx = torch.tensor([b[0] for b in good], dtype=torch.int64)
    x = torch.stack([b[1] for b in good]) if good else None
    y = torch.tensor([b[2] for b in good], dtype=torch.int64)
    return idx, x, y, bad


# --------------------------------------------------------------------------- class imbalance


class BalancedSampler(torch.utils.data.Sampler):
    """Per-epoch draws ``(item index, draw number)`` that counter class imbalance.

    * ``weighted``: draw with replacement, each item weighted by 1 / (its class count), so every class is
      drawn about equally often;
    * ``oversample``: every class resampled (with replacement) up to the largest class's count;
    * ``undersample``: every class subsampled (without replacement) down to the smallest class's count;
    * ``none``: a plain shuffle.

    The draw of epoch ``e`` comes from a generator seeded with ``(seed, e)``, so it is reproducible after
    a resume without carrying generator state around.
    """

    def __init__(self, targets: Sequence[int], mode: str = "weights", seed: int = 0, num_samples: int | None = None):
        mode = normalise_balance(mode)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.mode = mode
        self.seed = int(seed)
        self.epoch = 0
        classes, counts = np.unique(self.targets, return_counts=True)
        self.by_class = [np.flatnonzero(self.targets == c) for c in classes]
        natural = {"weights": len(self.targets), "none": len(self.targets),
                   "oversample": int(counts.max()) * len(classes), "undersample": int(counts.min()) * len(classes)}[mode]
        self.num_samples = int(num_samples or natural)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 7919, self.epoch])
        n = self.num_samples
        if self.mode == "none":
            idx = np.concatenate([rng.permutation(len(self.targets)) for _ in range(-(-n // len(self.targets)))])[:n]
        elif self.mode == "weights":
            counts = np.bincount(self.targets)
            w = 1.0 / counts[self.targets]
            idx = rng.choice(len(self.targets), size=n, replace=True, p=w / w.sum())
        else:
            per = -(-n // len(self.by_class))
            parts = [rng.choice(members, size=per, replace=self.mode == "oversample" or per > len(members))
                     for members in self.by_class]
            idx = rng.permutation(np.concatenate(parts))[:n]
        return idx

    def __iter__(self):
        return iter([(int(i), k) for k, i in enumerate(self.indices())])

    def __len__(self) -> int:
        return self.num_samples
