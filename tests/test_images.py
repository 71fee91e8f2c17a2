"""Reading and converting microscopy images: formats, bit depths, channels and bad files."""

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
