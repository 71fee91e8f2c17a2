"""Shared fixtures: offline hub, the bundled MitoCheck sample, a CLI runner and a ready lite0 store."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread per process: pytest-xdist already runs one worker per core, and on a busy machine threads
# that spin-wait on each other make every torch or BLAS call many times slower. Set these to override.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

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


def invoke_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``embedkit ARGS`` run inside this process, for steps whose results a test checks rather than the process
    itself (exit status, one-line errors and kills need :func:`run_cli`): no interpreter start, imports paid once.
    Raises AssertionError unless it exits 0; the environment, sys.argv and working folder are restored afterwards."""
    from click.testing import CliRunner

    from embedkit.cli import cli

    argv = [str(a) for a in args]
    saved, saved_argv = dict(os.environ), sys.argv
    sys.argv = [str(ROOT / "embedkit" / "cli.py"), *argv]  # as ``python -m embedkit.cli`` sees it (reports record it)
    try:
        with contextlib.chdir(ROOT):
            res = CliRunner().invoke(cli, argv, env=env, prog_name="embedkit")
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved)
    if res.exit_code != 0:
        detail = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info and res.exception else ""
        raise AssertionError(f"embedkit {' '.join(map(str, args))} failed ({res.exit_code}):\n{res.stderr[-3000:]}{detail[-3000:]}")
    return subprocess.CompletedProcess(["embedkit", *map(str, args)], 0, res.stdout, res.stderr)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test session, shared by all pytest-xdist workers; read-only to tests."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's base folder, above each worker's own
    folder = base / f"shared-{name}"
    with FileLock(str(base / f"shared-{name}.lock")):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def mitocheck_dir() -> Path:
    return MITOCHECK


@pytest.fixture(scope="session")
def lite0_store_ro(tmp_path_factory) -> Path:
    """The bundled sample embedded once with the real efficientnet_lite0 (plus its baseline keys); treat as read-only."""
    def build(folder: Path) -> None:
        run_cli("embed", MITOCHECK, "--store", folder / "cells.h5", "--group-by", "mitocheck", "--baselines", "--quiet")

    return built_once(tmp_path_factory, "lite0", build) / "cells.h5"


@pytest.fixture()
def lite0_store(lite0_store_ro, tmp_path) -> Path:
    """A private copy of the embedded sample that a test may modify."""
    dst = tmp_path / "cells.h5"
    shutil.copy(lite0_store_ro, dst)
    shards = Path(f"{lite0_store_ro}.shards")  # a store's big arrays live in shards beside it
    if shards.is_dir():
        shutil.copytree(shards, f"{dst}.shards")
    return dst
