"""What ``explain`` explains: a fine-tuned network, or a frozen encoder composed with a saved linear probe.

Both become an :class:`ExplainModel`: one differentiable module from normalised images to class logits,
the network whose layer names ``--layer`` refers to, the classes, and the exact preprocessing the model
was trained with (so explained pixels are the pixels the model saw).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..encoders import Encoder, Preprocess
from ..errors import EmbedkitError
from ..images import Conversion

FINETUNE_FILE = "model.json"
PROBE_FILE = "probe.json"


@dataclass
class ExplainModel:
    """A classifier ready for CAMs: ``net(x) -> logits`` on tensors prepared with ``preprocess``."""

    net: nn.Module
    backbone: nn.Module  # the network whose named_modules() name the layers (--layer)
    classes: list[str]
    preprocess: Preprocess
    conversion: Conversion = field(default_factory=Conversion)
    kind: str = "module"  # 'finetune', 'probe' or 'module'
    source: str = ""
    num_prefix_tokens: int | None = None  # ViTs: CLS + register tokens; None: read from the backbone
    info: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "ExplainModel":
        self.net.to(device)
        return self

    def describe(self) -> str:
        """A short human name: 'efficientnet_lite0 + logreg probe', 'fine-tuned resnet50'."""
        if self.kind == "probe":
            return f"{self.info.get('encoder', 'encoder')} + {self.info.get('head', 'linear')} probe"
        if self.kind == "finetune":
            return f"fine-tuned {self.info.get('model', 'network')}"
        return type(self.net).__name__

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def class_index(self, name: str) -> int:
        """Index of a class by name, with the list of classes when it is not one of them."""
        if name not in self.classes:
            shown = ", ".join(self.classes[:20]) + (" ..." if len(self.classes) > 20 else "")
            raise EmbedkitError(f"--target {name!r}: not a class of this model; use 'predicted' or one of: {shown}")
        return self.classes.index(name)


class EncoderWithHead(nn.Module):
    """A frozen encoder followed by a probe head, as one differentiable module: images -> logits.

    The encoder's weights stay frozen (``requires_grad=False``); gradients still flow through it to
    its activations as long as the input requires grad, which is all a CAM needs.
    """

    def __init__(self, encoder: Encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.outputs(x)[-1])  # the selected layer's features for a layer key


def compose(encoder: Encoder, head: nn.Module, classes: list[str], conversion: Conversion | None = None,
            source: str = "", info: dict | None = None) -> ExplainModel:
    """Wrap a frozen encoder and a head mapping its features [B, D] to logits [B, K] for explanation."""
    net = EncoderWithHead(encoder, head).eval()
    return ExplainModel(net, encoder.model, list(classes), encoder.preprocess, conversion or Conversion(), "probe",
                        source, encoder.num_prefix_tokens, dict(info or {}))


def wrap_classifier(net: nn.Module, classes: list[str], preprocess: Preprocess, conversion: Conversion | None = None,
                    source: str = "", info: dict | None = None) -> ExplainModel:
    """Wrap any classifier network (images -> logits) whose own layers are the ones to explain."""
    return ExplainModel(net.eval(), net, list(classes), preprocess, conversion or Conversion(), "module", source,
                        None, dict(info or {}))


def find_model_folder(path: str | os.PathLike) -> Path:
    """The folder holding ``model.json`` (fine-tuned) or ``probe.json`` (probe): PATH itself or one below it."""
    p = Path(path)
    if p.is_file() and p.name in (FINETUNE_FILE, PROBE_FILE):
        p = p.parent
    if not p.exists():
        raise EmbedkitError(f"MODEL {path}: no such folder; give a folder written by 'embedkit finetune' or 'embedkit probe'")
    if not p.is_dir():
        raise EmbedkitError(f"MODEL {path}: expected a folder holding {FINETUNE_FILE} (fine-tuned) or {PROBE_FILE} (probe)")
    if (p / FINETUNE_FILE).exists() or (p / PROBE_FILE).exists():
        return p
    found = sorted({f.parent for name in (FINETUNE_FILE, PROBE_FILE) for f in p.rglob(name)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise EmbedkitError(f"MODEL {path}: holds no {FINETUNE_FILE} or {PROBE_FILE}; give a folder written by "
                            f"'embedkit finetune' or 'embedkit probe'")
    shown = ", ".join(str(f) for f in found[:8]) + (" ..." if len(found) > 8 else "")
    raise EmbedkitError(f"MODEL {path}: holds {len(found)} models ({shown}); name one of them")


def load_model(path: str | os.PathLike) -> ExplainModel:
    """Load a fine-tuned checkpoint folder or a saved probe (with its frozen encoder) for explanation."""
    folder = find_model_folder(path)
    if (folder / FINETUNE_FILE).exists():
        return load_finetune_folder(folder)
    return load_probe_folder(folder)


def load_finetune_folder(folder: Path) -> ExplainModel:
    """A fine-tuned timm classifier (``model.json`` + ``model.safetensors``), via ``embedkit.finetune``."""
    from ..finetune import load_finetuned, preprocess_from

    net, info = load_finetuned(folder)
    return ExplainModel(net.eval(), net, [str(c) for c in info["classes"]], preprocess_from(info),
                        Conversion.from_dict(info.get("conversion")), "finetune", str(folder), None, info)


def load_probe_folder(folder: Path) -> ExplainModel:
    """A saved linear probe and the frozen encoder it was fitted on, composed into one module."""
    from ..encoders import encoder_from_config
    from ..probe import load_probe

    probe = load_probe(folder)
    head = probe.torch_module()  # refuses kNN probes: votes of neighbours have no gradient
    config = probe.encoder_config
    if (config.get("conversion") or {}).get("per_channel"):
        raise EmbedkitError(f"{folder}: the probe was fitted on a --channels {config['conversion']['per_channel']} key; "
                            f"CAMs of one channel at a time are not offered, explain a probe of an RGB key")
    encoder = encoder_from_config(config)
    return compose(encoder, head.eval(), [str(c) for c in probe.classes], Conversion.from_dict(config.get("conversion")),
                   str(folder), {"head": probe.head, "encoder_key": probe.encoder_key, "encoder": config.get("encoder"),
                                 "config_fingerprint": probe.config_fingerprint})
