"""The duplicate detector on real crops: augmented copies are found, distinct cells and non-square nuclei crops are not."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import DATA, MITOCHECK
from PIL import Image

from embedkit.sources import GROUP_PRESETS


@pytest.fixture(scope="module")
def cells() -> tuple[list[np.ndarray], np.ndarray]:
    """The bundled MitoCheck cells and their movies (plate + position)."""
    files = sorted(MITOCHECK.glob("*/*.png"))
    rx = re.compile(GROUP_PRESETS["mitocheck"])
    movies = np.array(["_".join(rx.search(f.name).groups()) for f in files])
    return [np.asarray(Image.open(f)) for f in files], movies


def _nuclei(windows: int = 0) -> list[np.ndarray]:
    """Tight bounding-box crops (mostly not square) of the StarDist fixture's nuclei, or with ``windows`` > 0
    that many 40-pixel windows centred on nuclei, inside the field and not overlapping each other."""
    import tifffile
    from skimage.measure import regionprops

    raw = tifffile.imread(DATA / "stardist" / "img2d.tif").astype(np.float32)
    lo, hi = np.percentile(raw, (0.5, 99.5))
    img = np.clip((raw - lo) * 255 / (hi - lo), 0, 255).astype(np.uint8)  # as an 8-bit export would be
    labels = tifffile.imread(DATA / "stardist" / "mask2d.tif")
    if not windows:
        return [img[r.bbox[0]:r.bbox[2], r.bbox[1]:r.bbox[3]] for r in regionprops(labels)]
    out, taken = [], []
    for r in regionprops(labels):
        y, x = (int(v) - 20 for v in r.centroid)
        if 0 <= y <= img.shape[0] - 40 and 0 <= x <= img.shape[1] - 40 and all(abs(y - a) >= 40 or abs(x - b) >= 40 for a, b in taken):
            taken.append((y, x))
            out.append(img[y:y + 40, x:x + 40])
    return out[:windows]


def test_augmented_copies_are_found_and_distinct_cells_are_not(cells):
    from embedkit.duplicates.augment import augmented_copy
    from embedkit.duplicates.search import build_catalog, find_copies

    images, movies = cells
    rng = np.random.default_rng(0)
    sources = [int(np.flatnonzero(movies == m)[0]) for m in np.unique(movies)][:30]  # one cell per movie
    first = [augmented_copy(images[i], rng) for i in sources]
    second = [augmented_copy(images[i], rng) for i in sources]
    n = len(images)
    cat = build_catalog(images + first + second)
    queries = np.arange(n, n + len(sources))  # first copies against the originals and the second copies
    pool = np.concatenate([np.arange(n), np.arange(n + len(sources), n + 2 * len(sources))])
    found = {v.query: v.match for v in find_copies(cat, queries, pool) if v.copy}
    source_of = {i: s for s, i in enumerate(sources)} | {n + len(sources) + s: s for s in range(len(sources))}
    right = [q for q in queries if q in found and source_of.get(found[q]) == q - n]
    assert len(right) >= 0.65 * len(sources), f"{len(right)} of {len(sources)} copies found"  # 22 of 30 when written
    assert len(right) == len(found), "a copy was matched with another cell"
    in_two = {v.query: v.match for v in find_copies(cat, queries, pool, workers=2) if v.copy}
    assert in_two == found  # verification in two processes gives the same pairs

    test_movies = set(np.unique(movies)[::4])  # distinct cells, split by movie: every flag would be false
    test = np.flatnonzero(np.isin(movies, list(test_movies)))
    train = np.flatnonzero(~np.isin(movies, list(test_movies)))
    flagged = [v for v in find_copies(cat, test, train) if v.copy]
    assert flagged == []


def test_non_square_crops_of_distinct_nuclei_are_not_flagged():
    from embedkit.duplicates.search import build_catalog, duplicate_pairs
    from embedkit.fingerprints import dihedral, fingerprint

    boxes = _nuclei()
    assert np.mean([b.shape[0] != b.shape[1] for b in boxes]) > 0.5
    assert duplicate_pairs(build_catalog(boxes)) == []
    # the pixel fingerprints pad by edge replication: distinct non-square crops stay apart
    fps = np.stack([fingerprint(b.astype(np.float32)) for b in boxes])
    sims = np.stack([(dihedral(f) @ fps.T).max(axis=0) for f in fps])
    np.fill_diagonal(sims, -1)
    assert sims.max() < 0.975


def test_copies_of_nuclei_windows_are_grouped_together():
    from embedkit.duplicates.augment import augmented_copy
    from embedkit.duplicates.search import build_catalog, components, duplicate_pairs

    boxes = _nuclei(windows=12)
    rng = np.random.default_rng(1)
    items, source = [], []
    for s, b in enumerate(boxes):
        for img in [b] + [augmented_copy(b, rng) for _ in range(3)]:
            items.append(img)
            source.append(s)
    source = np.array(source)
    labels = components(len(items), [(v.query, v.match) for v in duplicate_pairs(build_catalog(items))])
    for g in np.unique(labels):  # no group mixes two nuclei
        assert len(set(source[labels == g])) == 1
    assert len(np.unique(labels)) < 0.6 * len(items)  # and most copies were joined to their nucleus


def test_components_and_suspicious_grouping():
    from embedkit.duplicates.search import components
    from embedkit.leaks import suspicious_grouping

    assert components(5, [(0, 3), (3, 4)]).tolist() == [0, 1, 2, 0, 0]
    assert suspicious_grouping(["", "", ""]) == "the items have no group column"
    assert suspicious_grouping(["a", "b", "c"]) == "every item is its own group"
    assert "single item" in suspicious_grouping(["a", "a", "b", "c", "d"])
    assert suspicious_grouping(["a", "a", "b", "b", "c", "c"]) is None


def test_descriptors_ignore_right_angle_turns_and_mirrors(cells):
    from embedkit.duplicates.descriptors import describe_canvas
    from embedkit.duplicates.prepare import canvas

    images, _ = cells
    for img in images[:5]:
        c = canvas(img)[0]
        d = describe_canvas(c)
        others = [describe_canvas(np.ascontiguousarray(v)) for v in (np.rot90(c), np.rot90(c, 2), c[:, ::-1], c.T)]
        other_cell = describe_canvas(canvas(images[-1])[0])
        for o in others:  # exact turns and mirrors move the samples, not the numbers (up to interpolation)
            assert np.linalg.norm(o - d) < 0.1 * np.linalg.norm(other_cell - d)


def test_bench_without_data_is_one_error_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_leaks.py"), "--data", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--data" in proc.stderr and not proc.stdout
