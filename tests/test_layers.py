"""`embed --layers`: one key per intermediate layer, from one forward pass, with its provenance; and
`probe --layers best`: the layer chosen on validation only, every layer listed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import embedkit as ek
from conftest import run_cli
from test_probe_heads import edit_items
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


def _manifest(path, files, labels):
    path.write_text("path,label,group\n" + "".join(f"{f},{lab},{f.name[4:11]}\n" for f, lab in zip(files, labels)))
    return path


@pytest.fixture(scope="module")
def layered(mitocheck_dir, tmp_path_factory):
    """36 real cells of 3 classes (from a manifest) embedded by a tiny random ViT with blocks 8 and 10 besides the last."""
    root = tmp_path_factory.mktemp("layered")
    files = [f for c in ("Interphase", "Metaphase", "Prometaphase") for f in sorted((mitocheck_dir / c).glob("*.png"))[:12]]
    labels = [f.parent.name for f in files]
    store = root / "s.h5"
    ek.embed(_manifest(root / "cells.csv", files, labels), store, _tiny_vit(), key="vit", layers="-1,-2,-4", progress=False)
    return root, files, labels, store


def _probe(store, out, splits=None):
    from embedkit.probe import ProbeSettings, run_probe
    from embedkit.splits import SplitSpec

    settings = ProbeSettings(heads=["logreg", "knn"], baselines=(), leak_check=False, layers="best", n_boot=100,
                             split=SplitSpec(seeds=None if splits else 1))
    return run_probe(store, out, splits_path=str(splits) if splits else None, settings=settings, progress=False)


def test_probe_layers_best_chooses_on_validation_and_lists_every_layer(layered, tmp_path):
    root, files, labels, store = layered
    rep = _probe(store, tmp_path / "res")
    choice = rep.layers
    assert [(r.layer, r.key) for r in choice.rows] == [("block-11", "vit"), ("block-8", "vit@block-8"),
                                                      ("block-10", "vit@block-10")]
    for head, layer in choice.chosen.items():
        assert choice.row(layer).val_score(head) == max(r.val_score(head) for r in choice.rows)
    summary = (tmp_path / "res" / "summary.md").read_text()
    assert "## Layers" in summary and all(f"| {r.layer} | {r.key} |" in summary for r in choice.rows)
    assert (tmp_path / "res" / "layers" / "block-8" / "logreg" / "metrics.json").is_file()

    # Scrambling the test labels changes test scores but not the choice: test items never take part in it.
    test_ids = set(json.loads((tmp_path / "res" / "splits.json").read_text())["folds"][0]["test"])
    row_of = {i: r for r, i in enumerate(Store(store).ids)}
    test_rows = sorted(row_of[i] for i in test_ids)
    assert len({labels[r] for r in test_rows}) > 1
    other = tmp_path / "scrambled" / store.name  # a store's shard folder is named after its file
    other.parent.mkdir()
    shutil.copy(store, other)
    shutil.copytree(f"{store}.shards", f"{other}.shards")
    edit_items(other, label={r: labels[j] for r, j in zip(test_rows, np.roll(test_rows, 1))})
    again = _probe(other, tmp_path / "res2", splits=tmp_path / "res" / "splits.json").layers
    assert again.chosen == choice.chosen
    assert [[r.val_score(h) for h in choice.chosen] for r in again.rows] == [[r.val_score(h) for h in choice.chosen]
                                                                             for r in choice.rows]
    assert any(a.test_record(h)["metrics"]["balanced_accuracy"] != b.test_record(h)["metrics"]["balanced_accuracy"]
               for a, b in zip(again.rows, choice.rows) for h in choice.chosen)


def test_probe_layers_refuses_a_key_without_layer_keys(cells, tmp_path):
    store = tmp_path / "s.h5"
    ek.embed(cells, store, _tiny_vit(), key="vit", group_by="mitocheck", progress=False)
    proc = run_cli("probe", store, "--layers", "best", "--heads", "logreg", "--no-baselines",
                   "--out", tmp_path / "res", "--quiet", check=False)
    assert proc.returncode == 2 and "has no layer keys" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("probe", store, "--layers", "worst", "--out", tmp_path / "res", check=False)
    assert proc.returncode == 2 and "probe takes --layers best" in proc.stderr
    assert not (tmp_path / "res").exists()


def test_channels_bag_concatenates_each_channel_and_mean_averages_them(tmp_path):
    """5-channel OME-TIFFs: bag gives 5 x the encoder's dimension (one block per channel), mean gives 1 x."""
    from conftest import DATA

    five = DATA / "fivechannel"
    ek.embed(five, tmp_path / "bag.h5", _tiny_vit(), key="vit", channels="bag", progress=False)
    ek.embed(five, tmp_path / "mean.h5", _tiny_vit(), key="vit", channels="mean", progress=False)
    bag, mean = Store(tmp_path / "bag.h5"), Store(tmp_path / "mean.h5")
    vb, vm = bag.vectors("vit"), mean.vectors("vit")
    assert vb.shape == (4, 5 * 192) and vm.shape == (4, 192)
    per_channel = vb.reshape(4, 5, 192)
    assert not np.allclose(per_channel[:, 0], per_channel[:, 1])  # each channel has its own vector
    np.testing.assert_allclose(vm, per_channel.mean(axis=1), rtol=1e-4, atol=1e-5)
    cfg = bag.config("vit")
    assert cfg["channels"]["names"] == ["DNA", "ER", "RNA", "AGP", "Mito"] and cfg["channels"]["mode"] == "bag"
    assert cfg["conversion"]["channel_count"] == 5 and cfg["dim"] == 960
    # the RGB path of a 5-channel file still needs a channel map
    with pytest.raises(EmbedkitError, match="has 5 channels; pass --channels"):
        ek.embed(five, tmp_path / "rgb.h5", _tiny_vit(), key="vit", progress=False)


def test_random_init_baseline_of_a_layer_key_is_that_layer(cells, tmp_path):
    from embedkit.baselines import ensure_baselines

    store = tmp_path / "s.h5"
    ek.embed(cells, store, ek.create_encoder("efficientnet_lite0", image_size=64), key="lite", layers="-2",
             progress=False)
    keys, _ = ensure_baselines(Store(store), "lite@stage-3", ["random-init"], progress=False)
    s = Store(store)
    assert keys == {"random-init": "lite@random-init@stage-3"} and "lite@random-init" in s.keys
    cfg = s.config("lite@random-init@stage-3")
    assert cfg["layer"]["index"] == 3 and cfg["random_seed"] == 0 and cfg["dim"] == 112
    assert not np.allclose(s.vectors("lite@random-init@stage-3"), s.vectors("lite@stage-3"))
    assert s.resolve_key(None) == "lite"  # layer and baseline keys aside, the store has one key
    # a layer key's encoder rebuilt from its provenance gives that layer's vectors for new images (queries)
    from embedkit.embed import embed_images
    from embedkit.encoders import encoder_from_config

    enc = encoder_from_config(s.config("lite@stage-3"))
    first = Path(s.root) / str(s.column("path")[0])
    np.testing.assert_allclose(embed_images(enc, [str(first)])[0], s.vectors("lite@stage-3")[0], rtol=1e-4, atol=1e-5)
