"""Segmentation backends by name: each builds an object with ``segment(image) -> labels`` and ``config``."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import EmbedkitError

BACKENDS = ("cellpose", "watershed")


class Segmenter(Protocol):
    name: str

    @property
    def config(self) -> dict: ...

    def segment(self, image: np.ndarray) -> np.ndarray: ...


def create_segmenter(backend: str = "cellpose", *, model: str = "cpsam", diameter: float | None = None,
                     device: str = "auto", batch_size: int = 8, flow_threshold: float = 0.4,
                     cellprob_threshold: float = 0.0, min_size: int | None = None, polarity: str = "auto") -> Segmenter:
    """Build a segmenter (``min_size`` None: the backend's own default). Cellpose weights that cannot be found raise WeightsNotFoundError (no silent fallback)."""
    if backend == "cellpose":
        from .cellpose_backend import CellposeSegmenter

        return CellposeSegmenter(model=model, diameter=diameter, device=device, batch_size=batch_size,
                                 flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold,
                                 min_size=15 if min_size is None else min_size)
    if backend == "watershed":
        from .watershed import WatershedParams, WatershedSegmenter

        params = WatershedParams(polarity=polarity, diameter=diameter)
        if min_size is not None:
            params = WatershedParams(polarity=polarity, diameter=diameter, min_size=min_size)
        return WatershedSegmenter(params)
    raise EmbedkitError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
