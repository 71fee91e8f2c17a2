"""``embedkit leaks``: augmented copies of real cells across a random split are a leak; the suggested grouping
keeps them together; clean group splits pass; groups straddling a split are a leak."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import MITOCHECK, invoke_cli, run_cli
from PIL import Image

SOURCES = 16
COPIES = 3


@pytest.fixture(scope="module")
def copies_store(tmp_path_factory):
    """A store of 16 real cells (one per movie) and 3 augmented copies of each, every file its own group."""
    from embedkit.duplicates.augment import augmented_copy

    root = tmp_path_factory.mktemp("copies")
    rng = np.random.default_rng(0)
    seen_movies = set()
    n = 0
    for f in sorted(MITOCHECK.glob("*/*.png")):
        movie = f.name.split("___")[0][:11] + f.name.split("___")[1]
        if movie in seen_movies:
            continue
        seen_movies.add(movie)
        (root / "cells" / f.parent.name).mkdir(parents=True, exist_ok=True)
        img = np.asarray(Image.open(f))
        Image.fromarray(img).save(root / "cells" / f.parent.name / f"s{n:02d}_orig.png")
        for c in range(COPIES):
            Image.fromarray(augmented_copy(img, rng)).save(root / "cells" / f.parent.name / f"s{n:02d}_copy{c}.png")
        n += 1
        if n == SOURCES:
            break
    store = root / "copies.h5"
    invoke_cli("embed", root / "cells", "--store", store, "--encoder", "efficientnet_lite0", "--image-size", "32",
               "--group-by", "file", "--quiet")
    return store


def _source(item_id: str) -> str:
    return item_id.split("/")[-1][:3]


def test_copies_across_a_random_split_are_a_leak_and_the_suggested_grouping_fixes_it(copies_store, tmp_path):
    from embedkit.leaks import load_leak_groups, quick_leak_check, suspicious_grouping
    from embedkit.splits import make_splits
    from embedkit.store import Store

    s = Store(copies_store)
    assert suspicious_grouping(s.groups) == "every item is its own group"
    random = make_splits(s.ids, s.labels, s.ids, test_size=0.25, val_size=0.2, seed=0)
    random.save(tmp_path / "random.json")
    proc = run_cli("leaks", copies_store, "--splits", tmp_path / "random.json", "--out", tmp_path / "pairs.csv",
                   "--sheet", tmp_path / "pairs.png", "--suggest-groups", tmp_path / "groups.csv", "--quiet", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith("LEAK: ") and "have a copy in train/val (verified copy)" in verdict
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    test_ids = random.folds[0].test
    assert pairs["test_id"].nunique() >= 0.8 * len(test_ids)  # nearly every test item has a copy in train/val
    assert (pairs["test_id"].map(_source) == pairs["seen_id"].map(_source)).all()  # and it is a copy of that cell
    with Image.open(tmp_path / "pairs.png") as im:
        assert im.width > 400

    groups = pd.read_csv(tmp_path / "groups.csv", dtype=str)
    assert list(groups.columns) == ["id", "group", "previous_group", "copies"]
    by_source = groups.groupby(groups["id"].map(_source))["group"].nunique()
    assert (by_source == 1).mean() >= 2 / 3  # most cells are one group with all their copies (12 of 16 when written)
    assert groups.groupby("group")["id"].apply(lambda x: x.map(_source).nunique()).max() == 1  # never two cells

    aligned = load_leak_groups(s, tmp_path / "groups.csv")
    assert list(aligned) == list(groups.set_index("id").loc[list(s.ids), "group"])
    grouped = make_splits(s.ids, s.labels, aligned, test_size=0.25, val_size=0.2, seed=0)
    grouped.save(tmp_path / "grouped.json")
    again = run_cli("leaks", copies_store, "--splits", tmp_path / "grouped.json", "--out", tmp_path / "again.csv",
                    "--quiet", check=False)
    assert "group(s) sit on both sides" not in again.stdout
    remaining = pd.read_csv(tmp_path / "again.csv")["test_id"].nunique()
    assert remaining <= 0.25 * pairs["test_id"].nunique(), again.stdout  # only copies the grouping missed

    assert quick_leak_check(s, random).leaking
    assert quick_leak_check(s, s.groups).status == "leak"  # each file its own group: copies straddle groups
    clean = quick_leak_check(s, aligned)
    assert clean.n_checked == len(s.ids) and clean.n_flagged <= 2


def test_clean_group_split_of_real_cells_is_clean(lite0_store_ro, tmp_path):
    from embedkit.splits import make_splits
    from embedkit.store import Store

    s = Store(lite0_store_ro)
    make_splits(s.ids, s.labels, s.groups, test_size=0.25, val_size=0.2, seed=0).save(tmp_path / "clean.json")
    proc = run_cli("leaks", lite0_store_ro, "--splits", tmp_path / "clean.json", "--quiet", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("clean: no test item has a copy in train/val")


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
    proc = run_cli("leaks", lite0_store, "--splits", tmp_path / "bad.json", "--by", "embedding", "--quiet", check=False)
    assert proc.returncode == 1 and "1 group(s) sit on both sides" in proc.stdout.splitlines()[-1]
    assert f"group '{group_of[moved]}' is in test and train" in proc.stdout


def test_bad_input_is_one_line(lite0_store_ro, tmp_path):
    from embedkit.errors import EmbedkitError
    from embedkit.leaks import load_leak_groups
    from embedkit.store import Store

    (tmp_path / "other.json").write_text('{"folds": [{"train": ["nope.png"], "val": [], "test": []}]}')
    err = run_cli("leaks", lite0_store_ro, "--splits", tmp_path / "other.json", check=False)
    assert err.returncode == 2 and "not in the store" in err.stderr
    none = run_cli("leaks", lite0_store_ro, check=False)
    assert none.returncode == 2 and "nothing to do" in none.stderr
    thr = run_cli("leaks", lite0_store_ro, "--splits", tmp_path / "other.json", "--threshold", "0.9", check=False)
    assert thr.returncode == 2 and "--threshold applies to --by embedding" in thr.stderr
    (tmp_path / "g.csv").write_text("id,group\nnope.png,dup1\n")
    with pytest.raises(EmbedkitError, match="have no group"):
        load_leak_groups(Store(lite0_store_ro), tmp_path / "g.csv")


def _write_grouping(path, ids, groups) -> None:
    pd.DataFrame({"id": ids, "group": groups, "previous_group": groups, "copies": 0}).to_csv(path, index=False)


def test_probe_groups_by_a_leaks_grouping_file(lite0_store_ro, tmp_path):
    import json

    from embedkit.items import store_groups
    from embedkit.store import Store

    s = Store(lite0_store_ro)
    cells = [f"dup{g}" for g in pd.factorize(s.groups)[0] // 2]  # two movies per group: not the store's own grouping
    _write_grouping(tmp_path / "groups.csv", s.ids[::-1], cells[::-1])  # any row order
    groups, name = store_groups(s, f"leaks:{tmp_path / 'groups.csv'}")
    assert list(groups) == cells and name == f"leaks:{tmp_path / 'groups.csv'}"

    out = tmp_path / "probe"
    invoke_cli("probe", lite0_store_ro, "--group-by", f"leaks:{tmp_path / 'groups.csv'}", "--heads", "knn",
               "--no-baselines", "--out", out, "--quiet")
    splits = json.loads((out / "splits.json").read_text())
    assert splits["group_by"] == f"leaks:{tmp_path / 'groups.csv'}"
    group_of = dict(zip(s.ids, cells))
    fold = splits["folds"][0]
    sides = [{group_of[i] for i in fold[p]} for p in ("train", "val", "test")]
    assert not (sides[0] & sides[2]) and not (sides[1] & sides[2]) and not (sides[0] & sides[1])
    assert any(len({g for g in s.groups[[group_of[i] == c for i in s.ids]]}) == 2 for c in sides[2])


def test_a_bad_leaks_grouping_is_one_line(lite0_store_ro, mitocheck_dir, tmp_path):
    from embedkit.errors import EmbedkitError
    from embedkit.items import store_groups
    from embedkit.sources import discover
    from embedkit.store import Store

    s = Store(lite0_store_ro)
    missing = run_cli("probe", lite0_store_ro, "--group-by", f"leaks:{tmp_path / 'none.csv'}", "--out", tmp_path / "o",
                      check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "no such file" in missing.stderr and "--suggest-groups" in missing.stderr
    assert not (tmp_path / "o").exists()

    _write_grouping(tmp_path / "part.csv", s.ids[:-3], ["g"] * (len(s.ids) - 3))
    with pytest.raises(EmbedkitError, match=r"3 of the store's 320 items have no group.*another store"):
        store_groups(s, f"leaks:{tmp_path / 'part.csv'}")
    (tmp_path / "cols.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(EmbedkitError, match=r"^--group-by leaks:.*cols\.csv: a grouping file .*needs 'id' and 'group'"):
        store_groups(s, f"leaks:{tmp_path / 'cols.csv'}")
    (tmp_path / "twice.csv").write_text(f"id,group\n{s.ids[0]},a\n{s.ids[0]},b\n")
    with pytest.raises(EmbedkitError, match=r"twice\.csv:3: item .* is listed twice"):
        store_groups(s, f"leaks:{tmp_path / 'twice.csv'}")
    (tmp_path / "empty.csv").write_text(f"id,group\n{s.ids[0]},\n")
    with pytest.raises(EmbedkitError, match="empty group"):
        store_groups(s, f"leaks:{tmp_path / 'empty.csv'}")
    with pytest.raises(EmbedkitError, match="needs a file"):
        store_groups(s, "leaks:")
    with pytest.raises(EmbedkitError, match="lists a store's items; use it with the store"):
        discover(mitocheck_dir, group_by=f"leaks:{tmp_path / 'part.csv'}")


def test_auto_leak_check_runs_only_on_a_suspicious_grouping_and_finds_the_copies(copies_store, lite0_store_ro):
    from embedkit.leaks import auto_leak_check
    from embedkit.splits import make_splits
    from embedkit.store import Store

    s = Store(copies_store)
    by_file = make_splits(s.ids, s.labels, s.ids, test_size=0.25, val_size=0.2, seed=0)
    verdict = auto_leak_check(s, None, by_file, max_items=8)
    assert verdict is not None and verdict.leaking and verdict.reason == "every item is its own group"
    assert verdict.n_checked == 8 and verdict.n_flagged >= 5
    assert verdict.line.startswith("leak check (every item is its own group): LEAK: ")
    assert "\n" not in verdict.line and "--group-by leaks:" in verdict.line
    assert all(_source(a) == _source(b) for a, b in verdict.examples)
    sources = [_source(i) for i in s.ids]
    by_source = make_splits(s.ids, s.labels, sources, test_size=0.25, val_size=0.2, seed=0)
    assert auto_leak_check(s, None, by_source, sources) is None  # four items per group: plausible, no check
    assert auto_leak_check(s, None, by_file, dict(zip(s.ids, sources))) is None  # groups may be given by id

    real = Store(lite0_store_ro)
    by_movie = make_splits(real.ids, real.labels, real.groups, test_size=0.25, val_size=0.2, seed=0)
    assert auto_leak_check(real, None, by_movie) is None
    by_cell = make_splits(real.ids, real.labels, real.ids, test_size=0.25, val_size=0.2, seed=0)
    distinct = auto_leak_check(real, None, by_cell, real.ids, max_items=20, max_pool=100)
    assert distinct is not None and distinct.reason == "every item is its own group" and distinct.n_pool == 100
    assert distinct.status == "clean" and distinct.n_checked == 20  # distinct cells of one movie are not copies
    assert "(100 sampled)" in distinct.line
