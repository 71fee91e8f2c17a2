"""CAMs through the API: geometry, ViT token grids with registers, Grad-CAM vs HiResCAM theory, frozen encoders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.embed import to_tensor
from embedkit.encoders import Preprocess, create_encoder
from embedkit.errors import EmbedkitError
from embedkit.explain import (METHOD_NAMES, TokensToGrid, compose, compute_cam, parse_methods,
                              resolve_items, resolve_layer, select_rows, to_image_geometry, token_layout, trace_layers,
                              wrap_classifier)
from embedkit.explain.faithfulness import deletion_insertion, random_saliency, summarize
from embedkit.images import load_rgb
from embedkit.items import Item

torch.manual_seed(0)


def cells(mitocheck_dir: Path, n: int) -> list[Path]:
    """n real cells from different classes."""
    return [sorted(d.glob("*.png"))[0] for d in sorted(p for p in mitocheck_dir.iterdir() if p.is_dir())][:n]


def batch(paths: list[Path], pre: Preprocess) -> torch.Tensor:
    return torch.stack([to_tensor(load_rgb(p), pre) for p in paths])


@pytest.fixture(scope="module")
def lite0_head():
    """The real efficientnet_lite0 (frozen) composed with a linear head for 3 classes."""
    enc = create_encoder("efficientnet_lite0")
    head = torch.nn.Linear(enc.dim, 3)
    torch.nn.init.normal_(head.weight, std=0.05, generator=torch.Generator().manual_seed(1))
    return compose(enc, head, ["a", "b", "c"])


def test_gradcam_equals_hirescam_before_gap_and_differs_inside(lite0_head, mitocheck_dir):
    model = lite0_head
    x = batch(cells(mitocheck_dir, 2), model.preprocess)
    trace = trace_layers(model, x[:1])
    name, layer = resolve_layer(model, None, trace)
    assert name == "bn2"  # EfficientNet's last conv stage, followed directly by global average pooling
    with torch.inference_mode():  # how encoders usually run: CAMs must still get gradients
        g = compute_cam(model.net, x, "gradcam", layer, [0, 1])
        h = compute_cam(model.net, x, "hirescam", layer, [0, 1])
    assert g.maps.shape == (2, 224, 224) and np.isfinite(g.maps).all() and g.maps.max() > 0.99
    # GAP + linear: d score / d A is constant over space, so HiResCAM = Grad-CAM exactly.
    np.testing.assert_allclose(g.grid / g.grid.max(axis=(1, 2), keepdims=True),
                               h.grid / h.grid.max(axis=(1, 2), keepdims=True), atol=1e-4)
    np.testing.assert_allclose(g.maps, h.maps, atol=1e-3)
    # Inside the network gradients vary over space; averaging them (Grad-CAM) loses that, HiResCAM keeps it.
    _, inner = resolve_layer(model, "blocks.5", trace)
    g5 = compute_cam(model.net, x, "gradcam", inner, [0, 1])
    h5 = compute_cam(model.net, x, "hirescam", inner, [0, 1])
    assert np.abs(g5.maps - h5.maps).max() > 0.2
    assert all(p.grad is None and not p.requires_grad for p in model.net.encoder.parameters())


def test_map_back_to_a_non_square_image():
    pre = Preprocess(56, resize="pad")
    rgb = np.zeros((20, 40, 3), np.float32)
    rgb[4:8, 30:36] = 1.0  # a bright patch near the right edge
    x = to_tensor(rgb, pre)
    cam = (x[0] > x[0].mean() + 1).float().numpy()  # a "map" that is exactly the patch, on the model input
    back = to_image_geometry(cam, (20, 40), pre)
    assert back.shape == (20, 40)
    r, c = np.unravel_index(back.argmax(), back.shape)
    assert 3 <= r <= 8 and 29 <= c <= 36


def test_timm_vit_with_registers_at_non_square_input():
    import timm

    net = timm.create_model("test_vit", num_classes=3, reg_tokens=4, img_size=64, dynamic_img_size=True).eval()
    model = wrap_classifier(net, ["a", "b", "c"], Preprocess(64))
    layout = token_layout(model.backbone)
    assert layout.num_prefix_tokens == 5 and layout.grid((80, 112)) == (5, 7)
    x = torch.randn(2, 3, 80, 112)
    trace = trace_layers(model, x[:1])
    name, layer = resolve_layer(model, None, trace)
    assert name == f"blocks.{len(net.blocks) - 1}.norm1"
    maps = {}
    for m in METHOD_NAMES:
        res = compute_cam(net, x, m, layer, [0, 2], TokensToGrid(layout))
        assert res.maps.shape == (2, 80, 112) and np.isfinite(res.maps).all(), m
        assert res.grid.shape == (2, 5, 7), m
        maps[m] = res.maps
    # Tokens feed attention, not GAP + linear: the two differ well beyond float error.
    assert np.abs(maps["gradcam"] - maps["hirescam"]).max() > 0.02


@pytest.mark.parametrize("kind", ["dinov2_with_registers", "dinov3_vit"])
def test_transformers_vit_with_registers_frozen_encoder_and_head(tmp_path, kind):
    from transformers import Dinov2WithRegistersConfig, DINOv3ViTConfig

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_register_tokens=4)
    if kind == "dinov2_with_registers":
        Dinov2WithRegistersConfig(patch_size=14, image_size=56, **common).save_pretrained(tmp_path)
        shape, grid, prefix = (98, 126), (7, 9), "encoder.layer"
    else:
        DINOv3ViTConfig(patch_size=16, **common).save_pretrained(tmp_path)
        shape, grid, prefix = (96, 144), (6, 9), "model.layer"
    enc = create_encoder(f"hf:{tmp_path}", pretrained=False)
    assert enc.num_prefix_tokens == 5
    model = compose(enc, torch.nn.Linear(enc.dim, 2), ["x", "y"])
    x = torch.randn(2, 3, *shape)
    name, layer = resolve_layer(model, None, trace_layers(model, x[:1]))
    assert name == f"{prefix}.1.norm1"
    reshape = TokensToGrid(token_layout(model.backbone, model.num_prefix_tokens))
    with torch.inference_mode():
        res = compute_cam(model.net, x, "hirescam", layer, [1, 1], reshape)
    assert res.maps.shape == (2, *shape) and res.grid.shape == (2, *grid) and np.isfinite(res.maps).all()
    assert res.maps.std() > 0.01
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters())


def test_token_grid_refuses_a_mismatched_layout():
    import timm

    net = timm.create_model("test_vit", num_classes=2, reg_tokens=2, img_size=64, dynamic_img_size=True)
    layout = token_layout(net, num_prefix_tokens=1)  # wrong on purpose: the model has 3 prefix tokens
    reshape = TokensToGrid(layout)
    reshape.set_input((64, 64))
    with pytest.raises(EmbedkitError, match="prefix tokens"):
        reshape(torch.zeros(1, 3 + 16, 8))


def test_bad_methods_and_layers_get_clear_errors(lite0_head, mitocheck_dir):
    assert parse_methods("gradcam, HiResCAM,gradcam++") == ["gradcam", "hirescam", "gradcam++"]
    with pytest.raises(EmbedkitError, match="unknown method.*gradcam, hirescam"):
        parse_methods("gradcam,lime")
    x = batch(cells(mitocheck_dir, 1), lite0_head.preprocess)
    trace = trace_layers(lite0_head, x)
    with pytest.raises(EmbedkitError, match="no such layer.*blocks.6"):
        resolve_layer(lite0_head, "blocks.60", trace)
    with pytest.raises(EmbedkitError, match="outputs shape"):
        resolve_layer(lite0_head, "global_pool", trace)
    with pytest.raises(EmbedkitError, match="not a class"):
        lite0_head.class_index("Anaphase")


def test_items_from_files_folders_and_store_ids(mitocheck_dir, tmp_path):
    from embedkit import store as st
    from embedkit.items import ItemSet
    from embedkit.sources import discover

    src = discover(mitocheck_dir, group_by="mitocheck")
    with st.transaction(tmp_path / "items.h5") as f:
        st.write_items(f, src.items, src.root)
    store = ItemSet.from_store(st.Store(tmp_path / "items.h5"))
    one = cells(mitocheck_dir, 1)[0]
    got = resolve_items([store.ids[3], str(one), str(mitocheck_dir / "Anaphase")], store)
    assert got[0].row == 3 and got[0].label == str(store.labels[3])
    assert got[1].path == str(one.resolve()) and got[1].label == ""
    assert len(got) == 2 + len(list((mitocheck_dir / "Anaphase").glob("*.png")))
    with pytest.raises(EmbedkitError, match="not in store .*320 items"):
        resolve_items(["Anaphase/no-such-cell.png"], store)
    with pytest.raises(EmbedkitError, match="no such image file"):
        resolve_items([str(tmp_path / "missing.png")], None)


def test_selection_from_predictions():
    import pandas as pd

    classes = ["A", "B", "C"]
    rows = [  # id, true, pred, run, p_A, p_B, p_C
        ("i1", "A", "B", 0, 0.2, 0.7, 0.1), ("i2", "A", "C", 0, 0.1, 0.3, 0.6), ("i3", "B", "B", 0, 0.1, 0.8, 0.1),
        ("i4", "C", "A", 0, 0.9, 0.0, 0.1), ("i4", "C", "A", 1, 0.95, 0.0, 0.05), ("i5", "C", "C", 0, 0.0, 0.1, 0.9),
        ("i6", "", "A", 0, 1.0, 0.0, 0.0), ("i7", "A", "A", 0, 0.5, 0.3, 0.2),
    ]
    df = pd.DataFrame(rows, columns=["id", "true", "pred", "run"] + [f"p_{c}" for c in classes])
    df["true"] = df["true"].astype(str)
    wrong = select_rows(df, "misclassified", 10)
    assert list(wrong["id"]) == ["i4", "i1", "i2"]  # most confident mistakes first, each id once
    assert list(select_rows(df, "misclassified", 2)["id"]) == ["i4", "i1"]
    per = select_rows(df, "per-class", 1)
    assert list(per["id"]) == ["i7", "i3", "i5"]  # highest probability for its own class, unlabelled i6 ignored
    with pytest.raises(EmbedkitError, match="--select"):
        select_rows(df, "random", 3)


def test_deletion_insertion_rewards_the_evidence():
    """A model that only looks at one corner: the map of that corner beats the opposite one and random noise."""

    class Corner(torch.nn.Module):
        def forward(self, x):
            s = x[:, :, :8, :8].mean(dim=(1, 2, 3)) * 4
            return torch.stack([-s, s], dim=1)

    pre = Preprocess(32, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.full((1, 3, 32, 32), -1.0)  # black, normalised
    x[..., :8, :8] = 1.0  # but a white top-left corner, which is all the model looks at
    yy, xx = np.mgrid[:32, :32]
    good = (64.0 - yy - xx).astype(np.float32)  # the corner first
    bad = good[::-1, ::-1].copy()  # the corner last
    net = Corner()
    c_good = deletion_insertion(net, x, good, 1, pre, steps=8)
    c_bad = deletion_insertion(net, x, bad, 1, pre, steps=8)
    c_rand = deletion_insertion(net, x, random_saliency((32, 32), (4, 4), 0), 1, pre, steps=8)
    assert c_good.deletion_auc < c_rand.deletion_auc < c_bad.deletion_auc
    assert c_good.insertion_auc > c_bad.insertion_auc
    rows = [{"id": i, "method": m, "group": g, "deletion": d, "insertion": ins}
            for i, m, g, d, ins in [("x", "a", "g1", 0.1, 0.8), ("y", "a", "g2", 0.2, 0.6), ("x", "random", "g1", 0.4, 0.5),
                                    ("y", "random", "g2", 0.5, 0.3)]]
    summary = {r["method"]: r for r in summarize(rows)}
    assert summary["a"]["insertion_minus_deletion"] == pytest.approx(0.55)
    lo, hi = summary["a"]["deletion_ci"]
    assert 0.1 <= lo <= 0.15 <= hi <= 0.2
    assert summary["a"]["vs_random"] == pytest.approx(0.6)  # paired per image: 0.7 - 0.1 and 0.4 - (-0.2)
    assert summary["a"]["vs_random_ci"] == pytest.approx([0.6, 0.6])
    assert "vs_random" not in summary["random"]


def test_explain_run_writes_maps_overlays_and_grid(lite0_head, mitocheck_dir, tmp_path):
    from embedkit.explain import explain

    paths = cells(mitocheck_dir, 3)
    items = [Item(p.parent.name + "/" + p.name, str(p), label=p.parent.name, group=p.parent.name) for p in paths]
    res = explain(lite0_head, items, tmp_path / "out", methods="gradcam,eigencam", target="b", batch_size=2,
                  progress=False)
    assert res.layer == "bn2" and len(res.items) == 3
    for row in res.items:
        assert row["target"] == "b" and row["true"] == row["id"].split("/")[0]
        for m in ("gradcam", "eigencam"):
            arr = np.load(tmp_path / "out" / row[f"map_{m}"])
            assert arr.shape == (64, 64) and arr.dtype == np.float32 and np.isfinite(arr).all()
        assert (tmp_path / "out" / row["overlay"]).stat().st_size > 5000
    assert (tmp_path / "out" / "grid.png").exists()
    info = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert info["layer"] == "bn2" and info["class_agnostic_methods"] == ["eigencam"]
    assert not list((tmp_path / "out").rglob(".*.tmp"))
