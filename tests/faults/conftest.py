"""The fault suite's shared inputs: one small world (cells, store, probe, fine-tuned model) per session."""

from __future__ import annotations

import pytest

from conftest import built_once

from .cases import World, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """40 real cells embedded with lite0, probed and fine-tuned once; cases copy from it and never change it."""
    return World(built_once(tmp_path_factory, "fault_world", build_world))
