"""Building a trainable timm classifier with ImageNet weights, saving its best checkpoint, loading it back.

Weights come through the encoder registry's builders, so the sources and the missing-weights error are
the same as for ``embed``: the timm hub, a local ``--weights`` file, or the offline ``efficientnet_lite0/1/2``
packages (mapped by position into timm's ``tf_efficientnet_liteN``). The checkpoint is
``model.safetensors`` (the timm model's state dict with its K-class classifier) plus ``model.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..encoders import Preprocess
from ..errors import EmbedkitError

CHECKPOINT_FORMAT = "embedkit-finetune"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


@dataclass
class Built:
    """A trainable classifier and where it came from."""

    model: nn.Module
    name: str  # what the user asked for (e.g. efficientnet_lite0, timm:resnet50, efficientnet_b3)
    arch: str  # the timm architecture that load_finetuned rebuilds
    preprocess: Preprocess
    weights_source: str
    weights_fingerprint: str


def encoder_name(model: str) -> str:
    """Map ``--model`` to an encoder-registry name whose builder yields a timm network.

    Registry names backed by timm or the Lite packages are kept; ``timm:<arch>`` passes through; any other
    timm architecture name (``efficientnet_b3``, ``resnet50``, ...) becomes ``timm:<arch>``.
    """
    import timm

    from ..encoders import REGISTRY

    spec = REGISTRY.get(model)
    if spec is not None and spec.backend in ("timm", "lite"):
        return model
    if model.startswith("timm:"):
        return model
    if timm.is_model(model.split(".")[0]):
        return f"timm:{model}"
    hint = ""
    if spec is not None:
        alt = f", e.g. timm:{spec.local_arch} with --weights" if spec.local_arch else ""
        hint = f" ({model} is a {spec.backend} encoder; fine-tuning needs a timm architecture{alt})"
    raise EmbedkitError(f"--model {model!r}: not a timm model{hint}; use a timm name such as efficientnet_b3 or "
                        f"resnet50, timm:<name>, or efficientnet_lite0/1/2 for offline ImageNet weights")


def build_model(model: str, num_classes: int, *, weights: str | os.PathLike | None = None, pretrained: bool = True,
                image_size: int | None = None) -> Built:
    """A timm classifier for ``num_classes`` classes, initialised from ImageNet weights unless ``pretrained=False``."""
    from ..encoders import create_encoder

    name = encoder_name(model)
    enc = create_encoder(name, weights=weights, image_size=image_size, pretrained=pretrained)
    net = enc.model
    net.reset_classifier(num_classes)
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    return Built(net, model, enc.spec.arch, enc.preprocess, enc.weights_source, enc.weights_fingerprint)


def create_architecture(arch: str, num_classes: int, image_size: int) -> nn.Module:
    """The bare timm network (random weights) that a checkpoint's state dict loads into."""
    from ..encoders.timm_backend import create_timm_model

    return create_timm_model(arch, image_size, False, None, num_classes=num_classes)


def _atomic_bytes(path: Path, data: bytes) -> None:
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(path, data)


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, config: dict) -> None:
    """Write ``model.safetensors`` and ``model.json`` atomically (weights first, so the config never points ahead)."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_bytes(d / WEIGHTS_FILE, save(state, metadata={"format": CHECKPOINT_FORMAT, "model": config["model"]}))
    _atomic_bytes(d / CONFIG_FILE, json.dumps(config, indent=1).encode())


def read_config(directory: str | os.PathLike) -> dict:
    """Read and check ``model.json`` of a fine-tuned checkpoint folder."""
    d = Path(directory)
    path = d / CONFIG_FILE
    if not path.exists():
        folds = sorted(p.name for p in d.glob("fold_*") if (p / CONFIG_FILE).exists())
        if folds:
            raise EmbedkitError(f"{d} holds {len(folds)} fold models ({', '.join(folds)}); pass one of them, e.g. {d / folds[0]}")
        raise EmbedkitError(f"{d}: no {CONFIG_FILE}; not a folder written by 'embedkit finetune'")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise EmbedkitError(f"{path}: unreadable ({exc})") from None
    if cfg.get("format") != CHECKPOINT_FORMAT:
        raise EmbedkitError(f"{path}: not an embedkit fine-tuning checkpoint (format {cfg.get('format')!r})")
    if int(cfg.get("version", 0)) > CHECKPOINT_VERSION:
        raise EmbedkitError(f"{path}: checkpoint version {cfg['version']} is newer than this embedkit understands; upgrade")
    return cfg


def load_finetuned(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load the best fine-tuned model of ``directory``: ``(timm model in eval mode, model.json as a dict)``.

    The dict holds ``classes`` (output order), ``preprocess`` (``Preprocess(**info['preprocess'])``) and
    ``conversion`` (``Conversion.from_dict``), so images can be fed exactly as in training.
    """
    from safetensors.torch import load_file

    cfg = read_config(directory)
    model = create_architecture(cfg["model"], len(cfg["classes"]), int(cfg["preprocess"]["size"]))
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.exists():
        raise EmbedkitError(f"{weights}: missing; the checkpoint folder is incomplete")
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise EmbedkitError(f"{weights}: does not fit {cfg['model']} with {len(cfg['classes'])} classes "
                            f"({str(exc).splitlines()[0][:200]})") from None
    return model.to(device).eval(), cfg


def preprocess_from(cfg: dict) -> Preprocess:
    """The Preprocess a checkpoint was trained with."""
    p = dict(cfg["preprocess"])
    p["mean"], p["std"] = tuple(p["mean"]), tuple(p["std"])
    return Preprocess(**p)
