"""Class activation maps with pytorch-grad-cam, made safe for frozen encoders.

Frozen encoders have ``requires_grad=False`` weights and usually run under ``inference_mode``; then no
activation requires grad and a CAM fails with "element 0 of tensors does not require grad". Here the
input itself requires grad, with autograd explicitly enabled, so gradients reach every activation
while no weight is unfrozen.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import EmbedkitError

METHOD_NAMES = ("gradcam", "hirescam", "gradcam++", "eigencam", "scorecam")
#: Methods that need no gradient; EigenCAM is also class-agnostic (the same map for every target).
GRADIENT_FREE = ("eigencam", "scorecam")


class _KeepGrid:
    """Mixin: keep each layer's map at the feature grid's resolution, before normalisation and resizing."""

    def get_cam_image(self, *args, **kwargs):
        cam = super().get_cam_image(*args, **kwargs)
        self.grid_maps = np.maximum(np.asarray(cam, dtype=np.float32), 0)
        return cam


@functools.lru_cache(maxsize=None)
def _method_classes() -> dict[str, type]:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, ScoreCAM
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    class SignedEigenCAM(EigenCAM):
        """EigenCAM with the principal component's arbitrary sign fixed so the strong side is positive."""

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
            proj = get_2d_projection(activations)
            flip = np.abs(proj.min(axis=(1, 2))) > np.abs(proj.max(axis=(1, 2)))
            return np.where(flip[:, None, None], -proj, proj)

    class QuietScoreCAM(ScoreCAM):
        """ScoreCAM without its own per-image progress bar (the caller shows one over images)."""

        def get_cam_weights(self, *args, **kwargs):
            from pytorch_grad_cam import score_cam

            original = score_cam.tqdm
            score_cam.tqdm = _NoBar
            try:
                return super().get_cam_weights(*args, **kwargs)
            finally:
                score_cam.tqdm = original

    bases = {"gradcam": GradCAM, "hirescam": HiResCAM, "gradcam++": GradCAMPlusPlus, "eigencam": SignedEigenCAM,
             "scorecam": QuietScoreCAM}
    return {name: type(f"Grid{base.__name__}", (_KeepGrid, base), {}) for name, base in bases.items()}


class _NoBar:
    """Stands in for the ``tqdm`` module inside pytorch_grad_cam.score_cam."""

    @staticmethod
    def tqdm(iterable, *args, **kwargs):
        return iterable


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """'gradcam,hirescam' -> ['gradcam', 'hirescam'], refusing unknown names with the list of known ones."""
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    aliases = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++", "grad-cam": "gradcam", "hires-cam": "hirescam",
               "score-cam": "scorecam", "eigen-cam": "eigencam"}
    names = [aliases.get(n, n) for n in names]
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise EmbedkitError(f"--method {unknown[0] if unknown else spec!r}: unknown method; choose from "
                            f"{', '.join(METHOD_NAMES)} (comma-separated for several)")
    return list(dict.fromkeys(names))


@dataclass
class CamResult:
    """Maps for a batch: ``maps`` [B, H, W] in [0, 1] at the input's size; ``grid`` [B, h, w] unnormalised."""

    maps: np.ndarray
    grid: np.ndarray


def compute_cam(net: nn.Module, x: torch.Tensor, method: str, layer: nn.Module, targets: Sequence[int],
                reshape=None, scorecam_batch: int = 32) -> CamResult:
    """One CAM method for a batch ``x`` [B, 3, H, W] and one target class index per image.

    Works through frozen weights and inside an ``inference_mode`` caller: autograd is re-enabled locally
    and the input is a fresh tensor that requires grad.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = _method_classes()[method]
    if len(targets) != x.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {x.shape[0]}")
    if reshape is not None:
        reshape.set_input(x.shape[-2:])
    with torch.inference_mode(False), torch.enable_grad():
        inp = x.detach().clone().requires_grad_(True)
        cam = cls(model=net, target_layers=[layer], reshape_transform=reshape)
        cam.batch_size = scorecam_batch
        try:
            maps = cam(input_tensor=inp, targets=[ClassifierOutputTarget(int(t)) for t in targets])
            if not cam.activations_and_grads.activations:
                raise EmbedkitError("the target layer did not run in the forward pass; choose another with --layer")
            grid = cam.grid_maps
        except (IndexError, TypeError, ValueError):
            if not cam.activations_and_grads.activations:
                raise EmbedkitError("the target layer did not run in the forward pass; choose another with --layer") from None
            if method not in GRADIENT_FREE and not cam.activations_and_grads.gradients:
                raise EmbedkitError("no gradient reached the target layer: it is not on the path from the input to "
                                    "the class score; choose another with --layer") from None
            raise
        finally:
            cam.activations_and_grads.release()
            net.zero_grad(set_to_none=True)
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return CamResult(maps, np.nan_to_num(grid, nan=0.0, posinf=0.0, neginf=0.0))
