"""Pooled features of intermediate layers (ViT blocks, CNN stages), all taken from one forward pass.

Each backend describes its layers as :class:`Taps`: their kind (``block`` for token models, ``stage`` for
CNNs), the modules in network order, and how one forward pass captures some of them. ``embed --layers``
stores every chosen layer under its own key ``<key>@block-N`` / ``<key>@stage-N`` (N counts from 0 in network
order; -1 is the last). The plain ``<key>`` always holds the encoder's usual output; a chosen layer whose pooled
features are exactly that output (a ViT's last block after the final norm, a ResNet's last stage) is not
stored twice (see docs/architecture.md, "One key per layer").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import EmbedkitError

if TYPE_CHECKING:  # the key helpers stay importable without torch (the store uses them)
    import torch
    from torch import nn

KINDS = ("block", "stage")
#: A layer key: ``<base key>@block-N`` or ``<base key>@stage-N``.
LAYER_KEY = re.compile(r"^(?P<base>.+)@(?P<kind>block|stage)-(?P<index>\d+)$")


@dataclass(frozen=True)
class LayerRequest:
    """What ``--layers`` asked for: every layer, or indices (negative ones count from the end)."""

    spec: str
    every: bool = False
    indices: tuple[int, ...] = ()


def parse_layers(spec: str | Sequence[int] | None) -> LayerRequest | None:
    """'all', or a comma list of layer indices such as '-1,-2,-4' or '3,7'; None or '' asks for none."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if not isinstance(spec, str):
        return LayerRequest(",".join(map(str, spec)), indices=tuple(int(i) for i in spec))
    text = spec.strip()
    if text.lower() == "all":
        return LayerRequest(text, every=True)
    try:
        indices = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise EmbedkitError(f"--layers {spec!r}: give 'all' or comma-separated layer indices, e.g. -1,-2,-4 "
                            f"(negative ones count from the last layer)") from None
    return LayerRequest(text, indices=tuple(dict.fromkeys(indices)))


def layer_key(key: str, kind: str, index: int) -> str:
    """The store key of layer ``index`` (absolute, from 0) of the encoder stored under ``key``."""
    return f"{key}@{kind}-{int(index)}"


def split_layer_key(key: str) -> tuple[str, str | None]:
    """(base key, layer name such as 'block-8') of a layer key; (key, None) for any other key."""
    m = LAYER_KEY.match(key)
    return (m["base"], f"{m['kind']}-{m['index']}") if m else (key, None)


def layer_siblings(keys: Sequence[str], key: str) -> list[str]:
    """The layer keys stored for ``key`` (or for the base of a layer key), in network order."""
    base = split_layer_key(key)[0]
    found = [(m["kind"], int(m["index"]), k) for k in keys if (m := LAYER_KEY.match(k)) and m["base"] == base]
    return [k for _, _, k in sorted(found)]


class Taps:
    """A backend's intermediate layers and one forward pass that returns the final features and some of them.

    ``capture(x, indices)`` returns (the encoder's usual pre-pool features, the features of each chosen layer in
    ``indices`` order, each before pooling: tokens [B, T, D] or maps [B, C, H, W]).
    """

    def __init__(self, kind: str, names: Sequence[str]):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}")
        self.kind = kind
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.names)

    def capture(self, x: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError


class HookTaps(Taps):
    """Layers read with forward hooks on the network's own modules while ``features`` runs as usual.

    ``post`` is applied to each captured output (the final norm of token models, so that the last block's
    pooled features equal the encoder's output, as DINOv2's evaluation of intermediate layers does).
    """

    def __init__(self, kind: str, modules: Sequence[tuple[str, nn.Module]], features: Callable[[torch.Tensor], torch.Tensor],
                 post: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(kind, [n for n, _ in modules])
        self.modules = [m for _, m in modules]
        self.features = features
        self.post = post

    def capture(self, x: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seen: dict[int, torch.Tensor] = {}

        def hook(i: int):
            def store(_module, _inputs, output):
                seen[i] = output[0] if isinstance(output, (tuple, list)) else output
            return store

        handles = [self.modules[i].register_forward_hook(hook(i)) for i in dict.fromkeys(indices)]
        try:
            final = self.features(x)
        finally:
            for h in handles:
                h.remove()
        post = self.post or (lambda t: t)
        return final, [post(seen[i]) for i in indices]


class HiddenStateTaps(Taps):
    """Layers of a transformers model from its ``output_hidden_states`` (the embedding output left out)."""

    def __init__(self, kind: str, model: nn.Module, n_layers: int, post: Callable[[torch.Tensor], torch.Tensor] | None):
        super().__init__(kind, [f"hidden_states[{i + 1}]" for i in range(n_layers)])
        self.model = model
        self.post = post

    def capture(self, x: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.model(pixel_values=x, output_hidden_states=True)
        hidden = list(out.hidden_states)[-len(self.names):]  # some models list the embedding output first
        post = self.post or (lambda t: t)
        return out.last_hidden_state, [post(hidden[i]) for i in indices]


def timm_taps(model: nn.Module, tokens: bool, features: Callable[[torch.Tensor], torch.Tensor]) -> Taps | None:
    """A timm model's layers as timm's ``feature_info`` lists them (ViT blocks, CNN stages); None without one."""
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    named = dict(model.named_modules())
    try:
        modules = [(str(d["module"]), named[str(d["module"])]) for d in info]
    except (KeyError, TypeError):
        return None
    norm = getattr(model, "norm", None) if tokens else None
    return HookTaps("block" if tokens else "stage", modules, features, norm)


def module_taps(model: nn.Module, names: Sequence[str], features: Callable[[torch.Tensor], torch.Tensor]) -> Taps:
    """CNN stages given by module names (torchvision models)."""
    named = dict(model.named_modules())
    return HookTaps("stage", [(n, named[n]) for n in names], features)


def resolve(request: LayerRequest, taps: Taps | None, encoder_name: str) -> list[int]:
    """Absolute layer indices for ``request``, refusing ones the encoder does not have (one clear line)."""
    if taps is None or not len(taps):
        raise EmbedkitError(f"--layers {request.spec}: {encoder_name} offers no intermediate layers here; "
                            f"leave out --layers to store its final features")
    n, kind = len(taps), taps.kind
    if request.every:
        return list(range(n))
    bad = [i for i in request.indices if not -n <= i < n]
    if bad:
        raise EmbedkitError(f"--layers {request.spec}: {encoder_name} has {n} {kind}s ({kind}-0 to {kind}-{n - 1}); "
                            f"{bad[0]} is not one of them. Use indices from -{n} to {n - 1} (-1 is the last), or all")
    return list(dict.fromkeys(i % n for i in request.indices))
