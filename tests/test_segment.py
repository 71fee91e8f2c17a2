"""``embedkit segment`` end to end on real nuclei (the StarDist field cut into tiles): provenance, crops,
labels and groups, embedding from the store, resume after kill -9, and every bad-input path."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from conftest import ROOT, invoke_cli, run_cli
from embedkit.images import read_image, to_rgb, to_uint8
from embedkit.segment.crops import cut_crop, measure_cells
from embedkit.segment.outputs import safe_name
from embedkit.sources import discover
from embedkit.store import Store, transaction, write_items

STARDIST = Path(__file__).parent / "data" / "stardist"
WS = ("--backend", "watershed", "--quiet")


def tiles(folder: Path, size: int, names: dict[str, tuple[int, int]]) -> Path:
    """Write 16-bit tiles of the StarDist field: names maps 'A/t1.tif' -> (row, col) tile index."""
    img = tifffile.imread(STARDIST / "img2d.tif")
    for name, (r, c) in names.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(p, img[r * size:(r + 1) * size, c * size:(c + 1) * size])
    return folder


@pytest.fixture(scope="session")
def fields(tmp_path_factory) -> Path:
    return tiles(tmp_path_factory.mktemp("fields"), 256, {"A/t00.tif": (0, 0), "A/t01.tif": (0, 1), "B/t10.tif": (1, 0), "B/t11.tif": (1, 1)})


@pytest.fixture(scope="session")
def ws_store(fields, tmp_path_factory) -> tuple[Path, str]:
    store = tmp_path_factory.mktemp("ws") / "cells.h5"
    proc = invoke_cli("segment", fields, "--out", store, *WS, "--overlays", "1")
    return store, proc.stdout


def rows_of(store: Path) -> dict:
    s = Store(store)
    with h5py.File(store, "r") as f:
        cols = {k: f["items"][k][:] for k in ("bbox", "centroid", "area", "edge", "mask_id", "crop_box", "scale")}
        cols["pixels"] = f["pixels"][:]
    cols.update(id=s.ids, label=s.labels, group=s.groups, source=s.column("source"), path=s.column("path"))
    return cols


def cli_here(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from embedkit.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cells_carry_full_provenance(ws_store, fields):
    store, stdout = ws_store
    rows = rows_of(store)
    n = len(rows["id"])
    assert n > 60 and f"{n} cells added to" in stdout
    assert rows["pixels"].shape == (n, 96, 96, 3) and rows["pixels"].dtype == np.uint8
    assert set(rows["label"]) == {"A", "B"}
    assert all(lab == src.split("/")[0] for lab, src in zip(rows["label"], rows["source"]))
    assert list(rows["group"]) == list(rows["source"]) == list(rows["path"])  # default group: the source field
    labels_dir = Path(str(store)[:-3] + "_labels")
    for src in sorted(set(rows["source"])):
        sel = np.flatnonzero(rows["source"] == src)
        lab = tifffile.imread(labels_dir / f"{safe_name(src)}.labels.tif")
        assert lab.shape == (256, 256)
        cells = measure_cells(lab)
        pos = {int(m): k for k, m in enumerate(cells.mask_id)}
        k = np.array([pos[int(m)] for m in rows["mask_id"][sel]])
        np.testing.assert_array_equal(rows["bbox"][sel], cells.bbox[k])
        np.testing.assert_allclose(rows["centroid"][sel], cells.centroid[k], atol=1e-4)
        np.testing.assert_array_equal(rows["area"][sel], cells.area[k])
        # every interior cell of at least --min-area pixels is there, and no edge cell (--edge drop)
        assert sorted(rows["mask_id"][sel]) == sorted(cells.mask_id[~cells.edge & (cells.area >= 15)])
        assert [i.split("#")[0] for i in rows["id"][sel]] == [src] * len(sel)
        rgb = to_uint8(to_rgb(read_image(fields / src)))
        for j in sel[:5]:
            crop, box = cut_crop(rgb, lab, rows["centroid"][j], int(rows["mask_id"][j]), 96)
            np.testing.assert_array_equal(rows["pixels"][j], crop)
            np.testing.assert_array_equal(rows["crop_box"][j], box)
    assert not rows["edge"].any() and (rows["scale"] == 1).all()
    assert len(list(Path(str(store)[:-3] + "_overlays").glob("*.png"))) == 1
    with h5py.File(store, "r") as f:
        cfg = json.loads(f["segment"].attrs["config"])
        assert f["segment"].attrs["command"] == "segment"
        assert sorted(f["segment"]["fields"].asstr()[:]) == ["A/t00.tif", "A/t01.tif", "B/t10.tif", "B/t11.tif"]
    assert cfg["segmenter"]["backend"] == "watershed" and cfg["crop"]["size"] == 96
    assert cfg["conversion"]["percentiles"] == [1.0, 99.8]


def test_edge_keep_mask_and_group_by(fields, tmp_path):
    store = tmp_path / "masked.h5"
    invoke_cli("segment", fields, "--out", store, *WS, "--edge", "keep", "--mask", "--crop", "48", "--min-area", "40",
               "--group-by", "parent")
    rows = rows_of(store)
    assert rows["edge"].any() and (rows["area"] >= 40).all()
    assert set(rows["group"]) == {"A", "B"}
    for src in sorted(set(rows["source"])):
        lab = tifffile.imread(Path(str(store)[:-3] + "_labels") / f"{safe_name(src)}.labels.tif")
        cells = measure_cells(lab)
        sel = np.flatnonzero(rows["source"] == src)
        assert sorted(rows["mask_id"][sel]) == sorted(cells.mask_id[cells.area >= 40])
        edge_ids = set(cells.mask_id[cells.edge].tolist())
        assert {int(m) for m in rows["mask_id"][sel][rows["edge"][sel]]} == edge_ids & set(rows["mask_id"][sel].tolist())
        for j in sel[:8]:
            y0, x0 = (int(v) for v in rows["crop_box"][j][:2])
            padded = np.pad(lab, 48)
            win = padded[y0 + 48:y0 + 96, x0 + 48:x0 + 96]
            assert not rows["pixels"][j][win != rows["mask_id"][j]].any()
            assert rows["pixels"][j][win == rows["mask_id"][j]].any()


def test_segment_then_embed_from_the_store(tmp_path):
    field = tiles(tmp_path / "one", 128, {"f.tif": (1, 1)}) / "f.tif"
    store = tmp_path / "one.h5"
    invoke_cli("segment", field, "--out", store, *WS, "--crop", "64")
    n = len(Store(store))
    assert 3 <= n <= 30
    proc = invoke_cli("embed", store, "--store", store, "--quiet")
    assert f"embedded {n} images" in proc.stdout
    s = Store(store)
    assert s.done("efficientnet_lite0").all()
    vec = s.vectors("efficientnet_lite0")
    assert vec.shape == (n, 1280) and np.isfinite(vec).all()
    assert len({v.tobytes() for v in vec.round(4)}) == n  # different cells, different vectors


def _fields_in_shards(store: Path) -> int:
    """Fields an interrupted run finished: the fields recorded in its shards (its progress)."""
    n = 0
    for shard in Path(f"{store}.shards").glob("segment-*/w0-f*.h5"):
        with h5py.File(shard, "r") as f:
            n += f["field"].shape[0]
    return n


def test_killed_run_resumes_to_the_identical_store(tmp_path):
    names = {f"F/t{r}{c}.tif": (r, c) for r in range(4) for c in range(4)}
    src = tiles(tmp_path / "many", 128, names)
    clean = tmp_path / "clean.h5"
    run_cli("segment", src, "--out", clean, *WS)
    store = tmp_path / "resumed.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", "segment", str(src), "--out", str(store), *WS,
                             "--checkpoint-fields", "1"],
                            cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = Path(f"{store}.shards")
    deadline = time.time() + 120
    while time.time() < deadline and not list(shards.glob("segment-*/w0-f*.h5")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _fields_in_shards(store)
    assert not store.exists() and 1 <= done < len(names), "the run should have been killed mid-way"
    bad = run_cli("segment", src, "--out", store, *WS, "--crop", "64", check=False)
    assert bad.returncode == 2 and "interrupted run" in bad.stderr and "crop.size: 96" in bad.stderr
    proc = run_cli("segment", src, "--out", store, *WS)
    assert f"({done} already done" in proc.stdout
    assert not list(shards.glob("*/run.json"))  # the run is committed: no pending run is left
    a, b = rows_of(clean), rows_of(store)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    again = run_cli("segment", src, "--out", store, *WS)
    assert f"({len(names)} already done, 0 failed): 0 cells added" in again.stdout


def test_bad_fields_are_reported_and_never_corrupt_the_store(fields, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fields, src)
    (src / "A" / "t005_corrupt.tif").write_bytes(b"not a tiff at all")
    store = tmp_path / "cells.h5"
    proc = run_cli("segment", src, "--out", store, *WS, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "t005_corrupt.tif" in lines[0] and "--skip-bad" in lines[0]
    assert not store.exists()
    proc = invoke_cli("segment", src, "--out", store, *WS, "--skip-bad")
    assert "(1 already done, 1 failed)" in proc.stdout  # t00 finished before the corrupt field
    assert "skipped 1 fields" in proc.stderr
    report = Path(str(store)[:-3] + ".segment-failed.csv").read_text()
    assert "t005_corrupt.tif" in report and "not a readable image" in report
    assert sorted(set(Store(store).column("source"))) == ["A/t00.tif", "A/t01.tif", "B/t10.tif", "B/t11.tif"]
    with h5py.File(store, "r") as f:
        assert f["segment"]["failed"].asstr()[:, 0].tolist() == [str(src / "A" / "t005_corrupt.tif")]


def test_wrong_channels_missing_files_and_other_settings_fail_with_one_line(ws_store, fields, tmp_path, capsys):
    def one_line_error(*args):
        code, _, err = cli_here(capsys, *args)
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("embedkit: error:"), err
        return lines[0]

    msg = one_line_error("segment", fields, "--out", tmp_path / "c.h5", *WS, "--seg-channels", "1")
    assert "has 1 channel(s) but --seg-channels asks for channel 1" in msg
    msg = one_line_error("segment", fields, "--out", tmp_path / "c.h5", *WS, "--channels", "0,1,2")
    assert "--channels asks for channel 1" in msg
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{fields / 'A' / 't00.tif'},x\n{tmp_path / 'gone.tif'},y\n")
    msg = one_line_error("segment", manifest, "--out", tmp_path / "m.h5", *WS)
    assert "gone.tif" in msg and "file not found" in msg
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "m.h5").exists()

    store, _ = ws_store
    copy = tmp_path / "copy.h5"
    shutil.copy(store, copy)
    shutil.copytree(f"{store}.shards", tmp_path / f"{store.name}.shards")  # the shards folder keeps its name
    before = file_digest(copy)
    msg = one_line_error("segment", fields, "--out", copy, *WS, "--crop", "64", "--mask")
    assert "different settings" in msg and "crop.size: 96 in store vs 64 now" in msg and "crop.mask" in msg
    assert file_digest(copy) == before
    plain = tmp_path / "plain.h5"  # a store of whole images, as 'embed' makes
    with transaction(plain) as f:
        write_items(f, discover(fields).items, str(fields))
    msg = one_line_error("segment", fields, "--out", plain, *WS)
    assert "holds 4 items that 'embedkit segment' did not make" in msg


def test_scale_to_a_pixel_size_from_the_manifest(tmp_path, capsys):
    src = tiles(tmp_path / "f", 128, {"a.tif": (0, 0), "b.tif": (1, 1)})
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label,pixel_size\n{src / 'a.tif'},x,0.5\n{src / 'b.tif'},y,\n")
    store = tmp_path / "s.h5"
    code, out, err = cli_here(capsys, "segment", manifest, "--out", store, *WS, "--scale", "pixel:1.0", "--pixel-size", "0.25",
                              "--crop", "32")
    assert code == 0, err
    s = Store(store)
    scale = dict(zip(s.column("source"), s.column("scale")))
    assert scale[str(src / "a.tif")] == pytest.approx(0.5)   # the manifest's 0.5 µm/px to 1.0 µm/px
    assert scale[str(src / "b.tif")] == pytest.approx(0.25)  # no manifest value: --pixel-size
    code, _, err = cli_here(capsys, "segment", manifest, "--out", tmp_path / "t.h5", *WS, "--model", "cpsam")
    assert code == 2 and "--model applies to --backend cellpose" in err
