"""The store: atomic transactions, schema checks, appends, key configuration checks and the journal."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, invoke_cli
from embedkit import store as st
from embedkit.errors import EmbedkitError
from embedkit.sources import Item

CFG = {"encoder": "e", "weights_fingerprint": "w1", "preprocess": {"size": 8}, "pooling": None,
       "conversion": {}, "dtype": "float32", "dim": 4}


def _items(n, start=0):
    return [Item(id=f"i{k}", path=f"c/i{k}.png", label="a" if k % 2 else "b", group=f"g{k // 2}") for k in range(start, start + n)]


def test_transaction_is_atomic(tmp_path):
    path = tmp_path / "s.h5"
    with st.transaction(path) as f:
        st.write_items(f, _items(4), str(tmp_path))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with st.transaction(path) as f:
            st.write_items(f, _items(3, start=4), str(tmp_path))
            raise RuntimeError("crash in the middle")
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".s.h5.tmp-*"))
    s = st.Store(path)
    assert len(s) == 4 and list(s.labels) == ["b", "a", "b", "a"]
    with h5py.File(path, "r") as f:  # plain h5py reads it
        assert f.attrs["schema_version"] == st.SCHEMA_VERSION


def test_appending_items_marks_new_rows_not_done(tmp_path):
    path = tmp_path / "s.h5"
    with st.transaction(path) as f:
        st.write_items(f, _items(4), str(tmp_path))
        g = st.ensure_embedding(f, "e", 4, "float32", CFG)
        g["vectors"][:] = np.arange(16, dtype=np.float32).reshape(4, 4)
        g["done"][:] = True
    with st.transaction(path) as f:
        rows = st.write_items(f, _items(2, start=4), str(tmp_path))
    assert list(rows) == [4, 5]
    s = st.Store(path)
    assert list(s.done("e")) == [True] * 4 + [False] * 2
    v = s.vectors("e")
    assert np.isnan(v[4:]).all() and v[3, 3] == 15
    np.testing.assert_array_equal(s.vectors("e", np.array([3, 0])), v[[3, 0]])


def test_key_with_other_configuration_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    with st.transaction(path) as f:
        st.write_items(f, _items(2), str(tmp_path))
        st.ensure_embedding(f, "e", 4, "float32", CFG)
    other = {**CFG, "preprocess": {"size": 16}}
    with pytest.raises(EmbedkitError, match="different encoder configuration.*preprocess"):
        with st.transaction(path) as f:
            st.ensure_embedding(f, "e", 4, "float32", other)
    # library versions are provenance only and do not block
    with st.transaction(path) as f:
        st.ensure_embedding(f, "e", 4, "float32", {**CFG, "versions": {"torch": "x"}})


def test_foreign_and_missing_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(EmbedkitError, match="not an embedkit store"):
        st.Store(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(EmbedkitError, match="not a readable HDF5"):
        st.Store(tmp_path / "junk.h5")
    with pytest.raises(EmbedkitError, match="no such store"):
        st.Store(tmp_path / "none.h5")


def test_run_pins_configuration_and_lock_excludes_writers(tmp_path):
    run = st.Run(tmp_path / "s.h5", "embed", "e")
    assert run.start(CFG, "aaa") is False
    run.write(st.Run.shard_name("w0", "r", 0, 2), {"rows": np.arange(2), "vectors": np.ones((2, 4), np.float32)})
    again = st.Run(tmp_path / "s.h5", "embed", "e")
    assert again.start(CFG, "aaa") is True and again.dir == run.dir  # same config resumes
    assert [p.name for p in again.shards()] == ["w0-r000000000-000000002.h5"]
    assert np.array_equal(st.Run.read(again.shards()[0], "vectors")["vectors"], np.ones((2, 4), np.float32))
    with pytest.raises(EmbedkitError, match="interrupted run .* another configuration"):
        st.Run(tmp_path / "s.h5", "embed", "e").start({**CFG, "pooling": "mean"}, "bbb")
    assert json.loads((run.dir / "run.json").read_text())["config_fingerprint"] == "aaa"
    with st.write_lock(tmp_path / "s.h5"):
        with st.write_lock(tmp_path / "s.h5"):  # re-entrant in one process (command, then library)
            pass
        proc = subprocess.run([sys.executable, "-c", "import sys; from embedkit.store import write_lock\n"
                               "with write_lock(sys.argv[1]): pass", str(tmp_path / "s.h5")],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode != 0 and "being written by another" in proc.stderr


def test_sharded_key_reads_like_one_array_with_gaps_and_second_runs(tmp_path):
    from embedkit.store.writing import append_items, commit_embedding

    path = tmp_path / "s.h5"
    append_items(path, _items(10), str(tmp_path))
    x = np.arange(40, dtype=np.float32).reshape(10, 4)

    def run_once(rows, bad):
        run = st.Run(path, "embed", "e")
        run.start(CFG, "aaa")
        for a in range(0, len(rows), 3):  # shards of three rows, as checkpoints would cut them
            r = np.array(rows[a:a + 3])
            run.write(st.Run.shard_name("w0", "r", int(r.min()), int(r.max()) + 1),
                      {"rows": r, "ids": np.array([f"i{k}" for k in r], dtype=object), "vectors": x[r],
                       "bad": np.array(["unreadable" if k in bad else "" for k in r], dtype=object),
                       "paths": np.array([f"c/i{k}.png" for k in r], dtype=object)})
        return commit_embedding(path, run, "e", 4, "float32", CFG, [])

    assert run_once([0, 1, 2, 3, 4, 5, 6, 7], bad={2, 5}) == 6
    s = st.Store(path)
    assert list(s.done("e")) == [True, True, False, True, True, False, True, True, False, False]
    v = s.vectors("e")
    assert np.isnan(v[[2, 5, 8, 9]]).all() and np.array_equal(v[s.done("e")], x[s.done("e")])
    with h5py.File(path, "r") as f:  # plain h5py sees the same array through the virtual dataset
        np.testing.assert_array_equal(f["embeddings/e/vectors"][()], v)
    assert run_once([2, 5, 8, 9], bad=set()) == 4  # a second run fills the gaps from its own shards
    s = st.Store(path)
    assert s.done("e").all() and np.array_equal(s.vectors("e"), x)
    rows = np.array([9, 0, 5, 5, 2])
    np.testing.assert_array_equal(s.vectors("e", rows), x[rows])
    np.testing.assert_array_equal(np.concatenate([b for _, b in s.iter_vectors("e", batch=4)]), x)
    # each run's checkpoint shards were merged into one shard at its commit, then deleted
    assert sorted(p.name for p in st.folder_of(path).glob("*/*.h5")) == ["merged-r000000000-000000008.h5",
                                                                       "merged-r000000002-000000010.h5"]
    assert not list(st.folder_of(path).glob("*/run.json"))


def test_a_commit_merges_checkpoints_into_big_shards_in_row_order(tmp_path, monkeypatch):
    from embedkit.store import writing

    path = tmp_path / "s.h5"
    writing.append_items(path, _items(10), str(tmp_path))
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    monkeypatch.setattr(writing, "BIG_SHARD_BYTES", 4 * 4 * 4)  # four rows of four floats per merged shard
    run = st.Run(path, "embed", "e")
    run.start(CFG, "aaa")
    for rows in ([7, 8, 9], [0, 1, 2], [3, 4, 5, 6]):  # written out of order, as parallel workers would
        r = np.array(rows)
        run.write(st.Run.shard_name(f"w{rows[0]}", "r", int(r.min()), int(r.max()) + 1),
                  {"rows": r, "ids": np.array([f"i{k}" for k in r], dtype=object), "vectors": x[r],
                   "bad": np.array([""] * len(r), dtype=object), "paths": np.array([f"c/i{k}.png" for k in r], dtype=object)})
    assert writing.commit_embedding(path, run, "e", 4, "float32", CFG, []) == 10
    names = sorted(p.name for p in st.folder_of(path).glob("*/*.h5"))
    assert names == ["merged-r000000000-000000004.h5", "merged-r000000004-000000008.h5", "merged-r000000008-000000010.h5"]
    with st.Store(path) as s:
        assert np.array_equal(s.vectors("e"), x)
        reader = s._key_reader("e")
        assert len(reader.maps) == 3  # one contiguous run of rows per merged shard
    assert "3 shards, all present" in invoke_cli("store", "check", path).stdout
