"""``--engine ray`` against the local engine on real data: the same vectors (<= 1e-5), the same items in the same
order, a worker killed mid-write retried by Ray, a driver killed with SIGKILL resumed from its shards, and
segment / patches giving the same store.

One local Ray (2 CPUs, no dashboard, a short temp dir) serves the whole module: Ray starts slowly.
"""

import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import MITOCHECK, run_cli
from embedkit.embed import embed
from embedkit.encoders import create_encoder
from embedkit.images import Conversion
from embedkit.sources import discover
from embedkit.store import Run, Store, folder_of
from embedkit.store.tools import check

ray = pytest.importorskip("ray")

from embedkit.engines.ray_engine import RayEngine, plan_pool  # noqa: E402

#: Small enough to be quick, large enough for three shard blocks of 16 (batches as in the local engine).
N_CELLS, SIZE, BATCH = 40, 96, 16
CLASSES = ("Anaphase", "Apoptosis", "Interphase", "Metaphase")


@pytest.fixture(scope="module", autouse=True)
def local_threads():
    """The local engine on every core, as it runs by default. Its last, partial batch is not padded, and with one
    thread the kernels chosen for it round differently (~1e-5) from the full batches the Ray replicas run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="ek-ray-", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """40 MitoCheck cells from four classes, as class folders."""
    root = tmp_path_factory.mktemp("cells")
    per = N_CELLS // len(CLASSES)
    for c in CLASSES:
        (root / c).mkdir()
        for f in sorted((MITOCHECK / c).glob("*.png"))[:per]:
            shutil.copy(f, root / c / f.name)
    return root


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("efficientnet_lite0", image_size=SIZE)


@pytest.fixture(scope="module")
def local(cells, encoder, tmp_path_factory) -> Store:
    path = tmp_path_factory.mktemp("local") / "cells.h5"
    embed(discover(cells, group_by="mitocheck"), path, encoder, batch_size=BATCH, checkpoint_rows=BATCH, progress=False)
    return Store(path)


def assert_same_embedding(store: Store, local: Store) -> None:
    assert list(store.ids) == list(local.ids)  # every item once, in the local order
    assert list(store.groups) == list(local.groups) and list(store.labels) == list(local.labels)
    v, ref = store.vectors("efficientnet_lite0"), local.vectors("efficientnet_lite0")
    assert np.isfinite(v).all() and store.done("efficientnet_lite0").all()
    assert np.abs(v - ref).max() <= 1e-5
    a, b = store.config("efficientnet_lite0"), local.config("efficientnet_lite0")
    checks = a["selftest"].pop("determinism"), b["selftest"].pop("determinism")  # re-embedding errors differ run to run
    assert all(c["passed"] and c["items"] > 0 for c in checks)
    assert a == b  # same provenance


def test_pool_plan_follows_the_cluster():
    assert plan_pool({"CPU": 16, "GPU": 4}).replicas == 4 and plan_pool({"CPU": 16, "GPU": 4}).device == "cuda"
    cpu = plan_pool({"CPU": 16})
    assert (cpu.replicas, cpu.threads, cpu.device) == (14, 1, "cpu") and cpu.replicas * cpu.actor_cpus <= 16 - 1.6 + 1e-9
    two = plan_pool({"CPU": 2}, replicas=2)
    assert two.replicas * two.actor_cpus <= 2 - 0.5 and two.threads == 1
    from embedkit.errors import EmbedkitError

    with pytest.raises(EmbedkitError, match="no GPUs"):
        plan_pool({"CPU": 2}, "cuda")
    with pytest.raises(EmbedkitError, match="4 GPU"):
        plan_pool({"CPU": 8, "GPU": 4}, replicas=5)


def test_ray_equals_local_and_survives_a_killed_worker(cluster, cells, encoder, local, tmp_path, monkeypatch):
    # every worker process is SIGKILLed when it finishes writing its second shard (before the rename):
    # three blocks on two workers, so at least one dies and Ray retries its block on a fresh one
    monkeypatch.setenv("EMBEDKIT_WORKER_FAULT", "kill@shard:written#2")
    path = tmp_path / "cells.h5"
    res = embed(discover(cells, group_by="mitocheck"), path, encoder, batch_size=BATCH, checkpoint_rows=BATCH,
                progress=False, engine=RayEngine(replicas=2))
    assert res.n_embedded == N_CELLS and res.n_resumed == 0
    leftovers = [p.name for d in folder_of(path).iterdir() for p in d.iterdir() if ".tmp-" in p.name]
    assert leftovers, "no worker was killed mid-write"
    assert_same_embedding(Store(path), local)
    rep = check(path)
    assert rep.n_shards == 1 and not rep.problems and not rep.strays  # the commit merged the three blocks' shards


@pytest.mark.timeout(1200)  # several interpreters start; slow on a loaded machine
def test_a_killed_driver_resumes_from_the_shards_written(cluster, cells, local, tmp_path):
    path = tmp_path / "cells.h5"
    args = ("embed", cells, "--store", path, "--group-by", "mitocheck", "--image-size", SIZE, "--batch-size", BATCH,
            "--checkpoint-rows", BATCH, "--engine", "ray", "--address", cluster, "--replicas", "2", "--quiet")
    # the driver SIGKILLs itself as soon as the first block's shard is reported written
    killed = run_cli(*args, check=False, env={"EMBEDKIT_FAULT": "kill@ray:block-done#1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    runs = [d for d in folder_of(path).iterdir() if d.is_dir()]
    written = [p for d in runs for p in d.glob("*.h5")]
    assert written and "efficientnet_lite0" not in Store(path).keys
    before = [Run.read(p, "rows", "vectors") for p in written]
    done = run_cli(*args)
    n_done = int(done.stdout.split("; ")[1].split()[0])
    assert n_done >= BATCH and f"embedded {N_CELLS - n_done} images" in done.stdout
    assert_same_embedding(Store(path), local)
    for shard in before:  # committed as they were written before the kill, not recomputed
        assert np.array_equal(Store(path).vectors("efficientnet_lite0", shard["rows"]), shard["vectors"].astype(np.float32))
    assert not any(p.exists() for p in written)  # merged into the key's shard at commit


def test_bad_address_is_one_line(cells, tmp_path):
    proc = run_cli("embed", cells, "--store", tmp_path / "s.h5", "--engine", "ray", "--address", "127.0.0.1:1",
                   check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not reach a Ray cluster" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s.h5").exists()


def store_arrays(path: Path) -> dict:
    """Every item column and the pixels of a store, as plain arrays."""
    s = Store(path)
    out = {c: s.column(c) for c in s.columns()}
    out["pixels"] = s.pixels(slice(None))
    return out


def assert_same_store(a: Path, b: Path) -> None:
    x, y = store_arrays(a), store_arrays(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert np.array_equal(x[name], y[name], equal_nan=x[name].dtype.kind == "f"), name
    assert Store(a).segment_record()["fields"] == Store(b).segment_record()["fields"]


def test_segment_and_patches_on_ray_equal_local(cluster, tmp_path):
    from embedkit.segment.backends import create_segmenter
    from embedkit.segment.crops import CropParams
    from embedkit.segment.patch_pipeline import PairedChannel, extract_patches
    from embedkit.segment.pipeline import segment_fields
    from test_patches import KINDS, TILE, livedead_field
    from test_segment import tiles

    fields = tiles(tmp_path / "fields", 128, {f"A/t{r}{c}.tif": (r, c) for r in range(4) for c in range(2)})
    src = discover(fields)
    seg = create_segmenter("watershed")
    stores = {}
    for name, engine in (("local", None), ("ray", RayEngine(replicas=1))):
        stores[name] = tmp_path / f"cells-{name}.h5"
        res = segment_fields(src, stores[name], seg, CropParams(size=32), labels_dir=str(tmp_path / f"labels-{name}"),
                             progress=False, engine=engine)
        assert res.n_cells > 20 and not res.failed
    assert_same_store(stores["local"], stores["ray"])
    labels = sorted(p.name for p in (tmp_path / "labels-ray").rglob("*.tif"))
    assert labels == sorted(p.name for p in (tmp_path / "labels-local").rglob("*.tif")) and len(labels) == 8

    rng = np.random.default_rng(0)
    for i in range(3):
        livedead_field(tmp_path / "ld" / f"well{i}.tif", rng, list(np.roll(KINDS, 5 * i)))
    src = discover(tmp_path / "ld")
    for name, engine in (("local", None), ("ray", RayEngine(replicas=1))):
        stores[name] = tmp_path / f"patches-{name}.h5"
        extract_patches(src, stores[name], size=TILE, stride=TILE, conv=Conversion(channels=(0, 0, 0)),
                        paired=PairedChannel(channel=1), thresholds_out=str(tmp_path / f"gmm-{name}.json"),
                        progress=False, engine=engine)
    assert_same_store(stores["local"], stores["ray"])
    assert len(Store(stores["ray"])) >= 24


def test_layers_on_ray_equal_local(cluster, cells, tmp_path):
    """--layers under --engine ray: the same keys and vectors as the local engine (one forward pass per block)."""
    keys = {}
    for name, engine in (("local", None), ("ray", RayEngine(replicas=2))):
        enc = create_encoder("efficientnet_lite0", image_size=SIZE)
        res = embed(discover(cells, group_by="mitocheck"), tmp_path / f"{name}.h5", enc, batch_size=BATCH,
                    checkpoint_rows=BATCH, progress=False, engine=engine, layers="-1,-3")
        keys[name] = res.keys
    assert keys["ray"] == keys["local"] == ["efficientnet_lite0", "efficientnet_lite0@stage-4", "efficientnet_lite0@stage-2"]
    ray_store, local_store = Store(tmp_path / "ray.h5"), Store(tmp_path / "local.h5")
    for k in keys["ray"]:
        assert ray_store.done(k).all() and np.abs(ray_store.vectors(k) - local_store.vectors(k)).max() <= 1e-5
