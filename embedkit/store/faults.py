"""Test hooks that inject a crash or a full disk at named points of a store write.

``EMBEDKIT_FAULT`` holds comma-separated ``ACTION@POINT[#N]`` entries: ``kill`` sends this process
SIGKILL, ``enospc`` raises a disk-full OSError, ``truncate`` cuts the file just written to half its size
(as a write that failed silently would); ``#N`` fires at the N-th time the point is reached (default 1).
Points: ``shard:written`` (temp shard closed), ``shard:renamed``, ``commit:written`` (temp main file
closed), ``commit:renamed`` (main file renamed, run folder not yet cleaned).
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

_seen: dict[str, int] = {}


def fault(point: str, path: str | os.PathLike | None = None) -> None:
    """Fire the fault configured for ``point`` (no-op unless ``EMBEDKIT_FAULT`` names it)."""
    spec = os.environ.get("EMBEDKIT_FAULT", "")
    if not spec:
        return
    _seen[point] = _seen.get(point, 0) + 1
    for entry in spec.split(","):
        action, _, where = entry.strip().partition("@")
        where, _, nth = where.partition("#")
        if where != point or _seen[point] != int(nth or 1):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path or point))
        elif action == "truncate" and path is not None:
            p = Path(path)
            os.truncate(p, p.stat().st_size // 2)
