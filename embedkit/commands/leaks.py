"""``embedkit leaks``: copies of one cell across a split, and a grouping that keeps them together."""

from __future__ import annotations

import sys

import click

from ..errors import EmbedkitError


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


@click.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--splits", "splits_path", type=click.Path(exists=True, dir_okay=False),
              help="Splits JSON (from 'embedkit probe' or embedkit.splits) to check.")
@click.option("--suggest-groups", "groups_out", type=click.Path(dir_okay=False),
              help="Write a grouping that keeps every item with its copies (CSV id,group,...); use it with "
                   "'probe --group-by leaks:FILE'.")
@click.option("--by", type=click.Choice(["pixels", "embedding"]), default="pixels", show_default=True,
              help="pixels: find candidates, then verify each by aligning it (any rotation, shift, shear, zoom, "
                   "brightness); embedding: cosine of the key's vectors.")
@click.option("--encoder", "key", help="Embedding key or encoder name [default: the store's only key]. Used for "
                                       "--by embedding and for the images' channel conversion.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=None,
              help="--by embedding only: cosine at or above which a pair counts as a copy [0.99].")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1),
              help="Candidates verified per item.")
@click.option("--fold", "folds", type=click.IntRange(0), multiple=True, help="Check only these folds [default: all].")
@click.option("--out", "csv_out", type=click.Path(dir_okay=False), help="Write every copy pair found as CSV.")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Save the copy pairs side by side (PNG).")
@click.option("--show", default=20, show_default=True, type=click.IntRange(0), help="Pairs to print.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def leaks(store, splits_path, groups_out, by, key, threshold, k, folds, csv_out, sheet, show, quiet):
    """Find copies of one cell on both sides of a split, and suggest a grouping that keeps them together.

    Datasets often hold each cell as many augmented copies (rotated, shifted, sheared, zoomed, brightened,
    re-compressed). With --splits, every test item's most similar train and validation items are aligned
    onto it and kept when the alignment proves a copy; groups on both sides of the split count as leaks
    too. Exit status 1 when leaks are found, so pipelines can stop. With --suggest-groups, every item is
    checked against all others and the groups of copies (joined with the store's own groups) are written.
    """
    import os

    from ..leaks import find_leaks, suggest_groups, write_groups
    from ..splits import Splits

    if not splits_path and not groups_out:
        raise EmbedkitError("nothing to do: pass --splits SPLITS to check a split, --suggest-groups FILE for a grouping, or both")
    log = None if quiet else _echo_err
    report = None
    if splits_path:
        splits = Splits.load(splits_path)
        report = find_leaks(store, key, splits, by=by, threshold=threshold, folds=list(folds) or None, k=k,
                            progress=not quiet, log=log)
        _print_pairs(report.pairs, show, bool(csv_out))
        for f, g, parts in report.group_leaks[:5]:
            click.echo(f"fold {f}: group {g!r} is in {parts}")
        if csv_out:
            tmp = f"{csv_out}.tmp-{os.getpid()}"
            report.pairs.to_csv(tmp, index=False)
            os.replace(tmp, csv_out)
            click.echo(f"wrote {csv_out}")
        if sheet:
            from ..items import as_store
            from ..sheets import pair_sheet

            click.echo(f"wrote {pair_sheet(as_store(store), key, report.pairs, sheet, threshold=0.95 if by == 'pixels' else report.threshold, measure=report.measure)}")
    if groups_out:
        suggestion = suggest_groups(store, key, k=k, progress=not quiet, log=log)
        write_groups(groups_out, suggestion)
        click.echo(f"suggested grouping: {suggestion.summary()}; wrote {groups_out} "
                   f"(use: embedkit probe {store} --group-by leaks:{groups_out})")
    if report is not None:
        click.echo(report.verdict)
        if report.leaking:
            sys.exit(1)


def _print_pairs(pairs, show: int, written: bool) -> None:
    if not len(pairs) or not show:
        return
    click.echo(f"{'fold':>4}  {'similarity':>10}  {'fine':>6}  {'flat':>6}  {'emb. cos':>8}  {'test item':<44} {'seen in':<7} item")
    for r in pairs.head(show).itertuples(index=False):
        click.echo(f"{r.fold:>4}  {r.similarity:>10.4f}  {r.fine:>6.3f}  {r.flat:>6.3f}  {r.embedding_cosine:>8.4f}  "
                   f"{r.test_id[-44:]:<44} {r.seen_part:<7} {r.seen_id}")
    if len(pairs) > show:
        click.echo(f"... {len(pairs) - show} more pairs" + ("" if written else " (--out FILE lists them all)"))


COMMANDS = [leaks]
