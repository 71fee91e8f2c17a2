"""Which layer a CAM looks at: chosen per architecture family, or named with ``--layer``.

* CNNs (timm, torchvision, transformers ConvNeXt): the last layer that outputs a spatial map before
  global pooling (EfficientNet ``bn2``, ResNet ``layer4``), found by tracing one forward pass.
* ViTs (timm, DINOv2/DINOv3 in transformers): the last block's first norm (``blocks.11.norm1``,
  ``encoder.layer.11.norm1``). After the last block only the CLS token matters to a CLS-pooled head,
  so later layers give patch tokens no gradient; the last block's attention still mixes them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EmbedkitError
from .models import ExplainModel
from .reshape import token_layout

_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers?)\.(\d+)$")
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass
class LayerInfo:
    """One module of the backbone as seen in a forward pass."""

    name: str
    type: str
    shape: tuple[int, ...] | None  # output shape of its first call; None when it did not run
    calls: int


def trace_layers(model: ExplainModel, x: torch.Tensor) -> list[LayerInfo]:
    """Run one forward pass and record every backbone module's output shape, in order of completion."""
    seen: dict[str, LayerInfo] = {}
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if name in seen:
                seen[name].calls += 1
            else:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
                seen[name] = LayerInfo(name, type(module).__name__, shape, 1)
        return fn

    for name, module in model.backbone.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model.net(x.to(model.device))
    finally:
        for h in handles:
            h.remove()
    ran = list(seen.values())
    idle = [LayerInfo(n, type(m).__name__, None, 0) for n, m in model.backbone.named_modules() if n and n not in seen]
    return ran + idle


def default_layer(model: ExplainModel, trace: list[LayerInfo]) -> str:
    """The layer this family is usually explained at (see the module docstring)."""
    if token_layout(model.backbone, model.num_prefix_tokens) is not None:
        return _last_block_norm(model.backbone)
    spatial = [li for li in trace if li.calls == 1 and li.shape is not None and len(li.shape) == 4
               and li.shape[2] * li.shape[3] > 1 and li.type not in {c.__name__ for c in _PASSTHROUGH}]
    if not spatial:
        raise EmbedkitError("found no layer with a spatial feature map in this network; name one with --layer "
                            "(--list-layers shows them)")
    return spatial[-1].name


def _last_block_norm(backbone: nn.Module) -> str:
    blocks = [(name.count("."), -int(m.group(1)), name) for name, _ in backbone.named_modules()
              if (m := _BLOCK.search(name))]
    if not blocks:
        raise EmbedkitError("cannot find this ViT's transformer blocks; name the layer with --layer (--list-layers shows them)")
    name = min(blocks)[2]
    block = backbone.get_submodule(name)
    for child_name, child in block.named_children():
        if "norm" in type(child).__name__.lower() or "norm" in child_name.lower():
            return f"{name}.{child_name}"
    return name


def resolve_layer(model: ExplainModel, name: str | None, trace: list[LayerInfo]) -> tuple[str, nn.Module]:
    """The target layer's name and module: ``name`` checked against the network, or the family default."""
    chosen = default_layer(model, trace) if name is None else name
    modules = dict(model.backbone.named_modules())
    if chosen not in modules or not chosen:
        valid = [li.name for li in trace if li.calls == 1 and li.shape is not None and len(li.shape) in (3, 4)]
        close = difflib.get_close_matches(chosen, valid, n=6, cutoff=0.4)
        shown = close or valid[-8:]
        raise EmbedkitError(f"--layer {chosen!r}: no such layer in this network; valid names include "
                            f"{', '.join(shown)} (default: {default_layer(model, trace)}; --list-layers shows all "
                            f"{len(valid)})")
    info = next((li for li in trace if li.name == chosen), None)
    if info is None or info.calls == 0:
        raise EmbedkitError(f"--layer {chosen!r} is not used when this model classifies an image; pick another "
                            f"(--list-layers shows the ones that run)")
    if info.calls > 1:
        raise EmbedkitError(f"--layer {chosen!r} runs {info.calls} times per image (a shared module); CAMs need a "
                            f"layer that runs once, e.g. its parent block")
    tokens = token_layout(model.backbone, model.num_prefix_tokens) is not None
    if info.shape is None or len(info.shape) not in ((3, 4) if tokens else (4,)):
        want = "tokens [B, T, D] or a map [B, C, H, W]" if tokens else "a spatial map [B, C, H, W]"
        raise EmbedkitError(f"--layer {chosen!r} outputs shape {info.shape}; a CAM needs {want}")
    return chosen, modules[chosen]


def layer_table(model: ExplainModel, trace: list[LayerInfo], default: str) -> list[tuple[str, str, str, str]]:
    """Rows (name, type, output shape, note) for ``--list-layers``: the layers a CAM could use."""
    tokens = token_layout(model.backbone, model.num_prefix_tokens) is not None
    rows = []
    for li in trace:
        if li.calls != 1 or li.shape is None or len(li.shape) not in ((3, 4) if tokens else (4,)):
            continue
        rows.append((li.name, li.type, "x".join(str(s) for s in li.shape[1:]), "default" if li.name == default else ""))
    return rows
