"""CLI start-up benchmark: `embedkit --help` and `embedkit encoders` against `python -c "import torch"`.

Targets (issue: the front door): --help < 0.5x and encoders < 1.0x the time of importing torch, all
measured in this one run (median of --repeats cold processes each). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], repeats: int) -> float:
    """Median wall time of ``repeats`` fresh processes running ``args``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, env=env, cwd=str(ROOT))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/cli.json")
    a = ap.parse_args()
    py = sys.executable
    torch_s = timed([py, "-c", "import torch"], a.repeats)
    help_s = timed([py, "-m", "embedkit.cli", "--help"], a.repeats)
    enc_s = timed([py, "-m", "embedkit.cli", "encoders"], a.repeats)
    rec = {"import_torch_s": round(torch_s, 3), "help_s": round(help_s, 3), "encoders_s": round(enc_s, 3),
           "help_ratio": round(help_s / torch_s, 3), "encoders_ratio": round(enc_s / torch_s, 3),
           "targets": {"help_ratio": 0.5, "encoders_ratio": 1.0}, "repeats": a.repeats}
    rec["pass"] = rec["help_ratio"] < 0.5 and rec["encoders_ratio"] < 1.0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
