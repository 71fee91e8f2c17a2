"""``finetune()``: items and splits in, one trained model per fold and a probe-compatible result folder out.

Output folder (one fold, the usual case)::

    DIR/model.safetensors, model.json      best checkpoint (see load_finetuned)
    DIR/splits.json                         the exact splits used
    DIR/history.json, training_curve.png    per-epoch losses and validation balanced accuracy
    DIR/metrics.json, predictions.csv, confusion.png, roc.png, summary.md   (embedkit.results format)

With several folds each fold's checkpoint, history and curve live in ``DIR/fold_<k>/`` and the test
predictions of all folds are pooled at the top. The ``run`` column carries the run names that
``embedkit probe`` records in splits.json (``seed0``, ``fold3``, ...), so predictions pair row by row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import EmbedkitError
from ..images import Conversion
from ..splits import Splits, SplitSpec, check_splits, load_or_make_splits, run_names
from ..items import ItemSet
from . import ddp
from .data import Augment, CellDataset, check_files, load_items
from .evaluate import default_workers, predict
from .model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CONFIG_FILE, WEIGHTS_FILE, build_model, load_weights
from .state import LEGACY_STATE_FILE, STATE_FILE
from .train import HISTORY_FILE, TrainConfig, plot_history, train_fold

CURVE_FILE = "training_curve.png"


SplitOptions = SplitSpec  # the old name


@dataclass
class FinetuneResult:
    out: Path
    record: dict
    folds: list = field(default_factory=list)


def _versions() -> dict:
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__}


def get_splits(items: ItemSet, opts: SplitSpec) -> tuple[Splits, list[str]]:
    """Load and validate saved splits against these items, or make them with the shared splits module."""
    group_of = dict(zip(items.ids, items.groups))
    label_of = dict(zip(items.ids, items.labels))
    splits, _ = load_or_make_splits(items.ids, items.labels, items.groups, opts, opts.group_by or "group")
    if not splits.meta.get("runs"):  # name runs as 'embedkit probe' does, so predictions pair row by row
        many = len(splits.folds) > 1
        splits.meta["runs"] = [f"fold{k}" if many else f"seed{splits.seed}" for k in range(len(splits.folds))]
    warnings = check_splits(splits, group_of, label_of)
    for k, fold in enumerate(splits.folds):
        unlabelled = [i for part in ("train", "val", "test") for i in fold.part(part) if not label_of[i]]
        if unlabelled:
            raise EmbedkitError(f"splits fold {k}: item {unlabelled[0]!r} has no label; fine-tuning needs labelled items")
    return splits, warnings


def finetune(source, out: str | os.PathLike, model: str, *, split_opts: SplitSpec = SplitSpec(),
             train: TrainConfig = TrainConfig(), weights: str | None = None, pretrained: bool = True,
             image_size: int | None = None, conv: Conversion = Conversion(), folds: Sequence[int] | None = None,
             device: str = "auto", workers: int | None = None, name: str | None = None, restart: bool = False,
             progress: bool = True, log: Callable[[str], None] = print, nproc: int = 1) -> FinetuneResult:
    """Fine-tune ``model`` (a timm name, or efficientnet_lite0/1/2) on ``source`` and write a result folder.

    ``source`` is a Store, a store file, a folder of class folders, a manifest, or an :class:`ItemSet`.

    Re-running the same call resumes an interrupted run; finished folds are not trained again. ``nproc`` > 1
    trains with DistributedDataParallel in that many processes (see :mod:`.ddp`).
    """
    call = dict(locals())  # the arguments, for the processes of --nproc
    from ..device import resolve_device
    from ..results import predictions_frame, write_results

    train.check()
    out = Path(out)
    items = load_items(source, split_opts.group_by)
    splits, warnings = get_splits(items, split_opts)
    for w in warnings:
        log(f"warning: {w}")
    chosen = list(range(len(splits.folds))) if folds is None else sorted(set(folds))
    bad = [k for k in chosen if not 0 <= k < len(splits.folds)]
    if bad:
        raise EmbedkitError(f"--fold {bad[0]}: the splits have {len(splits.folds)} fold(s), numbered from 0")
    label_of = dict(zip(items.ids, items.labels))
    used = [i for k in chosen for part in ("train", "val", "test") for i in splits.folds[k].part(part)]
    classes = sorted({label_of[i] for i in used})
    index = {c: j for j, c in enumerate(classes)}
    check_files(items, items.positions(list(dict.fromkeys(used))))
    if nproc > 1 and not ddp.is_launched():
        if items.store is not None and not isinstance(source, (str, os.PathLike, ItemSet)):
            call["source"] = str(items.store.path)  # a Store handle is reopened by each process from its path
        return ddp.launch(nproc, finetune, call)

    dev = ddp.setup(resolve_device(device))
    if not ddp.is_main():
        log, progress = _silent, False
    out.mkdir(parents=True, exist_ok=True)
    if restart and ddp.is_main():
        _discard(out, len(splits.folds))
    ddp.barrier()
    n_workers = default_workers(dev) // ddp.world() if workers is None else workers
    aug = Augment() if train.augment else None
    fingerprint = splits.fingerprint()
    names = run_names(splits)
    name = name or f"{model} fine-tuned"

    frames, outcomes, throughput = [], [], []
    built = None
    for k in chosen:
        fold = splits.folds[k]
        fold_dir = out if len(splits.folds) == 1 else out / f"fold_{k}"
        torch.manual_seed(train.seed)
        built = build_model(model, len(classes), weights=weights, pretrained=pretrained, image_size=image_size)
        pre = built.preprocess

        def dataset(ids, augment=None):
            rows = items.positions(ids)
            return CellDataset(items, rows, np.array([index[label_of[i]] for i in ids]), pre, conv, augment, train.seed)

        settings = {"model": model, "arch": built.arch, "weights_fingerprint": built.weights_fingerprint,
                    "classes": classes, "preprocess": pre.to_dict(), "conversion": conv.to_dict(),
                    "splits_fingerprint": fingerprint, "fold": k, "train": train.to_dict(),
                    "augment": aug.to_dict() if aug else None}

        def checkpoint_config(best: dict, _k=k, _built=built) -> dict:
            return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": _built.arch, "name": model,
                    "classes": classes, "preprocess": _built.preprocess.to_dict(), "conversion": conv.to_dict(),
                    "splits_fingerprint": fingerprint, "fold": _k, "group_by": splits.group_by,
                    "hyperparameters": train.to_dict(), "augment": aug.to_dict() if aug else None,
                    "weights_source": _built.weights_source, "weights_fingerprint": _built.weights_fingerprint,
                    "best_epoch": best["epoch"], "best_val_balanced_accuracy": best["score"],
                    "versions": _versions()}

        log(f"fold {k}: {len(fold.train)} train / {len(fold.val)} val / {len(fold.test)} test items, "
            f"{len(classes)} classes; {model} ({built.weights_source}) at {pre.size}px on {dev}")
        outcome = train_fold(built.model, dataset(fold.train, aug), dataset(fold.val), classes, fold_dir, train,
                             settings, checkpoint_config, dev, workers=n_workers, progress=progress, log=log)
        outcomes.append(outcome)
        if not ddp.is_main():  # rank 0 alone tests and writes
            continue
        if outcome.already_done:
            log(f"fold {k}: already trained (best epoch {outcome.best_epoch}); evaluating its checkpoint")
        load_weights(built.model, fold_dir / WEIGHTS_FILE, f"{built.arch} with {len(classes)} classes")
        built.model.to(dev)  # a fold finished earlier was never moved to the device
        test_ds = dataset(fold.test)
        pred = predict(built.model, test_ds, dev, batch_size=train.batch_size * 2, workers=n_workers, amp=train.amp,
                       progress=progress, desc=f"test fold {k}")
        throughput.append((len(test_ds), pred.seconds))
        rows = items.positions(fold.test)
        frames.append(predictions_frame(list(fold.test), list(items.groups[rows]), [label_of[i] for i in fold.test],
                                        pred.proba, classes, run=names[k]))
        plot_history({f"fold {k}": outcome.history}, fold_dir / CURVE_FILE,
                     title=f"{name}: fold {k}" if len(splits.folds) > 1 else name)

    if not ddp.is_main():
        return FinetuneResult(out, {}, outcomes)
    import pandas as pd

    n_test = sum(n for n, _ in throughput)
    info = {"kind": "finetune", "name": name, "encoder": model, "head": "finetune", "model": built.arch,
            "splits_fingerprint": fingerprint, "group_by": splits.group_by, "folds_run": chosen,
            "n_folds": len(splits.folds), "run_names": [names[k] for k in chosen],
            "fit_seconds": float(np.mean([o.fit_seconds for o in outcomes])),
            "fit_seconds_per_run": [round(o.fit_seconds, 3) for o in outcomes],
            "predict_items_per_second": n_test / max(sum(s for _, s in throughput), 1e-9),
            "predict_note": "images/s from decoded files to class probabilities, batch "
                            f"{train.batch_size * 2}, on {dev}",
            "weights_source": built.weights_source, "weights_fingerprint": built.weights_fingerprint,
            "preprocess": built.preprocess.to_dict(), "conversion": conv.to_dict(),
            "hyperparameters": train.to_dict(), "augment": aug.to_dict() if aug else None,
            "best_epoch": [o.best_epoch for o in outcomes], "epochs_run": [len(o.history) for o in outcomes],
            "stopped_early": [o.stopped_early for o in outcomes], "device": str(dev), "processes": ddp.world(),
            "source": str(items.store.path if items.store is not None else source),
            "items_from": items.kind, "versions": _versions()}
    splits.save(out / "splits.json")
    record = write_results(out, pd.concat(frames, ignore_index=True), classes, info, title=name)
    if len(splits.folds) > 1:
        plot_history({f"fold {k}": o.history for k, o in zip(chosen, outcomes)}, out / CURVE_FILE, title=name)
    return FinetuneResult(out, record, outcomes)


def _silent(_: str) -> None:
    """The log of processes other than rank 0."""


def _discard(out: Path, n_folds: int) -> None:
    """--restart: remove a previous run's training state, history and checkpoint (results are rewritten)."""
    dirs = [out] if n_folds == 1 else [out / f"fold_{k}" for k in range(n_folds)]
    for d in dirs:
        for f in (STATE_FILE, LEGACY_STATE_FILE, HISTORY_FILE, WEIGHTS_FILE, CONFIG_FILE, CURVE_FILE):
            (d / f).unlink(missing_ok=True)
