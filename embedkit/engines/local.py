"""The default engine of segment and patches: fields loaded and cut one after another in this process.

It offers the same :meth:`LocalEngine.map_fields` as :class:`~.ray_engine.RayEngine`, so a pipeline hands its
field loader and cutter to whichever engine runs it and commits the run's shards itself.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from ..errors import BadImageError


def load_or_error(loader: Callable, k: int, item: Any) -> Any:
    """``loader(k, item)``, or the BadImageError saying why the field cannot be read (the cutter records it)."""
    try:
        return loader(k, item)
    except BadImageError as exc:
        return exc


class LocalEngine:
    """Runs a pipeline's fields in this process, writing shards every ``fields_per_block`` fields (or 64 MB / 20 s)."""

    def map_fields(self, todo: Sequence[tuple[int, Any]], loader: Callable, cutter: Callable, run, *, desc: str,
                   device: str = "auto", fields_per_block: int | None = None, progress: bool = True,
                   total: int | None = None, initial: int = 0) -> tuple[int, list[tuple[str, str]]]:
        """Load and cut every field of ``todo`` into the run's shards; return (objects found, failed fields)."""
        from tqdm.auto import tqdm

        from ..segment.storeio import FieldShards

        shards = FieldShards(run, fields_per_block)
        failed: list[tuple[str, str]] = []
        found = 0
        bar = tqdm(total=total or len(todo), initial=initial, unit="field", desc=desc, disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        try:
            for k, item in todo:
                found += cutter(k, item, load_or_error(loader, k, item), shards, failed) or 0
                bar.update(1)
            shards.flush()
        except BaseException:
            shards.flush()  # whole fields only, so keeping them is safe (a bad field stops the run, not its progress)
            raise
        finally:
            bar.close()
        return found, failed
