"""The click options that choose planes of microscopy files, shared by embed, segment and patches."""

from __future__ import annotations

from typing import Callable

import click

from ..sources import Source


def plane_options(pixel_size: bool = True) -> Callable:
    """Add --z and --t (and --pixel-size unless the command has its own) to a command."""
    opts = [
        click.option("--z", "z_rule", help="Z-stacks: max (maximum projection, the default), mid (middle plane) or a plane index."),
        click.option("--t", "t_frames", help="Time series: frames to use, e.g. 0,5,9 or 0:100:10 [default: every frame, one item each]."),
    ]
    if pixel_size:
        opts.append(click.option("--pixel-size", "target_pixel_size", type=click.FloatRange(min=0, min_open=True),
                                 help="Resample every image to this many µm per pixel first, using each file's metadata."))

    def wrap(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return wrap


def expand_source(src: Source, z_rule: str | None, t_frames: str | None, target_pixel_size: float | None = None,
                  group_by: str | None = None, skip_bad: bool = False, quiet: bool = False) -> Source:
    """Expand microscopy files into items (plate fields, scenes, frames) and say what happened on stderr."""
    from .dims import parse_t, parse_z
    from .expand import Selection, apply_selection

    sel = Selection(parse_z(z_rule), None if (t := parse_t(t_frames)) is None else tuple(t), target_pixel_size)
    n_before = len(src.items)
    out, failed = apply_selection(src, sel, group_by, skip_bad)
    if not quiet and len(out.items) != n_before:
        click.echo(f"{n_before} files hold {len(out.items)} items (plate fields, scenes and time points)", err=True)
    unknown = sum(it.meta.get("pixel_size") == "unknown" for it in out.items)
    if not quiet and target_pixel_size is not None and unknown:
        click.echo(f"{unknown} items have no pixel size in their metadata and are not resampled (recorded as 'unknown')",
                   err=True)
    for path, reason in failed:
        click.echo(f"skipped {path}: {reason}", err=True)
    return out
