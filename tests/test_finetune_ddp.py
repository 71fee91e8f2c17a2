"""``finetune --nproc 2``: DistributedDataParallel on CPU (gloo) with the bundled MitoCheck cells: every process
trains on its own share of the draws, rank 0 alone writes, validation covers the full validation set, and a
killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import MITOCHECK, ROOT, run_cli
from embedkit.finetune import BalancedSampler
from embedkit.finetune.ddp import ShardedSampler
from embedkit.finetune.state import STATE_FILE

TINY = ["--model", "test_resnet", "--random-init", "--image-size", "48", "--group-by", "mitocheck", "--nproc", "2",
        "--batch-size", "16", "--samples-per-epoch", "96", "--quiet"]


def test_each_process_draws_its_own_share():
    targets = np.repeat(np.arange(4), [30, 5, 10, 12])
    base = BalancedSampler(targets, "weighted", seed=3)
    base.set_epoch(2)
    draws = list(base)
    shares = []
    for r in range(3):
        s = ShardedSampler(BalancedSampler(targets, "weighted", seed=3), r, 3)
        s.set_epoch(2)
        shares.append(list(s))
        assert len(shares[-1]) == len(s) == -(-len(draws) // 3)
    flat = [d for share in zip(*shares) for d in share]
    assert flat[:len(draws)] == draws and flat[len(draws):] == draws[:len(flat) - len(draws)]  # disjoint, padded by wrap
    assert not set(shares[0]) & set(shares[1])


@pytest.mark.timeout(1200)  # several interpreters start; slow on a loaded machine
def test_two_processes_train_resume_after_a_kill_and_rank0_validates_on_everything(tmp_path):
    from embedkit.finetune import load_finetuned, preprocess_from
    from embedkit.finetune.data import CellDataset, load_items
    from embedkit.finetune.evaluate import predict
    from embedkit.images import Conversion
    from embedkit.metrics import classification_metrics
    from embedkit.splits import Splits

    out = tmp_path / "ddp"
    args = ["finetune", MITOCHECK, "--out", out, "--epochs", "2", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", *map(str, args)], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / STATE_FILE
    deadline = time.monotonic() + 600
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no epoch finished"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both training processes, after the first epoch
    proc.wait()
    first = json.loads((out / "history.json").read_text())["history"]
    assert len(first) == 1

    done = run_cli(*args)  # the same command resumes from the saved state
    assert done.stdout.count("balanced accuracy") == 1  # rank 0 alone reports
    hist = json.loads((out / "history.json").read_text())
    assert hist["finished"] and len(hist["history"]) == 2 and hist["history"][0] == first[0]
    info = json.loads((out / "metrics.json").read_text())
    assert info["processes"] == 2 and info["epochs_run"] == [2]
    assert not state.exists() and not [p for p in out.iterdir() if ".tmp" in p.name]

    model, cfg = load_finetuned(out)  # the checkpoint loads
    splits = Splits.load(out / "splits.json")
    items = load_items(MITOCHECK, "mitocheck")
    label_of = dict(zip(items.ids, items.labels))
    val = list(splits.folds[0].val)
    classes = cfg["classes"]
    ds = CellDataset(items, items.positions(val), np.array([classes.index(label_of[i]) for i in val]), preprocess_from(cfg),
                     Conversion())
    pred = predict(model, ds, torch.device("cpu"), batch_size=32)
    m = classification_metrics(ds.targets, pred.proba, classes)
    row = hist["history"][cfg["best_epoch"] - 1]  # what rank 0 recorded is the metric of the whole validation set
    assert row["val_balanced_accuracy"] == pytest.approx(m["balanced_accuracy"], abs=1e-9)
    assert row["val_loss"] == pytest.approx(pred.loss, rel=1e-5)
    assert len(splits.folds[0].test) == len(pd.read_csv(out / "predictions.csv"))  # rank 0 tested every test item
