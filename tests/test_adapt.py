"""embedkit adapt on bundled MitoCheck cells with the real efficientnet_lite0: learning, saving, loading as an
encoder, resume after SIGKILL, labels never read, excluded split items never opened, compare beside frozen."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MITOCHECK, ROOT, invoke_cli, run_cli
from embedkit.splits import Fold, Splits
from embedkit.store import fingerprint

N_CELLS = 40
# A tiny budget: 40 px views, batches of 16, two short epochs of SimCLR.
BUDGET = ["--encoder", "efficientnet_lite0", "--image-size", "40", "--batch-size", "16", "--epochs", "2",
          "--lr", "3e-4", "--warmup-epochs", "0.5", "--method", "simclr"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "encoder.safetensors"))


def _history(folder: Path) -> dict:
    return json.loads((folder / "history.json").read_text())


def _write_manifest(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(folder / "cells.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        w.writerows(rows)
    return folder / "cells.csv"


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> dict:
    """Two copies of 40 real cells with a splits file holding two movies out as test.

    ``clean`` lists the true labels. ``decoy`` lists the same ids with labels shuffled, and its test items'
    files are overwritten with bytes that are no image, so any run that opens them fails.
    """
    from embedkit.sources import group_from_path, group_rule

    files = sorted(MITOCHECK.glob("*/*.png"))[:: len(list(MITOCHECK.glob("*/*.png"))) // N_CELLS][:N_CELLS]
    rx = group_rule("mitocheck")
    rows = [(f.relative_to(MITOCHECK).as_posix(), f.parent.name, group_from_path(rx, f.name)) for f in files]
    base = tmp_path_factory.mktemp("adapt_cells")
    clean, decoy = base / "clean", base / "decoy"
    for folder in (clean, decoy):
        for rel, _, _ in rows:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(MITOCHECK / rel, folder / rel)
    groups = sorted({g for _, _, g in rows})
    ids = [r for r, _, _ in rows]
    test = [r for r, _, g in rows if g in groups[:2]]
    val = [r for r, _, g in rows if g in groups[2:4]]
    train = [r for r in ids if r not in test and r not in val]
    Splits([Fold(train=train, val=val, test=test)]).save(base / "splits.json")
    for rel in test:
        (decoy / rel).write_bytes(b"not an image")
    shuffled = np.random.default_rng(1).permutation([lab for _, lab, _ in rows])
    return {"clean": _write_manifest(clean, rows),
            "decoy": _write_manifest(decoy, [(r, str(s), g) for (r, _, g), s in zip(rows, shuffled)]),
            "splits": base / "splits.json", "ids": ids, "test": test, "base": base}


@pytest.fixture(scope="module")
def adapted(cells) -> Path:
    out = cells["base"] / "encoders" / "lite0-adapted"
    invoke_cli("adapt", cells["clean"], *BUDGET, "--splits", cells["splits"], "--exclude-split", "test", "--out", out,
               "--quiet")
    return out


def test_loss_falls_and_adapted_weights_differ_from_base(adapted, cells):
    from embedkit.encoders import create_encoder

    hist = _history(adapted)
    losses = [h["loss"] for h in hist["history"]]
    assert hist["finished"] and len(losses) == 2
    assert losses[-1] < losses[0] - 0.1, losses
    for f in ("encoder.safetensors", "encoder.json", "history.json", "loss_curve.png"):
        assert (adapted / f).stat().st_size > 0, f
    assert not (adapted / "train_state.safetensors").exists()

    cfg = json.loads((adapted / "encoder.json").read_text())
    kept = sorted(set(cells["ids"]) - set(cells["test"]))
    assert cfg["base_encoder"] == "efficientnet_lite0" and cfg["method"] == "simclr" and cfg["epochs"] == 2
    assert cfg["data"]["n_items"] == len(kept) == N_CELLS - len(cells["test"])
    assert cfg["data"]["fingerprint"] == fingerprint(kept)
    assert cfg["data"]["excluded"]["n_excluded"] == len(cells["test"]) and cfg["data"]["excluded"]["parts"] == ["test"]
    assert cfg["preprocess"]["size"] == 40

    base = create_encoder("efficientnet_lite0", image_size=40)
    assert cfg["base_weights_fingerprint"] == base.weights_fingerprint != cfg["weights_fingerprint"]
    new = _weights(adapted)
    old = base.model.state_dict()
    assert set(new) == set(old)
    changed = [k for k in new if new[k].is_floating_point() and not torch.equal(new[k], old[k])]
    assert "conv_stem.weight" in changed and len(changed) > len(new) // 2


@pytest.fixture(scope="module")
def decoy_resumed(cells) -> dict:
    """The decoy cells (shuffled labels, junk test files) adapted with the same settings, killed mid-run, resumed."""
    out = cells["base"] / "decoy-adapted"
    args = ["adapt", str(cells["decoy"]), *BUDGET, "--splits", str(cells["splits"]), "--exclude-split", "test",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", *args, "--quiet"], cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "history.json").exists() and len(_history(out)["history"]) >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = {"history": _history(out), "state": (out / "train_state.safetensors").exists(),
              "config": (out / "encoder.json").exists()}
    resumed = run_cli(*args)
    return {"out": out, "killed": killed, "stderr": resumed.stderr, "args": args}


def test_killed_run_resumes_from_its_last_epoch(decoy_resumed, adapted):
    killed = decoy_resumed["killed"]
    assert not killed["history"]["finished"] and len(killed["history"]["history"]) < 2, "not stopped mid-training"
    assert killed["state"] and not killed["config"]
    out = decoy_resumed["out"]
    m = re.search(rf"resuming {re.escape(str(out))} after epoch (\d+)/2", decoy_resumed["stderr"])
    assert m and int(m.group(1)) == 1, decoy_resumed["stderr"][-2000:]
    hist = _history(out)
    assert hist["finished"] and not (out / "train_state.safetensors").exists()
    # ... and ends where the uninterrupted run ended, loss for loss.
    assert [h["loss"] for h in hist["history"]] == pytest.approx([h["loss"] for h in _history(adapted)["history"]],
                                                                  abs=1e-6)


def test_labels_never_read(decoy_resumed, adapted):
    # Shuffled labels (and a resume) give bit-identical weights and the same data fingerprint.
    a, b = _weights(adapted), _weights(decoy_resumed["out"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    fp = [json.loads((d / "encoder.json").read_text())["data"]["fingerprint"] for d in (adapted, decoy_resumed["out"])]
    assert fp[0] == fp[1]


def test_excluded_split_items_are_never_opened(decoy_resumed, cells, tmp_path):
    from embedkit.adapt import AdaptConfig, adapt
    from embedkit.errors import BadImageError, EmbedkitError

    # The decoy run above succeeded although its test files are junk; without the exclusion they are read.
    assert _history(decoy_resumed["out"])["finished"]
    cfg = AdaptConfig(method="simclr", epochs=2, batch_size=16, lr=3e-4, warmup_epochs=0.5)
    with pytest.raises(BadImageError) as err:
        adapt(cells["decoy"], tmp_path / "opened", "efficientnet_lite0", cfg=cfg, image_size=40, progress=False,
              log=lambda s: None)
    assert err.value.path.split("/")[-1] in {t.split("/")[-1] for t in cells["test"]}

    # A finished run is not trained again; other settings on the same folder are refused, leaving it intact.
    out = decoy_resumed["out"]
    kw = dict(cfg=cfg, image_size=40, splits_file=str(cells["splits"]), exclude=("test",), progress=False,
              log=lambda s: None)
    assert adapt(cells["decoy"], out, "efficientnet_lite0", **kw).already_done
    before = (out / "encoder.safetensors").read_bytes()
    kw["cfg"] = AdaptConfig(method="simclr", epochs=3, batch_size=16, lr=3e-4, warmup_epochs=0.5)
    with pytest.raises(EmbedkitError, match="other settings.*epochs"):
        adapt(cells["decoy"], out, "efficientnet_lite0", **kw)
    assert (out / "encoder.safetensors").read_bytes() == before


def test_adapted_encoder_embeds_and_compares_with_the_frozen_one(adapted, cells, tmp_path):
    from embedkit.embed import embed
    from embedkit.encoders import create_encoder
    from embedkit.probe import ProbeSettings, run_probe
    from embedkit.report import compare_results
    from embedkit.sources import discover
    from embedkit.store import Store

    store = tmp_path / "cells.h5"
    embed(discover(cells["clean"]), store, create_encoder("efficientnet_lite0", image_size=40), key="frozen",
          progress=False)
    invoke_cli("embed", cells["clean"], "--store", store, "--encoder", f"local:{adapted}", "--key", "adapted", "--quiet")
    s = Store(store)
    frozen_cfg, adapted_cfg = s.config("frozen"), s.config("adapted")
    saved = json.loads((adapted / "encoder.json").read_text())
    assert adapted_cfg["weights_fingerprint"] == saved["weights_fingerprint"] != frozen_cfg["weights_fingerprint"]
    assert adapted_cfg["weights"].startswith("local:") and adapted_cfg["encoder"] == f"local:{adapted}"
    assert adapted_cfg["preprocess"] == frozen_cfg["preprocess"]
    va, vf = s.vectors("adapted"), s.vectors("frozen")
    assert va.shape == vf.shape and np.isfinite(va).all() and not np.allclose(va, vf)

    # Probes of both keys on the same splits pair up, item for item, in compare.
    for key in ("frozen", "adapted"):
        run_probe(store, tmp_path / key, key=key, splits_path=str(cells["splits"]),
                  settings=ProbeSettings(heads="knn", n_boot=100, baselines=()), progress=False)
    rep = compare_results([tmp_path / "frozen" / "knn", tmp_path / "adapted" / "knn"], out=tmp_path / "cmp", n_boot=100)
    assert not rep.warnings and len(rep.rows) == 2
    assert rep.pairs[0]["n_paired"] == len(cells["test"]) and "ci" in rep.pairs[0]


def test_dino_multicrop_adapts(cells, tmp_path):
    from embedkit.adapt import AdaptConfig, ViewConfig, adapt, load_adapted

    cfg = AdaptConfig(method="dino", epochs=1, batch_size=16, lr=3e-4, warmup_epochs=0.5, samples_per_epoch=16)
    res = adapt(cells["clean"], tmp_path / "dino", "efficientnet_lite0", cfg=cfg, views=ViewConfig(n_local=2),
                image_size=32, progress=False, log=lambda s: None)
    c = res.config
    assert c["method"] == "dino" and c["kept_network"] == "teacher" and np.isfinite(c["final_loss"])
    assert c["views"]["n_global"] == 2 and c["views"]["n_local"] == 2 and c["views"]["local_size"] == 16
    enc = load_adapted(f"local:{res.out}")
    assert enc.weights_fingerprint == c["weights_fingerprint"] != c["base_weights_fingerprint"]


def test_views_keep_channels_together_and_sizes(cells):
    from embedkit.adapt import MicroscopyViews, ViewConfig
    from embedkit.encoders.base import Preprocess
    from embedkit.images import Conversion, load_rgb

    rgb = load_rgb(str(MITOCHECK / cells["ids"][0]), Conversion())
    assert np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 0], rgb[..., 2])  # grayscale cell
    views = MicroscopyViews(ViewConfig(global_size=48, local_size=24, n_local=3), Preprocess(48, (0.5,) * 3, (0.5,) * 3))
    out = views(rgb, np.random.default_rng(0))
    assert [tuple(v.shape) for v in out] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3
    for v in out:  # no colour jitter: every channel of every view stays identical
        assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])
    again = views(rgb, np.random.default_rng(0))
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert not torch.equal(out[0], out[1])


def test_bad_input_is_one_line(cells, tmp_path):
    from embedkit.adapt.data import excluded_ids
    from embedkit.encoders import create_encoder
    from embedkit.errors import EmbedkitError

    res = run_cli("adapt", cells["clean"], "--exclude-split", "test", "--out", tmp_path / "x", check=False)
    assert res.returncode == 2 and "--splits" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(EmbedkitError, match="not a folder written by 'embedkit adapt'"):
        create_encoder(f"local:{tmp_path}")
    Splits([Fold(["a"], [], ["b"]), Fold(["b"], [], ["a"])]).save(tmp_path / "two.json")
    with pytest.raises(EmbedkitError, match="2 folds.*--fold"):
        excluded_ids(tmp_path / "two.json", ["test"], None)
