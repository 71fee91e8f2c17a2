"""Bad files and full disks in probe, predict, proportions, finetune, explain and learned patch filters.

Every case runs the real command on real data, then asserts: exit status 2, one stderr line naming the
problem, no traceback, every file that existed before unchanged, and no temp file left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import MITOCHECK, ROOT, invoke_cli

# A finished one-epoch fine-tuning run costs seconds: one 32-image batch at 32 px, small val/test parts.
TINY_FT = ["--group-by", "mitocheck", "--test-size", "0.1", "--val-size", "0.1", "--samples-per-epoch", "32",
           "--model", "test_resnet", "--random-init", "--image-size", "32", "--epochs", "1", "--quiet"]
CELL = sorted((MITOCHECK / "Anaphase").glob("*.png"))[0]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fast on a shared, oversubscribed machine


def _cli(*args, fsize: int | None = None) -> subprocess.CompletedProcess:
    """``embedkit ARGS``; with ``fsize``, no file may grow past that many bytes (a full disk, without root)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}, cwd=str(ROOT), timeout=900,
                          preexec_fn=limit if fsize else None)


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file, less the empty advisory lock a writer takes on a store before it loads a model."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not (p.name.endswith(".lock") and p.stat().st_size == 0)}


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def assert_refused(proc: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit 2 with one clear stderr line holding every expected fragment, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    for text in expected:
        assert text in err, err


@pytest.fixture(scope="module")
def probe_dir(lite0_store_ro, tmp_path_factory) -> Path:
    """A saved logreg probe of the sample store (one split, no baselines: the cases only need a valid probe)."""
    out = tmp_path_factory.mktemp("faults-probe")
    invoke_cli("probe", lite0_store_ro, "--heads", "logreg", "--seeds", "1", "--n-boot", "100", "--no-baselines", "--out", out,
               "--quiet")
    return out / "logreg" / "probe"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-ft") / "ft"
    invoke_cli("finetune", MITOCHECK, "--out", out, *TINY_FT, env=ONE_THREAD)
    return out


# --------------------------------------------------------------------------- saved probes and NaN rows


@pytest.mark.parametrize("case, expected", [
    ("list", "expected a JSON object, found a list"),
    ("no classes", "'classes' must list"),
    ("classes not a list", "'classes' must list"),
    ("bad version", "is not a number"),
    ("not json", "unreadable probe"),
])
def test_predict_refuses_a_broken_probe_json(case, expected, probe_dir, lite0_store_ro, tmp_path):
    bad = tmp_path / "probe"
    shutil.copytree(probe_dir, bad)
    meta = json.loads((bad / "probe.json").read_text())
    text = {"list": json.dumps([meta]),
            "no classes": json.dumps({k: v for k, v in meta.items() if k != "classes"}),
            "classes not a list": json.dumps({**meta, "classes": "Anaphase"}),
            "bad version": json.dumps({**meta, "version": "one"}),
            "not json": "{" + json.dumps(meta)[:200]}[case]
    (bad / "probe.json").write_text(text)
    before = _snapshot(tmp_path)
    assert_refused(_cli("predict", lite0_store_ro, "--probe", bad, "--out", tmp_path / "pred.csv"), expected)
    assert _snapshot(tmp_path) == before and not (tmp_path / "pred.csv").exists()


def _nan_store(src: Path, dst: Path, rows: list[int]) -> list[str]:
    """A copy of ``src`` whose finished vectors at ``rows`` hold NaN; returns their ids."""
    from embedkit.store import Store
    from embedkit.store.tools import pack

    pack(src, dst)  # self-contained, so the vectors can be damaged in place
    key = Store(dst).resolve_key("efficientnet_lite0")
    assert Store(dst).done(key)[rows].all()
    with h5py.File(dst, "r+") as f:  # the damage: written straight through h5py, as any tool could
        ds = f["embeddings"][key]["vectors"]
        for r in rows:
            v = ds[r]
            v[3] = np.nan
            ds[r] = v
    return [str(i) for i in Store(dst).ids[rows]]


def test_probe_and_predict_refuse_nan_vectors_naming_the_rows(lite0_store_ro, probe_dir, tmp_path):
    store = tmp_path / "nan.h5"
    ids = _nan_store(lite0_store_ro, store, [5, 200])
    before = _snapshot(tmp_path)
    for args in (("probe", store, "--heads", "logreg", "--out", tmp_path / "out", "--quiet"),
                 ("predict", store, "--probe", probe_dir, "--out", tmp_path / "pred.csv"),
                 ("proportions", store, "--probe", probe_dir)):
        proc = _cli(*args)
        assert_refused(proc, "2 finished row(s)", "NaN", "row 5", ids[0], ids[1])
    assert _snapshot(tmp_path) == before  # nothing written: no results folder, no predictions
    assert not (tmp_path / "out" / "logreg").exists() and not (tmp_path / "pred.csv").exists()


# --------------------------------------------------------------------------- fine-tuning checkpoints


def test_explain_refuses_a_garbage_model_safetensors(tmp_path):
    from embedkit.encoders import Preprocess
    from embedkit.finetune.model import create_architecture, save_checkpoint
    from embedkit.images import Conversion

    folder = tmp_path / "ft"
    cfg = {"format": "embedkit-finetune", "version": 1, "model": "test_resnet", "classes": ["a", "b"],
           "preprocess": Preprocess(32, (0.5,) * 3, (0.5,) * 3).to_dict(), "conversion": Conversion().to_dict()}
    save_checkpoint(folder, create_architecture("test_resnet", 2, 32), cfg)
    (folder / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    before = _snapshot(tmp_path)
    assert_refused(_cli("explain", folder, CELL, "--out", tmp_path / "cams", "--quiet"),
                   "model.safetensors", "not a readable safetensors file")
    assert _snapshot(tmp_path) == before and not (tmp_path / "cams").exists()


def _unfinished(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run that looks killed after its epoch (history not finished, state file pending)."""
    out = tmp_path / "ft"
    shutil.copytree(run, out)
    hist = json.loads((out / "history.json").read_text())
    (out / "history.json").write_text(json.dumps({**hist, "finished": False}))
    return out


class _Mkdir:
    """A pickle payload that makes a folder when unpickled: proof that a pickled state is never loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("case, expected", [
    ("garbage model", "not a readable safetensors file"),
    ("garbage state", "not a readable training state"),
    ("truncated state", "not a readable training state"),
    ("foreign state", "not a readable training state"),
    ("pickled state", "pickled by an older embedkit"),
    ("broken history", "history.json: unreadable"),
])
def test_finetune_refuses_damaged_checkpoints_and_never_unpickles(case, expected, finished_run, tmp_path):
    from safetensors.torch import save_file
    import torch

    out = _unfinished(finished_run, tmp_path) if case != "garbage model" else tmp_path / "ft"
    if case == "garbage model":
        shutil.copytree(finished_run, out)
        (out / "model.safetensors").write_bytes(b"not safetensors" * 50)
    elif case == "garbage state":
        (out / "train_state.safetensors").write_bytes(os.urandom(4096))
    elif case == "truncated state":
        from embedkit.finetune.state import save_state

        save_state(out / "train_state.safetensors", {"epoch": 1, "model": {"w": torch.zeros(1000)}})
        data = (out / "train_state.safetensors").read_bytes()
        (out / "train_state.safetensors").write_bytes(data[:len(data) // 2])
    elif case == "foreign state":
        save_file({"w": torch.zeros(3)}, str(out / "train_state.safetensors"))
    elif case == "pickled state":
        (out / "train_state.pt").write_bytes(pickle.dumps({"model": _Mkdir(str(tmp_path / "pwned"))}))
    elif case == "broken history":
        (out / "history.json").write_text("{not json")
    before = _snapshot(tmp_path)
    assert_refused(_cli("finetune", MITOCHECK, "--out", out, *TINY_FT), expected)
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_a_pickled_state_is_discarded_by_restart(finished_run, tmp_path):
    out = _unfinished(finished_run, tmp_path)
    (out / "train_state.pt").write_bytes(pickle.dumps({"model": _Mkdir(str(tmp_path / "pwned"))}))
    invoke_cli("finetune", MITOCHECK, "--out", out, "--restart", *TINY_FT)
    assert not (out / "train_state.pt").exists() and not (tmp_path / "pwned").exists()
    assert json.loads((out / "history.json").read_text())["finished"]


def test_state_round_trips_optimizer_tuples_and_int_keys(tmp_path):
    import torch

    from embedkit.finetune.state import load_state, save_state

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, betas=(0.8, 0.9))
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "best": {"score": -float("inf")}, "history": [{"epoch": 1}]}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer parameter ids stay integers
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    assert back["best"]["score"] == -float("inf") and back["history"] == [{"epoch": 1}]
    assert (tmp_path / "s.safetensors").read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["optimizer"])  # loads back into a fresh optimiser


# --------------------------------------------------------------------------- learned patch filters


@pytest.mark.parametrize("case", ["garbage", "missing arrays", "object array", "shapes differ", "json list"])
def test_patches_refuse_a_damaged_learned_filter(case, tmp_path):
    fm = tmp_path / "fm"
    fm.mkdir()
    meta = {"format": "embedkit-learned-filter", "version": 1, "encoder_config": {}, "conversion": {}, "intercept": 0.0,
            "info": {}, "fingerprint": "x", "classes": ["empty", "kept"]}
    (fm / "filter.json").write_text(json.dumps([meta] if case == "json list" else meta))
    npz = fm / "filter.npz"
    if case == "garbage":
        npz.write_bytes(b"PK\x03\x04 truncated zip")
    elif case == "missing arrays":
        np.savez(npz, mean=np.zeros(4))
    elif case == "object array":
        np.savez(npz, mean=np.array([{"a": 1}], dtype=object), scale=np.ones(1), coef=np.ones(1))
    else:
        np.savez(npz, mean=np.zeros(4), scale=np.ones(4), coef=np.ones(3))
    before = _snapshot(tmp_path)
    proc = _cli("patches", CELL, "--out", tmp_path / "p.h5", "--size", "32", "--filter", "learned",
                "--filter-model", fm, "--quiet")
    assert_refused(proc, "not an embedkit learned filter" if case == "json list" else "damaged")
    assert _snapshot(tmp_path) == before and not (tmp_path / "p.h5").exists()


# --------------------------------------------------------------------------- a full disk


def test_full_disk_during_probe_leaves_no_temp_files(lite0_store_ro, tmp_path):
    out = tmp_path / "out"
    proc = _cli("probe", lite0_store_ro, "--heads", "logreg", "--out", out, "--quiet", fsize=16_000)
    assert_refused(proc, "disk full while writing", "nothing was lost")
    assert not _temps(tmp_path)
    for p in out.rglob("*"):  # whatever was written is whole: JSON parses
        if p.suffix == ".json":
            json.loads(p.read_text())


def test_full_disk_during_finetune_leaves_no_temp_files_and_reruns(tmp_path):
    out = tmp_path / "ft"
    proc = _cli("finetune", MITOCHECK, "--out", out, *TINY_FT, fsize=200_000)  # the checkpoint is ~1.5 MB
    assert_refused(proc, "disk full while writing", "model.safetensors")
    assert not _temps(tmp_path) and not (out / "model.safetensors").exists()
    invoke_cli("finetune", MITOCHECK, "--out", out, *TINY_FT)  # space freed: the same command succeeds
    assert json.loads((out / "history.json").read_text())["finished"]
