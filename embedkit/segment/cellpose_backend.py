"""Cellpose 4 backend: the CPSAM model (``cpsam`` by default), or any Cellpose 4 model file.

Cellpose downloads its named models on first use. When that is impossible (offline machines), this
module fails with one line naming the file Cellpose wanted and where to put it; it never falls back to
another method silently. Model files whose CPSAM encoder is not the standard ViT-L (smaller custom
models, the tiny random model the tests use) are built at the size their state dict records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import atomic_path
from ..errors import EmbedkitError, WeightsNotFoundError

#: SAM ViT-L, the encoder of the published CPSAM weights.
VIT_L = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)}
MODEL_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"


def _quiet_cellpose() -> None:
    """Cellpose logs a warning about the optional dinov3 package on import; embedkit does not use it."""
    for name in ("cellpose", "cellpose.vit", "cellpose.models", "cellpose.core", "cellpose.dynamics"):
        logging.getLogger(name).setLevel(logging.ERROR)


def models_dir() -> Path:
    """Where Cellpose looks for (and downloads) its named models."""
    _quiet_cellpose()
    from cellpose import models

    return Path(models.MODEL_DIR)


def named_models() -> list[str]:
    _quiet_cellpose()
    from cellpose import models

    return list(models.MODEL_NAMES)


def resolve_model(model: str) -> str:
    """Path of a Cellpose model: a file as given, or a named model from Cellpose's models folder.

    A named model that is missing is downloaded the way Cellpose does; if that fails (or the machine is
    marked offline with HF_HUB_OFFLINE=1), raise WeightsNotFoundError with the exact file to provide.
    """
    if os.path.isfile(model):
        return os.path.abspath(model)
    names = named_models()
    if model not in names:
        raise EmbedkitError(f"--model {model!r}: not a file and not a Cellpose model name ({', '.join(names)})")
    target = models_dir() / model
    if target.is_file():
        return str(target)
    reason = "offline mode (HF_HUB_OFFLINE=1)"
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        from cellpose import models

        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)
        try:
            return models.cache_model_path(model)
        except Exception as exc:  # URLError, HTTPError, timeouts, disk errors: all mean "not available"
            reason = f"download failed: {type(exc).__name__}: {str(exc)[:120]}"
        finally:
            socket.setdefaulttimeout(old_timeout)
    raise WeightsNotFoundError(
        f"Cellpose model {model!r} is not on this machine ({reason}): put the file {model!r} "
        f"(from {MODEL_URL}{model}) at {target} (or set CELLPOSE_LOCAL_MODELS_PATH to its folder), "
        f"or pass --model PATH; --backend watershed needs no weights")


def cpsam_architecture(state_dict: dict) -> dict:
    """The SAM encoder size a CPSAM state dict was built with (width, depth, heads, global-attention blocks)."""
    try:
        dim = int(state_dict["encoder.patch_embed.proj.weight"].shape[0])
    except KeyError:
        raise EmbedkitError("the model file holds no CPSAM encoder (no encoder.patch_embed.proj.weight); "
                            "only Cellpose 4 (CPSAM) models are supported") from None
    blocks = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.blocks.")})
    rel = [state_dict.get(f"encoder.blocks.{i}.attn.rel_pos_h") for i in blocks]
    if not blocks or any(r is None for r in rel):
        raise EmbedkitError("the model file's CPSAM encoder has no relative-position tables; it is not a Cellpose 4 model")
    head_dim = int(rel[0].shape[1])
    # SAM builds 1024-px images of 16-px tokens: global blocks see 64 positions (127 offsets), windowed ones 14 (27).
    return {"embed_dim": dim, "depth": len(blocks), "num_heads": dim // head_dim,
            "global_attn_indexes": tuple(i for i, r in zip(blocks, rel) if int(r.shape[0]) == 2 * 64 - 1)}


@contextlib.contextmanager
def sam_architecture(arch: dict) -> Iterator[None]:
    """Temporarily make SAM's 'vit_l' builder (which Cellpose calls) build an encoder of ``arch``'s size."""
    import importlib

    build_sam = importlib.import_module("segment_anything.build_sam")  # the package re-exports a function of that name
    registry = build_sam.sam_model_registry
    original = registry["vit_l"]

    def build(checkpoint=None):
        return build_sam._build_sam(encoder_embed_dim=arch["embed_dim"], encoder_depth=arch["depth"],
                                    encoder_num_heads=arch["num_heads"],
                                    encoder_global_attn_indexes=list(arch["global_attn_indexes"]), checkpoint=checkpoint)

    registry["vit_l"] = build
    try:
        yield
    finally:
        registry["vit_l"] = original


def save_random_cpsam(path: str | os.PathLike, embed_dim: int = 32, depth: int = 2, num_heads: int = 2,
                      global_attn_indexes: tuple[int, ...] = (1,), seed: int = 0) -> Path:
    """Write a randomly initialised CPSAM of the given encoder size as a Cellpose 4 model file.

    Used to test the Cellpose path offline; its masks are arbitrary.
    """
    import torch

    _quiet_cellpose()
    from cellpose.vit import CPSAM

    torch.manual_seed(seed)
    arch = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "global_attn_indexes": global_attn_indexes}
    with sam_architecture(arch):
        net = CPSAM(dtype=torch.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)  # Cellpose reads its model files with torch.load
    return path


@dataclass
class CellposeSegmenter:
    """Segments RGB float fields with a Cellpose 4 model; ``config`` records what was used."""

    model: str = "cpsam"
    diameter: float | None = None
    device: str = "auto"
    batch_size: int = 8
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15

    name = "cellpose"

    def __post_init__(self) -> None:
        import torch

        from ..encoders.base import file_fingerprint

        self.path = resolve_model(self.model)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise EmbedkitError(f"--model {self.model}: not a readable PyTorch model file ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(state, dict) or "W2" not in state:
            raise EmbedkitError(f"--model {self.model}: not a Cellpose 4 model (no 'W2' readout); Cellpose 3 models do not work with Cellpose 4")
        self.arch = cpsam_architecture(state)
        del state
        self.fingerprint = file_fingerprint(self.path)
        self._model = None

    def _network(self):
        """Build the Cellpose model on first use, so that a finished run never pays for it."""
        if self._model is None:
            from ..device import resolve_device

            _quiet_cellpose()
            from cellpose import models

            dev = resolve_device(self.device)
            ctx = contextlib.nullcontext() if self.arch == VIT_L else sam_architecture(self.arch)
            with ctx:
                self._model = models.CellposeModel(pretrained_model=self.path, device=dev, use_bfloat16=dev.type == "cuda")
        return self._model

    @property
    def config(self) -> dict:
        from importlib.metadata import version

        return {"backend": "cellpose", "model": self.model if not os.path.isfile(self.model) else os.path.basename(self.model),
                "weights_fingerprint": self.fingerprint, "architecture": {**self.arch, "global_attn_indexes": list(self.arch["global_attn_indexes"])},
                "diameter": self.diameter, "flow_threshold": self.flow_threshold, "cellprob_threshold": self.cellprob_threshold,
                "min_size": self.min_size, "versions": {"cellpose": version("cellpose")}}

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Instance labels (int32) of an (H, W, C<=3) float image."""
        img = np.asarray(image, np.float32)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] < 3:
            img = np.concatenate([img, np.zeros(img.shape[:2] + (3 - img.shape[2],), np.float32)], axis=2)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse invariant checks")  # raised inside Cellpose's dynamics
            masks, _, _ = self._network().eval(img[:, :, :3], channel_axis=2, batch_size=self.batch_size,
                                               diameter=self.diameter, flow_threshold=self.flow_threshold,
                                               cellprob_threshold=self.cellprob_threshold, min_size=self.min_size)
        return np.asarray(masks, dtype=np.int32)
