"""``embedkit report``: one self-contained HTML page of a whole study, for a biologist to open and share.

It gathers the data (classes, groups, the split and the leak check), the comparison table with paired
tests (from :mod:`embedkit.report`), every model's confusion matrix and ROC, a map of the cells with
thumbnails, neighbour sheets of mistakes, a CAM gallery and the provenance, and renders them with
Jinja2 into a single file whose images are inline (base64): no network, opens by double-click.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .. import __version__
from ..atomic import atomic_write_bytes
from ..errors import EmbedkitError
from ..store import Store
from . import sections
from .render import render
from .sections import Options

__all__ = ["Options", "ReportResult", "build_report"]


@dataclass
class ReportResult:
    out: Path
    n_results: int
    n_images: int
    notes: list[str] = field(default_factory=list)


def build_report(results: Sequence[str | os.PathLike], store: str | os.PathLike, out: str | os.PathLike, *,
                 explain: str | os.PathLike | None = None, options: Options | None = None,
                 log: Callable[[str], None] | None = None) -> ReportResult:
    """Write the study report for result folders made on ``store`` into one HTML file at ``out``."""
    opts = options or Options()
    say = log or (lambda _m: None)
    st = Store(store)
    found, warnings = sections.load_results([str(p) for p in results], opts.allow_different_splits)
    say(f"{len(found)} result folders")
    table = sections.table_section(found, opts.n_boot)
    dataset = sections.dataset_section(st, found)
    splits = sections.splits_section(st, found)
    key = sections.view_key(st, found, table["best"])
    leaks = None
    if opts.leaks and splits is not None:
        say("leak check (pixel fingerprints)")
        leaks = sections.leaks_section(st, key, splits["splits"])
    chosen = sections.best_probe(found, table["rows"], key) if key else None
    notes = list(opts.notes)
    view_pictures, neighbours = [], None
    if key is None:
        view_note = neighbours_note = "The store holds no embeddings, so there is no map and no neighbour search."
    else:
        say(f"{opts.method} map of '{key}' with thumbnails")
        view_pictures = _optional(lambda: sections.view_pictures(st, key, chosen, opts), notes, "map") or []
        view_note = "The map could not be drawn; see the notes under Provenance."
        if chosen is not None:
            say("neighbour sheet of misclassified cells")
            neighbours = _optional(lambda: sections.neighbour_sheet(st, key, chosen, opts), notes, "neighbour sheet")
        neighbours_note = ("No misclassified cells to show." if chosen is not None
                           else f"No result was made on '{key}', so there are no mistakes to look up.")
    context = {
        "title": opts.title or f"embedkit study report: {Path(str(store)).stem}",
        "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "embedkit_version": __version__,
        "selfcheck": opts.selfcheck, "warnings": warnings, "dataset": dataset,
        "class_counts": sections.figure_of_counts(dataset), "splits": splits, "leaks": leaks, "table": table,
        "n_results": len(found), "models": sections.model_figures(found, table["rows"]), "key": key or "",
        "map_model": chosen.name if chosen is not None else "", "view_pictures": view_pictures, "view_note": view_note,
        "neighbours": neighbours, "neighbours_note": neighbours_note, "cams": sections.cam_section(explain),
        "provenance": sections.provenance_section(st, found, opts.command), "notes": notes,
    }
    html = render(context)
    out = Path(out)
    atomic_write_bytes(out, html.encode("utf-8"))
    return ReportResult(out, len(found), html.count("<img "), notes)


def _optional(make: Callable, notes: list[str], what: str):
    """Build an optional picture; a failure becomes a note on the page instead of ending the report."""
    try:
        return make()
    except EmbedkitError as exc:
        notes.append(f"The {what} was left out: {exc}")
        return None
