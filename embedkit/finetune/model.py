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

from ..atomic import atomic_write_bytes, atomic_write_json
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


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, config: dict) -> None:
    """Write ``model.safetensors`` and ``model.json`` atomically (weights first, so the config never points ahead)."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(d / WEIGHTS_FILE, save(state, metadata={"format": CHECKPOINT_FORMAT, "model": config["model"]}))
    atomic_write_json(d / CONFIG_FILE, config)


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
    except (ValueError, OSError) as exc:
        raise EmbedkitError(f"{path}: unreadable ({exc})") from None
    if not isinstance(cfg, dict):
        raise EmbedkitError(f"{path}: expected a JSON object, found a {type(cfg).__name__}; not an embedkit checkpoint")
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
    cfg = read_config(directory)
    try:
        arch, classes, size = str(cfg["model"]), list(cfg["classes"]), int(cfg["preprocess"]["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EmbedkitError(f"{Path(directory) / CONFIG_FILE}: incomplete checkpoint description ({exc!r} is missing "
                            f"or malformed)") from None
    model = create_architecture(arch, len(classes), size)
    load_weights(model, Path(directory) / WEIGHTS_FILE, f"{arch} with {len(classes)} classes")
    return model.to(device).eval(), cfg


def load_weights(model: nn.Module, weights: Path, what: str) -> None:
    """Load ``model.safetensors`` into ``model`` (all keys must fit); a missing, garbage or mismatched file is one line."""
    from safetensors.torch import load_file

    if not weights.exists():
        raise EmbedkitError(f"{weights}: missing; the checkpoint folder is incomplete")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for torn or foreign files
        raise EmbedkitError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: "
                            f"{str(exc)[:120]}); the checkpoint is damaged") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EmbedkitError(f"{weights}: does not fit {what} ({str(exc).splitlines()[0][:200]})") from None


def preprocess_from(cfg: dict) -> Preprocess:
    """The Preprocess a checkpoint was trained with."""
    p = dict(cfg["preprocess"])
    p["mean"], p["std"] = tuple(p["mean"]), tuple(p["std"])
    return Preprocess(**p)
