#!/usr/bin/env python
"""Benchmark the duplicate (leak) detector on augmented copies of real cells; writes JSON (bench/leaks.json).

Data (``--data``): the MitoCheck cells and the DSB2018 nuclei. Crops that share pixels are one source:
MitoCheck cells of one movie and frame closer than a crop width, and DSB nuclei are cut as 48-pixel
windows chosen so that no two windows of one field overlap. Each of ``--sources`` source crops per
dataset gets ``--copies`` seeded augmented copies (embedkit.duplicates.augment: any rotation, mirror,
shift up to 20 %, shear up to 0.2, zoom 0.8-1.2 per axis, black/nearest/reflect border, brightness and
contrast +-30 %, JPEG quality 60-95); every other crop of the dataset joins untouched.

Measured, per dataset, each against the previous detector (dihedral pixel fingerprints, threshold 0.975)
run on the same splits:

* **recall**: random 80/20 split of all items ignoring sources; the share of test items with a copy (or
  their original) in train that are flagged, and whether the flagged partner is really of their source.
  Split into its two stages: ``candidate_recall`` (a copy among the k stage-1 candidates, for several k)
  and ``verification_recall`` (flagged share of the test items whose 10 candidates hold a copy);
* **false flags**: split by source (whole sources to one side); every flag is false. Broken down into
  untouched crops and copies. Also DSB nuclei bounding-box crops (not square) split by field, and
  untouched MitoCheck cells of single movies split at random within the movie;
* **time**: catalog (descriptors), stage-1 candidates and the test-vs-train verification on a random split,
  for ``--sizes`` items made of sources and copies of both datasets, wall-clock and CPU seconds; above 10,000
  items with ``--verify-sample N`` only N test items are verified and the rest extrapolated; with
  ``--grouping`` also the suggested grouping (all items against all) for the smallest size.

Up to 600 test items are checked per accuracy experiment (all train items are searched); rates carry
95% Wilson intervals. Without the data folder it stops with one error line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MITOCHECK_NAME = re.compile(r"PLLT(\d+_\d+)--.*?___P(\d+_\d+)___T(\d+)___X(\d+)___Y(\d+)")
WINDOW = 48
#: Processes that verify candidates (--workers).
WORKERS = 1


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the verification workers)."""
    import resource

    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def log(msg: str) -> None:
    print(f"[bench_leaks {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Crops:
    """Crops of one dataset with the source they belong to (crops sharing pixels share a source) and a group."""

    images: list[np.ndarray]
    source: np.ndarray
    group: np.ndarray  # movie (MitoCheck) or field (DSB)
    meta: dict = field(default_factory=dict)


def _union_find_labels(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    from embedkit.duplicates.search import components

    return components(n, pairs)


def load_mitocheck(folder: Path) -> Crops:
    """All MitoCheck cells; a source is a set of crops of one movie frame that overlap."""
    from PIL import Image

    files = sorted(folder.glob("*/*.png"))
    images, movie, frame, xy = [], [], [], []
    for f in files:
        m = MITOCHECK_NAME.search(f.name)
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("L")))
        movie.append(f"{m.group(1)}_{m.group(2)}")
        frame.append(int(m.group(3)))
        xy.append((int(m.group(4)), int(m.group(5))))
    movie, frame, xy = np.array(movie), np.array(frame), np.array(xy)
    pairs = []
    side = images[0].shape[0]
    for key in set(zip(movie, frame)):
        idx = np.flatnonzero((movie == key[0]) & (frame == key[1]))
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                if np.all(np.abs(xy[idx[a]] - xy[idx[b]]) < side):
                    pairs.append((int(idx[a]), int(idx[b])))
    return Crops(images, _union_find_labels(len(images), pairs), movie, {"frame": frame, "xy": xy,
                                                                         "names": [f.name for f in files]})


