"""Every command against every class of bad input: exit 2, one error line naming the input, no traceback,
and every file already in the working folder left byte for byte as it was (see cases.py for the table)."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import pytest

from .cases import CASES, Outcome, run_case

QUICK = [c for c in CASES if c.quick]


def _param(case):
    return pytest.param(case, id=case.id)


@pytest.fixture(scope="session")
def outcomes(request, world, tmp_path_factory) -> Iterator[dict[str, Future]]:
    """Start the selected cases, two at a time and in test order; each test waits only for its own case."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.originalname == "test_bad_input_is_refused_cleanly" and hasattr(item, "callspec")]
    root = tmp_path_factory.mktemp("fault_cases")
    pool = ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1))
    futures = {case.id: pool.submit(run_case, case, world, root / f"case{n:03d}") for n, case in enumerate(wanted)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", [_param(c) for c in QUICK])
def test_bad_input_is_refused_cleanly(case, outcomes):
    outcome: Outcome = outcomes[case.id].result()
    assert not outcome.problems(), f"{case.id}: {'; '.join(outcome.problems())}\nstderr:\n{outcome.stderr[-2500:]}"


def test_the_table_covers_every_command():
    """Each command of the CLI has at least one quick case."""
    from embedkit.cli import cli

    # adapt, report, run and store arrived with this table; their bad-input rows are still to be written
    # (see the open reliability issue). Every older command must keep its cases.
    wanted = set(cli.commands) - {"encoders", "adapt", "report", "run", "store"}
    assert wanted <= {c.command for c in QUICK}, sorted(wanted - {c.command for c in QUICK})
