"""Figures: one overlay per image, one grid per run (for a paper), and the faithfulness curves."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import figures
from ..figures import pyplot as _plt

CMAP = "turbo"
ALPHA = 0.45


@dataclass
class Panel:
    """What one explained image shows: its pixels, labels and one map per method (at the image's size)."""

    id: str
    rgb: np.ndarray
    true: str
    pred: str
    score: float
    target: str
    maps: dict[str, np.ndarray]
    target_score: float | None = None  # probability of the target class, when it is not the prediction

    @property
    def wrong(self) -> bool:
        return bool(self.true) and self.true != self.pred


def save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> None:
    """Save a figure atomically, cropped to its content, and close it."""
    figures.save_figure(fig, path, dpi=dpi, bbox_inches="tight")


def _show(ax, rgb: np.ndarray, cam: np.ndarray | None = None) -> None:
    gray = rgb.ndim == 3 and np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 0], rgb[..., 2])
    ax.imshow(rgb[..., 0] if gray else rgb, cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
    if cam is not None:
        ax.imshow(cam, cmap=CMAP, alpha=ALPHA, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def caption(p: Panel) -> str:
    """'true: A | pred: B (0.93)' with the map's target when it is not the prediction."""
    text = f"true: {p.true or '?'} | pred: {p.pred} ({p.score:.2f})"
    if p.target != p.pred:
        text += f"\nmap for: {p.target}" + (f" ({p.target_score:.2f})" if p.target_score is not None else "")
    return text


def overlay_figure(p: Panel, layer: str, path: str | os.PathLike) -> None:
    """The image and one overlay per method side by side, titled with the true and predicted labels."""
    plt = _plt()
    n = 1 + len(p.maps)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n + 0.4, 2.9), squeeze=False)
    _show(axes[0, 0], p.rgb)
    axes[0, 0].set_title("input", fontsize=9)
    im = None
    for ax, (method, cam) in zip(axes[0, 1:], p.maps.items()):
        _show(ax, p.rgb, cam)
        ax.set_title(method, fontsize=9)
        im = ax.images[-1]
    title = f"{p.id}\n{caption(p)}"
    fig.suptitle(title, fontsize=9, color="firebrick" if p.wrong else "black")
    fig.subplots_adjust(top=1 - 0.075 * (title.count("\n") + 1) - 0.06)
    if im is not None:
        cb = fig.colorbar(im, ax=list(axes[0]), fraction=0.025, pad=0.02)
        cb.set_label(f"relative importance ({layer})", fontsize=7)
        cb.ax.tick_params(labelsize=7)
    save_figure(fig, path)


def grid_layout(n_images: int, n_methods: int) -> tuple[int, int]:
    """(rows, blocks per row) so the grid is about 4:3; each block is an image and its maps."""
    per = 1 + n_methods
    best = (math.inf, 1)
    for bc in range(1, max(1, n_images) + 1):
        rows = math.ceil(n_images / bc)
        aspect = (bc * per) / (rows * 1.2)
        best = min(best, (abs(math.log(aspect / (4 / 3))), bc))
    bc = best[1]
    return math.ceil(n_images / bc), bc


def grid_figure(panels: Sequence[Panel], methods: Sequence[str], title: str, path: str | os.PathLike) -> None:
    """All explained images in one figure: per image the input, then one column per method."""
    plt = _plt()
    rows, bc = grid_layout(len(panels), len(methods))
    per = 1 + len(methods)
    size = 1.5 if len(panels) * per <= 48 else 1.15
    gap = 0.15  # a narrow empty column between blocks, so each image's maps read as a unit
    ratios = ([1.0] * per + [gap]) * bc
    ratios = ratios[:-1]
    fig, axes = plt.subplots(rows, len(ratios), figsize=(size * sum(ratios), size * 1.3 * rows + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})
    for ax in axes.ravel():
        ax.axis("off")
    for k, p in enumerate(panels):
        r, b = divmod(k, bc)
        col = b * (per + 1)
        ax = axes[r, col]
        ax.axis("on")
        _show(ax, p.rgb)
        text = f"{p.true or '?'} → {p.pred} {p.score:.2f}"
        if p.target != p.pred:
            text += f"\n(map: {p.target})"
        ax.set_title(text, fontsize=6.5, color="firebrick" if p.wrong else "black")
        for j, m in enumerate(methods):
            ax = axes[r, col + 1 + j]
            ax.axis("on")
            _show(ax, p.rgb, p.maps[m])
            if r == 0:
                ax.set_title(m, fontsize=8, fontweight="bold")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=0.3, w_pad=0.2)
    save_figure(fig, path, dpi=200)


def faithfulness_figure(fractions: np.ndarray, curves: dict[str, dict[str, np.ndarray]], path: str | os.PathLike) -> None:
    """Mean deletion and insertion curves per method (and the random reference)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for method, c in curves.items():
        style = {"color": "grey", "linestyle": "--"} if method == "random" else {}
        for ax, key in zip(axes, ("deletion", "insertion")):
            mean = c[key].mean(axis=0)
            ax.plot(fractions, mean, label=f"{method} (AUC {np.trapezoid(mean, fractions):.3f})", **style)
    for ax, key, hint in zip(axes, ("deletion", "insertion"), ("lower is better", "higher is better")):
        ax.set_xlabel("fraction of pixels " + ("removed" if key == "deletion" else "restored"))
        ax.set_ylabel("target class probability")
        ax.set_title(f"{key} ({hint})", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
