"""The fault suite's shared inputs: one small world (cells, store, probe, fine-tuned model) per session."""

from __future__ import annotations

import pytest

from .cases import World, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """40 real cells embedded with lite0, probed and fine-tuned once; cases copy from it and never change it."""
    return build_world(tmp_path_factory.mktemp("fault_world"))
