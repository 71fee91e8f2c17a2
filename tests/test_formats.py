"""Microscopy formats through bioio: fixtures written here with bioio's writers, read back through embedkit."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import DATA, invoke_cli, run_cli

pytest.importorskip("bioio")
pytest.importorskip("bioio_ome_tiff")
pytest.importorskip("bioio_ome_zarr")

from embedkit import formats  # noqa: E402
from embedkit.errors import BadImageError, EmbedkitError  # noqa: E402
from embedkit.formats import dims, plates, writers  # noqa: E402
from embedkit.images import Conversion, is_image_file, load_rgb, parse_channels, read_image, to_rgb  # noqa: E402
from embedkit.sources import discover  # noqa: E402

NAMES = ["DAPI", "Phalloidin", "Tubulin", "Mito", "ER"]


@pytest.fixture(scope="module")
def nuclei() -> np.ndarray:
    """The real StarDist nuclei image (512 x 512, uint16)."""
    return tifffile.imread(DATA / "stardist" / "img2d.tif")


def five_channels(img: np.ndarray) -> np.ndarray:
    """Five distinguishable (C, Y, X) channels made from one real image."""
    return np.stack([img, img.max() - img, img // 2, np.roll(img, 9, 0), np.roll(img, 9, 1)]).astype(np.uint16)


@pytest.fixture(scope="module")
def files(tmp_path_factory, nuclei):
    """A folder with a 5-channel OME-TIFF, a T-series, a Z-stack, a 2x2-well plate and a plain PNG."""
    root = tmp_path_factory.mktemp("formats")
    c5 = five_channels(nuclei[:128, :128])
    (root / "fixed").mkdir()
    writers.write_ome_tiff(root / "fixed" / "five.ome.tiff", c5, "CYX", NAMES, pixel_size=0.65)
    frames = np.stack([five_channels(nuclei[128 * i:128 * (i + 1), :128]) for i in range(4)])
    writers.write_ome_tiff(root / "fixed" / "movie.ome.tiff", frames, "TCYX", NAMES, pixel_size=0.65)
    zstack = np.stack([np.roll(c5, 3 * z, axis=2) for z in range(5)], axis=1)  # (C, Z, Y, X)
    writers.write_ome_tiff(root / "fixed" / "stack.ome.tiff", zstack, "CZYX", NAMES, pixel_size=0.65, z_step=1.0)
    wells = {f"{r}/{c}": [five_channels(nuclei[256 * i:256 * (i + 1), 256 * j:256 * (j + 1)])[:2] for j in range(2)]
             for i, r in enumerate("AB") for c, _ in zip("12", range(2))}
    writers.write_plate(root / "plate.ome.zarr", wells, NAMES[:2], pixel_size=0.325, name="P1")
    from PIL import Image

    Image.fromarray((nuclei[:96, :96] // 1).clip(0, 255).astype(np.uint8)).save(root / "fixed" / "plain.png")
    return {"root": root, "c5": c5, "frames": frames, "zstack": zstack, "wells": wells}


def test_plain_files_keep_the_fast_path(files):
    assert not formats.handles(files["root"] / "fixed" / "plain.png")
    assert not formats.handles("cells/a.tif")
    assert formats.handles("a.ome.tiff") and formats.handles("x.czi") and formats.handles("p.zarr/A/1/0")
    assert is_image_file("x.nd2") and is_image_file("x.lif") and is_image_file("x.png")


def test_five_channel_ome_tiff_names_and_pixel_size(files):
    path = files["root"] / "fixed" / "five.ome.tiff"
    info = formats.describe(path)
    assert info.channel_names == tuple(NAMES)
    assert info.pixel_size == pytest.approx((0.65, 0.65))
    raw = read_image(path)
    assert raw.shape == (128, 128, 5)
    np.testing.assert_array_equal(np.moveaxis(raw, -1, 0), files["c5"])
    by_name = to_rgb(raw, Conversion(parse_channels("Phalloidin,DAPI,-")), str(path))
    by_index = to_rgb(raw, Conversion(parse_channels("1,0,-")), str(path))
    np.testing.assert_array_equal(by_name, by_index)
    assert by_name[..., 2].max() == 0
    with pytest.raises(BadImageError, match="'Actin' is not one of its channels"):
        to_rgb(raw, Conversion(parse_channels("Actin")), str(path))


def test_channel_names_need_metadata(files):
    png = files["root"] / "fixed" / "plain.png"
    with pytest.raises(BadImageError, match="no channel metadata"):
        load_rgb(png, Conversion(parse_channels("DAPI")))
    with pytest.raises(EmbedkitError):
        parse_channels("1,%,0")


def test_time_series_gives_one_item_per_frame(files):
    src = discover(files["root"] / "fixed")
    out, failed = formats.apply_selection(src)
    assert not failed
    movie = [it for it in out.items if it.path.startswith("movie.ome.tiff")]
    assert [it.meta["t"] for it in movie] == ["0", "1", "2", "3"]
    assert {it.group for it in movie} == {"movie.ome.tiff"}  # frames of one movie never straddle a split
    for it in movie:
        raw = read_image(files["root"] / "fixed" / it.path)
        np.testing.assert_array_equal(np.moveaxis(raw, -1, 0), files["frames"][int(it.meta["t"])])
    picked, _ = formats.apply_selection(src, formats.Selection(t=tuple(dims.parse_t("1:4:2"))))
    assert [it.meta["t"] for it in picked.items if "t" in it.meta] == ["1", "3"]
    with pytest.raises(BadImageError, match="has 4 time points but --t asks for frame 7"):
        formats.apply_selection(src, formats.Selection(t=(7,)))


def test_z_rules(files):
    path = str(files["root"] / "fixed" / "stack.ome.tiff")
    z = files["zstack"]  # (C, Z, Y, X)
    np.testing.assert_array_equal(np.moveaxis(read_image(path + "::z=max"), -1, 0), z.max(axis=1))
    np.testing.assert_array_equal(np.moveaxis(read_image(path + "::z=mid"), -1, 0), z[:, 2])
    np.testing.assert_array_equal(np.moveaxis(read_image(path + "::z=4"), -1, 0), z[:, 4])
    with pytest.raises(BadImageError, match="has 5 Z planes but --z asks for plane 9"):
        read_image(path + "::z=9")
    with pytest.raises(EmbedkitError, match="--z 'top'"):
        dims.parse_z("top")


def test_plate_fields_become_items_grouped_by_well(files):
    fields = plates.plate_fields(files["root"] / "plate.ome.zarr")
    assert len(fields) == 8 and {f.well for f in fields} == {"A1", "A2", "B1", "B2"}
    src, _ = formats.apply_selection(discover(files["root"] / "plate.ome.zarr"))
    assert len(src.items) == 8
    it = src.items[3]
    assert it.path == "plate.ome.zarr/A/2/1"
    assert {k: it.meta[k] for k in formats.PLATE_COLUMNS} == {"plate": "P1", "row": "A", "column": "2", "well": "A2",
                                                              "field": "1"}
    assert it.group == "P1/A2" and it.meta["pixel_size"] == "0.325"
    np.testing.assert_array_equal(np.moveaxis(read_image(files["root"] / it.path), -1, 0), files["wells"]["A/2"][1])
    by_row, _ = formats.apply_selection(discover(files["root"] / "plate.ome.zarr"), group_by="row")
    assert sorted({i.group for i in by_row.items}) == ["P1/A", "P1/B"]


def test_pixel_size_resampling_brings_objectives_to_one_scale(tmp_path, nuclei):
    img = nuclei[:256, :256]
    writers.write_ome_tiff(tmp_path / "x40.ome.tiff", img[None], "CYX", ["DAPI"], pixel_size=0.325)
    writers.write_ome_tiff(tmp_path / "x20.ome.tiff", img[None, ::2, ::2], "CYX", ["DAPI"], pixel_size=0.65)
    writers.write_ome_tiff(tmp_path / "nometa.ome.tiff", img[None], "CYX", ["DAPI"])
    src, _ = formats.apply_selection(discover(tmp_path), formats.Selection(pixel_size=0.65))
    meta = {it.path.split("::")[0]: it.meta for it in src.items}
    assert meta["x40.ome.tiff"]["pixel_size"] == "0.325" and meta["nometa.ome.tiff"]["pixel_size"] == "unknown"
    arrays = {it.path.split("::")[0]: read_image(tmp_path / it.path)[..., 0].astype(float) for it in src.items}
    assert arrays["x40.ome.tiff"].shape == arrays["x20.ome.tiff"].shape == (128, 128)
    assert arrays["nometa.ome.tiff"].shape == (256, 256)  # unknown size: left as it is
    corr = np.corrcoef(arrays["x40.ome.tiff"].ravel(), arrays["x20.ome.tiff"].ravel())[0, 1]
    assert corr > 0.9


def test_bad_and_unsupported_files_get_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "broken.czi"
    bad.write_bytes(b"not a czi file at all")
    with pytest.raises(BadImageError, match=r"broken\.czi: not a readable Zeiss CZI file \(bioio-czi"):
        read_image(bad)
    from embedkit.formats import plugins

    missing = plugins.Plugin("Nikon ND2", "no_such_bioio_plugin", "bioio-nd2")
    monkeypatch.setitem(plugins.PLUGINS, ".nd2", missing)
    (tmp_path / "a.nd2").write_bytes(b"x")
    plugins._open.cache_clear()
    with pytest.raises(BadImageError, match=r"a\.nd2: is a Nikon ND2 file, which needs the bioio plugin 'bioio-nd2'"):
        read_image(tmp_path / "a.nd2")


def test_cli_bad_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "x.lif"
    bad.write_bytes(b"junk")
    proc = run_cli("embed", bad, "--store", tmp_path / "s.h5", "--quiet", check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "x.lif" in lines[0] and "bioio-lif" in lines[0], proc.stderr
    assert not (tmp_path / "s.h5").exists()


def test_cli_embed_by_channel_name_records_items(files, tmp_path):
    store = tmp_path / "s.h5"
    proc = invoke_cli("embed", files["root"] / "fixed" / "five.ome.tiff", files["root"] / "fixed" / "movie.ome.tiff",
                      files["root"] / "fixed" / "stack.ome.tiff", "--store", store, "--channels", "DAPI,Phalloidin,-",
                      "--z", "mid", "--t", "0,2", "--quiet")
    from embedkit.store import Store

    s = Store(store)
    frame = s.items_frame().set_index("id")
    assert sorted(frame.index) == ["five.ome.tiff", "movie.ome.tiff::t=0", "movie.ome.tiff::t=2", "stack.ome.tiff::z=mid"]
    assert set(frame["pixel_size"]) == {"0.65"} and frame.loc["stack.ome.tiff::z=mid", "z"] == "mid"
    assert s.config(s.keys[0])["conversion"]["channels"] == ["DAPI", "Phalloidin", None]
    assert s.done(s.keys[0]).all() and "embedded 4 images" in proc.stdout


def test_cli_segment_plate_cells_keep_their_well(files, tmp_path):
    store = tmp_path / "cells.h5"
    invoke_cli("segment", files["root"] / "plate.ome.zarr", "--out", store, "--backend", "watershed", "--channels",
               "DAPI", "--crop", "32", "--quiet")
    from embedkit.store import Store

    frame = Store(store).items_frame()
    assert len(frame) > 50
    assert set(frame["well"]) == {"A1", "A2", "B1", "B2"}
    assert (frame["group"] == "P1/" + frame["well"]).all()
    assert frame["id"].str.startswith("plate.ome.zarr/").all()


def test_large_field_tiles_keep_each_cell_once(tmp_path, nuclei):
    """A field segmented tile by tile finds the cells of the whole-field run, none twice, ids as in the label Zarr."""
    import zarr
    from scipy.spatial import cKDTree

    from embedkit.formats.tiled import segment_large_field
    from embedkit.images import to_uint8
    from embedkit.segment.backends import create_segmenter
    from embedkit.segment.crops import CropParams, crop_cells
    from embedkit.segment.fields import load_field

    row = np.concatenate([nuclei, nuclei[:, ::-1]], 1)
    field = np.concatenate([row, row[::-1]], 0)  # 1024 x 1024 of real nuclei
    path = writers.write_ome_zarr(tmp_path / "field.ome.zarr", field[None, None, None], ["DAPI"], 0.5, chunks=(256, 256))
    seg, crop = create_segmenter("watershed", diameter=16), CropParams(size=32)
    tiled = segment_large_field(path, seg, crop, tile=384, labels_path=str(tmp_path / "labels.zarr"), progress=False)
    fld = load_field(path)
    whole = crop_cells(to_uint8(fld.rgb), seg.segment(fld.seg), crop)
    assert abs(len(tiled.cells) - len(whole.cells)) <= 0.05 * len(whole.cells)
    dist, _ = cKDTree(tiled.cells.centroid).query(whole.cells.centroid)
    assert (dist < 1.5).mean() > 0.85
    self_dist, _ = cKDTree(tiled.cells.centroid).query(tiled.cells.centroid, k=2)
    assert self_dist[:, 1].min() > 3  # no cell kept by two tiles
    assert len(np.unique(tiled.cells.mask_id)) == len(tiled.cells)
    labels = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:]
    painted = set(np.unique(labels).tolist()) - {0}
    assert painted <= set(tiled.cells.mask_id.tolist()) and len(painted) >= 0.99 * len(tiled.cells)
    y, x = np.rint(tiled.cells.centroid[:50]).astype(int).T
    assert (labels[y, x] == tiled.cells.mask_id[:50]).mean() > 0.9
    assert tiled.pixels.shape == (len(tiled.cells), 32, 32, 3) and tiled.pixels.max() > 0


def test_large_field_patches_equal_the_whole_field_windows(tmp_path, nuclei):
    """Tile-by-tile patches of a field: the same windows, pixels and filter decisions as reading it whole."""
    from embedkit.formats.tiled_patches import large_field_patches
    from embedkit.images import to_uint8
    from embedkit.segment.fields import load_field
    from embedkit.segment.filters import SimpleFilter
    from embedkit.segment.patches import cut_patches, patch_offsets

    row = np.concatenate([nuclei, nuclei[:, ::-1]], 1)
    path = writers.write_ome_zarr(tmp_path / "f.ome.zarr", row[None, None, None], ["DAPI"], 0.5, chunks=(256, 256))
    filt = SimpleFilter(min_foreground=0.05)
    got = large_field_patches(path, 96, 64, filt=filt, tile=200)
    rgb = to_uint8(load_field(path).rgb)  # the sample windows cover this small field, so percentiles agree
    offsets = patch_offsets(rgb.shape[:2], 96, 64)
    patches = cut_patches(rgb, offsets, 96)
    keep = filt.keep(patches, float(np.median(SimpleFilter.gray(rgb[None])[0])))
    assert int(got["n_windows"][0]) == len(offsets) and 0 < keep.sum() < len(offsets)
    order = np.lexsort((got["offset"][:, 1], got["offset"][:, 0]))
    np.testing.assert_array_equal(got["offset"][order], offsets[keep])
    np.testing.assert_array_equal(got["pixels"][order], patches[keep])
    with pytest.raises(BadImageError, match="paired channel"):
        large_field_patches(path, 96, 64, paired=object())
