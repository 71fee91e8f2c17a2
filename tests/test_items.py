"""The one item model and pixel reader: store crops when the store holds them, the item's file otherwise."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import MITOCHECK, invoke_cli
from embedkit.errors import EmbedkitError
from embedkit.images import Conversion, load_rgb
from embedkit.items import Item, ItemSet
from embedkit.store import Store

CELL = sorted((MITOCHECK / "Anaphase").glob("*.png"))[0]


def test_sources_share_the_one_item_model():
    from embedkit import sources

    assert sources.Item is Item
    it = Item("a", "a.png", "x")
    assert (it.group, it.meta, it.row) == ("", {}, None)


def test_store_pixels_are_read_from_the_store_not_the_file(tmp_path):
    store_path = tmp_path / "patches.h5"
    invoke_cli("patches", CELL, "--out", store_path, "--size", "32", "--stride", "32", "--filter", "none", "--quiet")
    items = ItemSet.from_store(Store(store_path))
    assert items.has_pixels and items.kind == "store pixels" and len(items) == 4
    field = load_rgb(CELL)
    for i in range(len(items)):
        y, x = map(int, re.search(r"@(\d+),(\d+)$", str(items.ids[i])).groups())
        assert items.where(i) == f"{store_path}[{i}]"
        np.testing.assert_allclose(items.rgb(i), field[y:y + 32, x:x + 32], atol=0.5 / 255)  # the crop, not the field
    batch = items.rgbs([3, 0, 3])
    np.testing.assert_array_equal(batch[0], items.rgb(3))
    np.testing.assert_array_equal(batch[1], items.rgb(0))
    assert items.missing_files(range(4)) == []  # crops never miss, even if the field file went away


def test_store_without_pixels_reads_files_and_mixes_with_loose_files(lite0_store_ro, tmp_path):
    store = Store(lite0_store_ro)
    items = ItemSet.from_store(store)
    assert not items.has_pixels and items.kind == "store files"
    path = store.abspath(str(store.column("path")[7]))
    assert items.where(7) == path and items.paths[7] == path
    np.testing.assert_array_equal(items.rgb(7, Conversion()), load_rgb(path))
    it = items.item(7)
    assert (it.id, it.row, it.label) == (str(store.ids[7]), 7, str(store.labels[7]))

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    mixed = ItemSet.from_items([it, Item("loose", str(CELL)), Item("broken", str(broken)),
                                Item("gone", str(tmp_path / "gone.png"))], store)
    assert list(mixed.rows) == [7, -1, -1, -1]
    np.testing.assert_array_equal(mixed.rgb(0), load_rgb(path))
    np.testing.assert_array_equal(mixed.rgb(1), load_rgb(CELL))
    thumbs = mixed.rgbs(range(4))
    assert thumbs[0] is not None and thumbs[1] is not None and thumbs[2] is None and thumbs[3] is None
    assert mixed.missing_files(range(4)) == [str(tmp_path / "gone.png")]


def test_ids_positions_files_and_hints(lite0_store_ro):
    items = ItemSet.from_store(Store(lite0_store_ro))
    ids = [str(items.ids[5]), str(items.ids[2])]
    assert list(items.positions(ids)) == [5, 2]
    assert items.position_of_file(items.paths[9]) == 9
    assert items.position_of_file("/no/such.png") is None
    assert "did you mean 'Anaphase/" in items.id_hint("Anaphase/")
    sub = items.subset([9, 1])
    assert list(sub.rows) == [9, 1] and list(sub.ids) == [items.ids[9], items.ids[1]]
    np.testing.assert_array_equal(sub.rgb(0), items.rgb(9))


def test_open_turns_any_source_into_items(lite0_store_ro, tmp_path):
    from_store = ItemSet.open(str(lite0_store_ro), group_by="mitocheck")
    from_folder = ItemSet.open(MITOCHECK, group_by="mitocheck")
    assert from_store.group_by == "mitocheck" and from_folder.kind == "class folders"
    by_id = dict(zip(from_folder.ids, from_folder.groups))
    assert all(by_id[i] == g for i, g in zip(from_store.ids, from_store.groups))
    np.testing.assert_array_equal(from_folder.rgb(0), load_rgb(from_folder.paths[0]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmbedkitError, match="no images"):
        ItemSet.open(empty)
