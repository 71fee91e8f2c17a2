"""The Cellpose 4 backend, run offline through a tiny randomly initialised CPSAM (masks are arbitrary:
these tests check the plumbing, not segmentation quality), and its failure when weights are missing."""

from pathlib import Path

import h5py
import json
import pytest
import tifffile
import torch

from embedkit.encoders.base import file_fingerprint
from embedkit.segment.cellpose_backend import cpsam_architecture, save_random_cpsam
from embedkit.segment.crops import measure_cells
from embedkit.store import Store

from test_segment import cli_here, tiles


@pytest.fixture(scope="session")
def tiny_cpsam(tmp_path_factory) -> Path:
    """A 2-block, 32-wide CPSAM (about 3.5 MB), built offline with random weights."""
    return save_random_cpsam(tmp_path_factory.mktemp("cpsam") / "tiny_cpsam.pt", embed_dim=32, depth=2, num_heads=2,
                             global_attn_indexes=(1,))


def test_architecture_is_read_back_from_the_state_dict(tiny_cpsam, tmp_path):
    state = torch.load(tiny_cpsam, map_location="cpu", weights_only=True)
    assert cpsam_architecture(state) == {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,)}
    assert 2.5e6 < tiny_cpsam.stat().st_size < 5e6
    other = save_random_cpsam(tmp_path / "other.pt", embed_dim=48, depth=3, num_heads=4, global_attn_indexes=(0, 2))
    state = torch.load(other, map_location="cpu", weights_only=True)
    assert cpsam_architecture(state) == {"embed_dim": 48, "depth": 3, "num_heads": 4, "global_attn_indexes": (0, 2)}


def test_the_published_cpsam_shape_is_recognised_as_sam_vit_l():
    from cellpose.vit import CPSAM

    from embedkit.segment.cellpose_backend import VIT_L

    with torch.device("meta"):  # shapes only: the 305M-parameter network is never allocated
        state = CPSAM().state_dict()
    assert cpsam_architecture(state) == VIT_L


def test_segment_with_a_cellpose_model_file(tiny_cpsam, tmp_path, capsys):
    field = tiles(tmp_path / "f", 128, {"x.tif": (1, 2)}) / "x.tif"
    store = tmp_path / "cp.h5"
    code, out, err = cli_here(capsys, "segment", field, "--out", store, "--model", tiny_cpsam, "--flow-threshold", "0",
                              "--min-area", "10", "--edge", "keep", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "with cellpose" in out
    labels = tifffile.imread(tmp_path / "cp_labels" / "x.tif.labels.tif")
    assert labels.shape == (128, 128) and labels.max() > 0
    cells = measure_cells(labels)
    s = Store(store)
    n = len(s)
    assert n == int((cells.area >= 10).sum()) > 0
    assert sorted(s.column("mask_id")) == sorted(cells.mask_id[cells.area >= 10])
    with h5py.File(store, "r") as f:
        assert f["pixels"].shape == (n, 96, 96, 3)
        cfg = json.loads(f["segment"].attrs["config"])["segmenter"]
    assert cfg["backend"] == "cellpose" and cfg["model"] == "tiny_cpsam.pt"
    assert cfg["weights_fingerprint"] == file_fingerprint(tiny_cpsam)
    assert cfg["architecture"] == {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}
    assert cfg["flow_threshold"] == 0 and "cellpose" in cfg["versions"]


def test_bad_model_files_fail_with_one_line(tmp_path, capsys):
    field = tiles(tmp_path / "f", 64, {"x.tif": (0, 0)}) / "x.tif"
    not_cp4 = tmp_path / "old.pt"
    torch.save({"weight": torch.zeros(3)}, not_cp4)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    for model, expected in ((not_cp4, "not a Cellpose 4 model"), (garbage, "not a readable PyTorch model file"),
                            ("cyto9", "not a file and not a Cellpose model name")):
        code, _, err = cli_here(capsys, "segment", field, "--out", tmp_path / "x.h5", "--model", model, "--quiet")
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "x.h5").exists()


def test_missing_cpsam_weights_name_the_file_and_the_fallback(tmp_path, capsys, monkeypatch):
    import cellpose.models

    field = tiles(tmp_path / "f", 64, {"x.tif": (0, 0)}) / "x.tif"
    models = tmp_path / "models"
    # what CELLPOSE_LOCAL_MODELS_PATH does when set before cellpose is imported
    monkeypatch.setattr(cellpose.models, "MODEL_DIR", models)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli_here(capsys, "segment", field, "--out", tmp_path / "x.h5", "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(models / "cpsam") in lines[0] and "--backend watershed" in lines[0]
    assert "huggingface.co/mouseland/cellpose-sam" in lines[0]
    assert not (tmp_path / "x.h5").exists()
