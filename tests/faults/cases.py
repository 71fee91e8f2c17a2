"""The fault table: every command x every class of bad input that applies to it, and how to judge a run.

A case runs ``python -m embedkit.cli`` in its own working folder, which holds copies of what the command
reads (the store, probe results, a fine-tuned model) and the bad input made by its class's maker. A
clean refusal exits with status 2, prints one error line with no traceback, names the bad input, and
leaves every file that was in the working folder byte for byte as it was.

Used by tests/faults/test_bad_inputs.py (the quick cases: each bad input on its cheapest command, and each
command once per family of bad inputs) and scripts/bench_faults.py (all of them).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MITOCHECK = ROOT / "tests" / "data" / "mitocheck"
STARDIST_FIELD = ROOT / "tests" / "data" / "stardist" / "img2d.tif"
CLASSES = ("Anaphase", "Interphase", "Metaphase", "Prometaphase")
CELLS_PER_CLASS = 10
TINY_FINETUNE = ("--model", "test_resnet", "--random-init", "--image-size", "64", "--epochs", "1", "--batch-size", "8")


# --------------------------------------------------------------------------------------------- running

def cli_env() -> dict[str, str]:
    """Environment of every CLI run: this checkout, no hub, no display, one thread per run."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(args: list[str], cwd: Path, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m embedkit.cli ARGS`` in ``cwd``."""
    proc = subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], cwd=str(cwd), env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"embedkit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------- the world

@dataclass(frozen=True)
class World:
    """Valid inputs made once: 40 real cells embedded with lite0, a logreg probe, a tiny fine-tuned model."""

    root: Path

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    @property
    def store(self) -> Path:
        return self.root / "store.h5"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def finetuned(self) -> Path:
        return self.root / "finetuned"

    @property
    def ids(self) -> list[str]:
        return json.loads((self.root / "ids.json").read_text())

    def cell_files(self) -> list[Path]:
        return sorted(self.cells.rglob("*.png"))


def build_world(root: Path) -> World:
    """Embed, probe and fine-tune the sample once; every case copies what it needs from here."""
    world = World(Path(root))
    for cls in CLASSES:
        (world.cells / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((MITOCHECK / cls).glob("*.png"))[:CELLS_PER_CLASS]:
            shutil.copy(f, world.cells / cls / f.name)
    cli(["embed", world.cells, "--store", world.store, "--group-by", "mitocheck", "--quiet"], world.root, check=True)
    cli(["probe", world.store, "--heads", "logreg", "--seeds", "1", "--no-baselines", "--out", world.results,
         "--n-boot", "100", "--quiet"], world.root,
        check=True)
    cli(["finetune", world.store, *TINY_FINETUNE, "--splits", world.results / "splits.json", "--out", world.finetuned,
         "--quiet"], world.root, check=True)
    import h5py

    with h5py.File(world.store, "r") as f:
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in f["items"]["id"][:]]
    (world.root / "ids.json").write_text(json.dumps(ids))
    return world


# --------------------------------------------------------------------------------------------- bad inputs

Maker = Callable[[Path, World], Path | str]


def _image_source(work: Path, world: World, name: str, write: Callable[[Path], None]) -> Path:
    """work/imgs/{A,B}: two real cells each plus the bad file in A; work/imgs.csv: all world cells plus the bad file."""
    cells = world.cell_files()
    for sub, picks in (("A", cells[:2]), ("B", cells[-2:])):
        (work / "imgs" / sub).mkdir(parents=True, exist_ok=True)
        for f in picks:
            shutil.copy(f, work / "imgs" / sub / f.name)
    bad = work / "imgs" / "A" / name
    write(bad)
    rows = ["path,label,group"] + [f"{f},{f.parent.name},{f.name[4:11]}" for f in cells] + [f"{bad},Anaphase,bad"]
    (work / "imgs.csv").write_text("\n".join(rows) + "\n")
    return bad


def _truncated_png(path: Path) -> None:
    from PIL import Image

    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _five_channel_tif(path: Path) -> None:
    import tifffile

    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (5, 64, 64), dtype=np.uint8))


