"""Pixel fingerprints for near-duplicate detection, invariant to flips, rotations and intensity changes.

A fingerprint is the grey image, padded square by repeating its edge pixels and resized to 32 x 32, band-pass filtered (difference
of Gaussians, sigma 0.7 and 2 pixels) and scaled to zero mean and unit length. The cosine of two
fingerprints is then the correlation of their band-passed pixels: a gain or offset in intensity does
not change it, and comparing one image's 8 dihedral variants (4 rotations, each mirrored) with the other
makes it blind to flips and 90-degree rotations. The band-pass keeps cell texture and outline and
drops the smooth blob every cell shares, which is what lets distinct cells stay apart.

Why not the encoder's embedding: CNN features are not rotation-invariant. On MitoCheck with
efficientnet_lite0, rotated copies of a cell fall to cosine 0.78 from their original (0.69 when also
dimmed by 10 %) while distinct cells from other movies reach 0.986, so no embedding threshold separates them; fingerprints do (copies
>= 0.993, distinct cells <= 0.96; numbers in docs/neighbors.md and bench/neighbors.json).
"""

from __future__ import annotations

import sys
from typing import Iterator, Sequence

import numpy as np

from .errors import BadImageError, EmbedkitError
from .images import Conversion, load_rgb, to_rgb
from .store import Store

SIZE = 32
SIGMAS = (0.7, 2.0)


def fingerprint(rgb: np.ndarray) -> np.ndarray:
    """Fingerprint of one RGB (or grey) float image: a unit vector of SIZE*SIZE band-passed pixels."""
    from PIL import Image
    from scipy import ndimage as ndi

    grey = np.asarray(rgb, dtype=np.float32)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    h, w = grey.shape
    m = max(h, w)
    top, left = (m - h) // 2, (m - w) // 2
    # edge padding: a zero band would dominate the band-passed fingerprint and make every crop of one
    # aspect ratio look alike (distinct non-square crops reached 0.998 with zero padding)
    square = np.pad(grey, ((top, m - h - top), (left, m - w - left)), mode="edge")
    small = np.asarray(Image.fromarray(square).resize((SIZE, SIZE), Image.BILINEAR if m < SIZE else Image.LANCZOS),
                       dtype=np.float32)
    band = ndi.gaussian_filter(small, SIGMAS[0]) - ndi.gaussian_filter(small, SIGMAS[1])
    band -= band.mean()
    norm = float(np.linalg.norm(band))
    return (band / norm if norm > 1e-8 else band).ravel()


def dihedral(fp: np.ndarray) -> np.ndarray:
    """The 8 rotations/mirrorings of a fingerprint, as rows [8, SIZE*SIZE]; row 0 is the fingerprint itself."""
    img = fp.reshape(SIZE, SIZE)
    out = []
    for k in range(4):
        r = np.rot90(img, k)
        out += [r.ravel(), r[:, ::-1].ravel()]
    return np.stack(out).astype(np.float32)


def iter_item_images(store: Store, rows: Sequence[int], conv: Conversion = Conversion(), what: str = "pixel fingerprints",
                     chunk: int = 512) -> Iterator[tuple[int, np.ndarray]]:
    """(position in ``rows``, RGB float image) of store items, from /pixels when present, else the item files.

    Pixels are read in sorted chunks; files that cannot be read end the iteration with one error naming them."""
    rows = np.asarray(rows, dtype=np.int64)
    pixels = store.has_pixels
    paths = None if pixels else store.column("path")
    bad: list[str] = []
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        if pixels:
            order = np.argsort(part)
            for j, c in zip(order, store.pixels(part[order])):
                yield s + int(j), to_rgb(c, conv)
        else:
            for j, r in enumerate(part):
                try:
                    yield s + j, load_rgb(store.abspath(str(paths[r])), conv)
                except BadImageError as exc:
                    bad.append(f"{exc.path} ({exc.reason})")
    if bad:
        raise EmbedkitError(f"{len(bad)} item image(s) cannot be read for {what}, e.g. {bad[0]}; "
                            f"fix the store root, or compare embeddings instead with --by embedding")


def item_fingerprints(store: Store, rows: Sequence[int], conv: Conversion = Conversion(), progress: bool = False) -> np.ndarray:
    """Fingerprints [len(rows), SIZE*SIZE] of store items, from /pixels when present, else the item files."""
    from tqdm.auto import tqdm

    out = np.zeros((len(rows), SIZE * SIZE), dtype=np.float32)
    with tqdm(total=len(rows), unit="img", desc="pixel fingerprints", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for j, rgb in iter_item_images(store, rows, conv):
            out[j] = fingerprint(rgb)
            bar.update(1)
    return out
