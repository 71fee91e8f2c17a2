"""The one device policy: which device to use, mixed precision on it, and DataLoader settings."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import EmbedkitError


def resolve_device(device: str = "auto", allow_mps: bool = True) -> torch.device:
    """'auto' picks CUDA, then MPS (if allowed), then CPU; an explicit CUDA request without a GPU is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if allow_mps and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmbedkitError("--device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    return torch.device(device)


def use_cpu_threads() -> None:
    """Run torch's CPU kernels on every core, unless ``OMP_NUM_THREADS`` sets the count (e.g. one per test worker)."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def worker_init(_: int) -> None:
    """DataLoader workers use one thread each, so N workers do not oversubscribe the cores."""
    torch.set_num_threads(1)


def loader_kwargs(device: torch.device, workers: int) -> dict:
    """Keyword arguments for a DataLoader feeding ``device`` with ``workers`` processes."""
    return dict(num_workers=workers, pin_memory=device.type == "cuda",
                worker_init_fn=worker_init if workers else None, persistent_workers=False)
