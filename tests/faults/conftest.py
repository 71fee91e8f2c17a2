"""The fault suite's shared inputs, each made once per session and read-only to tests: one small world (cells,
store, probe, fine-tuned model), and 8 cells with the store an uninterrupted embed makes of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import MITOCHECK, built_once, invoke_cli

from .cases import World, build_world
from .stores import ARGS


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """40 real cells embedded with lite0, probed and fine-tuned once; cases copy from it and never change it."""
    return World(built_once(tmp_path_factory, "fault_world", build_world))


@pytest.fixture(scope="session")
def eight_cells(tmp_path_factory) -> Path:
    """A folder of 8 real cells from two classes."""
    def build(folder: Path) -> None:
        for cls in ("Anaphase", "Metaphase"):
            (folder / cls).mkdir()
            for f in sorted((MITOCHECK / cls).glob("*.png"))[:4]:
                shutil.copy(f, folder / cls / f.name)

    return built_once(tmp_path_factory, "eight_cells", build)


@pytest.fixture(scope="session")
def reference(eight_cells, tmp_path_factory) -> Path:
    """The 8 cells embedded by an uninterrupted run (two checkpoint shards, merged into one at commit)."""
    def build(folder: Path) -> None:
        invoke_cli("embed", eight_cells, "--store", folder / "s.h5", *ARGS)

    return built_once(tmp_path_factory, "eight_cells_store", build) / "s.h5"
