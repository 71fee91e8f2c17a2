"""Cell geometry, crops, masking, edges and scaling, checked against the StarDist ground-truth labels."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from embedkit.errors import EmbedkitError
from embedkit.images import read_image, to_rgb, to_uint8
from embedkit.segment.crops import CropParams, ScaleSpec, crop_cells, cut_crop, measure_cells, scale_factors, select_cells
from embedkit.segment.scoring import dsb_scores
from embedkit.segment.watershed import WatershedParams, estimate_radius, intensity, watershed_segment

STARDIST = Path(__file__).parent / "data" / "stardist"


@pytest.fixture(scope="module")
def field():
    raw = read_image(STARDIST / "img2d.tif")
    return to_uint8(to_rgb(raw)), tifffile.imread(STARDIST / "mask2d.tif").astype(np.int32)


def test_measure_cells_matches_regionprops_on_ground_truth(field):
    from skimage.measure import regionprops

    _, gt = field
    cells = measure_cells(gt)
    props = regionprops(gt)
    assert len(cells) == len(props) == 125
    assert cells.mask_id.tolist() == [p.label for p in props]
    np.testing.assert_array_equal(cells.bbox, [p.bbox for p in props])
    np.testing.assert_allclose(cells.centroid, [p.centroid for p in props], atol=1e-3)
    np.testing.assert_array_equal(cells.area, [p.area for p in props])
    border = set(np.unique(np.concatenate([gt[0], gt[-1], gt[:, 0], gt[:, -1]]))) - {0}
    assert set(cells.mask_id[cells.edge].tolist()) == border


def test_crop_is_centred_on_the_centroid_and_zero_padded_at_borders(field):
    img, gt = field
    cells = measure_cells(gt)
    padded = np.pad(img, ((96, 96), (96, 96), (0, 0)))
    for k in (int(np.argmin(cells.centroid[:, 0])), int(np.argmax(cells.centroid[:, 1])), 60):
        cy, cx = np.rint(cells.centroid[k]).astype(int)
        crop, box = cut_crop(img, gt, cells.centroid[k], int(cells.mask_id[k]), 96)
        assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(box, [cy - 48, cx - 48, cy + 48, cx + 48])
        np.testing.assert_array_equal(crop[48, 48], img[cy, cx])
        np.testing.assert_array_equal(crop, padded[cy + 48:cy + 144, cx + 48:cx + 144])
    assert box[0] >= 0  # the last one lies inside; the first two reach past the top and right edges
    top = int(np.argmin(cells.centroid[:, 0]))
    crop, box = cut_crop(img, gt, cells.centroid[top], int(cells.mask_id[top]), 96)
    assert box[0] < 0 and not crop[:-int(box[0])].any()


def test_mask_zeroes_background_and_neighbours(field):
    img, gt = field
    cells = measure_cells(gt)
    k = int(np.argmax(cells.area))
    mid = int(cells.mask_id[k])
    crop, box = cut_crop(img, gt, cells.centroid[k], mid, 64, mask=True)
    y0, x0 = int(box[0]), int(box[1])
    win = gt[max(0, y0):y0 + 64, max(0, x0):x0 + 64]
    assert y0 >= 0 and x0 >= 0 and win.shape == (64, 64)
    assert set(np.unique(win)) - {0, mid}, "the test cell should have a neighbour in its window"
    assert not crop[win != mid].any()
    np.testing.assert_array_equal(crop[win == mid], img[y0:y0 + 64, x0:x0 + 64][win == mid])


def test_area_and_edge_selection(field):
    _, gt = field
    cells = measure_cells(gt)
    keep = select_cells(cells, CropParams(min_area=200, max_area=500, edge="drop"))
    assert np.array_equal(keep, (cells.area >= 200) & (cells.area <= 500) & ~cells.edge)
    kept_edges = select_cells(cells, CropParams(edge="keep", min_area=0))
    assert kept_edges.all()
    with pytest.raises(EmbedkitError):
        CropParams(min_area=50, max_area=10)


def disk_field(radius=10, size=80):
    yy, xx = np.mgrid[:size, :size]
    lab = ((yy - 40) ** 2 + (xx - 40) ** 2 <= radius ** 2).astype(np.int32)
    img = np.repeat((lab * 200 + 20).astype(np.uint8)[..., None], 3, axis=2)
    return img, lab


def test_scale_to_a_cell_diameter_resamples_the_cell():
    img, lab = disk_field(radius=10)
    res = crop_cells(img, lab, CropParams(size=96, mask=True, scale=ScaleSpec.parse("cell:40")))
    assert res.scale[0] == pytest.approx(40 / res.cells.diameter[0])
    area = int((res.pixels[0, :, :, 0] > 100).sum())
    assert area == pytest.approx(np.pi * 20 ** 2, rel=0.06)
    cy, cx = np.argwhere(res.pixels[0, :, :, 0] > 100).mean(0)
    assert abs(cy - 47.5) < 1 and abs(cx - 47.5) < 1
    box = res.crop_box[0]
    assert box[2] - box[0] == pytest.approx(96 / res.scale[0], rel=1e-5)


def test_scale_specs():
    img, lab = disk_field(radius=10)
    cells = measure_cells(lab)
    assert scale_factors(cells, CropParams(scale=ScaleSpec.parse("pixel:1.0")), pixel_size=0.5)[0] == pytest.approx(0.5)
    assert scale_factors(cells, CropParams(scale=ScaleSpec.parse("diameter:30")))[0] == pytest.approx(30 / cells.diameter[0])
    assert scale_factors(cells, CropParams())[0] == 1.0
    with pytest.raises(EmbedkitError, match="pixel size"):
        scale_factors(cells, CropParams(scale=ScaleSpec.parse("pixel:1.0")))
    for bad in ("pixel", "cell:-3", "zoom:2"):
        with pytest.raises(EmbedkitError, match="--scale"):
            ScaleSpec.parse(bad)


def test_watershed_on_the_stardist_field(field):
    raw = read_image(STARDIST / "img2d.tif")
    gt = field[1]
    labels = watershed_segment(to_rgb(raw))
    scores = dsb_scores(gt, labels)
    assert 100 <= labels.max() <= 150  # 125 nuclei in the ground truth
    assert scores[0.5] >= 0.55
    assert labels.dtype == np.int32 and labels.shape == gt.shape


def test_watershed_polarity_and_radius():
    img, lab = disk_field(radius=10)
    gray = img[..., 0].astype(np.float32) / 255
    assert intensity(gray)[1] == "bright"
    assert intensity(1 - gray)[1] == "dark"
    assert estimate_radius(lab > 0) == pytest.approx(10, abs=1)
    # a dark disk on a bright background is found once the polarity is known or detected
    for pol in ("auto", "dark"):
        out = watershed_segment(1 - gray, WatershedParams(polarity=pol))
        assert out.max() == 1 and abs(int((out > 0).sum()) - int(lab.sum())) < 0.1 * lab.sum()
    assert watershed_segment(np.zeros((50, 50), np.float32)).max() == 0