def load_dsb(folder: Path, rng: np.random.Generator) -> tuple[Crops, Crops]:
    """(48-pixel windows around nuclei, no two of a field overlapping; tight bounding-box crops of all nuclei)."""
    import tifffile
    from PIL import Image
    from skimage.measure import regionprops

    windows, w_field, boxes, b_field = [], [], [], []
    for lab_path in sorted((folder / "labels").glob("*.tif")):
        labels = tifffile.imread(lab_path)
        with Image.open(folder / "images" / f"{lab_path.stem}.png") as im:
            field_img = np.asarray(im.convert("L"))
        height, width = field_img.shape
        taken: list[tuple[int, int]] = []
        props = list(regionprops(labels))
        for r in (props[i] for i in rng.permutation(len(props))):
            y0, x0, y1, x1 = r.bbox
            boxes.append(field_img[y0:y1, x0:x1].copy())
            b_field.append(lab_path.stem)
            if r.area < 30:
                continue
            cy, cx = (int(round(v)) for v in r.centroid)
            top, left = cy - WINDOW // 2, cx - WINDOW // 2
            if top < 0 or left < 0 or top + WINDOW > height or left + WINDOW > width:
                continue  # windows reaching past the field would be zero-padded: all such crops look alike
            if any(abs(cy - ty) < WINDOW and abs(cx - tx) < WINDOW for ty, tx in taken):
                continue
            taken.append((cy, cx))
            windows.append(field_img[top:top + WINDOW, left:left + WINDOW].copy())
            w_field.append(lab_path.stem)
    w_field, b_field = np.array(w_field), np.array(b_field)
    return (Crops(windows, np.arange(len(windows)), w_field),
            Crops(boxes, np.arange(len(boxes)), b_field))


@dataclass
class Pool:
    """Items of one experiment: source crops with their copies, plus untouched crops."""

    images: list[np.ndarray]
    source: np.ndarray
    group: np.ndarray
    kind: np.ndarray  # 'original', 'copy' or 'untouched'
    origin: np.ndarray  # index of the crop each item is (a copy of)


def with_copies(crops: Crops, n_sources: int, n_copies: int, rng: np.random.Generator) -> Pool:
    """``n_sources`` crops (one per source) with ``n_copies`` augmented copies each, plus all crops of other sources."""
    from embedkit.duplicates.augment import augmented_copy

    first = {}
    for i, s in enumerate(crops.source):
        first.setdefault(int(s), i)
    chosen = set(rng.choice(sorted(first), size=min(n_sources, len(first)), replace=False).tolist())
    images, source, group, kind, origin = [], [], [], [], []
    for i, img in enumerate(crops.images):
        s = int(crops.source[i])
        if s in chosen and first[s] != i:
            continue  # other crops overlapping a chosen source would be partial copies; leave them out
        images.append(img)
        source.append(s)
        group.append(crops.group[i])
        kind.append("original" if s in chosen else "untouched")
        origin.append(i)
        if s in chosen:
            for _ in range(n_copies):
                images.append(augmented_copy(img, rng))
                source.append(s)
                group.append(crops.group[i])
                kind.append("copy")
                origin.append(i)
    return Pool(images, np.array(source), np.array(group), np.array(kind), np.array(origin))


#: Test items checked per experiment (a random sample of the test part; all train items are searched).
MAX_QUERIES = 600


def _sample(test: np.ndarray, rng: np.random.Generator, limit: int | None) -> np.ndarray:
    return np.sort(rng.choice(test, limit, replace=False)) if limit and len(test) > limit else test


