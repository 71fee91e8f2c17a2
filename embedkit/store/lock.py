"""One writer per store: an advisory lock on ``<store>.lock``, re-entrant within a process."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from ..errors import EmbedkitError

_held: dict[str, list] = {}  # absolute lock path -> [file handle, depth]


@contextlib.contextmanager
def write_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<store>.lock`` for the duration of a write.

    A command takes it before loading a model, so a second writer is refused at once; nested use in the
    same process (command, then library call) is allowed. It is a POSIX record lock, owned by this process
    alone: forked decoding workers do not inherit it, so a killed run's orphaned workers never block its resume.
    """
    lock_path = os.path.abspath(f"{path}.lock")
    if lock_path in _held:
        _held[lock_path][1] += 1
        try:
            yield
        finally:
            _held[lock_path][1] -= 1
        return
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise EmbedkitError(f"{path} is being written by another embedkit process; wait for it to finish") from None
        _held[lock_path] = [fh, 1]
        try:
            yield
        finally:
            del _held[lock_path]
            fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


def holds_lock(path: str | os.PathLike) -> bool:
    """Whether this process holds the write lock of the store at ``path``."""
    return os.path.abspath(f"{path}.lock") in _held
