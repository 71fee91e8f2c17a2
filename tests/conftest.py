"""Shared fixtures: offline hub, the bundled MitoCheck sample, a CLI runner and a ready lite0 store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
MITOCHECK = DATA / "mitocheck"


def run_cli(*args: str, check: bool = True, timeout: float = 3000, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m embedkit.cli ARGS`` against this checkout; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"embedkit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def mitocheck_dir() -> Path:
    return MITOCHECK


@pytest.fixture(scope="session")
def lite0_store_ro(tmp_path_factory) -> Path:
    """The bundled sample embedded once with the real efficientnet_lite0 (plus its baseline keys); treat as read-only."""
    path = tmp_path_factory.mktemp("lite0") / "cells.h5"
    run_cli("embed", MITOCHECK, "--store", path, "--group-by", "mitocheck", "--baselines", "--quiet")
    return path


@pytest.fixture()
def lite0_store(lite0_store_ro, tmp_path) -> Path:
    """A private copy of the embedded sample that a test may modify."""
    dst = tmp_path / "cells.h5"
    shutil.copy(lite0_store_ro, dst)
    shards = Path(f"{lite0_store_ro}.shards")  # a store's big arrays live in shards beside it
    if shards.is_dir():
        shutil.copytree(shards, f"{dst}.shards")
    return dst
