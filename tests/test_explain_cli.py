"""``embedkit explain`` end to end: a saved probe on the real frozen efficientnet_lite0, a fine-tuned
checkpoint folder, selections from predictions.csv, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import invoke_cli, run_cli
from embedkit.images import read_image

SPOT = (slice(3, 13), slice(3, 13))  # a bright square in the top-left corner of a 64 x 64 cell


def run_main(*args) -> None:
    """Run the CLI in this process (the console script's entry point, without a new interpreter)."""
    from embedkit.cli import main

    main([str(a) for a in args])


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process and capture it: (exit code, stdout, stderr)."""
    from embedkit.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def spot_probe(tmp_path_factory, mitocheck_dir):
    """Real cells, each once plain and once with a bright top-left spot; a lite0 probe told them apart."""
    from PIL import Image

    root = tmp_path_factory.mktemp("spot")
    data = root / "data"
    cells = [sorted(d.glob("*.png"))[1] for d in sorted(p for p in mitocheck_dir.iterdir() if p.is_dir())][:12]
    for cls in ("plain", "spot"):
        (data / cls).mkdir(parents=True)
        for c in cells:
            arr = read_image(c)[..., 0].copy()
            if cls == "spot":
                arr[SPOT] = 255
            Image.fromarray(arr).save(data / cls / c.name)
    store = root / "spot.h5"
    run_main("embed", data, "--store", store, "--group-by", "mitocheck", "--quiet")
    run_main("probe", store, "--heads", "logreg,knn", "--folds", "3", "--C", "0.1,1", "--n-boot", "100",
             "--out", root / "results", "--quiet")
    return root


def peak_in_corner(m: np.ndarray) -> bool:
    r, c = np.unravel_index(m.argmax(), m.shape)
    h, w = m.shape
    return r < h // 2 and c < w // 2 and m[:h // 2, :w // 2].mean() > 2 * m[h // 2:, w // 2:].mean()


def test_probe_on_frozen_encoder_end_to_end_peaks_on_the_spot(spot_probe, tmp_path):
    out = tmp_path / "cams"
    proc = invoke_cli("explain", spot_probe / "results" / "logreg", "--store", spot_probe / "spot.h5", "--select",
                      "per-class", "--n", "2", "--method", "gradcam,hirescam", "--faithfulness", "--steps", "2", "--out", out,
                      "--quiet")
    assert "explained 4 images" in proc.stdout and "layer bn2" in proc.stdout
    items = pd.read_csv(out / "items.csv", keep_default_na=False)
    assert sorted(items["true"]) == ["plain"] * 2 + ["spot"] * 2
    spots = items[items["true"] == "spot"]
    assert (spots["pred"] == "spot").all() and (spots["score"] > 0.5).all()
    for _, row in spots.iterrows():
        for m in ("gradcam", "hirescam"):
            cam = np.load(out / row[f"map_{m}"])
            assert cam.shape == (64, 64) and np.isfinite(cam).all()
            assert peak_in_corner(cam), (row["id"], m)
    for row in items.itertuples():
        assert (out / row.overlay).exists()
    faith = pd.read_csv(out / "faithfulness.csv")
    assert list(faith["method"]) == ["gradcam", "hirescam", "random"]
    assert faith["insertion"].between(0, 1).all() and faith["deletion"].between(0, 1).all()
    assert faith["vs_random"].notna().tolist() == [True, True, False] and "gain vs random" in proc.stdout
    assert (out / "faithfulness.png").exists() and (out / "grid.png").exists()
    info = json.loads((out / "explain.json").read_text())
    assert info["model"]["kind"] == "probe" and info["model"]["encoder"] == "efficientnet_lite0"
    assert info["model"]["source"] == str(spot_probe / "results" / "logreg" / "probe")


def test_misclassified_selection_on_real_cells(lite0_store_ro, tmp_path, capsys):
    results = tmp_path / "results"
    run_main("probe", lite0_store_ro, "--heads", "logreg", "--seeds", "1", "--C", "1e-3,1e-2", "--n-boot", "100", "--out", results, "--quiet")
    out = tmp_path / "cams"
    code, _, err = cli(capsys, "explain", results / "logreg", "--store", lite0_store_ro, "--select", "misclassified",
                       "--n", "3", "--out", out)
    assert code == 0 and "selected 3 items (misclassified)" in err
    items = pd.read_csv(out / "items.csv", keep_default_na=False)
    pred = pd.read_csv(results / "logreg" / "predictions.csv", keep_default_na=False)
    wrong = pred[(pred["true"] != "") & (pred["true"] != pred["pred"])]
    confidence = wrong.apply(lambda r: r[f"p_{r['pred']}"], axis=1)
    assert list(items["id"]) == list(wrong.loc[confidence.sort_values(ascending=False).index[:3], "id"])
    assert (items["recorded_pred"] != items["true"]).all()
    # the saved probe is the model that made these predictions: explain recomputes them from the pixels
    assert list(items["pred"]) == list(items["recorded_pred"])
    assert len(list((out / "maps").glob("*.hirescam.npy"))) == 3


@pytest.fixture(scope="module")
def finetuned(spot_probe):
    """A real 'embedkit finetune' result folder: a tiny timm EfficientNet, one epoch on the spot cells."""
    out = spot_probe / "finetune"
    run_main("finetune", spot_probe / "data", "--group-by", "mitocheck", "--model", "test_efficientnet", "--random-init",
             "--image-size", "96", "--epochs", "1", "--out", out, "--quiet")
    return out


def test_finetuned_checkpoint_with_layer_listing_and_override(finetuned, spot_probe, mitocheck_dir, tmp_path, capsys):
    code, listing, _ = cli(capsys, "explain", finetuned, "--list-layers")
    assert code == 0 and "bn2" in listing and "<- default" in listing and "blocks.2" in listing
    files = sorted((mitocheck_dir / "Anaphase").glob("*.png"))[:2]
    out = tmp_path / "cams"
    code, _, err = cli(capsys, "explain", finetuned, *files, "--method", "gradcam++,scorecam", "--layer", "blocks.2",
                       "--out", out, "--quiet")
    assert code == 0, err
    info = json.loads((out / "explain.json").read_text())
    assert info["layer"] == "blocks.2" and info["model"]["kind"] == "finetune"
    items = pd.read_csv(out / "items.csv", keep_default_na=False)
    assert list(items["true"]) == ["", ""] and set(items["pred"]) <= {"plain", "spot"}
    assert info["model"]["model"] == "test_efficientnet" and info["preprocess"]["size"] == 96
    for m in ("gradcam++", "scorecam"):
        maps = sorted((out / "maps").glob(f"*.{m}.npy"))
        assert len(maps) == 2 and all(np.load(p).shape == (64, 64) and np.isfinite(np.load(p)).all() for p in maps)
    # the run's own predictions.csv (found in the result folder) selects store items; same model, same pixels
    code, _, err = cli(capsys, "explain", finetuned, "--store", spot_probe / "spot.h5", "--select", "per-class", "--n", "1",
                       "--out", tmp_path / "sel", "--quiet")
    assert code == 0 and str(finetuned / "predictions.csv") in err
    items = pd.read_csv(tmp_path / "sel" / "items.csv", keep_default_na=False)
    assert sorted(items["true"]) == ["plain", "spot"] and list(items["pred"]) == list(items["recorded_pred"])


def one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    code, _, err = result
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("embedkit: error:"), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_inputs_get_one_clear_line(finetuned, spot_probe, mitocheck_dir, tmp_path, capsys):
    cell = sorted((mitocheck_dir / "Anaphase").glob("*.png"))[0]
    one_line_error(cli(capsys, "explain", finetuned, cell, "--method", "gradcam,lime", "--out", tmp_path),
                   "unknown method", "hirescam")
    one_line_error(cli(capsys, "explain", finetuned, cell, "--layer", "blocks.9", "--out", tmp_path),
                   "no such layer", "blocks.2", "--list-layers")
    one_line_error(cli(capsys, "explain", spot_probe / "results" / "logreg", "plain/no-such-cell.png", "--store",
                       spot_probe / "spot.h5", "--out", tmp_path), "not in store", "24 items")
    one_line_error(cli(capsys, "explain", finetuned, cell, "--target", "Prophase", "--out", tmp_path),
                   "not a class", "plain, spot")
    one_line_error(cli(capsys, "explain", spot_probe / "results" / "knn", cell, "--out", tmp_path),
                   "not differentiable", "logreg")
    assert not list(tmp_path.iterdir())  # nothing written
    proc = run_cli("explain", finetuned, cell, "--method", "lime", "--out", tmp_path, check=False)  # the real script
    one_line_error((proc.returncode, proc.stdout, proc.stderr), "unknown method")
