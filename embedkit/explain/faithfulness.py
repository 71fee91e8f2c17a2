"""Faithfulness: does a map point at pixels the model actually uses? Deletion and insertion scores.

Deletion (Petsiuk et al., RISE, 2018) removes pixels in order of decreasing saliency, replacing them
with black, and records the target class probability; a faithful map makes it fall fast (low area
under the curve). Insertion starts from a heavily blurred image and puts the original pixels back in
the same order; a faithful map makes the probability rise fast (high area). ``insertion - deletion``
summarises both (higher is better). A random map at the layer's resolution is scored alongside as the
chance reference.
Ties in a map (flat zero regions) are broken at random, never in raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import Preprocess

RANDOM = "random"


@dataclass
class Curves:
    """Target-class probability after removing (deletion) or restoring (insertion) each fraction of pixels."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return float(np.trapezoid(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        return float(np.trapezoid(self.insertion, self.fractions))


def blurred(x: torch.Tensor) -> torch.Tensor:
    """A heavy Gaussian blur of a [B, 3, H, W] batch (sigma = 1/45 of the larger side, about 5 px at 224)."""
    sigma = max(x.shape[-2:]) / 45.0
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect" if radius < min(x.shape[-2:]) else "replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def black(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Black pixels (0 before normalisation) in the model's normalised input space."""
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device)[:, None, None]
    return ((0 - mean) / std).expand_as(x[0])[None].expand_as(x).clone()


def pixel_order(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices from most to least salient, ties broken at random."""
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    return np.lexsort((rng.random(flat.size), -flat))


@torch.no_grad()
def deletion_insertion(net: nn.Module, x: torch.Tensor, saliency: np.ndarray, target: int, pre: Preprocess,
                       steps: int = 20, batch_size: int = 32, seed: int = 0) -> Curves:
    """Deletion and insertion curves for one image ``x`` [1, 3, H, W] and its map ``saliency`` [H, W]."""
    h, w = x.shape[-2:]
    if saliency.shape != (h, w):
        raise ValueError(f"map {saliency.shape} does not match the input {(h, w)}")
    order = torch.from_numpy(pixel_order(saliency, np.random.default_rng(seed))).to(x.device)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.rint(fractions * h * w).astype(int)
    ranks = torch.empty(h * w, dtype=torch.long, device=x.device)
    ranks[order] = torch.arange(h * w, device=x.device)
    ranks = ranks.view(1, 1, h, w)
    empty, soft = black(x, pre), blurred(x)
    curves = {}
    for name, start, end in (("deletion", x, empty), ("insertion", soft, x)):
        probs = []
        for s in range(0, len(counts), batch_size):
            c = torch.as_tensor(counts[s:s + batch_size], device=x.device).view(-1, 1, 1, 1)
            changed = (ranks < c).to(x.dtype)  # the first c pixels in saliency order
            batch = start * (1 - changed) + end * changed
            probs.append(torch.softmax(net(batch).float(), dim=1)[:, target].cpu().numpy())
        curves[name] = np.concatenate(probs)
    return Curves(fractions, curves["deletion"], curves["insertion"])


def random_saliency(shape: tuple[int, int], grid: tuple[int, int], seed: int) -> np.ndarray:
    """The chance reference: uniform noise on the CAM layer's grid, upsampled like a CAM.

    It has the same blob size as the maps it is compared with, so deletion removes pixels in blobs for
    both; pixel-wise noise would shred the image and look spuriously "faithful" under deletion.
    """
    noise = torch.from_numpy(np.random.default_rng(seed).random(tuple(grid)).astype(np.float32))[None, None]
    return F.interpolate(noise, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


def group_mean_ci(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """Mean of ``values`` and its 95% CI from a bootstrap that resamples whole groups (NaN CI with one group)."""
    values = np.asarray(values, dtype=np.float64)
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if len(uniq) < 2:
        return float(values.mean()), [float("nan"), float("nan")]
    draws = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    sums = np.bincount(inverse, weights=values, minlength=len(uniq))
    counts = np.bincount(inverse, minlength=len(uniq)).astype(float)
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return float(values.mean()), [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def summarize(rows: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per method: mean deletion, insertion and insertion - deletion AUC with 95% group-bootstrap CIs.

    ``rows`` hold ``id``, ``method``, ``group``, ``deletion`` and ``insertion`` per image; the bootstrap
    resamples whole groups (an image is its own group unless the store says otherwise). With a ``random``
    reference, ``vs_random`` is the paired per-image gain in insertion - deletion over it: a method whose
    CI lies above 0 points at evidence better than chance on these images.
    """
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    score = {(r.get("id"), r["method"]): r["insertion"] - r["deletion"] for r in rows}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        groups = np.array([r["group"] for r in mine])
        values = {"deletion": np.array([r["deletion"] for r in mine]), "insertion": np.array([r["insertion"] for r in mine])}
        values["insertion_minus_deletion"] = values["insertion"] - values["deletion"]
        rec = {"method": method, "n_images": len(mine), "n_groups": len(np.unique(groups))}
        for key, v in values.items():
            rec[key], rec[f"{key}_ci"] = group_mean_ci(v, groups, n_boot, seed)
        paired = [(score[(r.get("id"), method)] - score[(r.get("id"), RANDOM)], r["group"]) for r in mine
                  if method != RANDOM and (r.get("id"), RANDOM) in score]
        if paired:
            gains, g = zip(*paired)
            rec["vs_random"], rec["vs_random_ci"] = group_mean_ci(np.array(gains), np.array(g), n_boot, seed)
        out.append(rec)
    return out
