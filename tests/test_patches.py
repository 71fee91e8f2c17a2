"""``embedkit patches``: sliding windows, the empty-patch filters and GMM labels from a paired channel,
on constructed data whose answers are known by construction."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from embedkit.errors import EmbedkitError
from embedkit.segment.filters import LearnedFilter, SimpleFilter
from embedkit.segment.gmm_labels import GmmThresholds, fit_thresholds
from embedkit.segment.patches import cut_patches, patch_offsets, window_means, window_starts
from embedkit.store import Store

from test_segment import cli_here

TILE = 64


# --------------------------------------------------------------------------- constructed data

def bf_tile(rng, kind: str) -> np.ndarray:
    """Bright-field tile: flat background with camera noise, plus a dark cell unless empty."""
    t = 1000 + rng.normal(0, 5, (TILE, TILE))
    if kind != "empty":
        yy, xx = np.mgrid[:TILE, :TILE]
        cy, cx = rng.integers(22, 42, 2)
        t[(yy - cy) ** 2 + (xx - cx) ** 2 <= 15 ** 2] = 600 + rng.normal(0, 20)
    return t


FL_LEVEL = {"live": (200, 20), "dead": (2000, 150), "amb": (1100, 0), "empty": (100, 0)}


def livedead_field(path: Path, rng, kinds: list[str], grid: int = 4) -> list[tuple[str, float]]:
    """A grid x grid field of tiles as a 2-channel uint16 TIFF (bright-field, fluorescence); returns (kind, level) per tile."""
    bf = np.zeros((grid * TILE, grid * TILE))
    fl = np.zeros_like(bf)
    truth = []
    for k, kind in enumerate(kinds):
        r, c = divmod(k, grid)
        bf[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = bf_tile(rng, kind)
        mean, sd = FL_LEVEL[kind]
        level = float(mean + sd * rng.normal())
        fl[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = level + rng.normal(0, 3, (TILE, TILE))
        truth.append((kind, level))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.stack([bf, fl]).clip(0, 65535).astype(np.uint16))
    return truth


KINDS = ["empty", "live", "dead", "live", "dead", "live", "empty", "dead",
         "live", "dead", "amb", "live", "dead", "empty", "live", "dead"]


@pytest.fixture(scope="module")
def livedead(tmp_path_factory):
    root = tmp_path_factory.mktemp("livedead")
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(3):
        kinds = list(np.roll(KINDS, 5 * i))
        for k, (kind, level) in enumerate(livedead_field(root / "exp1" / f"well{i}.tif", rng, kinds)):
            r, c = divmod(k, 4)
            truth[f"well{i}.tif@{r * TILE},{c * TILE}"] = (kind, level)
    return root / "exp1", truth


# --------------------------------------------------------------------------- windows

def test_window_starts_cover_the_field():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(500, 224, 112) == [0, 112, 224, 276]
    assert window_starts(3, 4, 1) == []
    offsets = patch_offsets((500, 300), 224, 112)
    assert offsets.shape == (4 * 2, 2) and offsets[-1].tolist() == [276, 76]


def test_patches_and_window_means_equal_plain_slicing():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)
    offsets = patch_offsets(img.shape[:2], 32, 20)
    patches = cut_patches(img, offsets, 32)
    plane = rng.normal(size=(90, 70))
    means = window_means(plane, offsets, 32)
    for k, (y, x) in enumerate(offsets):
        np.testing.assert_array_equal(patches[k], img[y:y + 32, x:x + 32])
        assert means[k] == pytest.approx(plane[y:y + 32, x:x + 32].mean(), abs=1e-9)


# --------------------------------------------------------------------------- filters

def test_simple_filter_keeps_cells_and_drops_flat_noise():
    rng = np.random.default_rng(2)
    kinds = ["empty", "live"] * 5
    tiles = np.stack([bf_tile(rng, k) for k in kinds])
    u8 = np.repeat(((tiles - 500) / 600 * 255).clip(0, 255).astype(np.uint8)[..., None], 3, axis=3)
    background = float(np.median(u8[0, ..., 0])) / 255
    filt = SimpleFilter()
    assert filt.keep(u8, background).tolist() == [k != "empty" for k in kinds]
    fg, sd = filt.measure(u8, background)
    assert (fg[1::2] > 0.1).all() and (fg[0::2] < 0.01).all()
    assert not SimpleFilter(min_std=1.0).keep(u8, background).any()


def clouds(rng, n):
    x = np.concatenate([rng.normal(0, 1, (n, 16)), rng.normal(0, 1, (n, 16)) + np.r_[6.0, np.zeros(15)]])
    return x, np.r_[np.zeros(n, int), np.ones(n, int)]


def test_learned_filter_fits_saves_and_reloads_without_pickle(tmp_path):
    rng = np.random.default_rng(3)
    x, y = clouds(rng, 8)
    filt = LearnedFilter.fit_arrays(x, y, {"encoder": "e", "weights_fingerprint": "abc"}, {"channels": None})
    test_x, test_y = clouds(rng, 200)
    assert ((filt.decision(test_x) > 0) == test_y).mean() > 0.9
    assert filt.info["n_empty"] == filt.info["n_kept"] == 8 and filt.info["cv"] == "leave-one-out"
    filt.save(tmp_path / "f")
    with np.load(tmp_path / "f" / "filter.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["coef", "mean", "scale"]
    again = LearnedFilter.load(tmp_path / "f")
    np.testing.assert_allclose(again.decision(test_x), filt.decision(test_x))
    meta = json.loads((tmp_path / "f" / "filter.json").read_text())
    meta["intercept"] += 1.0
    (tmp_path / "f" / "filter.json").write_text(json.dumps(meta))
    with pytest.raises(EmbedkitError, match="does not match"):
        LearnedFilter.load(tmp_path / "f")
    with pytest.raises(EmbedkitError, match="no saved filter"):
        LearnedFilter.load(tmp_path / "nothing")


# --------------------------------------------------------------------------- GMM labels

def test_gmm_recovers_two_known_populations():
    rng = np.random.default_rng(4)
    values = np.r_[rng.normal(100, 10, 1500), rng.normal(1000, 50, 500)]
    thr = fit_thresholds(values, ("live", "dead"))
    assert thr.means == pytest.approx((100, 1000), rel=0.02)
    assert thr.sds == pytest.approx((10, 50), rel=0.1)
    assert thr.weights == pytest.approx((0.75, 0.25), abs=0.02)
    assert thr.low == pytest.approx(110, rel=0.03) and thr.high == pytest.approx(950, rel=0.03)
    assert thr.bic[1] < thr.bic[0] - 100


def test_gmm_rule_and_saved_thresholds(tmp_path):
    thr = GmmThresholds(low=10.0, high=20.0, classes=("live", "dead"))
    assert thr.assign([5, 10, 15, 20, 25]).tolist() == ["live", "", "", "", "dead"]
    again = GmmThresholds.load(thr.save(tmp_path / "t.json"))
    assert again == thr
    with pytest.raises(EmbedkitError, match="overlap"):
        GmmThresholds(low=30.0, high=20.0)
    with pytest.raises(EmbedkitError, match="at least 10"):
        fit_thresholds(np.arange(5.0))
    with pytest.raises(EmbedkitError, match="do not show two populations"):
        fit_thresholds(np.random.default_rng(0).normal(100, 10, 500))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(EmbedkitError, match="not a thresholds file"):
        GmmThresholds.load(tmp_path / "x.json")


# --------------------------------------------------------------------------- the command

def patch_rows(store: Path) -> dict:
    s = Store(store)
    with h5py.File(store, "r") as f:
        return {"id": s.ids, "label": s.labels, "offset": f["items"]["offset"][:], "bbox": f["items"]["bbox"][:],
                "source": s.column("source"), "paired_mean": s.column("paired_mean"), "pixels": f["pixels"][:],
                "gmm": json.loads(f["segment"].attrs.get("gmm_thresholds", "null"))}


def test_patches_with_simple_filter_and_gmm_labels(livedead, tmp_path, capsys):
    folder, truth = livedead
    store = tmp_path / "p.h5"
    code, out, err = cli_here(capsys, "patches", folder, "--out", store, "--size", TILE, "--stride", TILE,
                              "--channels", "0", "--paired-channel", "1", "--quiet")
    assert code == 0, err
    rows = patch_rows(store)
    assert rows["pixels"].shape == (len(rows["id"]), TILE, TILE, 3)
    for pid, off, box, src in zip(rows["id"], rows["offset"], rows["bbox"], rows["source"]):
        assert pid == f"{src}@{off[0]},{off[1]}" and box.tolist() == [off[0], off[1], off[0] + TILE, off[1] + TILE]
    written = dict(zip(rows["id"], rows["label"]))
    kinds = {pid: kind for pid, (kind, _) in truth.items()}
    assert all(written[p] == kinds[p] for p in written), "every label must be the tile's true class"
    assert not any(kinds[p] in ("empty", "amb") for p in written)  # empty filtered, ambiguous discarded
    for cls in ("live", "dead"):
        n_true = sum(k == cls for k in kinds.values())
        assert sum(v == cls for v in written.values()) >= 0.6 * n_true
    for p, m in zip(rows["id"], rows["paired_mean"]):
        assert m == pytest.approx(truth[p][1], abs=3)
    saved = GmmThresholds.load(tmp_path / "p.gmm.json")
    assert (tmp_path / "p.gmm.png").exists()
    assert rows["gmm"]["low"] == saved.low and saved.low < 1100 < saved.high
    levels = np.array([lvl for kind, lvl in truth.values() if kind != "empty"])
    refit = fit_thresholds(levels, ("live", "dead"))
    assert saved.low == pytest.approx(refit.low, rel=0.02) and saved.high == pytest.approx(refit.high, rel=0.02)
    n_amb = sum(k == "amb" for k in kinds.values())
    assert f"{sum(k == 'empty' for k in kinds.values())} empty" in out and "ambiguous discarded" in out
    assert int(out.split(" ambiguous discarded")[0].rsplit(" ", 1)[1]) >= n_amb

    # the saved thresholds label a second dataset unchanged, even one that is almost all dead
    rng = np.random.default_rng(9)
    kinds2 = ["dead"] * 10 + ["live", "live", "empty", "empty", "dead", "dead"]
    truth2 = livedead_field(tmp_path / "exp2" / "w.tif", rng, kinds2)
    store2 = tmp_path / "p2.h5"
    code, out, err = cli_here(capsys, "patches", tmp_path / "exp2", "--out", store2, "--size", TILE, "--stride", TILE,
                              "--channels", "0", "--paired-channel", "1", "--gmm-thresholds", tmp_path / "p.gmm.json", "--quiet")
    assert code == 0, err
    rows2 = patch_rows(store2)
    assert rows2["gmm"] == saved.to_dict()
    expected = {f"w.tif@{divmod(k, 4)[0] * TILE},{divmod(k, 4)[1] * TILE}": saved.assign([lvl])[0]
                for k, (kind, lvl) in enumerate(truth2) if kind != "empty"}
    assert dict(zip(rows2["id"], rows2["label"])) == {p: lab for p, lab in expected.items() if lab}
    assert sum(lab == "dead" for lab in rows2["label"]) >= 10


def test_learned_filter_from_marked_examples(tmp_path, capsys):
    rng = np.random.default_rng(5)
    kinds = ["empty", "live", "dead", "empty"]
    livedead_field(tmp_path / "small" / "f.tif", rng, kinds, grid=2)
    for kind, sub in (("empty", "empty"), ("live", "kept")):
        (tmp_path / "ex" / sub).mkdir(parents=True)
        for i in range(3):
            t = ((bf_tile(rng, kind) - 500) / 600 * 255).clip(0, 255).astype(np.uint8)
            Image.fromarray(t).save(tmp_path / "ex" / sub / f"{i}.png")
    args = ("patches", tmp_path / "small" / "f.tif", "--size", TILE, "--stride", TILE, "--channels", "0", "--filter", "learned",
            "--filter-model", tmp_path / "fm", "--quiet")
    code, out, err = cli_here(capsys, *args, "--out", tmp_path / "a.h5", "--filter-examples", tmp_path / "ex")
    assert code == 0, err
    kept = set(Store(tmp_path / "a.h5").ids)
    assert kept == {f"f.tif@0,{TILE}", f"f.tif@{TILE},0"}  # the live and the dead tile; both empty ones dropped
    assert (tmp_path / "fm" / "filter.json").exists() and (tmp_path / "fm" / "filter.npz").exists()
    code, out, err = cli_here(capsys, *args, "--out", tmp_path / "b.h5")  # reuse the saved filter
    assert code == 0, err
    assert set(Store(tmp_path / "b.h5").ids) == kept
    np.testing.assert_allclose(Store(tmp_path / "b.h5").column("filter_score"), Store(tmp_path / "a.h5").column("filter_score"), rtol=1e-4)
    code, _, err = cli_here(capsys, *args, "--out", tmp_path / "c.h5", "--filter-examples", tmp_path / "ex")
    assert code == 2 and "already holds a fitted filter" in err


def test_patch_option_errors(livedead, tmp_path, capsys):
    folder, _ = livedead
    for extra, expected in ((("--gmm-thresholds", __file__), "paired channel"),
                            (("--paired-replace", "nothing"), "OLD=NEW"),
                            (("--paired-channel", "1", "--gmm-classes", "live"), "two different names"),
                            (("--paired-channel", "5", "--channels", "0"), "paired channel is 5"),
                            (("--filter", "learned"), "needs --filter-model")):
        code, _, err = cli_here(capsys, "patches", folder, "--out", tmp_path / "x.h5", "--quiet", *extra)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.h5").exists()


def test_a_failed_fit_resumes_with_saved_thresholds(tmp_path, capsys):
    rng = np.random.default_rng(7)
    for i in range(2):
        livedead_field(tmp_path / "uni" / f"w{i}.tif", rng, ["live"] * 14 + ["empty"] * 2)
    args = ("patches", tmp_path / "uni", "--out", tmp_path / "u.h5", "--size", TILE, "--stride", TILE, "--channels", "0",
            "--paired-channel", "1", "--quiet")
    code, _, err = cli_here(capsys, *args)  # one population: a GMM cannot give two separated classes
    assert code == 2 and "do not show two populations" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "u.h5").exists() and list((tmp_path / "u.h5.shards").glob("patches-*/w0-f*.h5"))
    GmmThresholds(low=500.0, high=1500.0).save(tmp_path / "t.json")
    code, out, err = cli_here(capsys, *args, "--gmm-thresholds", tmp_path / "t.json")
    assert code == 0, err
    assert "(2 already done" in out
    assert set(Store(tmp_path / "u.h5").labels) == {"live"} and len(Store(tmp_path / "u.h5")) == 28
