"""Reading and converting microscopy images: formats, bit depths, channels and bad files."""

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from embedkit.errors import BadImageError, EmbedkitError
from embedkit.images import Conversion, load_rgb, parse_channels, parse_percentiles, read_image, to_rgb


@pytest.fixture()
def cell(mitocheck_dir):
    return np.array(Image.open(next((mitocheck_dir / "Interphase").glob("*.png"))))


def test_8bit_gray_png_is_replicated_to_rgb(tmp_path, cell):
    rgb = load_rgb(_save_png(tmp_path / "c.png", cell))
    assert rgb.shape == cell.shape + (3,)
    assert rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[..., 0], cell / 255.0, atol=1e-6)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def _save_png(path, arr):
    Image.fromarray(arr).save(path)
    return path


def test_16bit_uses_robust_percentiles_not_truncation(tmp_path, cell):
    # A dim 16-bit image (values far below 65535) with one hot pixel: percentiles must stretch it.
    img = (cell.astype(np.uint16) * 8 + 1000)
    img[0, 0] = 60000
    p = tmp_path / "c16.tif"
    tifffile.imwrite(p, img)
    raw = read_image(p)
    assert raw.dtype == np.uint16 and raw.shape == cell.shape + (1,)
    rgb = load_rgb(p)
    assert rgb.max() == pytest.approx(1.0) and rgb.min() == pytest.approx(0.0)
    lo, hi = np.percentile(img, [1, 99.8])
    np.testing.assert_allclose(rgb[10, 10, 0], np.clip((img[10, 10] - lo) / (hi - lo), 0, 1), atol=1e-5)
    # the same cell in 8-bit and 16-bit ends up strongly correlated
    assert np.corrcoef(rgb[..., 0].ravel(), cell.ravel())[0, 1] > 0.99
    narrow = to_rgb(raw, Conversion(percentiles=(0, 100)))
    assert narrow[..., 0].max() == pytest.approx(1.0) and narrow[5, 5, 0] < rgb[5, 5, 0] + 1e-6


