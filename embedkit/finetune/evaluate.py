"""Running a classifier over a dataset: class probabilities, loss, and inference throughput."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..device import autocast, loader_kwargs
from ..errors import BadImageError
from .data import CellDataset, collate


@dataclass
class Prediction:
    proba: np.ndarray  # [N, K] softmax probabilities, in dataset order
    loss: float  # mean cross-entropy against the dataset's targets
    seconds: float

    @property
    def items_per_second(self) -> float:
        return len(self.proba) / self.seconds if self.seconds > 0 else float("nan")


def loader(ds: CellDataset, batch_size: int, workers: int, device: torch.device, sampler=None) -> torch.utils.data.DataLoader:
    """A DataLoader over ``ds`` (in order unless a sampler is given)."""
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False,
                                       collate_fn=collate, **loader_kwargs(device, workers))


def raise_bad(bad: list[tuple[int, str]]) -> None:
    """Stop on the first unreadable image with one clear line (training must not silently drop items)."""
    if bad:
        path, _, reason = bad[0][1].partition(": ")
        raise BadImageError(path, f"{reason}; fix or remove it (and make splits without it), then run again to resume")


@torch.no_grad()
def predict(model: torch.nn.Module, ds: CellDataset, device: torch.device, *, batch_size: int = 64, workers: int = 0,
            amp: bool = True, progress: bool = False, desc: str = "predict") -> Prediction:
    """Softmax probabilities and mean loss of ``model`` on every item of ``ds`` (no augmentation)."""
    from tqdm.auto import tqdm

    model.eval()
    proba = np.zeros((len(ds), 0), dtype=np.float32)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    total_loss, n = 0.0, 0
    t0 = time.perf_counter()
    with tqdm(total=len(ds), desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True,
              file=sys.stderr) as bar:
        for idx, x, y, bad in loader(ds, batch_size, workers, device):
            raise_bad(bad)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
            out.append((idx.numpy(), torch.softmax(logits, dim=1).cpu().numpy()))
            bar.update(len(y))
    seconds = time.perf_counter() - t0
    if out:
        k = out[0][1].shape[1]
        proba = np.zeros((len(ds), k), dtype=np.float64)
        for idx, p in out:
            proba[idx] = p
    return Prediction(proba, total_loss / max(n, 1), seconds)


def default_workers(device: torch.device) -> int:
    """Decoding workers: none on CPU (the cores train the model), up to 8 on a GPU machine."""
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
