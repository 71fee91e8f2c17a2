"""``adapt()``: continue self-supervised training of an encoder on unlabelled cells, resumably.

Output folder::

    OUT/encoder.safetensors, encoder.json   the adapted encoder (load it as local:OUT)
    OUT/history.json, loss_curve.png        per-epoch (and per-step) loss
    OUT/train_state.safetensors             resume point while the run is unfinished (removed at the end)

After every epoch the whole training state (networks, heads, DINO centre, optimiser, AMP scaler, history) is
written atomically into one safetensors file; a killed run started again with the same settings continues
from its last completed epoch. Sampling and views are seeded from (seed, epoch, draw), as in ``finetune``,
so a resumed run ends with the weights an uninterrupted one would have (on CPU).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..atomic import atomic_write_json
from ..errors import EmbedkitError
from ..finetune.train import run_identity
from ..images import Conversion
from .data import Unlabelled, select_items
from .methods import MethodConfig, build_method, views_needed
from .saved import CONFIG_FILE, WEIGHTS_FILE, save_adapted
from .state import load_state, read_meta, save_state
from .views import MicroscopyViews, ViewConfig, ViewDataset, collate_views

STATE_FILE = "train_state.safetensors"
HISTORY_FILE = "history.json"
CURVE_FILE = "loss_curve.png"


@dataclass
class AdaptConfig:
    """Optimisation settings of an adaptation run (recorded in encoder.json)."""

    method: str = "dino"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    head_lr_scale: float = 10.0  # the new projection head starts from random weights and learns faster
    weight_decay: float = 0.04
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    samples_per_epoch: int | None = None
    seed: int = 0
    amp: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.epochs < 1:
            raise EmbedkitError("--epochs must be at least 1")
        if self.lr <= 0 or self.head_lr_scale <= 0:
            raise EmbedkitError("--lr and --head-lr-scale must be positive")
        if self.batch_size < 2:
            raise EmbedkitError("--batch-size must be at least 2 (views are contrasted within a batch)")


@dataclass
class AdaptResult:
    out: Path
    config: dict
    history: list[dict]
    resumed_from: int = 0
    already_done: bool = False
    fit_seconds: float = field(default=0.0)


def _libraries() -> dict:
    from importlib.metadata import version

    return {"torch": torch.__version__, "timm": version("timm"), "lightly": version("lightly")}


def _check_previous(out: Path, identity: str, settings: dict) -> dict | None:
    """The saved history of a run in ``out`` with these settings; refuse one made with other settings."""
    from ..configdiff import describe_differences

    path = out / HISTORY_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("identity") != identity:
        raise EmbedkitError(f"{out} holds an adaptation run made with other settings "
                            f"({describe_differences(saved.get('settings', {}), settings)}); run the same command to "
                            f"resume it, pass --restart to discard it, or choose another --out")
    return saved


def _discard(out: Path) -> None:
    for name in (STATE_FILE, HISTORY_FILE, CURVE_FILE, WEIGHTS_FILE, CONFIG_FILE):
        (out / name).unlink(missing_ok=True)


def adapt(source: str | os.PathLike, out: str | os.PathLike, encoder: str, *, cfg: AdaptConfig = AdaptConfig(),
          views: ViewConfig | None = None, method_cfg: MethodConfig = MethodConfig(), image_size: int | None = None,
          pooling: str | None = None, weights: str | None = None, splits_file: str | None = None,
          exclude: Sequence[str] = (), fold: int | None = None, conv: Conversion = Conversion(), device: str = "auto",
          workers: int | None = None, restart: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> AdaptResult:
    """Adapt ``encoder`` to the cells of ``source`` with DINO or SimCLR and save it in ``out``.

    Labels are never read. ``exclude`` names split parts (e.g. ``('test',)``) of ``splits_file`` to leave out,
    so a later probe on those items is honest. Re-running the same call resumes an interrupted run.
    """
    from ..device import resolve_device
    from ..encoders import create_encoder

    cfg.check()
    out = Path(out)
    data = select_items(source, splits_file, exclude, fold)
    base = create_encoder(encoder, weights=weights, pooling=pooling, image_size=image_size)
    size = base.preprocess.size
    views = views or ViewConfig()
    n_global, n_local = views_needed(cfg.method, views.n_local)
    views = replace(views, global_size=size, n_global=n_global, n_local=n_local,
                    local_size=views.local_size or max(16, size // 2))
    settings = {"encoder": encoder, "base_weights_fingerprint": base.weights_fingerprint,
                "preprocess": base.preprocess.to_dict(), "pooling": base.pooling, "conversion": conv.to_dict(),
                "data_fingerprint": data.fingerprint, "train": cfg.to_dict(), "method": method_cfg.to_dict(),
                "views": views.to_dict(),  # the excluded ids, not where the splits file lies, identify a run
                "excluded": {k: v for k, v in data.excluded.items() if k != "splits_file"}}
    identity = run_identity(settings)
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        _discard(out)
    saved = _check_previous(out, identity, settings)
    if saved is not None and saved.get("finished") and (out / CONFIG_FILE).exists():
        (out / STATE_FILE).unlink(missing_ok=True)
        return AdaptResult(out, json.loads((out / CONFIG_FILE).read_text()), saved["history"], already_done=True,
                           fit_seconds=saved.get("fit_seconds", 0.0))

    dev = resolve_device(device)
    spare = [base]

    def make_encoder():
        """The encoder built above first (no second load), then fresh copies (the DINO teacher)."""
        return spare.pop() if spare else create_encoder(encoder, weights=weights, pooling=pooling, image_size=size)

    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, make_encoder, method_cfg)
    log(f"adapting {encoder} ({method.adapted().weights_source}) by {cfg.method} on {len(data.ids)} cells from "
        f"{data.items.kind}{_excluded_note(data)}; {size}px, {cfg.epochs} epochs, on {dev}")
    history, start, fit = _train(method, data, views, conv, out, identity, settings, cfg, dev, workers, progress, log)

    adapted = method.adapted()
    config = {"base_encoder": encoder, "base_weights": adapted.weights_source,
              "base_weights_fingerprint": settings["base_weights_fingerprint"], "method": cfg.method,
              "kept_network": method.kept, "epochs": cfg.epochs, "final_loss": history[-1]["loss"],
              "data": {"fingerprint": data.fingerprint, "n_items": len(data.ids), "source": os.path.abspath(source),
                       "items_from": data.items.kind, "excluded": data.excluded, "labels_used": False},
              "preprocess": adapted.preprocess.to_dict(), "pooling": adapted.pooling, "dim": adapted.dim,
              "conversion": conv.to_dict(), "train": cfg.to_dict(), "method_config": method_cfg.to_dict(),
              "views": views.to_dict(), "fit_seconds": fit, "device": str(dev), "identity": identity,
              "implementation": "lightly (DINOLoss, DINOProjectionHead, NTXentLoss, SimCLRProjectionHead)",
              "versions": _libraries()}
    config = save_adapted(out, adapted.to("cpu"), config)
    plot_loss(history, out / CURVE_FILE, title=f"{encoder} adapted by {cfg.method}")
    atomic_write_json(out / HISTORY_FILE, {"identity": identity, "settings": settings, "finished": True,
                                           "history": history, "fit_seconds": fit})
    (out / STATE_FILE).unlink(missing_ok=True)
    return AdaptResult(out, config, history, resumed_from=start, fit_seconds=fit)


def _excluded_note(data: Unlabelled) -> str:
    ex = data.excluded
    if not ex:
        return ""
    return f" ({ex['n_excluded']} {'/'.join(ex['parts'])} items of fold {ex['fold']} excluded)"


def _optimizer(method, cfg: AdaptConfig) -> torch.optim.Optimizer:
    """AdamW: no weight decay on biases and norms; the head's learning rate scaled by ``head_lr_scale``."""
    groups = []
    for module, scale in zip(method.trainable(), (1.0, cfg.head_lr_scale)):
        params = [p for p in module.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _train(method, data: Unlabelled, views: ViewConfig, conv: Conversion, out: Path, identity: str, settings: dict,
           cfg: AdaptConfig, dev: torch.device, workers: int | None, progress: bool,
           log: Callable[[str], None]) -> tuple[list[dict], int, float]:
    """The epoch loop with per-epoch resumable state; returns (history, epoch resumed from, fit seconds)."""
    from tqdm.auto import tqdm

    from ..device import autocast, loader_kwargs
    from ..finetune.data import BalancedSampler
    from ..finetune.evaluate import default_workers, raise_bad
    from ..finetune.train import lr_factor

    method.to(dev)
    opt = _optimizer(method, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported())
    ds = ViewDataset(data.items, data.rows, MicroscopyViews(views, method.adapted().preprocess), conv, cfg.seed)
    sampler = BalancedSampler(np.zeros(len(ds), dtype=np.int64), "none", cfg.seed, cfg.samples_per_epoch)
    batch = min(cfg.batch_size, len(sampler))
    steps = len(sampler) // batch
    total, warmup = steps * cfg.epochs, int(round(cfg.warmup_epochs * steps))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True, collate_fn=collate_views,
                                         **loader_kwargs(dev, default_workers(dev) if workers is None else workers))
    state_path = out / STATE_FILE
    history: list[dict] = []
    start = 0
    if state_path.exists():
        if read_meta(state_path).get("identity") != identity:
            raise EmbedkitError(f"{state_path} belongs to a run with other settings; pass --restart to discard it")
        meta = load_state(state_path, method, opt, scaler)
        history, start = meta["history"], int(meta["epoch"])
        log(f"resuming {out} after epoch {start}/{cfg.epochs} (loss {history[-1]['loss']:.4f})")
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        method.train()
        losses: list[float] = []
        bar = tqdm(loader, total=steps, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not progress, leave=False, dynamic_ncols=True, file=sys.stderr)
        for step, (xs, bad) in enumerate(bar):
            raise_bad(bad)
            global_step = epoch * steps + step
            for g in opt.param_groups:
                g["lr"] = cfg.lr * g["lr_scale"] * lr_factor(global_step, total, warmup, cfg.min_lr_ratio)
            xs = [x.to(dev, non_blocking=True) for x in xs]
            with autocast(dev, cfg.amp):
                loss = method.loss(xs, epoch)
            if not torch.isfinite(loss):
                raise EmbedkitError(f"the {cfg.method} loss became {float(loss)} in epoch {epoch + 1}; lower --lr "
                                    f"(now {cfg.lr:g}) and run with --restart")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            method.before_step(epoch)
            scaler.step(opt)
            scaler.update()
            method.after_step(global_step + 1, total)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        bar.close()
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "step_losses": losses,
                        "lr": cfg.lr * lr_factor((epoch + 1) * steps - 1, total, warmup, cfg.min_lr_ratio),
                        "images": steps * batch, "seconds": seconds, "images_per_second": steps * batch / seconds})
        save_state(state_path, method, opt, scaler, {"identity": identity, "epoch": epoch + 1, "history": history})
        fit = float(sum(h["seconds"] for h in history))
        atomic_write_json(out / HISTORY_FILE, {"identity": identity, "settings": settings, "finished": False,
                                               "history": history, "fit_seconds": fit})
        log(f"epoch {epoch + 1}/{cfg.epochs}: {cfg.method} loss {history[-1]['loss']:.4f}  "
            f"[{seconds:.0f}s, {history[-1]['images_per_second']:.1f} img/s]")
    method.eval()
    return history, start, float(sum(h["seconds"] for h in history))


def plot_loss(history: list[dict], path: str | os.PathLike, title: str = "adaptation loss") -> None:
    """Per-step loss (faint) and per-epoch mean loss against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for h in history:
        n = len(h["step_losses"])
        xs = h["epoch"] - 1 + (np.arange(n) + 1) / max(n, 1)
        ax.plot(xs, h["step_losses"], "-", color="C0", alpha=0.3, lw=0.8)
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], "o-", color="C1", ms=4, label="epoch mean")
    ax.set_xlabel("epoch")
    ax.set_ylabel("self-supervised loss")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def result_summary(res: AdaptResult) -> str:
    """One line for the command: what was adapted, the loss, where it is, how to use it."""
    c, h = res.config, res.history
    first, last = h[0]["loss"], h[-1]["loss"]
    state = "already adapted" if res.already_done else f"adapted in {res.fit_seconds:.0f}s"
    return (f"{c['base_encoder']} {state} by {c['method']} on {c['data']['n_items']} cells: loss {first:.4f} -> "
            f"{last:.4f} over {len(h)} epochs; weights fingerprint {c['weights_fingerprint']} "
            f"(base {c['base_weights_fingerprint']}); use it as --encoder local:{res.out}")