def test_16bit_png_and_rgb_rgba_jpeg(tmp_path, cell):
    Image.fromarray(cell.astype(np.uint16) * 200).save(tmp_path / "c16.png")
    assert read_image(tmp_path / "c16.png").dtype in (np.uint16, np.int32)
    assert load_rgb(tmp_path / "c16.png").max() == pytest.approx(1.0)
    rgb8 = np.stack([cell, cell // 2, 255 - cell], -1)
    Image.fromarray(rgb8).save(tmp_path / "c.jpg", quality=95)
    assert load_rgb(tmp_path / "c.jpg").shape == cell.shape + (3,)
    rgba = np.concatenate([rgb8, np.full(cell.shape + (1,), 128, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "c.png")
    out = load_rgb(tmp_path / "c.png")
    np.testing.assert_allclose(out, rgb8 / 255.0, atol=1e-6)  # alpha dropped, colour untouched


def test_multichannel_tiff_needs_channel_map(tmp_path, cell):
    stack = np.stack([cell, cell // 2, cell // 3, 255 - cell, cell // 4]).astype(np.uint8)  # C, H, W
    p = tmp_path / "five.tif"
    tifffile.imwrite(p, stack)
    assert read_image(p).shape == cell.shape + (5,)
    with pytest.raises(BadImageError, match="5 channels; pass --channels"):
        load_rgb(p)
    rgb = load_rgb(p, Conversion(channels=parse_channels("3,0,-")))
    np.testing.assert_allclose(rgb[..., 0], (255 - cell) / 255.0, atol=1e-6)
    np.testing.assert_allclose(rgb[..., 1], cell / 255.0, atol=1e-6)
    assert rgb[..., 2].max() == 0
    with pytest.raises(BadImageError, match="has 5 channel\\(s\\) but --channels asks for channel 7"):
        load_rgb(p, Conversion(channels=parse_channels("7,0,1")))


def test_bad_files_give_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    (tmp_path / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(BadImageError, match="empty"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(BadImageError, match="not a readable image"):
        read_image(tmp_path / "text.png")
    with pytest.raises(BadImageError, match="not a readable image"):
        read_image(tmp_path / "trunc.png")
    with pytest.raises(BadImageError, match="not found"):
        read_image(tmp_path / "missing.png")


def test_channel_and_percentile_specs():
    assert parse_channels("0") == (0, 0, 0)
    assert parse_channels("2,1,-") == (2, 1, None)
    assert parse_channels(None) is None
    assert parse_channels("DAPI,Actin,-") == ("DAPI", "Actin", None)  # names, resolved per file (docs/formats.md)
    for bad in ("1,%,0", "1,2", "-,-,-"):
        with pytest.raises(EmbedkitError):
            parse_channels(bad)
    assert parse_percentiles("0.5,99.5") == (0.5, 99.5)
    with pytest.raises(EmbedkitError):
        parse_percentiles("99,1")


def huge_tiff(path, side: int = 20_000, tile: int = 2048):
    """A side x side uint8 TIFF of zeros, tile-compressed to a few hundred KB and written without the whole array."""
    zeros = np.zeros((tile, tile), np.uint8)
    n = (-(-side // tile)) ** 2
    tifffile.imwrite(path, data=(zeros for _ in range(n)), shape=(side, side), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", compressionargs={"level": 1})
    return path


def _png_header_only(path, width: int, height: int):
    """A PNG whose header claims width x height (8-bit gray) with no pixel data: a decompression bomb's shape."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))
    return path


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc")
def test_huge_images_are_refused_from_their_header_without_decoding(tmp_path):
    """A 400-megapixel TIFF of ~0.5 MB is refused in a fresh process whose peak memory stays far below its decoded size."""
    import subprocess
    import sys

    from conftest import ROOT

    tif = huge_tiff(tmp_path / "huge.tif")
    assert tif.stat().st_size < 2_000_000
    png = _png_header_only(tmp_path / "huge.png", 30_000, 20_000)
    # VmHWM is this process's own peak (ru_maxrss would carry over the parent's through fork and exec).
    code = ("import re, sys\nfrom embedkit.images import read_image\nfrom embedkit.errors import BadImageError\n"
            "for p in sys.argv[1:]:\n    try:\n        read_image(p)\n    except BadImageError as e:\n        print(e)\n"
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)")
    proc = subprocess.run([sys.executable, "-c", code, str(tif), str(png)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 3, proc.stderr
    assert "huge.tif: is 20000 x 20000 (400 megapixels), over the 100-megapixel limit" in lines[0]
    assert "huge.png: is 20000 x 30000 (600 megapixels)" in lines[1] and "EMBEDKIT_MAX_PIXELS" in lines[1]
    assert int(lines[2]) < 200, f"peak memory {lines[2]} MB: the 400 MB image was decoded"


def test_pixel_limit_is_configurable(tmp_path, cell, monkeypatch):
    p = _save_png(tmp_path / "c.png", cell)
    monkeypatch.setenv("EMBEDKIT_MAX_PIXELS", str(cell.size - 1))
    with pytest.raises(BadImageError, match=rf"is {cell.shape[0]} x {cell.shape[1]} .* over the"):
        read_image(p)
    tifffile.imwrite(tmp_path / "c5.tif", np.zeros((5,) + cell.shape, np.uint8))
    with pytest.raises(BadImageError, match=rf"is 5 x {cell.shape[0]} x {cell.shape[1]}"):
        read_image(tmp_path / "c5.tif")  # channels do not count, the plane does
    monkeypatch.setenv("EMBEDKIT_MAX_PIXELS", str(cell.size))
    assert read_image(tmp_path / "c5.tif").shape == cell.shape + (5,)
    monkeypatch.setenv("EMBEDKIT_MAX_PIXELS", "0")
    assert read_image(p).shape == cell.shape + (1,)
    assert read_image(p, limit=cell.size).shape == cell.shape + (1,)
    monkeypatch.setenv("EMBEDKIT_MAX_PIXELS", "lots")
    with pytest.raises(EmbedkitError, match="EMBEDKIT_MAX_PIXELS='lots': not a number"):
        read_image(p)
