"""Store faults: key traversal, crashes and full disks at every step of a commit, damaged shards, two writers,
broken store files, and the check / pack / upgrade tools. Each refusal is one line, exit 2, and changes no byte."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import MITOCHECK, ROOT, run_cli
from embedkit.errors import EmbedkitError
from embedkit.store import Store

KEY = "efficientnet_lite0"
ARGS = ("--batch-size", "4", "--checkpoint-rows", "4", "--quiet")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (lock files excluded: taking a lock is not a write)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("embedkit: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def copy_store(src: Path, folder: Path) -> Path:
    """Copy a store and its shards folder (under its own name) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copy(src, dst)
    if Path(f"{src}.shards").is_dir():
        shutil.copytree(f"{src}.shards", f"{dst}.shards")
    return dst


def every_array(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a store read with plain h5py (the shard index left out)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.startswith("shards"):
                out[name] = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]
        f.visititems(visit)
    return out


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """A folder of 8 real cells from two classes."""
    folder = tmp_path_factory.mktemp("cells")
    for cls in ("Anaphase", "Metaphase"):
        (folder / cls).mkdir()
        for f in sorted((MITOCHECK / cls).glob("*.png"))[:4]:
            shutil.copy(f, folder / cls / f.name)
    return folder


@pytest.fixture(scope="module")
def reference(cells, tmp_path_factory) -> Path:
    """The 8 cells embedded by an uninterrupted run (two checkpoint shards, merged into one at commit)."""
    store = tmp_path_factory.mktemp("ref") / "s.h5"
    run_cli("embed", cells, "--store", store, *ARGS)
    return store


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("key", ["..", "../../x", "/abs/x", "a/b", ".", "a..b", "sp ace", ""])
def test_unsafe_keys_are_refused_before_anything_is_touched(key, reference, cells, tmp_path):
    store = copy_store(reference, tmp_path / "w")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    before, outside = tree(tmp_path / "w"), tree(tmp_path / "x")
    line = one_line_error(run_cli("embed", cells, "--store", store, "--key", key, *ARGS, check=False))
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


# --------------------------------------------------------------------------- crashes and full disks


# shards #1 and #2 are the run's checkpoints, #3 the merged shard its commit writes before naming it
@pytest.mark.parametrize("point", ["kill@shard:written#2", "kill@shard:renamed#1", "kill@shard:written#3", "kill@commit:written",
                                   "kill@commit:renamed"])