def _huge_tif(path: Path) -> None:
    import tifffile

    side, tile = 20_000, 2048
    zeros = np.zeros((tile, tile), np.uint8)
    tifffile.imwrite(path, data=(zeros for _ in range((-(-side // tile)) ** 2)), shape=(side, side), dtype=np.uint8,
                     tile=(tile, tile), compression="zlib", compressionargs={"level": 1})


def _csv(work: Path, name: str, text: str | bytes) -> Path:
    p = work / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _manifest_rows(world: World, label_of_second: str = "") -> list[str]:
    cells = world.cell_files()
    rows = ["path,label,group"] + [f"{f},{f.parent.name},{f.name[4:11]}" for f in cells]
    if label_of_second:
        f = cells[1]
        rows[2] = f"{f},{label_of_second},{f.name[4:11]}"
    return rows


def _h5(work: Path, world: World, name: str, edit: Callable | None, packed: bool = False) -> Path:
    """A copy of the world's store (and its side files) under ``name``, changed by ``edit(h5py.File)``.

    ``packed``: a self-contained copy (``embedkit store pack``), so that vectors can be damaged in place.
    """
    import h5py

    dst = work / name
    if packed:
        from embedkit.store.tools import pack

        pack(world.store, dst)
    else:
        _copy_store(world, dst)
    if edit is not None:
        with h5py.File(dst, "r+") as f:
            edit(f)
    return dst


def _copy_store(world: World, dst: Path) -> None:
    """Copy store.h5 and anything beside it that belongs to it (store.h5.*, store.<key>.faiss, ...)."""
    for p in world.root.iterdir():
        if p.name.startswith(world.store.stem + ".") and p.name != world.store.name:
            target = dst.parent / (dst.stem + p.name[len(world.store.stem):])
            (shutil.copytree if p.is_dir() else shutil.copy)(p, target)
    shutil.copy(world.store, dst)


def _first_key(f) -> str:
    """The encoder's key (baseline keys such as 'handcrafted' and '<key>@random-init' come after it)."""
    keys = sorted(f["embeddings"])
    return next((k for k in keys if k != "handcrafted" and "@" not in k), keys[0])


def _nan_row(f) -> None:
    ds = f["embeddings"][_first_key(f)]["vectors"]
    row = ds[3]
    row[:] = np.nan
    ds[3] = row


def _probe_copy(work: Path, world: World, name: str, edit: Callable[[Path], None]) -> Path:
    dst = work / name
    shutil.copytree(world.results / "logreg" / "probe", dst)
    edit(dst)
    return dst


def _finetuned_copy(work: Path, world: World, name: str, edit: Callable[[Path], None]) -> Path:
    dst = work / name
    shutil.copytree(world.finetuned, dst)
    edit(dst)
    return dst


def _half_lite0(path: Path) -> None:
    import torch

    from embedkit.encoders import get_spec
    from embedkit.encoders.lite import lite_weights_path

    state = torch.load(lite_weights_path(get_spec("efficientnet_lite0")), map_location="cpu", weights_only=True)
    torch.save(dict(list(state.items())[: len(state) // 2]), path)


class _Payload:
    """Unpickling this runs a shell command: a checkpoint that must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle_payload(path: Path) -> None:
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Payload(path.parent / "PWNED")}, fh)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _victim(work: Path) -> Path:
    (work / "victim").mkdir(exist_ok=True)
    (work / "victim" / "keep.txt").write_text("must survive")
    return work / "victim"


def _foreign_h5(work: Path) -> Path:
    import h5py

    p = work / "foreign.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.arange(10)
    return p


def _empty_dir(work: Path, name: str) -> Path:
    (work / name).mkdir()
    return work / name


def _results_with_garbage_metrics(work: Path, world: World) -> Path:
    dst = work / "garbage_results"
    shutil.copytree(world.results, dst)
    (dst / "logreg" / "metrics.json").write_text("{not json")
    return dst


def _populations(work: Path, world: World, name: str, second_population: str, encoding: str = "utf-8") -> Path:
    ids = world.ids
    rows = ["id,population"] + [f"{i},pop{n % 2}" for n, i in enumerate(ids)]
    rows[2] = f"{ids[1]},{second_population}"
    return _csv(work, name, "\n".join(rows).encode(encoding))


#: class name -> maker(work, world) returning the bad input (a path, or a string such as a key).
BAD: dict[str, Maker] = {
    # images
    "zero-byte image": lambda w, W: _image_source(w, W, "zero.png", lambda p: p.write_bytes(b"")),
    "text as PNG": lambda w, W: _image_source(w, W, "text.png", lambda p: p.write_text("this is not a PNG\n")),
    "truncated PNG": lambda w, W: _image_source(w, W, "truncated.png", _truncated_png),
    "5-channel TIFF": lambda w, W: _image_source(w, W, "five.tif", _five_channel_tif),
    "huge TIFF": lambda w, W: _image_source(w, W, "huge.tif", _huge_tif),
    # manifests and other tables
    "missing manifest": lambda w, W: w / "missing.csv",
    "non-UTF-8 manifest": lambda w, W: _csv(w, "cp1252.csv", "\n".join(_manifest_rows(W, "Caf\u00e9")).encode("cp1252")),
    "UTF-16 manifest": lambda w, W: _csv(w, "utf16.csv", "\n".join(_manifest_rows(W)).encode("utf-16")),
    "extra-field manifest": lambda w, W: _csv(w, "comma.csv", "\n".join(_manifest_rows(W, "Anaphase, late"))),
    "non-UTF-8 populations": lambda w, W: _populations(w, W, "pops_cp1252.csv", "Caf\u00e9", "cp1252"),
    "extra-field populations": lambda w, W: _populations(w, W, "pops_comma.csv", "pop0, late"),
    "missing populations": lambda w, W: w / "missing_pops.csv",
    "non-UTF-8 predictions": lambda w, W: _csv(w, "pred_cp1252.csv", "id,true,pred\nCaf\u00e9,a,b\n".encode("cp1252")),
    "garbage predictions": lambda w, W: _csv(w, "pred_garbage.csv", b"\x00\x01\x02 not a table \xff\n"),
    "non-UTF-8 queries": lambda w, W: _csv(w, "queries_cp1252.csv", "id\nCaf\u00e9\n".encode("cp1252")),
    # weights
    "empty weights folder": lambda w, W: _empty_dir(w, "empty_weights"),
    "garbage safetensors": lambda w, W: _write(w / "garbage.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" * 20),
    "garbage pth": lambda w, W: _write(w / "garbage.pth", b"PK\x03\x04 not a zip at all" * 20),
    "half weights": lambda w, W: (_half_lite0(w / "half.pth"), w / "half.pth")[1],
    "pickle payload": lambda w, W: (_pickle_payload(w / "payload.pth"), w / "payload.pth")[1],
    # stores
    "missing store": lambda w, W: w / "missing.h5",
    "text as store": lambda w, W: _write(w / "text.h5", b"this is not HDF5\n" * 10),
    "non-store HDF5": lambda w, W: _foreign_h5(w),
    "string schema_version": lambda w, W: _h5(w, W, "schema.h5", lambda f: f.attrs.__setitem__("schema_version", "one")),
    "key without config": lambda w, W: _h5(w, W, "noconfig.h5", lambda f: f["embeddings"][_first_key(f)].attrs.__delitem__("config")),
    "store without items": lambda w, W: _h5(w, W, "noitems.h5", lambda f: f.__delitem__("items")),
    "NaN row": lambda w, W: _h5(w, W, "nan.h5", _nan_row, packed=True),
    # encoders, keys, splits, probes, models, results, configs
    "unknown encoder": lambda w, W: "nope_net",
    "layer out of range": lambda w, W: "99",
    "layers not numbers": lambda w, W: "abc",
    "key ..": lambda w, W: (_victim(w), "..")[1],
    "key ../victim": lambda w, W: (_victim(w), "../victim")[1],
    "key absolute": lambda w, W: str(_victim(w)),
    "key a/b": lambda w, W: "a/b",
    "garbage splits": lambda w, W: _write(w / "garbage_splits.json", b"{this is not json"),
    "splits as list": lambda w, W: _write(w / "list_splits.json", b"[1, 2, 3]"),
    "missing probe folder": lambda w, W: w / "missing_probe",
    "probe.json a list": lambda w, W: _probe_copy(w, W, "probe_list", lambda d: (d / "probe.json").write_text("[1, 2]")),
    "probe.json without classes": lambda w, W: _probe_copy(
        w, W, "probe_noclasses", lambda d: (d / "probe.json").write_text(
            json.dumps({k: v for k, v in json.loads((d / "probe.json").read_text()).items() if k != "classes"}))),
    "garbage probe safetensors": lambda w, W: _probe_copy(
        w, W, "probe_garbage", lambda d: (d / "probe.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" * 9)),
    "garbage model.safetensors": lambda w, W: _finetuned_copy(
        w, W, "model_garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" * 9)),
    "missing model folder": lambda w, W: w / "missing_model",
    "empty results folder": lambda w, W: _empty_dir(w, "empty_results"),
    "garbage metrics.json": _results_with_garbage_metrics,
    # study configs
    "garbage config": lambda w, W: _write(w / "garbage.yaml", b"stages: [embed\n  - {{{ not yaml"),
    "config unknown command": lambda w, W: _write(w / "unknown_cmd.yaml", _study("frobnicate", {"store": str(W.store)})),
    "config unknown option": lambda w, W: _write(w / "unknown_opt.yaml", _study("info", {"store": str(W.store), "colour": "red"})),
    "missing config": lambda w, W: w / "missing.yaml",
}


def _study(command: str, options: dict) -> bytes:
    """A one-stage study config running ``command`` with ``options``."""
    import yaml

    return yaml.safe_dump({"name": "bad", "state": "state.json",
                           "stages": [{"name": "only", "command": command, "options": options}]}).encode()

IMAGE_CLASSES = ("zero-byte image", "text as PNG", "truncated PNG", "5-channel TIFF", "huge TIFF")
MANIFEST_CLASSES = ("missing manifest", "non-UTF-8 manifest", "UTF-16 manifest", "extra-field manifest")
WEIGHTS_CLASSES = ("empty weights folder", "garbage safetensors", "garbage pth", "half weights", "pickle payload")
STORE_CLASSES = ("missing store", "text as store", "non-store HDF5", "string schema_version", "key without config",
                 "store without items")
STORE_TARGET_CLASSES = ("text as store", "non-store HDF5", "string schema_version", "store without items")
KEY_CLASSES = ("key ..", "key ../victim", "key absolute", "key a/b")
PROBE_CLASSES = ("missing probe folder", "probe.json a list", "probe.json without classes", "garbage probe safetensors")
CONFIG_CLASSES = ("missing config", "garbage config", "config unknown command", "config unknown option")


# --------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    """One command run against one bad input; ``args`` use {work}, {bad}, {store}, {results}, ... placeholders."""

    command: str
    family: str  # images, manifests, tables, weights, stores, targets, rows, encoders, layers, keys, splits, probes, models, results, configs
    bad: str
    args: tuple[str, ...]
    quick: bool = True  # in the test suite; the others run in scripts/bench_faults.py only

    @property
    def id(self) -> str:
        return f"{self.command}[{self.bad}]"


#: Commands from cheapest to dearest to start (no torch, torch, a model to load, a network to train).
COST = ("info", "store", "run", "index", "export", "leaks", "compare", "report", "view", "segment", "patches", "probe",
        "predict", "proportions", "neighbors", "explain", "embed", "adapt", "finetune")

SEGMENT = ("--backend", "watershed", "--quiet")
PATCHES = ("--size", "32", "--quiet")
FINETUNE_OUT = (*TINY_FINETUNE, "--out", "{work}/ft", "--quiet")
ADAPT_OUT = ("--encoder", "efficientnet_lite0", "--image-size", "40", "--epochs", "1", "--batch-size", "8",
             "--out", "{work}/adapted", "--quiet")
PROBE = ("--heads", "logreg", "--out", "{work}/res", "--n-boot", "100", "--quiet")
PROBE_DIR = "{results}/logreg/probe"
ID0 = "{id0}"


def _rows() -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """(command, family, classes, args) for every pairing of a command with the bad inputs it can meet."""
    rows = [
        ("embed", "images", IMAGE_CLASSES, ("embed", "{imgs}", "--store", "{work}/new.h5", "--quiet")),
        ("segment", "images", IMAGE_CLASSES, ("segment", "{imgs}", "--out", "{work}/seg.h5", *SEGMENT)),
        ("patches", "images", IMAGE_CLASSES, ("patches", "{imgs}", "--out", "{work}/p.h5", *PATCHES)),
        ("finetune", "images", IMAGE_CLASSES, ("finetune", "{imgs_csv}", *FINETUNE_OUT)),
        ("neighbors", "images", IMAGE_CLASSES, ("neighbors", "{store}", "{bad}", "-k", "3")),
        ("explain", "images", IMAGE_CLASSES, ("explain", PROBE_DIR, "{bad}", "--out", "{work}/cams", "--quiet")),
        ("embed", "manifests", MANIFEST_CLASSES, ("embed", "{bad}", "--store", "{work}/new.h5", "--quiet")),
        ("segment", "manifests", MANIFEST_CLASSES, ("segment", "{bad}", "--out", "{work}/seg.h5", *SEGMENT)),
        ("patches", "manifests", MANIFEST_CLASSES, ("patches", "{bad}", "--out", "{work}/p.h5", *PATCHES)),
        ("finetune", "manifests", MANIFEST_CLASSES, ("finetune", "{bad}", *FINETUNE_OUT)),
        ("proportions", "tables", ("non-UTF-8 populations", "extra-field populations", "missing populations"),
         ("proportions", "{store}", "--probe", PROBE_DIR, "--populations", "{bad}", "--out", "{work}/props")),
        ("view", "tables", ("non-UTF-8 predictions", "garbage predictions"),
         ("view", "{store}", "--method", "pca", "--predictions", "{bad}", "--out", "{work}/v.png", "--quiet")),
        ("neighbors", "tables", ("non-UTF-8 queries",), ("neighbors", "{store}", "{bad}", "-k", "3")),
        ("embed", "weights", WEIGHTS_CLASSES, ("embed", "{cell0}", "--store", "{work}/new.h5", "--weights", "{bad}", "--quiet")),
        ("finetune", "weights", WEIGHTS_CLASSES,
         ("finetune", "{store}", "--model", "efficientnet_lite0", "--weights", "{bad}", "--splits",
          "{results}/splits.json", "--epochs", "1", "--out", "{work}/ft", "--quiet")),
        ("neighbors", "weights", ("garbage safetensors", "empty weights folder"),
         ("neighbors", "{store}", "{cell0}", "--weights", "{bad}")),
        ("probe", "stores", STORE_CLASSES, ("probe", "{bad}", *PROBE)),
        ("predict", "stores", STORE_CLASSES, ("predict", "{bad}", "--probe", PROBE_DIR, "--out", "{work}/pred.csv")),
        ("neighbors", "stores", STORE_CLASSES, ("neighbors", "{bad}", ID0, "-k", "3")),
        ("index", "stores", STORE_CLASSES, ("index", "{bad}", "--quiet")),
        ("leaks", "stores", STORE_CLASSES, ("leaks", "{bad}", "--splits", "{results}/splits.json", "--quiet")),
        ("view", "stores", STORE_CLASSES, ("view", "{bad}", "--method", "pca", "--out", "{work}/v.png", "--quiet")),
        ("export", "stores", STORE_CLASSES, ("export", "{bad}", "--format", "npy", "--out", "{work}/e.npy")),
        ("info", "stores", STORE_CLASSES, ("info", "{bad}")),
        ("proportions", "stores", STORE_CLASSES, ("proportions", "{bad}", "--probe", PROBE_DIR, "--out", "{work}/props")),
        ("finetune", "stores", STORE_CLASSES[:3], ("finetune", "{bad}", *FINETUNE_OUT)),
        ("explain", "stores", STORE_CLASSES[:3],
         ("explain", PROBE_DIR, ID0, "--store", "{bad}", "--out", "{work}/cams", "--quiet")),
        ("embed", "targets", STORE_TARGET_CLASSES, ("embed", "{cell0}", "--store", "{bad}", "--quiet")),
        ("segment", "targets", STORE_TARGET_CLASSES, ("segment", "{field}", "--out", "{bad}", *SEGMENT)),
        ("patches", "targets", STORE_TARGET_CLASSES, ("patches", "{field}", "--out", "{bad}", *PATCHES)),
        ("probe", "rows", ("NaN row",), ("probe", "{bad}", *PROBE)),
        ("predict", "rows", ("NaN row",), ("predict", "{bad}", "--probe", PROBE_DIR, "--out", "{work}/pred.csv")),
        ("embed", "encoders", ("unknown encoder",),
         ("embed", "{cell0}", "--store", "{work}/new.h5", "--encoder", "{bad}", "--quiet")),
        ("probe", "encoders", ("unknown encoder",), ("probe", "{store}", *PROBE, "--encoder", "{bad}")),
        ("index", "encoders", ("unknown encoder",), ("index", "{store}", "--quiet", "--encoder", "{bad}")),
        ("view", "encoders", ("unknown encoder",),
         ("view", "{store}", "--method", "pca", "--out", "{work}/v.png", "--quiet", "--encoder", "{bad}")),
        ("export", "encoders", ("unknown encoder",),
         ("export", "{store}", "--format", "npy", "--out", "{work}/e.npy", "--encoder", "{bad}")),
        ("neighbors", "encoders", ("unknown encoder",), ("neighbors", "{store}", ID0, "--encoder", "{bad}")),
        ("leaks", "encoders", ("unknown encoder",),
         ("leaks", "{store}", "--splits", "{results}/splits.json", "--by", "embedding", "--quiet", "--encoder", "{bad}")),
        ("predict", "encoders", ("unknown encoder",),
         ("predict", "{store}", "--probe", PROBE_DIR, "--out", "{work}/pred.csv", "--encoder", "{bad}")),
        ("proportions", "encoders", ("unknown encoder",),
         ("proportions", "{store}", "--probe", PROBE_DIR, "--out", "{work}/props", "--encoder", "{bad}")),
        ("finetune", "encoders", ("unknown encoder",), ("finetune", "{store}", "--model", "{bad}", "--out", "{work}/ft", "--quiet")),
        ("embed", "layers", ("layer out of range", "layers not numbers"),
         ("embed", "{cell0}", "--store", "{work}/new.h5", "--layers", "{bad}", "--quiet")),
        ("probe", "layers", ("layers not numbers",), ("probe", "{store}", *PROBE, "--layers", "{bad}")),
        ("embed", "keys", KEY_CLASSES, ("embed", "{cell0}", "--store", "{store}", "--key", "{bad}", "--quiet")),
        ("probe", "splits", ("garbage splits", "splits as list"), ("probe", "{store}", *PROBE, "--splits", "{bad}")),
        ("leaks", "splits", ("garbage splits", "splits as list"), ("leaks", "{store}", "--splits", "{bad}", "--quiet")),
        ("finetune", "splits", ("garbage splits", "splits as list"), ("finetune", "{store}", *FINETUNE_OUT, "--splits", "{bad}")),
        ("predict", "probes", PROBE_CLASSES, ("predict", "{store}", "--probe", "{bad}", "--out", "{work}/pred.csv")),
        ("proportions", "probes", PROBE_CLASSES, ("proportions", "{store}", "--probe", "{bad}", "--out", "{work}/props")),
        ("explain", "probes", PROBE_CLASSES, ("explain", "{bad}", "{cell0}", "--out", "{work}/cams", "--quiet")),
        ("explain", "models", ("garbage model.safetensors", "missing model folder"),
         ("explain", "{bad}", "{cell0}", "--out", "{work}/cams", "--quiet")),
        ("compare", "results", ("empty results folder", "garbage metrics.json", "missing model folder"), ("compare", "{bad}")),
        ("report", "results", ("empty results folder", "garbage metrics.json"),
         ("report", "{bad}", "--store", "{store}", "--out", "{work}/report.html", "--no-leaks")),
        ("report", "stores", STORE_CLASSES, ("report", "{results}", "--store", "{bad}", "--out", "{work}/report.html")),
        ("store", "stores", STORE_CLASSES[:4], ("store", "check", "{bad}")),
        ("run", "configs", CONFIG_CLASSES, ("run", "{bad}")),
        ("adapt", "manifests", MANIFEST_CLASSES, ("adapt", "{bad}", *ADAPT_OUT)),
        ("adapt", "stores", STORE_CLASSES[:3], ("adapt", "{bad}", *ADAPT_OUT)),
        ("adapt", "splits", ("garbage splits", "splits as list"),
         ("adapt", "{store}", *ADAPT_OUT, "--splits", "{bad}", "--exclude-split", "test")),
    ]
    return [(cmd, fam, tuple(classes), tuple(args)) for cmd, fam, classes, args in rows]


def _table() -> list[Case]:
    """Every pairing; quick ones: each bad input on its cheapest command, and each command once per family."""
    pairs = [(cmd, fam, bad, args) for cmd, fam, classes, args in _rows() for bad in classes]
    cheapest = {}
    for cmd, _, bad, _ in sorted(pairs, key=lambda p: COST.index(p[0])):
        cheapest.setdefault(bad, cmd)
    first_of_family: set[tuple[str, str]] = set()
    out = []
    for cmd, fam, bad, args in pairs:
        quick = cheapest[bad] == cmd or (cmd, fam) not in first_of_family
        first_of_family.add((cmd, fam))
        out.append(Case(cmd, fam, bad, args, quick))
    return out


CASES: list[Case] = _table()


# --------------------------------------------------------------------------------------------- one run

@dataclass
class Outcome:
    """What one case did, and what a clean refusal demands of it."""

    case: Case
    returncode: int
    stderr: str
    error_lines: list[str]
    bad_name: str
    changed: list[str]  # pre-existing files whose bytes changed or that vanished
    seconds: float
    payload_ran: bool = False

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr

    @property
    def names_input(self) -> bool:
        return any(self.bad_name in ln for ln in self.error_lines)

    def problems(self) -> list[str]:
        """Everything that falls short of a clean refusal (empty when the case passes)."""
        out = []
        if self.returncode != 2:
            out.append(f"exit status {self.returncode}, not 2")
        if self.traceback:
            out.append("a traceback on stderr")
        if len(self.error_lines) != 1 or not self.error_lines[0].startswith(ERROR_PREFIXES):
            out.append(f"{len(self.error_lines)} error lines, not one clean line")
        elif not self.names_input:
            out.append(f"the error does not name {self.bad_name!r}")
        if self.changed:
            out.append(f"pre-existing files changed or lost: {', '.join(self.changed[:5])}")
        if self.payload_ran:
            out.append("a pickled payload ran")
        return out


#: How an error reaches the user: embedkit's own line, or click's for a malformed command line.
ERROR_PREFIXES = ("embedkit: error: ", "Error: ")
#: An exception's message printed without a traceback ("ValueError: ..."): never a clean refusal.
_RAW_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception)\b.*:")


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that report an error; notes and progress around them are not counted."""
    lines = [ln.split("\r")[-1].rstrip() for ln in stderr.splitlines()]
    return [ln for ln in lines if ln.startswith(ERROR_PREFIXES) or _RAW_EXCEPTION.match(ln)]


def prepare(case: Case, world: World, work: Path) -> tuple[dict[str, str], str]:
    """Make the case's working folder (copies of what it reads, plus the bad input).

    Returns the placeholders and the name a good error message gives the bad input.
    """
    work.mkdir(parents=True, exist_ok=True)
    text = " ".join(case.args)
    ph = {"work": str(work), "cells": str(world.cells), "field": str(STARDIST_FIELD), "id0": world.ids[0],
          "cell0": str(world.cell_files()[0])}
    if "{store}" in text:
        _copy_store(world, work / "store.h5")
        ph["store"] = str(work / "store.h5")
    if "{results}" in text:
        shutil.copytree(world.results, work / "results")
        ph["results"] = str(work / "results")
    bad = BAD[case.bad](work, world)
    ph["bad"] = str(bad)
    ph["imgs"], ph["imgs_csv"] = str(work / "imgs"), str(work / "imgs.csv")
    return ph, bad.name if isinstance(bad, Path) else bad


def run_case(case: Case, world: World, work: Path, timeout: float = 600) -> Outcome:
    """Prepare, hash, run and judge one case."""
    ph, bad_name = prepare(case, world, work)
    before = tree_hashes(work)
    world_before = tree_hashes(world.root)
    t0 = time.perf_counter()
    proc = cli([a.format(**ph) for a in case.args], work, timeout=timeout)
    seconds = time.perf_counter() - t0
    after = tree_hashes(work) if work.exists() else {}
    world_after = tree_hashes(world.root)
    changed = sorted(k for k, h in before.items() if after.get(k) != h)
    changed += sorted(f"world/{k}" for k, h in world_before.items() if world_after.get(k) != h)
    payload = any(p.name == "PWNED" for p in work.rglob("*")) if work.exists() else False
    return Outcome(case, proc.returncode, proc.stderr, error_lines(proc.stderr), bad_name, changed, seconds, payload)
