"""``embedkit leaks``: planted flipped/rotated/brightened copies of real cells across a split are caught; clean splits pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import run_cli
from PIL import Image

COPIES = {"hflip": lambda a: a[:, ::-1], "rot90": lambda a: np.rot90(a),
          "bright": lambda a: np.clip(np.rint(a.astype(np.float32) * 1.1), 0, 255).astype(a.dtype),
          "exact": lambda a: a}


def _plant(store, test_ids: list[str], folder) -> dict[str, str]:
    """Write an augmented copy of each test cell under its own new group, embed them with the real lite0; copy id -> original id."""
    from embedkit.embed import embed
    from embedkit.encoders import create_encoder
    from embedkit.sources import discover
    from embedkit.store import Store

    s = Store(store)
    row_of = {str(i): r for r, i in enumerate(s.ids)}
    folder.mkdir()
    lines, planted = ["path,label,group"], {}
    for n, (name, f) in enumerate(COPIES.items()):
        orig = test_ids[n]
        r = row_of[orig]
        arr = np.asarray(Image.open(s.abspath(str(s.column("path")[r]))))
        Image.fromarray(np.ascontiguousarray(f(arr))).save(folder / f"{name}.png")
        lines.append(f"{name}.png,{s.labels[r]},planted_{n}")
        planted[f"{name}.png"] = orig
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    embed(discover(str(folder / "manifest.csv")), store, create_encoder("efficientnet_lite0"), device="cpu", progress=False)
    return planted


def test_planted_copies_are_found_and_the_clean_split_is_clean(lite0_store, tmp_path):
    from embedkit.splits import Fold, Splits, make_splits
    from embedkit.store import Store

    s = Store(lite0_store)
    splits = make_splits(s.ids, s.labels, s.groups, test_size=0.25, val_size=0.2, seed=0)
    splits.save(tmp_path / "clean.json")
    clean = run_cli("leaks", lite0_store, "--splits", tmp_path / "clean.json", "--quiet", check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    verdict = clean.stdout.strip().splitlines()[-1]
    assert verdict.startswith("clean: no test item has a train/val near-duplicate (pixel similarity >= 0.975)")

    fold = splits.folds[0]
    group_of = dict(zip(s.ids, s.groups))
    originals, seen_groups = [], set()
    for i in fold.test:  # one cell per movie, so each planted pair is unambiguous
        if group_of[i] not in seen_groups:
            seen_groups.add(group_of[i])
            originals.append(i)
    planted = _plant(lite0_store, originals, tmp_path / "planted")
    Splits([Fold(train=fold.train + list(planted), val=fold.val, test=fold.test)]).save(tmp_path / "leaky.json")
    leaky = run_cli("leaks", lite0_store, "--splits", tmp_path / "leaky.json", "--out", tmp_path / "pairs.csv",
                    "--sheet", tmp_path / "pairs.png", "--quiet", check=False)
    assert leaky.returncode == 1
    verdict = leaky.stdout.strip().splitlines()[-1]
    assert verdict.startswith(f"LEAK: {len(planted)} of {len(fold.test)} test items have a near-duplicate in train/val")
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    found = set(zip(pairs["seen_id"], pairs["test_id"]))
    assert set(planted.items()) <= found  # every flipped, rotated, brightened and exact copy
    assert set(pairs["seen_id"]) == set(planted)  # and nothing but the planted copies
    assert (pairs["similarity"] >= 0.975).all() and (pairs["seen_part"] == "train").all()
    assert pairs.loc[pairs["seen_id"] == "rot90.png", "embedding_cosine"].iloc[0] < pairs["similarity"].min()
    from PIL import Image as _Image

    with _Image.open(tmp_path / "pairs.png") as im:
        assert im.width > 400

    # embedding cosine sees the exact copy; its verdict still says LEAK
    emb = run_cli("leaks", lite0_store, "--splits", tmp_path / "leaky.json", "--by", "embedding", "--out",
                  tmp_path / "emb.csv", "--quiet", check=False)
    assert emb.returncode == 1 and "embedding cosine >= 0.990" in emb.stdout
    emb_pairs = pd.read_csv(tmp_path / "emb.csv")
    assert ("exact.png", planted["exact.png"]) in set(zip(emb_pairs["seen_id"], emb_pairs["test_id"]))


def test_groups_straddling_the_split_are_a_leak(lite0_store, tmp_path):
    from embedkit.splits import Fold, Splits, make_splits
    from embedkit.store import Store

    s = Store(lite0_store)
    fold = make_splits(s.ids, s.labels, s.groups, test_size=0.25, val_size=0.2, seed=1).folds[0]
    group_of = dict(zip(s.ids, s.groups))
    test_groups = [group_of[i] for i in fold.test]
    moved = next(i for i in fold.test if test_groups.count(group_of[i]) > 1)  # its movie keeps cells in test
    rest = [i for i in fold.test if i != moved]
    Splits([Fold(train=fold.train + [moved], val=fold.val, test=rest)]).save(tmp_path / "bad.json")
    proc = run_cli("leaks", lite0_store, "--splits", tmp_path / "bad.json", "--quiet", check=False)
    assert proc.returncode == 1 and "1 group(s) sit on both sides" in proc.stdout.splitlines()[-1]
    assert f"group '{group_of[moved]}' is in test and train" in proc.stdout
    (tmp_path / "other.json").write_text('{"folds": [{"train": ["nope.png"], "val": [], "test": []}]}')
    err = run_cli("leaks", lite0_store, "--splits", tmp_path / "other.json", check=False)
    assert err.returncode == 2 and "not in the store" in err.stderr
