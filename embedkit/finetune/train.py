"""The training loop of one fold: AdamW, warm-up + cosine schedule, AMP on GPU, early stopping, resume.

After every epoch the full training state (model, optimiser, AMP scaler, epoch, history, best score) is
written atomically to ``train_state.safetensors`` (tensors + JSON, see :mod:`.state`); a killed run
started again with the same settings continues from its last completed epoch. Sampling, augmentation and dropout draws are seeded from (seed, epoch),
so the resumed run ends exactly as an uninterrupted one would (on CPU; GPU kernels may differ in the last bits).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_json
from ..configdiff import differences
from ..errors import EmbedkitError
from ..figures import pyplot, save_figure
from ..metrics import classification_metrics
from . import ddp
from .data import BalancedSampler, CellDataset
from .evaluate import autocast, loader, predict, raise_bad
from .model import save_checkpoint
from .state import STATE_FILE, load_state, refuse_legacy, save_state

HISTORY_FILE = "history.json"


@dataclass
class TrainConfig:
    """Hyper-parameters of a fine-tuning run (all recorded in model.json and metrics.json)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    patience: int = 8
    balance: str = "weights"
    samples_per_epoch: int | None = None
    augment: bool = True
    label_smoothing: float = 0.0
    seed: int = 0
    amp: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.epochs < 1:
            raise EmbedkitError("--epochs must be at least 1")
        if self.lr <= 0:
            raise EmbedkitError("--lr must be positive")
        if self.patience < 1:
            raise EmbedkitError("--patience must be at least 1")
        if not 0 <= self.label_smoothing < 1:
            raise EmbedkitError("--label-smoothing must lie in [0, 1)")


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` of the base rate at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class FoldOutcome:
    """What training one fold produced."""

    directory: Path
    history: list[dict]
    best_epoch: int
    best_score: float
    fit_seconds: float
    resumed_from: int = 0
    stopped_early: bool = False
    already_done: bool = False


def run_identity(settings: dict) -> str:
    """Short hash of everything that determines a run's result (resume refuses other settings)."""
    from ..store import fingerprint

    return fingerprint(settings)


def check_resumable(directory: Path, settings: dict) -> dict | None:
    """The saved history of a run in ``directory`` with the same settings, None when there is none.

    A run there with other settings is refused with a line naming what differs.
    """
    hist_path = directory / HISTORY_FILE
    if not hist_path.exists():
        return None
    try:
        saved = json.loads(hist_path.read_text())
    except ValueError as exc:
        raise EmbedkitError(f"{hist_path}: unreadable ({exc}); pass --restart to discard the run in {directory}") from None
    if not isinstance(saved, dict):
        raise EmbedkitError(f"{hist_path}: not a fine-tuning history; pass --restart to discard the run in {directory}")
    if saved.get("identity") != run_identity(settings):
        diffs = "; ".join(differences(saved.get("settings", {}), settings)[:4]) or "unknown"
        raise EmbedkitError(f"{directory} holds a fine-tuning run made with other settings ({diffs}); run the same "
                            f"command to resume it, pass --restart to discard it, or choose another --out")
    return saved


def train_fold(model: torch.nn.Module, train_ds: CellDataset, val_ds: CellDataset, classes: list[str],
               directory: Path, cfg: TrainConfig, settings: dict, checkpoint_config: Callable[[dict], dict],
               device: torch.device, *, workers: int = 0, progress: bool = True,
               log: Callable[[str], None] = lambda s: None) -> FoldOutcome:
    """Train ``model`` on ``train_ds``, keep the best epoch by validation balanced accuracy, save it.

    ``settings`` identifies the run (a resume must match it); ``checkpoint_config(best)`` returns the
    model.json written with each new best checkpoint.
    """
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    identity = run_identity(settings)
    saved = check_resumable(directory, settings)
    if saved is not None and saved.get("finished"):
        (directory / STATE_FILE).unlink(missing_ok=True)  # left over if killed right after finishing
        best = saved["best"]
        return FoldOutcome(directory, saved["history"], best["epoch"], best["score"], saved["fit_seconds"],
                           already_done=True, stopped_early=saved.get("stopped_early", False))
    if len(val_ds) == 0:
        raise EmbedkitError("these splits have no validation items; fine-tuning needs them to pick the best epoch")
    refuse_legacy(directory)

    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = ddp.wrap(model, device)  # DistributedDataParallel under --nproc; the model itself otherwise
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported())
    sampler = ddp.shard(BalancedSampler(train_ds.targets, cfg.balance, cfg.seed, cfg.samples_per_epoch))
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    history: list[dict] = []
    best = {"epoch": 0, "score": -math.inf, "loss": math.inf}
    stale = 0
    start = 0
    state_path = directory / STATE_FILE
    if state_path.exists():
        history, best, stale, start = _resume(state_path, identity, model, opt, scaler)
        log(f"resuming {directory} after epoch {start}/{cfg.epochs} (best so far: epoch {best['epoch']}, "
            f"val balanced accuracy {best['score']:.3f})")
    y_val = val_ds.targets
    stopped_early = False
    for epoch in range(start, cfg.epochs):
        if stale >= cfg.patience:
            stopped_early = True
            break
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(loader(train_ds, cfg.batch_size, workers, device, sampler=sampler), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress, leave=False,
                   dynamic_ncols=True, file=sys.stderr)
        for step, (_, x, y, bad) in enumerate(bar):
            raise_bad(bad)
            factor = lr_factor(epoch * steps_per_epoch + step, total_steps, warmup_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * factor
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, cfg.amp):
                loss = F.cross_entropy(net(x).float(), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise EmbedkitError(f"training loss became {float(loss)} in epoch {epoch + 1}; lower --lr "
                                    f"(now {cfg.lr:g}) and run with --restart")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            running += float(loss.detach()) * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{running / seen:.3f}")
        bar.close()
        running, seen = ddp.total(running, seen)
        val = predict(model, val_ds, device, batch_size=cfg.batch_size * 2, workers=workers, amp=cfg.amp)
        m = classification_metrics(y_val, val.proba, classes)
        val_loss, m = ddp.share((val.loss, m))  # rank 0's numbers decide, so every process stops at the same epoch
        row = {"epoch": epoch + 1, "train_loss": running / max(seen, 1), "val_loss": val_loss,
               "val_balanced_accuracy": m["balanced_accuracy"], "val_accuracy": m["accuracy"],
               "lr": cfg.lr * lr_factor((epoch + 1) * steps_per_epoch - 1, total_steps, warmup_steps, cfg.min_lr_ratio),
               "seconds": time.perf_counter() - t0}
        improved = m["balanced_accuracy"] > best["score"] + 1e-12 or (
            abs(m["balanced_accuracy"] - best["score"]) <= 1e-12 and val_loss < best["loss"])
        if improved:
            best = {"epoch": epoch + 1, "score": m["balanced_accuracy"], "loss": val_loss}
            stale = 0
            if ddp.is_main():
                save_checkpoint(directory, model, checkpoint_config(best))
        else:
            stale += 1
        row["best"] = improved
        history.append(row)
        if not ddp.is_main():
            continue
        save_state(state_path, {"identity": identity, "epoch": epoch + 1, "model": model.state_dict(),
                                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "history": history,
                                "best": best, "stale": stale})
        atomic_write_json(directory / HISTORY_FILE, {"identity": identity, "settings": settings, "finished": False,
                                                     "history": history, "best": best,
                                                     "fit_seconds": sum(h["seconds"] for h in history)})
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.3f}, val loss {val_loss:.3f}, "
            f"val balanced accuracy {m['balanced_accuracy']:.3f}{'  (best)' if improved else ''}  [{row['seconds']:.0f}s]")
    if stopped_early:
        log(f"early stop: validation balanced accuracy has not improved for {cfg.patience} epochs")
    fit_seconds = float(sum(h["seconds"] for h in history))
    if not ddp.is_main():
        return FoldOutcome(directory, history, best["epoch"], best["score"], fit_seconds, resumed_from=start,
                           stopped_early=stopped_early)
    atomic_write_json(directory / HISTORY_FILE, {"identity": identity, "settings": settings, "finished": True,
                                                 "stopped_early": stopped_early, "history": history, "best": best,
                                                 "fit_seconds": fit_seconds})
    state_path.unlink(missing_ok=True)
    return FoldOutcome(directory, history, best["epoch"], best["score"], fit_seconds, resumed_from=start,
                       stopped_early=stopped_early)


def _resume(state_path: Path, identity: str, model: torch.nn.Module, opt, scaler) -> tuple[list, dict, int, int]:
    """Load a saved training state into model, optimiser and scaler; (history, best, stale, epoch) to go on from."""
    state = load_state(state_path)
    if state.get("identity") != identity:
        raise EmbedkitError(f"{state_path} belongs to a run with other settings; pass --restart to discard it")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        return state["history"], state["best"], int(state["stale"]), int(state["epoch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise EmbedkitError(f"{state_path}: does not fit this model and optimiser ({str(exc).splitlines()[0][:160]}); "
                            f"pass --restart to discard it") from None


def plot_history(histories: dict[str, list[dict]], path: str | os.PathLike, title: str = "training curve") -> None:
    """Training and validation loss, and validation balanced accuracy, per epoch for each fold; best epochs marked."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for n, (label, history) in enumerate(histories.items()):
        ep = [h["epoch"] for h in history]
        tag = f"{label} " if len(histories) > 1 else ""
        ax1.plot(ep, [h["train_loss"] for h in history], "o-", ms=3, color=f"C{n}", label=f"{tag}train")
        ax1.plot(ep, [h["val_loss"] for h in history], "s--", ms=3, color=f"C{n}", label=f"{tag}validation")
        ax2.plot(ep, [h["val_balanced_accuracy"] for h in history], "o-", ms=3, color=f"C{n}", label=label)
        best = [h for h in history if h.get("best")]
        if best:
            ax2.plot([best[-1]["epoch"]], [best[-1]["val_balanced_accuracy"]], "*", ms=12, color=f"C{n}")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation balanced accuracy (star: kept)")
    if len(histories) > 1:
        ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