def test_sigkill_during_a_commit_resumes_to_identical_vectors(point, reference, cells, tmp_path):
    store = copy_store(reference, tmp_path)
    proc = run_cli("embed", cells, "--store", store, "--key", "k", *ARGS, check=False, env={"EMBEDKIT_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with h5py.File(store, "r") as f:  # plain h5py reads it right after the kill
        assert f["items/id"].shape[0] == 8
        assert np.array_equal(f[f"embeddings/{KEY}/vectors"][()], Store(reference).vectors(KEY))
    keys = Store(store).keys
    assert keys == [KEY, "k"] if point.endswith("commit:renamed") else keys == [KEY]
    run_cli("embed", cells, "--store", store, "--key", "k", *ARGS)
    s = Store(store)
    assert s.done("k").all()
    assert np.array_equal(s.vectors("k"), Store(reference).vectors(KEY))  # bit-identical to the uninterrupted run
    assert not list(tmp_path.rglob(".*.tmp-*")) and not list(tmp_path.rglob("run.json"))


@pytest.mark.parametrize("fault", ["enospc@commit:written", "truncate@commit:written", "enospc@shard:written#2",
                                   "truncate@shard:written#1", "enospc@shard:written#3"])
def test_full_disk_or_silent_write_failure_is_never_success(fault, reference, cells, tmp_path):
    store = copy_store(reference, tmp_path)
    before = tree(tmp_path)
    proc = run_cli("embed", cells, "--store", store, "--key", "k", *ARGS, check=False, env={"EMBEDKIT_FAULT": fault})
    line = one_line_error(proc)
    assert "disk full" in line and "nothing was lost" in line and "re-run" in line
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that existed changed
    assert all("/embed-k-" in k for k in set(after) - set(before))  # only the run's verified shards were added
    assert not list(tmp_path.rglob(".*.tmp-*"))  # no temp file is left
    assert Store(store).keys == [KEY]
    run_cli("embed", cells, "--store", store, "--key", "k", *ARGS)
    assert np.array_equal(Store(store).vectors("k"), Store(reference).vectors(KEY))


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_real_file_size_limit_fails_cleanly_and_resumes(reference, cells, tmp_path):
    store = copy_store(reference, tmp_path)
    before = tree(tmp_path)
    limit = 8192  # the run's state fits, a vector shard (4 x 1280 floats) does not
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # --workers 0: decoding workers pass batches through shared-memory files, which the limit would also cut
    proc = subprocess.run([sys.executable, "-m", "embedkit.cli", "embed", str(cells), "--store", str(store), "--key", "k", *ARGS,
                           "--workers", "0"],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), preexec_fn=_limit_file_size(limit), timeout=600)
    line = one_line_error(proc)
    assert "disk full while writing" in line and "nothing was lost" in line
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before
    assert not list(tmp_path.rglob(".*.tmp-*"))
    run_cli("embed", cells, "--store", store, "--key", "k", *ARGS)
    assert np.array_equal(Store(store).vectors("k"), Store(reference).vectors(KEY))


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


# --------------------------------------------------------------------------- refusals


def test_refused_embed_appends_nothing(reference, cells, tmp_path):
    store = copy_store(reference, tmp_path / "w")
    more = tmp_path / "more"
    shutil.copytree(cells, more)
    for f in sorted((MITOCHECK / "Prometaphase").glob("*.png"))[:2]:
        shutil.copy(f, more / "Anaphase" / f"new_{f.name}")
    before = tree(tmp_path / "w")
    line = one_line_error(run_cli("embed", more, "--store", store, "--image-size", "160", *ARGS, check=False))
    assert "different encoder configuration" in line
    assert tree(tmp_path / "w") == before and len(Store(store)) == 8


def test_a_second_writer_is_refused_before_the_model_loads(reference, cells, tmp_path):
    store = copy_store(reference, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from embedkit.store import write_lock\n"
                               "with write_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)", str(store)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(tmp_path)
        # weights that do not exist: had the model been loaded first, the error would be about them
        line = one_line_error(run_cli("embed", cells, "--store", store, "--weights", tmp_path / "none.pth", *ARGS, check=False))
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


def test_stale_temp_files_of_dead_processes_are_swept(reference, cells, tmp_path):
    store = copy_store(reference, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    run_dir = next(Path(f"{store}.shards").iterdir())
    leftovers = [tmp_path / f".s.h5.tmp-{pid}", run_dir / f".w0-r000000000-000000004.h5.tmp-{pid}"]
    for p in leftovers:
        p.write_bytes(b"half written")
    run_cli("embed", cells, "--store", store, "--key", "k", *ARGS)
    assert not any(p.exists() for p in leftovers)


# --------------------------------------------------------------------------- damaged shards and the tools


def test_deleted_or_truncated_shard_is_named_by_check_and_by_readers(reference, tmp_path):
    store = copy_store(reference, tmp_path)
    assert "1 shard, all present" in run_cli("store", "check", store).stdout
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
    run_cli("store", "pack", reference, packed)
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


def test_schema1_store_is_read_refused_for_writes_and_upgraded(reference, cells, tmp_path):
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
    line = one_line_error(run_cli("embed", cells, "--store", old, "--key", "k", *ARGS, check=False))
    assert f"embedkit store upgrade {old}" in line
    assert tree(tmp_path) == before
    assert "moved" in run_cli("store", "upgrade", old).stdout
    with h5py.File(old, "r") as f:
        assert f.attrs["schema_version"] == 2 and f["pixels"].is_virtual and f[f"embeddings/{KEY}/vectors"].is_virtual
    got = every_array(old)
    for name in expected:
        np.testing.assert_array_equal(expected[name], got[name], err_msg=name)
    assert "all present" in run_cli("store", "check", old).stdout
    run_cli("embed", cells, "--store", old, "--key", "k", *ARGS)
    assert np.array_equal(Store(old).vectors("k"), Store(reference).vectors(KEY))