def random_split(n: int, rng: np.random.Generator, test: float = 0.2, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    is_test = rng.random(n) < test
    return np.flatnonzero(~is_test), _sample(np.flatnonzero(is_test), rng, limit)


def split_by(labels: np.ndarray, rng: np.random.Generator, test: float = 0.2, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    uniq = np.unique(labels)
    test_labels = set(uniq[rng.random(len(uniq)) < test].tolist())
    is_test = np.array([x in test_labels for x in labels])
    return np.flatnonzero(~is_test), _sample(np.flatnonzero(is_test), rng, limit)


# --------------------------------------------------------------------------- detectors


def run_detector(images: list[np.ndarray], train: np.ndarray, test: np.ndarray, catalog=None) -> dict[int, int]:
    """The new two-stage detector: test item -> the train item it was flagged with."""
    from embedkit.duplicates.search import build_catalog, find_copies

    cat = catalog if catalog is not None else build_catalog(images, workers=WORKERS)
    return {v.query: v.match for v in find_copies(cat, test, train, workers=WORKERS) if v.copy}


def run_fingerprints(images: list[np.ndarray], train: np.ndarray, test: np.ndarray, threshold: float = 0.975) -> dict[int, int]:
    """The previous detector: best of 8 dihedral orientations of band-passed 32x32 fingerprints."""
    from embedkit.fingerprints import dihedral, fingerprint
    from embedkit.neighbors import search

    fps = np.stack([fingerprint(np.asarray(im, np.float32)) for im in images])
    variants = np.concatenate([dihedral(f) for f in fps[test]])
    sims, nn = search(fps[train], variants, 1)
    sims, nn = sims.reshape(len(test), 8), nn.reshape(len(test), 8)
    best = sims.argmax(axis=1)
    return {int(test[q]): int(train[nn[q, best[q]]]) for q in range(len(test)) if sims[q, best[q]] >= threshold}


DETECTORS = {"two_stage": run_detector, "fingerprints_baseline": run_fingerprints}


def candidate_recall(cat, source: np.ndarray, train: np.ndarray, queries: np.ndarray) -> dict:
    """Share of ``queries`` with an item of their own source among their k stage-1 candidates in train (k = 5,
    10 (the default), 20, 50): the ceiling stage 1 puts on recall."""
    from embedkit.duplicates.search import K, candidates

    if not len(queries):
        return {}
    ks = sorted({5, K, 20, 50})
    _, nn = candidates(cat, queries, train, max(ks))
    hit = (nn >= 0) & (source[train][np.maximum(nn, 0)] == source[queries][:, None])
    return {f"k{k}": round(float(hit[:, :k].any(axis=1).mean()), 4) for k in ks}


def recall(pool: Pool, rng: np.random.Generator, names: list[str] | None = None) -> dict:
    """Random split ignoring sources: flagged share of test items that have a same-source item in train.

    Also the candidate recall (a copy among the stage-1 candidates) and the verification recall (flagged
    share of the test items whose candidates hold a copy), so that the limiting stage shows."""
    from embedkit.duplicates.search import K, build_catalog, candidates

    train, test = random_split(len(pool.images), rng, limit=MAX_QUERIES)
    train_sources = set(pool.source[train].tolist())
    has_copy = np.array([pool.kind[q] != "untouched" and pool.source[q] in train_sources for q in test])
    out = {"n_items": len(pool.images), "n_test": int(len(test)), "n_test_with_copy_in_train": int(has_copy.sum())}
    w0, c0 = time.perf_counter(), cpu_seconds()
    cat = build_catalog(pool.images, workers=WORKERS)
    out["catalog_seconds"], out["catalog_cpu_seconds"] = round(time.perf_counter() - w0, 1), round(cpu_seconds() - c0, 1)
    with_copy = test[has_copy]
    out["candidate_recall"] = candidate_recall(cat, pool.source, train, with_copy)
    log(f"  candidate recall: {out['candidate_recall']}")
    _, nn = candidates(cat, with_copy, train, K)
    in_candidates = ((nn >= 0) & (pool.source[train][np.maximum(nn, 0)] == pool.source[with_copy][:, None])).any(axis=1)
    for name, fn in DETECTORS.items():
        t0, c0 = time.perf_counter(), cpu_seconds()
        flagged = fn(pool.images, train, test, cat) if name == "two_stage" else fn(pool.images, train, test)
        hit = np.array([q in flagged for q in test])
        right = [pool.source[flagged[q]] == pool.source[q] for q in test[has_copy] if q in flagged]
        distinct = test[~has_copy]
        n_hit = int(hit[has_copy].sum())
        out[name] = {"recall": float(hit[has_copy].mean()) if has_copy.any() else None,
                     "recall_95ci": list(_wilson(n_hit, int(has_copy.sum()))),
                     "partner_of_same_source": float(np.mean(right)) if right else None,
                     "flagged_without_copy_in_train": int(hit[~has_copy].sum()),
                     "examples_without_copy_in_train": [[_name(pool, q, names), _name(pool, flagged[q], names)]
                                                        for q in test[~has_copy] if q in flagged][:10],
                     "n_without_copy_in_train": int(len(distinct)),
                     "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)}
        if name == "two_stage":
            caught = np.array([q in flagged for q in with_copy])
            out[name]["verification_recall"] = (float(caught[in_candidates].mean()) if in_candidates.any() else None)
            out[name]["n_with_copy_among_candidates"] = int(in_candidates.sum())
        log(f"  recall {name}: {out[name]}")
    return out


def false_flags(images: list[np.ndarray], labels: np.ndarray, kinds: np.ndarray, rng: np.random.Generator,
                what: str) -> dict:
    """Split by ``labels`` (sources, fields or single cells): every flag is false."""
    train, test = split_by(labels, rng, limit=MAX_QUERIES)
    out = {"what": what, "n_items": len(images), "n_test": int(len(test))}
    for name, fn in DETECTORS.items():
        flagged = fn(images, train, test)
        per_kind = {}
        for k in np.unique(kinds[test]):
            qs = test[kinds[test] == k]
            n = sum(q in flagged for q in qs)
            per_kind[str(k)] = {"flagged": int(n), "of": int(len(qs)), "rate": n / len(qs)}
        n = len(flagged)
        lo, hi = _wilson(n, len(test))
        out[name] = {"flagged": n, "rate": n / max(len(test), 1), "rate_95ci": [lo, hi], "by_kind": per_kind,
                     "examples": [[int(q), int(p)] for q, p in list(flagged.items())[:5]]}
        log(f"  false flags {what} {name}: {n} of {len(test)}")
    return out


def _name(pool: Pool, item: int, names: list[str] | None) -> str:
    base = names[pool.origin[item]] if names else f"crop {pool.origin[item]}"
    return f"{base} ({pool.kind[item]})"


def _wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.96, k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(float(c - h), 4), round(float(c + h), 4)


def dataset_report(name: str, crops: Crops, args, rng: np.random.Generator) -> dict:
    log(f"{name}: {len(crops.images)} crops, {len(np.unique(crops.source))} sources")
    pool = with_copies(crops, args.sources, args.copies, rng)
    log(f"{name}: pool of {len(pool.images)} items ({args.sources} sources x {args.copies} copies + untouched crops)")
    rep = {"n_crops": len(crops.images), "n_pool": len(pool.images), "recall": recall(pool, rng, crops.meta.get("names"))}
    rep["false_flags_split_by_source"] = false_flags(pool.images, pool.source, pool.kind, rng, "split by source")
    return rep


def single_movies(crops: Crops, n_movies: int, rng: np.random.Generator) -> dict:
    """Untouched MitoCheck cells of the largest movies, split at random within each movie (sources kept whole)."""
    movies, counts = np.unique(crops.group, return_counts=True)
    keep = np.isin(crops.group, movies[np.argsort(-counts)[:n_movies]])
    idx = np.flatnonzero(keep)
    return false_flags([crops.images[i] for i in idx], crops.source[idx], np.array(["untouched"] * len(idx)), rng,
                       f"untouched cells of {n_movies} movies, split within each movie")


def timing(mito: Crops, dsb: Crops, size: int, copies: int, rng: np.random.Generator, grouping: bool,
           verify_sample: int | None = None) -> dict:
    """Catalog + candidates + test-vs-train verification (and optionally the all-items grouping) on ``size`` items.

    With ``verify_sample``, only that many random test items are verified and the verification time of all
    test items is extrapolated from them (``check_seconds_estimated``); catalog and candidates always run in full."""
    from embedkit.duplicates.augment import augmented_copy
    from embedkit.duplicates.search import K, build_catalog, duplicate_pairs, find_copies
    from embedkit.neighbors import knn

    per = copies + 1
    srcs = [("m", i) for i in np.unique(mito.source, return_index=True)[1]] + [("d", i) for i in range(len(dsb.images))]
    order = rng.permutation(len(srcs))
    images, source = [], []
    for j in order:
        if len(images) >= size:
            break
        kind, i = srcs[j]
        img = (mito if kind == "m" else dsb).images[i]
        n_copies = copies if len(srcs) * per >= size else int(np.ceil(size / len(srcs))) - 1
        images.append(img)
        source.append(j)
        for _ in range(n_copies):
            images.append(augmented_copy(img, rng))
            source.append(j)
    images, source = images[:size], np.array(source[:size])
    train, test = random_split(len(images), rng)
    out = {"n_items": len(images), "n_test": int(len(test)), "n_train": int(len(train)), "workers": WORKERS}
    w0, c0 = time.perf_counter(), cpu_seconds()
    cat = build_catalog(images, workers=WORKERS)
    out["catalog_seconds"] = round(time.perf_counter() - w0, 1)
    out["catalog_cpu_seconds"] = round(cpu_seconds() - c0, 1)
    w0, c0 = time.perf_counter(), cpu_seconds()
    knn(cat.descriptors[train], cat.descriptors[test], K, method="exact")
    out["candidates_seconds"] = round(time.perf_counter() - w0, 1)
    out["candidates_cpu_seconds"] = round(cpu_seconds() - c0, 1)
    checked = test if not verify_sample or verify_sample >= len(test) else np.sort(rng.choice(test, verify_sample, replace=False))
    w0, c0 = time.perf_counter(), cpu_seconds()
    verified = find_copies(cat, checked, train, workers=WORKERS)
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    out["n_verified_queries"] = int(len(checked))
    out["pairs_verified"] = len(verified)
    if len(checked) == len(test):
        out["check_seconds"] = round(wall, 1)
        out["check_cpu_seconds"] = round(cpu, 1)
        out["total_seconds"] = round(out["catalog_seconds"] + out["check_seconds"], 1)
    else:  # candidates for all test items are timed above; verification scales with the number of test items
        scale = len(test) / len(checked)
        out["check_seconds_estimated"] = round(out["candidates_seconds"] + wall * scale, 1)
        out["check_cpu_seconds_estimated"] = round(out["candidates_cpu_seconds"] + cpu * scale, 1)
        out["total_seconds_estimated"] = round(out["catalog_seconds"] + out["check_seconds_estimated"], 1)
    out["verify_seconds_per_test_item"] = round(wall / max(len(checked), 1), 4)
    train_sources = set(source[train].tolist())
    has = np.array([source[q] in train_sources for q in checked])
    flagged = {v.query for v in verified if v.copy}
    out["recall"] = float(np.mean([q in flagged for q in checked[has]])) if has.any() else None
    out["candidate_recall"] = candidate_recall(cat, source, train, checked[has])
    out["load_average"] = os.getloadavg()
    if grouping:
        w0, c0 = time.perf_counter(), cpu_seconds()
        pairs = duplicate_pairs(cat)
        out["grouping_seconds"] = round(time.perf_counter() - w0, 1)
        out["grouping_cpu_seconds"] = round(cpu_seconds() - c0, 1)
        out["grouping_edges"] = len(pairs)
    log(f"  time {size}: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="Shared data folder (mitocheck/, dsb2018/).")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "leaks.json")
    p.add_argument("--sources", type=int, default=300, help="Source crops per dataset that get copies.")
    p.add_argument("--copies", type=int, default=20, help="Augmented copies per source.")
    p.add_argument("--sizes", default="10000,100000", help="Item counts to time (comma separated; empty: none).")
    p.add_argument("--verify-sample", type=int, default=None,
                   help="Above 10,000 items, verify only this many test items and extrapolate (candidates run in full).")
    p.add_argument("--grouping", action="store_true", help="Also time the all-items grouping at the smallest size.")
    p.add_argument("--only", default="accuracy,timing", help="Sections to run: accuracy, timing (comma separated).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="Processes verifying candidates (default: the cores this process may use).")
    args = p.parse_args(argv)
    from embedkit.duplicates.search import available_cores

    global WORKERS
    WORKERS = args.workers or available_cores()
    if not (args.data / "mitocheck").is_dir() or not (args.data / "dsb2018").is_dir():
        print(f"bench_leaks: error: no mitocheck/ and dsb2018/ under {args.data}; pass --data DIR (the shared data folder)",
              file=sys.stderr)
        return 2
    import cv2

    cv2.setNumThreads(1)
    rng = np.random.default_rng(args.seed)
    mito = load_mitocheck(args.data / "mitocheck")
    windows, boxes = load_dsb(args.data / "dsb2018", rng)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average_at_start": os.getloadavg()},
              "settings": {"workers": WORKERS, "sources": args.sources, "copies": args.copies, "seed": args.seed, "dsb_window": WINDOW}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so a long run that is stopped keeps what it measured
        result["machine"]["load_average_at_end"] = os.getloadavg()
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
        os.replace(tmp, args.out)

    if "accuracy" in args.only:
        result["mitocheck"] = dataset_report("mitocheck", mito, args, rng)
        save()
        result["mitocheck"]["false_flags_single_movies"] = single_movies(mito, 5, rng)
        save()
        result["dsb"] = dataset_report("dsb windows", windows, args, rng)
        save()
        result["dsb"]["false_flags_bounding_boxes"] = false_flags(
            boxes.images, boxes.group, np.array(["untouched"] * len(boxes.images)), rng,
            "tight bounding-box crops of distinct nuclei, split by field")
        save()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] if "timing" in args.only else []
    result["timing"] = []
    for n in sizes:
        sample = args.verify_sample if n > 10_000 else None
        result["timing"].append(timing(mito, windows, n, args.copies, rng, grouping=args.grouping and n == min(sizes),
                                       verify_sample=sample))
        save()
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
