"""Finding items: class folders, manifests with metadata, plain folders, file lists, and group rules."""

import pytest

from embedkit.errors import EmbedkitError
from embedkit.sources import discover, read_csv_rows


def test_class_folders_with_mitocheck_groups(mitocheck_dir):
    src = discover(mitocheck_dir, group_by="mitocheck")
    assert src.kind == "class_folders"
    assert len(src.items) == 320
    assert len({it.label for it in src.items}) == 16
    it = src.items[0]
    assert it.path.startswith(it.label + "/")
    # plate + position: e.g. 'PLLT0023_04--...___P00005_01___' -> '0023_04_00005_01'
    name = it.path.split("/")[-1]
    assert it.group == f"{name[4:11]}_{name.split('___P')[1][:8]}"
    assert len({i.group for i in src.items}) == 75


def test_manifest_keeps_extra_columns_and_groups(tmp_path, mitocheck_dir):
    files = sorted((mitocheck_dir / "Anaphase").glob("*.png"))[:3]
    rows = ["path,label,group,well,dose"] + [f"{f},A,g{i % 2},B0{i},{i * 0.5}" for i, f in enumerate(files)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    src = discover(tmp_path / "m.csv")
    assert src.kind == "manifest"
    assert [it.group for it in src.items] == ["g0", "g1", "g0"]
    assert src.items[1].meta == {"well": "B01", "dose": "0.5"}
    by_col = discover(tmp_path / "m.csv", group_by="well")
    assert [it.group for it in by_col.items] == ["B00", "B01", "B02"]


def test_manifest_errors(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(EmbedkitError, match="needs a 'path' column"):
        discover(tmp_path / "nopath.csv")
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(EmbedkitError, match="lists no images"):
        discover(tmp_path / "empty.csv")


def test_plain_folder_and_file_list(tmp_path, mitocheck_dir):
    files = sorted((mitocheck_dir / "Hole").glob("*.png"))[:4]
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in files:
        (flat / f.name).write_bytes(f.read_bytes())
    src = discover(flat)
    assert src.kind == "folder" and len(src.items) == 4 and not src.labelled
    assert all(it.group == it.path for it in src.items)  # each file its own group by default
    lst = discover([str(f) for f in files[:2]], group_by="parent")
    assert lst.kind == "files" and len(lst.items) == 2


def test_group_regex_must_match_every_item(mitocheck_dir):
    with pytest.raises(EmbedkitError, match="does not match"):
        discover(mitocheck_dir, group_by=r"PLATE(\d+)")
    with pytest.raises(EmbedkitError, match="no such file"):
        discover(mitocheck_dir / "nope")


def test_manifest_text_encodings_and_extra_fields(tmp_path, mitocheck_dir):
    """A BOM is accepted; cp1252/latin-1 text is refused naming the encoding; an unquoted comma names its line."""
    files = sorted((mitocheck_dir / "Anaphase").glob("*.png"))[:3]
    rows = ["path,label"] + [f"{f},Anaphase" for f in files]
    (tmp_path / "bom.csv").write_bytes(("\ufeff" + "\n".join(rows) + "\n").encode("utf-8"))
    assert [it.path for it in discover(tmp_path / "bom.csv").items] == [str(f) for f in files]

    cafe = rows[:2] + [f"{files[1]},Caf\u00e9 \u2013 late"] + rows[3:]
    (tmp_path / "cp1252.csv").write_bytes("\n".join(cafe).encode("cp1252"))
    with pytest.raises(EmbedkitError, match=r"cp1252.csv: not UTF-8 \(byte 0xe9 on line 3\); it looks like cp1252") as exc:
        discover(tmp_path / "cp1252.csv")
    assert "\n" not in str(exc.value)
    (tmp_path / "latin1.csv").write_bytes("\n".join(rows[:2] + [f"{files[1]},\u00e9\u0081"]).encode("latin-1"))
    with pytest.raises(EmbedkitError, match="it looks like latin-1"):
        discover(tmp_path / "latin1.csv")
    (tmp_path / "utf16.csv").write_text("\n".join(rows), encoding="utf-16")
    with pytest.raises(EmbedkitError, match="UTF-16"):
        discover(tmp_path / "utf16.csv")

    comma = rows[:3] + [f"{files[2]},Anaphase, late"]
    (tmp_path / "comma.csv").write_text("\n".join(comma) + "\n")
    with pytest.raises(EmbedkitError, match=r"comma.csv:4: 3 fields but the header has 2 columns; quote"):
        discover(tmp_path / "comma.csv")
    quoted = rows[:3] + [f'{files[2]},"Anaphase, late"', ""]
    (tmp_path / "quoted.csv").write_text("\n".join(quoted) + "\n")
    assert discover(tmp_path / "quoted.csv").items[-1].label == "Anaphase, late"


def test_read_csv_rows_for_other_tables(tmp_path):
    (tmp_path / "pops.csv").write_text("id,population\n\na,p1\nb\n")
    cols, rows = read_csv_rows(tmp_path / "pops.csv", ("id", "population"), what="populations file")
    assert cols == ["id", "population"] and rows == [(3, {"id": "a", "population": "p1"}), (4, {"id": "b", "population": ""})]
    with pytest.raises(EmbedkitError, match="a populations file needs 'id' and 'group' columns"):
        read_csv_rows(tmp_path / "pops.csv", ("id", "group"), what="populations file")


def test_a_single_file_must_be_an_image_a_manifest_or_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "text.h5").write_text("not HDF5")
    with pytest.raises(EmbedkitError, match=r"notes.txt: neither an image \(.png"):
        discover(tmp_path / "notes.txt")
    with pytest.raises(EmbedkitError, match="text.h5: not a readable embedkit store"):
        discover([tmp_path / "text.h5"])
