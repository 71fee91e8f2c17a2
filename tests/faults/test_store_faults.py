"""Store faults: key traversal, refused appends, two writers, broken store files, stale temp files, damaged shards,
and the check / pack / upgrade tools. Each refusal is one line, exit 2, and changes no byte. Crashes and full disks
during a commit: test_store_kill_faults.py and test_store_disk_faults.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import MITOCHECK, ROOT, invoke_cli, run_cli
from embedkit.errors import EmbedkitError
from embedkit.store import Store

from .stores import ARGS, KEY, copy_store, every_array, one_line_error, tree


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("key", ["..", "../../x", "/abs/x", "a/b", ".", "a..b", "sp ace", ""])
def test_unsafe_keys_are_refused_before_anything_is_touched(key, reference, eight_cells, tmp_path):
    store = copy_store(reference, tmp_path / "w")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    before, outside = tree(tmp_path / "w"), tree(tmp_path / "x")
    line = one_line_error(run_cli("embed", eight_cells, "--store", store, "--key", key, *ARGS, check=False))
    assert "--key" in line and "one name" in line
    assert tree(tmp_path / "w") == before and tree(tmp_path / "x") == outside


def test_library_and_runs_refuse_unsafe_keys(tmp_path):
    from embedkit.store import Run, validate_key

    for key in ("..", "../x", "/x", "a/b"):
        with pytest.raises(EmbedkitError, match="one name"):
            validate_key(key)
        with pytest.raises(EmbedkitError, match="one name"):
            Run(tmp_path / "s.h5", "embed", key)
    assert validate_key("lite0_128@v2+x-1.0") == "lite0_128@v2+x-1.0"


# --------------------------------------------------------------------------- refusals


def test_refused_embed_appends_nothing(reference, eight_cells, tmp_path):
    store = copy_store(reference, tmp_path / "w")
    more = tmp_path / "more"
    shutil.copytree(eight_cells, more)
    for f in sorted((MITOCHECK / "Prometaphase").glob("*.png"))[:2]:
        shutil.copy(f, more / "Anaphase" / f"new_{f.name}")
    before = tree(tmp_path / "w")
    line = one_line_error(run_cli("embed", more, "--store", store, *ARGS, "--image-size", "160", check=False))
    assert "different encoder configuration" in line
    assert tree(tmp_path / "w") == before and len(Store(store)) == 8


def test_a_second_writer_is_refused_before_the_model_loads(reference, eight_cells, tmp_path):
    store = copy_store(reference, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from embedkit.store import write_lock\n"
                               "with write_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)", str(store)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(tmp_path)
        # weights that do not exist: had the model been loaded first, the error would be about them
        line = one_line_error(run_cli("embed", eight_cells, "--store", store, "--weights", tmp_path / "none.pth", *ARGS,
                                      check=False))
        assert "being written by another embedkit process" in line
        assert tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_broken_store_files_fail_with_one_line(reference, tmp_path):
    cases = {}
    s1 = copy_store(reference, tmp_path / "a")
    with h5py.File(s1, "r+") as f:
        f.attrs["schema_version"] = "two"
    cases[s1] = "schema_version 'two' is not a whole number"
    s2 = copy_store(reference, tmp_path / "b")
    with h5py.File(s2, "r+") as f:
        del f[f"embeddings/{KEY}"].attrs["config"]
    cases[s2] = "has no 'config' attribute"
    s3 = tmp_path / "c" / "s.h5"
    s3.parent.mkdir()
    with h5py.File(s3, "w") as f:
        f.attrs["schema_version"] = 2
    cases[s3] = "without an /items group"
    for path, msg in cases.items():
        for cmd in (("info", path), ("export", path, "--out", tmp_path / "x.h5ad", "--format", "h5ad")):
            assert msg in one_line_error(run_cli(*cmd, check=False))


def test_stale_temp_files_of_dead_processes_are_swept(reference, eight_cells, tmp_path):
    store = copy_store(reference, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    run_dir = next(Path(f"{store}.shards").iterdir())
    leftovers = [tmp_path / f".s.h5.tmp-{pid}", run_dir / f".w0-r000000000-000000004.h5.tmp-{pid}"]
    for p in leftovers:
        p.write_bytes(b"half written")
    invoke_cli("embed", eight_cells, "--store", store, "--key", "k", *ARGS)
    assert not any(p.exists() for p in leftovers)


# --------------------------------------------------------------------------- damaged shards and the tools


def test_deleted_or_truncated_shard_is_named_by_check_and_by_readers(reference, tmp_path):
    store = copy_store(reference, tmp_path)
    assert "1 shard, all present" in invoke_cli("store", "check", store).stdout
    shards = sorted(Path(f"{store}.shards").glob("*/*.h5"))
    assert len(shards) == 1  # the run's two checkpoint shards, merged at commit
    rel = f"{shards[0].parent.name}/{shards[0].name}"

    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    line = one_line_error(run_cli("store", "check", store, check=False))
    assert rel in line and "truncated" in line
    with pytest.raises(EmbedkitError, match=f"shard .*{rel} is truncated"):
        Store(store).vectors(KEY)
    assert rel in one_line_error(run_cli("export", store, "--format", "npy", "--out", tmp_path / "x.npy", check=False))

    shards[0].unlink()
    assert rel in one_line_error(run_cli("store", "check", store, check=False))
    with pytest.raises(EmbedkitError, match=f"shard .*{rel} is missing"):
        Store(store).vectors(KEY)

    shards[0].write_bytes(data[:100] + bytes(255 - b for b in data[100:200]) + data[200:])  # same size, other bytes
    line = one_line_error(run_cli("store", "check", store, check=False))
    assert rel in line and ("checksum" in line or "cannot" in line)


def test_pack_equals_the_store_array_by_array(reference, tmp_path):
    packed = tmp_path / "packed.h5"
    invoke_cli("store", "pack", reference, packed)
    a, b = every_array(reference), every_array(packed)
    assert a.keys() == b.keys() and f"embeddings/{KEY}/vectors" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with h5py.File(packed, "r") as f:
        assert not f[f"embeddings/{KEY}/vectors"].is_virtual and "shards" not in f
    moved = tmp_path / "elsewhere" / "p.h5"
    moved.parent.mkdir()
    shutil.move(packed, moved)  # one self-contained file
    assert np.array_equal(Store(moved).vectors(KEY), Store(reference).vectors(KEY))


def test_a_moved_store_reads_from_any_working_directory(reference, tmp_path):
    moved = copy_store(reference, tmp_path / "deep" / "er")
    code = ("import sys, h5py, numpy as np\n"
            "with h5py.File(sys.argv[1], 'r') as f: np.save(sys.argv[2], f['embeddings/efficientnet_lite0/vectors'][()])")
    subprocess.run([sys.executable, "-c", code, str(moved), str(tmp_path / "v.npy")], check=True, cwd="/")
    assert np.array_equal(np.load(tmp_path / "v.npy"), Store(reference).vectors(KEY))


def test_schema1_store_is_read_refused_for_writes_and_upgraded(reference, eight_cells, tmp_path):
    old = tmp_path / "old.h5"  # today's single-file layout: every array inside the file
    with h5py.File(reference, "r") as src, h5py.File(old, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        dst.attrs["schema_version"] = 1
        src.copy("items", dst)
        g = dst.create_group(f"embeddings/{KEY}")
        for k, v in src[f"embeddings/{KEY}"].attrs.items():
            g.attrs[k] = v
        g["vectors"] = src[f"embeddings/{KEY}/vectors"][()]
        g["done"] = src[f"embeddings/{KEY}/done"][()]
        dst["pixels"] = np.arange(8 * 4 * 4 * 3, dtype=np.uint8).reshape(8, 4, 4, 3)
    expected = every_array(old)
    assert np.array_equal(Store(old).vectors(KEY), Store(reference).vectors(KEY))  # schema 1 reads
    before = tree(tmp_path)
    line = one_line_error(run_cli("embed", eight_cells, "--store", old, "--key", "k", *ARGS, check=False))
    assert f"embedkit store upgrade {old}" in line
    assert tree(tmp_path) == before
    assert "moved" in invoke_cli("store", "upgrade", old).stdout
    with h5py.File(old, "r") as f:
        assert f.attrs["schema_version"] == 2 and f["pixels"].is_virtual and f[f"embeddings/{KEY}/vectors"].is_virtual
    got = every_array(old)
    for name in expected:
        np.testing.assert_array_equal(expected[name], got[name], err_msg=name)
    assert "all present" in invoke_cli("store", "check", old).stdout
    invoke_cli("embed", eight_cells, "--store", old, "--key", "k", *ARGS)
    assert np.array_equal(Store(old).vectors("k"), Store(reference).vectors(KEY))
