"""Reading microscopy images (PNG/JPEG/TIFF, 8/16-bit, any channel count) and turning them into RGB.

Two steps are kept apart so each can be checked: :func:`read_image` returns the raw array exactly as
stored (H, W, C), and :func:`to_rgb` maps it to float RGB in [0, 1] with explicit, recorded rules.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BadImageError, EmbedkitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image suffix embedkit can read."""
    from .formats import SUFFIXES  # microscopy formats read through bioio (embedkit.formats)

    return str(path).lower().endswith(IMAGE_SUFFIXES + SUFFIXES)


#: Largest image read whole, in pixels (height x width x planes): a 20,000 x 20,000 field would need
#: gigabytes once decoded. The environment variable EMBEDKIT_MAX_PIXELS overrides it (0: no limit).
DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "EMBEDKIT_MAX_PIXELS"


def max_pixels() -> int:
    """The pixel limit in force: EMBEDKIT_MAX_PIXELS (e.g. 250000000 or 2.5e8; 0 turns it off) or 100 megapixels."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise EmbedkitError(f"{MAX_PIXELS_ENV}={raw!r}: not a number of pixels (e.g. 250000000, or 0 for no limit)") from None
    if value < 0:
        raise EmbedkitError(f"{MAX_PIXELS_ENV}={raw!r}: must be 0 (no limit) or a positive number of pixels")
    return value


def check_pixels(path: str, shape: Sequence[int], pixels: int, limit: int | None = None) -> None:
    """Refuse an image of ``pixels`` pixels (its stored ``shape``) above the limit, before it is decoded."""
    limit = max_pixels() if limit is None else limit
    if limit and pixels > limit:
        dims = " x ".join(str(int(d)) for d in shape)
        raise BadImageError(path, f"is {dims} ({pixels / 1e6:.3g} megapixels), over the {limit / 1e6:g}-megapixel limit "
                                  f"for reading an image whole; crop or tile it first, or raise the limit with "
                                  f"'embedkit --max-pixels N ...' or {MAX_PIXELS_ENV}=N")


def read_image(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Read an image as an (H, W, C) array in its stored dtype; raise BadImageError with the reason.

    Its size is checked from the file header against ``limit`` (default :func:`max_pixels`) before any
    pixel is decoded.
    """
    from . import formats

    if formats.handles(path):  # OME-TIFF, OME-Zarr, CZI, ND2, LIF and item locators go through bioio
        return formats.read_raw(path)
    path = Path(path)
    if not path.exists():
        raise BadImageError(str(path), "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(str(path), "file is empty (0 bytes)")
    limit = max_pixels() if limit is None else limit
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            arr = _read_tiff(path, limit)
        else:
            arr = _read_pil(path, limit)
    except BadImageError:
        raise
    except Exception as exc:  # decoders raise many types; all mean "not a readable image"
        reason = " ".join(str(exc).split())[:200]  # one line, however the decoder formats its message
        raise BadImageError(str(path), f"not a readable image ({type(exc).__name__}: {reason})") from None
    return _to_hwc(arr, str(path))


def _read_tiff(path: Path, limit: int) -> np.ndarray:
    """The first series of a TIFF, its size checked from the IFDs before decoding."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        # Channel axes (samples, or few planes as _to_hwc reads them) do not count; every other axis does.
        spatial = [d for d, ax in zip(series.shape, series.axes) if ax not in "SC" and d > 8]
        check_pixels(str(path), series.shape, int(np.prod(spatial, dtype=np.int64)), limit)
        return tf.asarray()


def _read_pil(path: Path, limit: int) -> np.ndarray:
    """PNG/JPEG/BMP through Pillow, its size checked from the header before decoding."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # embedkit's own limit, checked below, replaces Pillow's bomb check
    try:
        with Image.open(path) as im:
            check_pixels(str(path), (im.height, im.width), im.width * im.height, limit)
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr"):
                im = im.convert("RGB")
            return np.array(im)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _to_hwc(arr: np.ndarray, path: str) -> np.ndarray:
    """Bring 2-D, HWC or CHW arrays (as TIFFs often store them) to HWC."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        # Channel-first stacks: few planes, each much larger than the plane count.
        if arr.shape[0] <= 8 and arr.shape[0] < min(arr.shape[1:]) and arr.shape[2] > 8:
            arr = np.moveaxis(arr, 0, -1)
        return arr
    squeezed = np.squeeze(arr)
    if squeezed.ndim in (2, 3) and squeezed.ndim < arr.ndim:
        return _to_hwc(squeezed, path)
    raise BadImageError(path, f"has {arr.ndim} dimensions {tuple(arr.shape)}; expected a 2-D image with channels")


@dataclass(frozen=True)
class Conversion:
    """How raw arrays become RGB; recorded with every embedding run as provenance."""

    channels: tuple[int | None, int | None, int | None] | None = None
    percentiles: tuple[float, float] = (1.0, 99.8)
    rescale_8bit: bool = False
    per_channel: str | None = None  # 'bag' or 'mean' (embedkit.channelbag): every channel as its own grayscale image
    channel_count: int | None = None  # how many channels per_channel expects (set by embed from the first image)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = None if self.channels is None else list(self.channels)
        d["percentiles"] = list(self.percentiles)
        if self.per_channel is None:  # absent rather than None, so keys made before these fields keep their fingerprint
            del d["per_channel"], d["channel_count"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Conversion":
        """Inverse of to_dict (a store key's recorded conversion)."""
        d = d or {}
        ch = d.get("channels")
        return cls(channels=None if ch is None else tuple(ch), percentiles=tuple(d.get("percentiles", (1.0, 99.8))),
                   rescale_8bit=bool(d.get("rescale_8bit", False)), per_channel=d.get("per_channel"),
                   channel_count=d.get("channel_count"))


#: ``--channels`` values that run every channel through the encoder separately (see embedkit.channelbag).
PER_CHANNEL = ("bag", "mean")


def make_conversion(channels: str | None, percentiles: str | Sequence[float] = (1.0, 99.8)) -> Conversion:
    """The Conversion of ``--channels`` (a channel map, or bag / mean) and ``--percentiles``."""
    mode = str(channels).strip().lower() if channels is not None else ""
    if mode in PER_CHANNEL:
        return Conversion(percentiles=parse_percentiles(percentiles), per_channel=mode)
    return Conversion(channels=parse_channels(channels), percentiles=parse_percentiles(percentiles))


def parse_channels(spec: str | None) -> tuple[int | str | None, int | str | None, int | str | None] | None:
    """Parse a channel map such as '0', '2,1,0', '1,0,-' or 'DAPI,Phalloidin,-' (R,G,B sources; '-' leaves one black)."""
    if spec is None or str(spec).strip() == "":
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise EmbedkitError(f"--channels {spec!r}: give one channel (replicated to RGB) or three, e.g. '2,1,0' or '1,0,-'")
    out: list[int | None] = []
    for p in parts:
        if p in ("-", "none", ""):
            out.append(None)
        elif p.isdigit():
            out.append(int(p))
        elif p.isprintable() and p[0].isalpha():
            out.append(p)  # a channel name, resolved per file from its metadata (embedkit.formats)
        else:
            raise EmbedkitError(f"--channels {spec!r}: {p!r} is not a channel index, a channel name or '-'")
    if all(c is None for c in out):
        raise EmbedkitError(f"--channels {spec!r} maps no channel at all")
    return out[0], out[1], out[2]


def parse_percentiles(spec: str | Sequence[float]) -> tuple[float, float]:
    """Parse 'LOW,HIGH' percentiles used to rescale 16-bit and float images."""
    vals = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(vals) != 2 or not 0 <= vals[0] < vals[1] <= 100:
        raise EmbedkitError(f"percentiles {spec!r}: need LOW,HIGH with 0 <= LOW < HIGH <= 100, e.g. 1,99.8")
    return vals[0], vals[1]


def _rescale(plane: np.ndarray, conv: Conversion) -> np.ndarray:
    """Map one channel to float32 [0, 1]: 8-bit linearly, everything else by robust percentiles."""
    if plane.dtype == np.uint8 and not conv.rescale_8bit:
        return plane.astype(np.float32) / 255.0
    x = plane.astype(np.float32)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros_like(x)
    lo, hi = np.percentile(finite, conv.percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def to_rgb(arr: np.ndarray, conv: Conversion = Conversion(), path: str = "image", keep_uint8: bool = False) -> np.ndarray:
    """Convert an (H, W, C) raw array to float32 RGB in [0, 1] following ``conv``.

    Grayscale is replicated, RGBA drops alpha, and any other channel count needs ``conv.channels``; with
    ``conv.per_channel`` (bag / mean) every channel is kept instead, as (H, W, C).
    ``keep_uint8``: 8-bit input that maps linearly (value / 255) stays uint8, so the division can happen
    later on the encoder's device (the result divided by 255 equals the float32 output exactly).
    """
    if arr.ndim != 3:
        arr = _to_hwc(arr, path)
    c = arr.shape[2]
    if conv.per_channel is not None:
        return _all_channels(arr, conv, path, keep_uint8)
    if conv.channels is not None and any(isinstance(i, str) for i in conv.channels):
        from .formats import resolve_channel_names

        conv = Conversion(resolve_channel_names(conv.channels, path), conv.percentiles, conv.rescale_8bit)
    raw = keep_uint8 and arr.dtype == np.uint8 and not conv.rescale_8bit
    dtype = np.uint8 if raw else np.float32

    def rescale(plane: np.ndarray) -> np.ndarray:
        return plane if raw else _rescale(plane, conv)

    if conv.channels is not None:
        bad = [i for i in conv.channels if i is not None and i >= c]
        if bad:
            raise BadImageError(path, f"has {c} channel(s) but --channels asks for channel {bad[0]}")
        planes = [np.zeros(arr.shape[:2], dtype) if i is None else rescale(arr[:, :, i]) for i in conv.channels]
        return np.stack(planes, axis=-1)
    if c == 1:
        g = rescale(arr[:, :, 0])
        return np.stack([g, g, g], axis=-1)
    if c == 2 and arr.dtype == np.uint8:  # PIL 'LA': gray + alpha
        g = rescale(arr[:, :, 0])
        return np.stack([g, g, g], axis=-1)
    if c in (3, 4):
        return np.stack([rescale(arr[:, :, i]) for i in range(3)], axis=-1)
    raise BadImageError(path, f"has {c} channels; pass --channels to map them to RGB, e.g. --channels 0,1,2 or --channels 1,0,-")


def _all_channels(arr: np.ndarray, conv: Conversion, path: str, keep_uint8: bool) -> np.ndarray:
    """Every channel rescaled on its own, (H, W, C), for ``--channels bag|mean``; refuse another channel count."""
    c = arr.shape[2]
    if conv.channel_count is not None and c != conv.channel_count:
        raise BadImageError(path, f"has {c} channel(s); --channels {conv.per_channel} in this run takes "
                                  f"{conv.channel_count}, as its first image has")
    if keep_uint8 and arr.dtype == np.uint8 and not conv.rescale_8bit:
        return np.ascontiguousarray(arr)
    return np.stack([_rescale(arr[:, :, i], conv) for i in range(c)], axis=-1)


def load_rgb(path: str | os.PathLike, conv: Conversion = Conversion()) -> np.ndarray:
    """Read a file and convert it to float32 RGB in [0, 1]."""
    return to_rgb(read_image(path), conv, str(path))


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float [0, 1] image to uint8, for thumbnails and stored crops."""
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
