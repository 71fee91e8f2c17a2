"""Cell thumbnails and contact sheets: what neighbour lookups and leak checks look like.

Thumbnails are read through :class:`~embedkit.items.ItemSet` (the store's ``/pixels`` crops when present,
else the item files), converted with the embedding key's recorded channel map and percentiles, so a 16-bit
or multichannel image looks as the encoder saw it. A file that cannot be read becomes a grey tile saying so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BadImageError
from .figures import pyplot, save_figure
from .images import Conversion, load_rgb, to_uint8
from .items import ItemSet
from .store import Store


def fit_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Uint8 RGB thumbnail of ``size`` x ``size``: pad to square, then resize (antialiased)."""
    from PIL import Image

    img = to_uint8(rgb) if rgb.dtype != np.uint8 else rgb
    h, w = img.shape[:2]
    s = max(h, w)
    canvas = np.zeros((s, s, 3), dtype=np.uint8)
    canvas[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = img[..., :3]
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC if s < size else Image.LANCZOS))


def item_thumbnails(items: ItemSet | Store, positions: Sequence[int], conv: Conversion = Conversion(),
                    size: int = 96) -> list[np.ndarray | None]:
    """Thumbnails of the items at ``positions`` (store rows, for a Store), None where unreadable, in the order given."""
    if isinstance(items, Store):
        items = ItemSet.from_store(items)
    return [None if rgb is None else fit_square(rgb, size) for rgb in items.rgbs(positions, conv)]


def file_thumbnail(path: str | os.PathLike, conv: Conversion = Conversion(), size: int = 96) -> np.ndarray | None:
    try:
        return fit_square(load_rgb(path, conv), size)
    except BadImageError:
        return None


@dataclass
class Tile:
    """One cell of a contact sheet: an image (or None) with up to two caption lines."""

    image: np.ndarray | None
    title: str
    subtitle: str = ""
    color: str = "black"
    frame: str | None = None


def _draw_tile(ax, tile: Tile, size: int) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if tile.image is None:
        ax.imshow(np.full((size, size, 3), 200, dtype=np.uint8))
        ax.text(size / 2, size / 2, "unreadable", ha="center", va="center", fontsize=7, color="0.3")
    else:
        ax.imshow(tile.image, interpolation="nearest")
    for spine in ax.spines.values():
        spine.set_visible(tile.frame is not None)
        if tile.frame is not None:
            spine.set_edgecolor(tile.frame)
            spine.set_linewidth(3)
    ax.set_title(tile.title, fontsize=7, color=tile.color, pad=2)
    if tile.subtitle:
        ax.text(0.5, -0.04, tile.subtitle, transform=ax.transAxes, ha="center", va="top", fontsize=7, color=tile.color)


def contact_sheet(rows: Sequence[Sequence[Tile]], out: str | os.PathLike, *, title: str | None = None,
                  row_labels: Sequence[str] | None = None, size: int = 96) -> Path:
    """Draw a grid of tiles (one list per sheet row) into a PNG, written atomically."""
    plt = pyplot()
    n_rows = max(1, len(rows))
    n_cols = max(1, max((len(r) for r in rows), default=1))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.35 * n_cols, 1.75 * n_rows + (0.4 if title else 0)), squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            if r < len(rows) and c < len(rows[r]):
                _draw_tile(ax, rows[r][c], size)
            else:
                ax.axis("off")
        if row_labels and r < len(row_labels):
            axes[r][0].set_ylabel(row_labels[r], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, h_pad=1.2, w_pad=0.3)
    return save_figure(fig, out)


def neighbor_sheet(store: Store, key: str, queries: Sequence, sims: np.ndarray, rows: np.ndarray, out: str | os.PathLike,
                   *, max_queries: int = 30, size: int = 96) -> Path:
    """One sheet row per query: the query image, then its neighbours with rank, label and similarity.

    Neighbour captions are green when their label equals the query item's label, red when it differs.
    """
    conv = Conversion.from_dict(store.config(key).get("conversion"))
    items = ItemSet.from_store(store)
    labels, groups = items.labels, items.groups
    queries = list(queries)[:max_queries]
    grid = []
    for q, srow, rrow in zip(queries, sims, rows):
        qlabel = str(labels[q.row]) if q.row is not None else ""
        qimg = item_thumbnails(items, [q.row], conv, size)[0] if q.is_item else file_thumbnail(q.path, conv, size)
        qname = os.path.basename(str(q.name))
        tiles = [Tile(qimg, "query" + (f": {qlabel}" if qlabel else ""), qname[:22], "black", frame="black")]
        valid = rrow >= 0
        thumbs = item_thumbnails(items, rrow[valid], conv, size)
        for rank, (s, r, im) in enumerate(zip(srow[valid], rrow[valid], thumbs), start=1):
            lab = str(labels[r])
            colour = "black" if not qlabel or not lab else ("tab:green" if lab == qlabel else "tab:red")
            same = " (same group)" if q.row is not None and groups[r] == groups[q.row] and r != q.row else ""
            tiles.append(Tile(im, f"{rank}. {lab or '-'}"[:24], f"{s:.3f}{same}", colour))
        grid.append(tiles)
    title = f"nearest neighbours under '{key}' (cosine similarity)"
    return contact_sheet(grid, out, title=title, size=size)


def pair_sheet(store: Store, key: str | None, pairs, out: str | os.PathLike, *, threshold: float,
               measure: str = "similarity", max_pairs: int = 24, size: int = 96) -> Path:
    """Leak-check pairs side by side (test item | train/val item), most similar first, four pairs per row."""
    conv = Conversion.from_dict(store.config(store.resolve_key(key)).get("conversion")) if store.keys else Conversion()
    items = ItemSet.from_store(store)
    top = pairs.head(max_pairs)
    t_imgs = item_thumbnails(items, items.positions(top["test_id"]), conv, size)
    s_imgs = item_thumbnails(items, items.positions(top["seen_id"]), conv, size)
    grid, line = [], []
    for p, ti, si in zip(top.itertuples(index=False), t_imgs, s_imgs):
        line += [Tile(ti, f"test: {p.test_label}"[:24], f"fold {p.fold}, {p.similarity:.3f}", "tab:red", frame="tab:red"),
                 Tile(si, f"{p.seen_part}: {p.seen_label}"[:24], p.seen_group[:24], "black")]
        if len(line) == 8:
            grid.append(line)
            line = []
    if line:
        grid.append(line)
    if not grid:
        grid = [[Tile(None, f"no pair at {measure} >= {threshold:.3f}")]]
    return contact_sheet(grid, out, title=f"train/test near-duplicates ({measure} >= {threshold:.3f})", size=size)
