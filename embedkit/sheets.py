"""Cell thumbnails and contact sheets: what neighbour lookups and leak checks look like.

Thumbnails come from the store's ``/pixels`` crops when present, else from the item files (store root +
path), converted with the embedding key's recorded channel map and percentiles, so a 16-bit or
multichannel image looks as the encoder saw it. A file that cannot be read becomes a grey tile saying so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BadImageError
from .images import Conversion, load_rgb, to_rgb, to_uint8
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


def item_thumbnails(store: Store, rows: Sequence[int], conv: Conversion = Conversion(), size: int = 96) -> list[np.ndarray | None]:
    """Thumbnails of store rows (None where the image cannot be read), in the order given."""
    rows = np.asarray(rows, dtype=np.int64)
    out: list[np.ndarray | None] = [None] * len(rows)
    if len(rows) == 0:
        return out
    uniq, inverse = np.unique(rows, return_inverse=True)
    if store.has_pixels:
        crops = store.pixels(uniq)
        thumbs = [fit_square(to_rgb(c, conv), size) for c in crops]
    else:
        paths = store.column("path")
        thumbs = []
        for r in uniq:
            try:
                thumbs.append(fit_square(load_rgb(store.abspath(str(paths[r])), conv), size))
            except BadImageError:
                thumbs.append(None)
    return [thumbs[i] for i in inverse]


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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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


def save_figure(fig, out: str | os.PathLike, dpi: int = 130) -> Path:
    """Save a matplotlib figure as PNG via a temporary file and rename, then close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix or '.png'}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return out


def neighbor_sheet(store: Store, key: str, queries: Sequence, sims: np.ndarray, rows: np.ndarray, out: str | os.PathLike,
                   *, max_queries: int = 30, size: int = 96) -> Path:
    """One sheet row per query: the query image, then its neighbours with rank, label and similarity.

    Neighbour captions are green when their label equals the query item's label, red when it differs.
    """
    conv = Conversion.from_dict(store.config(key).get("conversion"))
    labels, groups = store.labels, store.groups
    queries = list(queries)[:max_queries]
    grid = []
    for q, srow, rrow in zip(queries, sims, rows):
        qlabel = str(labels[q.row]) if q.row is not None else ""
        qimg = item_thumbnails(store, [q.row], conv, size)[0] if q.is_item else file_thumbnail(q.path, conv, size)
        qname = os.path.basename(str(q.name))
        tiles = [Tile(qimg, "query" + (f": {qlabel}" if qlabel else ""), qname[:22], "black", frame="black")]
        valid = rrow >= 0
        thumbs = item_thumbnails(store, rrow[valid], conv, size)
        for rank, (s, r, im) in enumerate(zip(srow[valid], rrow[valid], thumbs), start=1):
            lab = str(labels[r])
            colour = "black" if not qlabel or not lab else ("tab:green" if lab == qlabel else "tab:red")
            same = " (same group)" if q.row is not None and groups[r] == groups[q.row] and r != q.row else ""
            tiles.append(Tile(im, f"{rank}. {lab or '-'}"[:24], f"{s:.3f}{same}", colour))
        grid.append(tiles)
    title = f"nearest neighbours under '{key}' (cosine similarity)"
    return contact_sheet(grid, out, title=title, size=size)


def pair_sheet(store_path: str | os.PathLike, key: str | None, pairs, out: str | os.PathLike, *, threshold: float,
               measure: str = "similarity", max_pairs: int = 24, size: int = 96) -> Path:
    """Leak-check pairs side by side (test item | train/val item), most similar first, four pairs per row."""
    store = Store(store_path)
    conv = Conversion.from_dict(store.config(store.resolve_key(key)).get("conversion")) if store.keys else Conversion()
    row_of = {str(i): r for r, i in enumerate(store.ids)}
    top = pairs.head(max_pairs)
    test_rows = [row_of[i] for i in top["test_id"]]
    seen_rows = [row_of[i] for i in top["seen_id"]]
    t_imgs = item_thumbnails(store, test_rows, conv, size)
    s_imgs = item_thumbnails(store, seen_rows, conv, size)
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
