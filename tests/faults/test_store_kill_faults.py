"""Store faults: SIGKILL at every step of a commit, in embed and in segment; the next run ends identical."""

from __future__ import annotations

import signal

import h5py
import numpy as np
import pytest

from conftest import ROOT, run_cli
from embedkit.store import Store

from .stores import ARGS, KEY, copy_store, every_array


# shards #1 and #2 are the run's checkpoints, #3 the merged shard its commit writes before naming it
@pytest.mark.parametrize("point", ["kill@shard:written#2", "kill@shard:renamed#1", "kill@shard:written#3", "kill@commit:written",
                                   "kill@commit:renamed"])
def test_sigkill_during_a_commit_resumes_to_identical_vectors(point, reference, eight_cells, tmp_path):
    store = copy_store(reference, tmp_path)
    proc = run_cli("embed", eight_cells, "--store", store, "--key", "k", *ARGS, check=False, env={"EMBEDKIT_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with h5py.File(store, "r") as f:  # plain h5py reads it right after the kill
        assert f["items/id"].shape[0] == 8
        assert np.array_equal(f[f"embeddings/{KEY}/vectors"][()], Store(reference).vectors(KEY))
    keys = Store(store).keys
    assert keys == [KEY, "k"] if point.endswith("commit:renamed") else keys == [KEY]
    run_cli("embed", eight_cells, "--store", store, "--key", "k", *ARGS)
    s = Store(store)
    assert s.done("k").all()
    assert np.array_equal(s.vectors("k"), Store(reference).vectors(KEY))  # bit-identical to the uninterrupted run
    assert not list(tmp_path.rglob(".*.tmp-*")) and not list(tmp_path.rglob("run.json"))


def test_segment_killed_in_a_commit_resumes_to_the_identical_store(tmp_path):
    import tifffile

    img = tifffile.imread(ROOT / "tests" / "data" / "stardist" / "img2d.tif")
    src = tmp_path / "fields"
    src.mkdir()
    for r in range(2):
        for c in range(2):
            tifffile.imwrite(src / f"t{r}{c}.tif", img[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128])
    args = ("--backend", "watershed", "--quiet", "--checkpoint-fields", "1", "--crop", "32")
    clean = tmp_path / "clean.h5"
    run_cli("segment", src, "--out", clean, *args)
    for point in ("kill@shard:written#3", "kill@commit:written"):
        store = tmp_path / point.replace(":", "_").replace("@", "_").replace("#", "_") / "s.h5"
        proc = run_cli("segment", src, "--out", store, *args, check=False, env={"EMBEDKIT_FAULT": point})
        assert proc.returncode == -signal.SIGKILL and not store.exists()
        run_cli("segment", src, "--out", store, *args)
        a, b = every_array(clean), every_array(store)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert not list(store.parent.rglob(".*.tmp-*"))
