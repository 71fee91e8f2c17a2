"""`embed --layers`: one key per intermediate layer, from one forward pass, with its provenance; and
`probe --layers best`: the layer chosen on validation only, every layer listed."""

from __future__ import annotations

import numpy as np
import pytest

import embedkit as ek
from conftest import run_cli
from embedkit.errors import EmbedkitError
from embedkit.store import Store


@pytest.fixture(scope="module")
def cells(mitocheck_dir, tmp_path_factory):
    """24 real cells of 3 classes as class folders."""
    root = tmp_path_factory.mktemp("cells")
    for c in ("Interphase", "Metaphase", "Prometaphase"):
        (root / c).mkdir()
        for f in sorted((mitocheck_dir / c).glob("*.png"))[:8]:
            (root / c / f.name).write_bytes(f.read_bytes())
    return root


def _tiny_vit():
    import torch

    torch.manual_seed(0)
    return ek.create_encoder("timm:vit_tiny_patch16_224", pretrained=False, image_size=32)


def test_vit_blocks_get_one_key_each_and_differ(cells, tmp_path):
    store = tmp_path / "s.h5"
    res = ek.embed(cells, store, _tiny_vit(), key="vit", layers="-1,-2,-4", progress=False)
    s = Store(store)
    assert res.keys == ["vit", "vit@block-10", "vit@block-8"]
    assert sorted(s.keys) == ["vit", "vit@block-10", "vit@block-8"]  # block-11 is 'vit' itself, not stored twice
    vecs = {k: s.vectors(k) for k in s.keys}
    assert all(v.shape == (24, 192) and np.isfinite(v).all() for v in vecs.values())
    assert not np.allclose(vecs["vit"], vecs["vit@block-10"]) and not np.allclose(vecs["vit@block-10"], vecs["vit@block-8"])
    layer = s.config("vit@block-8")["layer"]
    assert layer["name"] == "block-8" and layer["index"] == 8 and layer["count"] == 12 and layer["plain_key_is"] == "block-11"
    assert "layer" not in s.config("vit")  # the plain key's provenance is unchanged
    # the same network without --layers gives the plain key's vectors bit for bit
    alone = tmp_path / "alone.h5"
    ek.embed(cells, alone, _tiny_vit(), key="vit", progress=False)
    np.testing.assert_array_equal(Store(alone).vectors("vit"), vecs["vit"])


def test_cnn_stages_added_later_leave_the_plain_key_alone(cells, tmp_path):
    store = tmp_path / "s.h5"
    ek.embed(cells, store, "efficientnet_lite0", key="lite", progress=False)
    before = Store(store).vectors("lite")
    shards_before = sorted(p.name for p in (tmp_path / "s.h5.shards").rglob("*.h5"))
    res = ek.embed(cells, store, "efficientnet_lite0", key="lite", layers="all", progress=False)
    s = Store(store)
    assert res.keys == ["lite"] + [f"lite@stage-{i}" for i in range(5)]  # lite0's head conv follows stage-4
    assert [s.config(f"lite@stage-{i}")["dim"] for i in range(5)] == [16, 24, 40, 112, 320]
    np.testing.assert_array_equal(s.vectors("lite"), before)
    new_shards = {p.parent.name.rsplit("-", 1)[0].removeprefix("embed-") for p in (tmp_path / "s.h5.shards").rglob("*.h5")
                  if p.name not in shards_before}
    assert all(k.startswith("lite@stage") for k in new_shards)  # nothing rewritten for the done plain key
    assert all(s.done(k).all() for k in s.keys)


def test_bad_layers_are_refused_before_anything_is_written(cells, tmp_path):
    with pytest.raises(EmbedkitError, match="has 5 stages"):
        ek.embed(cells, tmp_path / "s.h5", "efficientnet_lite0", layers="-6", progress=False)
    with pytest.raises(EmbedkitError, match="comma-separated layer indices"):
        ek.embed(cells, tmp_path / "s.h5", "efficientnet_lite0", layers="2-3", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".lock"]  # no store, no shards
    proc = run_cli("embed", cells, "--store", tmp_path / "s.h5", "--layers", "99", "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("embedkit: error")] == [
        "embedkit: error: --layers 99: efficientnet_lite0 has 5 stages (stage-0 to stage-4); 99 is not one of them. "
        "Use indices from -5 to 4 (-1 is the last), or all"]
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".lock"]
