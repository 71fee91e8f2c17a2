"""The GPU path on the CPU: uint8 crops converted on the encoder's device give the loader's numbers, and the
prepared GPU check (scripts/gpu_check.sh) passes its own dry run (--cpu-smoke), installing the project first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MITOCHECK, ROOT
from embedkit.embed import ImageDataset, collate, collate_raw, embed
from embedkit.encoders import Preprocess, create_encoder
from embedkit.engines.preprocess import device_batch
from embedkit.images import Conversion
from embedkit.sources import discover
from embedkit.store import Store


@pytest.mark.parametrize("pre", [Preprocess(size=80), Preprocess(size=48, interpolation="bilinear", mean=(0.5,) * 3,
                                                                 std=(0.5,) * 3), Preprocess(size=64, resize="stretch")])
def test_device_conversion_equals_the_loaders(pre, tmp_path):
    from PIL import Image

    src = discover(MITOCHECK)
    entries = [(it.id, src.abspath(it)) for it in src.items[:12]]
    wide = tmp_path / "wide.png"  # a non-square 8-bit RGB image and a 16-bit one: padding, channels, percentiles
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(wide)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 60000, (50, 30), dtype=np.uint16)).save(deep)
    entries += [("wide", str(wide)), ("deep", str(deep))]
    _, _, ref, _ = collate([ImageDataset(entries, pre, Conversion())[i] for i in range(len(entries))])
    raw = [ImageDataset(entries, pre, Conversion(), raw=True)[i] for i in range(len(entries))]
    assert raw[0][1].dtype == np.uint8 and raw[-1][1].dtype == np.float32  # 8-bit travels as uint8, 16-bit as float
    _, good, groups, _ = collate_raw(raw)
    x = device_batch(groups, len(good), pre, torch.device("cpu"))
    assert x.shape == ref.shape and torch.abs(x - ref).max() <= 1e-5


def test_embed_with_device_preprocessing_equals_the_loader_path(tmp_path):
    enc = create_encoder("efficientnet_lite0", image_size=72)
    src = discover(MITOCHECK / "Anaphase")
    vecs = {}
    for where in ("workers", "device"):
        path = tmp_path / f"{where}.h5"
        embed(src, path, enc, batch_size=16, preprocess=where, progress=False)
        vecs[where] = Store(path).vectors("efficientnet_lite0")
    assert np.isfinite(vecs["device"]).all() and np.abs(vecs["device"] - vecs["workers"]).max() <= 1e-5


@pytest.mark.timeout(1200)  # several interpreters start; slow on a loaded machine
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must use the copy it installs
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
                          env={**env, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["smoke"] and rep["environment"]["device"] == "cpu"
    assert str(tmp_path) in rep["environment"]["embedkit_from"]  # the installed copy ran, not the checkout
    n = rep["data"]["crops"]
    assert n == 40
    for name, dim in (("efficientnet_lite0", 1280), ("dinov2_vits14", 384)):
        run = rep["embed"][name]
        assert run["images"] == n and run["dim"] == dim and run["random_init"] == (name == "dinov2_vits14")
        assert run["images_per_second"] > 0 and run["bare_forward"]["images_per_second"] > 0
        assert run["embed_vs_bare"] == pytest.approx(run["images_per_second"] / run["bare_forward"]["images_per_second"])
    ft = rep["finetune"]
    assert ft["train_images"] + ft["val_images"] < n and ft["epoch_images_per_second"] > 0 and ft["input_px"] == 32
    fa = rep["faiss"]
    assert fa["device"] == "cpu" and fa["rows"] == n and fa["ivf"]["recall_at_10"] == 1.0  # one list: IVF is exact
    assert not list(tmp_path.glob("embedkit-gpu-check.*"))  # the work folder is removed
