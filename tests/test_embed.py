"""`embedkit embed` end to end on real cells: stores, resume after SIGKILL, bad inputs, keys and export."""

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import ROOT, invoke_cli, run_cli
from embedkit.store import Store


def _error_line(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("embedkit: error")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _tree_bytes(folder) -> dict:
    """Every file under ``folder`` (the store, its shards, reports) with its bytes; the lock file excluded."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def _manifest(path, files, labels=None):
    rows = ["path,label,group"] + [f"{f},{(labels or {}).get(str(f), f.parent.name)},{f.name[4:11]}" for f in files]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def subset(mitocheck_dir):
    """48 real cells from 8 classes."""
    classes = sorted(p for p in mitocheck_dir.iterdir() if p.is_dir())[:8]
    return [f for c in classes for f in sorted(c.glob("*.png"))[:6]]


def test_sample_store_has_items_groups_and_provenance(lite0_store_ro):
    s = Store(lite0_store_ro)
    assert len(s) == 320 and len(set(s.groups)) == 75 and len(set(s.labels)) == 16
    assert sorted(s.keys) == ["efficientnet_lite0", "efficientnet_lite0@random-init", "handcrafted"]  # embedded with --baselines
    cfg = s.config("efficientnet_lite0")
    assert cfg["selftest"]["passed"] and cfg["selftest"]["determinism"]["items"] == 4
    for field in ("encoder", "weights_fingerprint", "preprocess", "pooling", "conversion", "versions", "dim"):
        assert field in cfg
    assert cfg["preprocess"]["mean"] == [0.5, 0.5, 0.5] and cfg["dim"] == 1280
    v = s.vectors("efficientnet_lite0")
    assert v.shape == (320, 1280) and np.isfinite(v).all() and s.done("efficientnet_lite0").all()
    info = invoke_cli("info", lite0_store_ro).stdout
    assert "320/320 done" in info and "Interphase 20" in info


def test_augmented_copies_are_closer_than_other_cells(tmp_path, subset):
    """Rotations and flips of one cell must embed closer to it than other real cells do."""
    folder = tmp_path / "aug"
    folder.mkdir()
    for f in subset[::2]:
        im = np.array(Image.open(f))
        Image.fromarray(im).save(folder / f"orig_{f.name}")
        Image.fromarray(np.fliplr(np.rot90(im))).save(folder / f"aug_{f.name}")
    store = tmp_path / "a.h5"
    invoke_cli("embed", folder, "--store", store, "--quiet")
    s = Store(store)
    ids, v = list(s.ids), s.vectors("efficientnet_lite0")
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    origs = [i for i, x in enumerate(ids) if x.startswith("orig_")]
    hits, gaps = 0, []
    for i in origs:
        j = ids.index("aug_" + ids[i][5:])
        others = [k for k in origs if k != i]
        hits += sim[i, j] > sim[i, others].max()
        gaps.append(sim[i, j] - np.median(sim[i, others]))
    assert hits / len(origs) >= 0.8, f"augmented copy nearest for only {hits}/{len(origs)} cells"
    assert min(gaps) > 0


def test_resume_after_sigkill_gives_identical_vectors(tmp_path, subset):
    src = _manifest(tmp_path / "m.csv", subset)
    args = ["--batch-size", "8", "--checkpoint-rows", "8", "--quiet"]
    full = tmp_path / "full.h5"
    run_cli("embed", src, "--store", full, *args)

    killed = tmp_path / "killed.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", "embed", str(src), "--store", str(killed), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = tmp_path / "killed.h5.shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("embed-efficientnet_lite0-*/w0-r*.h5"))) < 2:
        assert proc.poll() is None, "run finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(shards.glob("embed-efficientnet_lite0-*/w0-r*.h5")))
    assert 2 <= done_before < 6
    with h5py.File(killed, "r") as f:  # readable by plain h5py right after the kill
        assert f["items"]["id"].shape[0] == len(subset)
    assert "efficientnet_lite0" not in Store(killed).keys  # nothing half-committed

    out = run_cli("embed", src, "--store", killed, *args).stdout
    assert f"{done_before * 8} were already done" in out
    assert not list(shards.glob("*/run.json"))  # committed: no pending run is left
    a, b = Store(full), Store(killed)
    assert list(a.ids) == list(b.ids)
    assert np.array_equal(a.vectors("efficientnet_lite0"), b.vectors("efficientnet_lite0"))
    assert b.done("efficientnet_lite0").all()


def test_bad_images_stop_cleanly_or_are_skipped_with_a_report(tmp_path, subset):
    folder = tmp_path / "cells"
    shutil.copytree(subset[0].parent, folder / subset[0].parent.name)
    (folder / "Bad").mkdir()
    (folder / "Bad" / "zero.png").write_bytes(b"")
    (folder / "Bad" / "text.png").write_text("this is not a PNG")
    tifffile.imwrite(folder / "Bad" / "five.tif", np.zeros((5, 32, 32), np.uint8))
    store = tmp_path / "s.h5"
    line = _error_line(run_cli("embed", folder, "--store", store, "--quiet", check=False))
    assert "Bad/" in line and "--skip-bad" in line
    assert not (store.exists() and "efficientnet_lite0" in Store(store).keys)

    proc = invoke_cli("embed", folder, "--store", store, "--quiet", "--skip-bad")
    assert "skipped 3 bad images" in proc.stderr
    s = Store(store)
    done = dict(zip(s.ids, s.done("efficientnet_lite0")))
    assert sum(done.values()) == len(done) - 3
    assert not done["Bad/zero.png"] and not done["Bad/five.tif"]
    report = (tmp_path / "s.efficientnet_lite0.skipped.csv").read_text()
    assert "empty" in report and "5 channels" in report and "not a readable image" in report

    # the channel count problem is solved by mapping channels explicitly (into a new key)
    tif_only = tmp_path / "tif"
    tif_only.mkdir()
    shutil.copy(folder / "Bad" / "five.tif", tif_only)
    invoke_cli("embed", tif_only, "--store", tmp_path / "t.h5", "--channels", "0,1,2", "--quiet")


def test_missing_manifest_file_and_key_mismatch(tmp_path, subset):
    src = _manifest(tmp_path / "m.csv", subset[:6] + [subset[0].parent / "does_not_exist.png"])
    store = tmp_path / "s.h5"
    line = _error_line(run_cli("embed", src, "--store", store, "--quiet", check=False))
    assert "does_not_exist.png" in line and "file not found" in line
    assert not store.exists()
    invoke_cli("embed", src, "--store", store, "--quiet", "--skip-bad")
    before = _tree_bytes(tmp_path)
    line = _error_line(run_cli("embed", src, "--store", store, "--image-size", "128", "--quiet", "--skip-bad", check=False))
    assert "different encoder configuration" in line and "--key" in line
    assert _tree_bytes(tmp_path) == before  # nothing already written is lost or changed, and nothing is added
    # another configuration goes under its own key, beside the first
    invoke_cli("embed", src, "--store", store, "--image-size", "128", "--key", "lite0_128", "--quiet", "--skip-bad")
    assert sorted(Store(store).keys) == ["efficientnet_lite0", "lite0_128"]


def test_other_encoders_go_through_embed(tmp_path, subset):
    """Tiny random DINOv2 / DINOv3 (transformers folders), a timm ViT and a timm CNN, each under its own key."""
    from test_encoders import _tiny_hf

    src = _manifest(tmp_path / "m.csv", subset[:10])
    store = tmp_path / "s.h5"
    _tiny_hf("dinov2_reg", tmp_path / "d2")
    _tiny_hf("dinov3", tmp_path / "d3")
    invoke_cli("embed", src, "--store", store, "--encoder", "dinov2_vits14_reg", "--weights", tmp_path / "d2",
               "--pooling", "cls+mean", "--image-size", "98", "--quiet")
    invoke_cli("embed", src, "--store", store, "--encoder", f"hf:{tmp_path / 'd3'}", "--key", "tiny_dinov3", "--quiet")
    invoke_cli("embed", src, "--store", store, "--encoder", "timm:vit_tiny_patch16_224", "--random-init",
               "--image-size", "64", "--quiet")
    invoke_cli("embed", src, "--store", store, "--encoder", "timm:resnet10t", "--random-init", "--image-size", "64",
               "--quiet")
    s = Store(store)
    dims = {k: s.vectors(k).shape[1] for k in s.keys}
    assert dims == {"dinov2_vits14_reg": 64, "tiny_dinov3": 32, "timm_vit_tiny_patch16_224": 192, "timm_resnet10t": 512}
    assert all(s.done(k).all() for k in s.keys)
    assert s.config("dinov2_vits14_reg")["num_prefix_tokens"] == 5


def test_export_h5ad_csv_npy(tmp_path, lite0_store):
    import anndata

    for fmt in ("h5ad", "csv", "npy"):
        invoke_cli("export", lite0_store, "--format", fmt, "--out", tmp_path / f"x.{fmt}")
    ad = anndata.read_h5ad(tmp_path / "x.h5ad")
    assert ad.shape == (320, 1280)
    assert set(ad.obs.columns) >= {"label", "group", "path"}
    assert ad.obs["label"].nunique() == 16
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), ad.X)
    assert (tmp_path / "x.csv").read_text().splitlines()[0].startswith("id,path,label,group")


def test_help_is_useful():
    out = invoke_cli("embed", "--help").stdout
    for word in ("class folders", "manifest", "--skip-bad", "--channels", "resume"):
        assert word in out
    assert "efficientnet_lite0" in invoke_cli("encoders").stdout
