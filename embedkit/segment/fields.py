"""Loading one whole field: the raw array, its RGB rendering for crops, and the planes a segmenter sees."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadImageError, EmbedkitError
from ..images import Conversion, read_image, to_rgb


def parse_seg_channels(spec: str | None) -> tuple[int, ...] | None:
    """'0' or '1,0': raw channels (nuclear first for watershed) that the segmenter sees; None = the RGB rendering."""
    if spec is None or str(spec).strip() == "":
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise EmbedkitError(f"--seg-channels {spec!r}: give one to three channel indices, e.g. '0' or '1,0'")
    return tuple(int(p) for p in parts)


@dataclass
class Field:
    """One loaded field: ``rgb`` float32 [H, W, 3] in [0, 1] (what crops show), ``seg`` what is segmented."""

    path: str
    raw: np.ndarray
    rgb: np.ndarray
    seg: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[:2]


def load_field(path: str, conv: Conversion = Conversion(), seg_channels: tuple[int, ...] | None = None) -> Field:
    """Read a field and convert it (16-bit by robust percentiles, as for embedding); raise BadImageError on failure."""
    raw = read_image(path)
    rgb = to_rgb(raw, conv, path)
    if seg_channels is None:
        seg = rgb
    else:
        bad = [c for c in seg_channels if c >= raw.shape[2]]
        if bad:
            raise BadImageError(path, f"has {raw.shape[2]} channel(s) but --seg-channels asks for channel {bad[0]}")
        chans = tuple(seg_channels) + (None,) * (3 - len(seg_channels))
        seg = to_rgb(raw, Conversion(channels=chans, percentiles=conv.percentiles, rescale_8bit=conv.rescale_8bit), path)
        seg = seg[:, :, :len(seg_channels)]
    return Field(path=path, raw=raw, rgb=rgb, seg=seg)
