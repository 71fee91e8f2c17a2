"""Fault campaign, long version: every case of tests/faults/cases.py (not only the quick ones) and kill -9
at more seeded random points of embed, segment, patches, finetune and view.

Counts what the issue asks for: cases run, clean errors, tracebacks, and files lost or changed (target 0),
plus the cases that fail only because their fix lives on another branch. Kill scenarios report how many
kills landed mid-run, whether every resumed result was bit-identical, and temp files left behind.

Usage: python scripts/bench_faults.py [--out bench/faults.json] [--kills 6] [--jobs 2] [--only embed,info]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_cases(world, work: Path, jobs: int, only: set[str]) -> dict:
    """Every (or every ``only``) case of the table; totals and one row per case."""
    from tests.faults.cases import CASES, run_case

    cases = [c for c in CASES if not only or c.command in only]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(lambda ic: run_case(ic[1], world, work / f"case{ic[0]:03d}"), enumerate(cases)))
    rows = [{"case": o.case.id, "command": o.case.command, "family": o.case.family, "bad_input": o.case.bad, "quick": o.case.quick,
             "exit": o.returncode, "clean": not o.problems(),
             "problems": o.problems(), "error": o.error_lines[-1] if o.error_lines else "",
             "seconds": round(o.seconds, 2)} for o in outcomes]
    failing = [r for r in rows if not r["clean"]]
    return {
        "cases": len(rows),
        "clean_errors": sum(r["clean"] for r in rows),
        "tracebacks": sum(o.traceback for o in outcomes),
        "files_lost": sum(len(o.changed) for o in outcomes),
        "cases_losing_files": sum(bool(o.changed) for o in outcomes),
        "wrong_exit_status": sum(o.returncode != 2 for o in outcomes),
        "pickle_payloads_run": sum(o.payload_ran for o in outcomes),
        "failing": sorted(r["case"] for r in failing),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


def run_kills(work: Path, kills: int, seed: int) -> dict:
    """The kill -9 scenarios of tests/faults/test_kill_resume.py with ``kills`` points each."""
    from tests.faults.cases import cli
    from tests.faults.killing import (EMBED_ARGS, kill_embed, kill_finetune, kill_patches, kill_segment, kill_view,
                                      make_cells, make_fields)

    cells = make_cells(work / "cells", per_class=8)
    fields = make_fields(work / "fields", n=16)
    ref = work / "embed_ref" / "ref.h5"
    ref.parent.mkdir(parents=True)
    cli(["embed", cells, "--store", ref, *EMBED_ARGS], ref.parent, check=True)
    scenarios = {
        "embed": lambda w: kill_embed(cells, ref, w, kills, seed),
        "segment": lambda w: kill_segment(fields, w, kills, seed + 1),
        "patches": lambda w: kill_patches(fields, w, kills, seed + 2),
        "finetune": lambda w: kill_finetune(cells, w, kills, seed + 3),
        "view": lambda w: kill_view(ref, w, kills, seed + 4),
    }
    out = {}
    for name, scenario in scenarios.items():
        w = work / f"kill_{name}"
        w.mkdir()
        t0 = time.perf_counter()
        r = scenario(w)
        out[name] = {"points": [round(p, 2) for p in r.points], "killed_mid_run": sum(r.mid_run),
                     "readable_after_every_kill": all(r.readable), "bit_identical": r.identical,
                     "differences": r.differences[:10], "leftovers": r.leftovers[:10],
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"kill {name}: {sum(r.mid_run)}/{len(r.points)} mid-run, identical={r.identical}, "
              f"leftovers={len(r.leftovers)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "faults.json"))
    ap.add_argument("--kills", type=int, default=6, help="kill points per command (the tests use 3)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once")
    ap.add_argument("--only", default="", help="comma list of commands to run cases for (default: all)")
    ap.add_argument("--no-kills", action="store_true")
    args = ap.parse_args()

    from tests.faults.cases import build_world

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        tmp = Path(tmp)
        world = build_world(tmp / "world")
        setup = time.perf_counter() - t0
        cases = run_cases(world, tmp / "cases", args.jobs, {c for c in args.only.split(",") if c})
        print(f"{cases['cases']} cases: {cases['clean_errors']} clean errors, {cases['tracebacks']} tracebacks, "
              f"{cases['files_lost']} files lost or changed; failing " + str(len(cases['failing'])), flush=True)
        kills = {} if args.no_kills else run_kills(tmp / "kills", args.kills, args.seed)
    report = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "setup_seconds": round(setup, 1),
        "totals": {k: v for k, v in cases.items() if k != "rows"},
        "kill_resume": kills,
        "kill_points_total": sum(len(k["points"]) for k in kills.values()),
        "kills_mid_run_total": sum(k["killed_mid_run"] for k in kills.values()),
        "resumes_bit_identical": sum(k["bit_identical"] for k in kills.values()),
        "cases": cases["rows"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
