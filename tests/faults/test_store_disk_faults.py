"""Store faults: a full disk, a silently failed write and a real file size limit during a commit are never a
success: one error line, exit 2, no byte of the existing store changed, and the same command succeeds afterwards."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, invoke_cli, run_cli
from embedkit.store import Store

from .stores import ARGS, KEY, copy_store, one_line_error, tree


@pytest.mark.parametrize("fault", ["enospc@commit:written", "truncate@commit:written", "enospc@shard:written#2",
                                   "truncate@shard:written#1", "enospc@shard:written#3"])
def test_full_disk_or_silent_write_failure_is_never_success(fault, reference, eight_cells, tmp_path):
    store = copy_store(reference, tmp_path)
    before = tree(tmp_path)
    proc = run_cli("embed", eight_cells, "--store", store, "--key", "k", *ARGS, check=False, env={"EMBEDKIT_FAULT": fault})
    line = one_line_error(proc)
    assert "disk full" in line and "nothing was lost" in line and "re-run" in line
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that existed changed
    assert all("/embed-k-" in k for k in set(after) - set(before))  # only the run's verified shards were added
    assert not list(tmp_path.rglob(".*.tmp-*"))  # no temp file is left
    assert Store(store).keys == [KEY]
    invoke_cli("embed", eight_cells, "--store", store, "--key", "k", *ARGS)
    assert np.array_equal(Store(store).vectors("k"), Store(reference).vectors(KEY))


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_real_file_size_limit_fails_cleanly_and_resumes(reference, eight_cells, tmp_path):
    store = copy_store(reference, tmp_path)
    before = tree(tmp_path)
    limit = 8192  # the run's state fits, a vector shard (4 x 1280 floats) does not
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # --workers 0: decoding workers pass batches through shared-memory files, which the limit would also cut
    proc = subprocess.run([sys.executable, "-m", "embedkit.cli", "embed", str(eight_cells), "--store", str(store), "--key", "k",
                           *ARGS, "--workers", "0"],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), preexec_fn=_limit_file_size(limit), timeout=600)
    line = one_line_error(proc)
    assert "disk full while writing" in line and "nothing was lost" in line
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before
    assert not list(tmp_path.rglob(".*.tmp-*"))
    invoke_cli("embed", eight_cells, "--store", store, "--key", "k", *ARGS)
    assert np.array_equal(Store(store).vectors("k"), Store(reference).vectors(KEY))
