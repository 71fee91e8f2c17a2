"""``embedkit report``: one self-contained HTML page of a study."""

from __future__ import annotations

import shlex
import sys

import click


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--store", "store_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The store the results were made on (items, vectors, cell images).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HTML file to write, e.g. report.html.")
@click.option("--explain", "explain_dir", type=click.Path(exists=True, file_okay=False),
              help="An 'embedkit explain' output folder for the CAM gallery.")
@click.option("--method", type=click.Choice(["tsne", "umap", "pca"]), default="tsne", show_default=True,
              help="Map of the cells (reuses the store's saved view when current).")
@click.option("--max-thumbnails", default=150, show_default=True, type=click.IntRange(1), help="About how many thumbnails on the map.")
@click.option("--mistakes", "n_misclassified", default=4, show_default=True, type=click.IntRange(0),
              help="Misclassified cells shown with their neighbours.")
@click.option("-k", "k", default=6, show_default=True, type=click.IntRange(1), help="Neighbours per misclassified cell.")
@click.option("--leaks/--no-leaks", default=True, show_default=True, help="Run the train/test near-duplicate check.")
@click.option("--allow-different-splits", is_flag=True, help="Compare results made on different splits (flagged on the page).")
@click.option("--title", help="Page title [default: from the store name].")
@click.option("--n-boot", default=2000, show_default=True, type=click.IntRange(100), help="Bootstrap resamples of the paired tests.")
@click.option("--selfcheck", is_flag=True, hidden=True, help="Add a script that records broken images and script errors in the page (tests).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def report(results, store_path, out, explain_dir, method, max_thumbnails, n_misclassified, k, leaks,
           allow_different_splits, title, n_boot, selfcheck, quiet):
    """Write one self-contained HTML report of a study: data, split and leak check, every model with CIs and
    paired tests, confusion matrices and ROC curves, a map of the cells with thumbnails, neighbours of
    mistakes, CAMs and provenance. Images are inline: the file opens by double-click, with no network.

    \b
    RESULTS are folders written by 'embedkit probe' or 'embedkit finetune' (or folders above them).
    """
    from ..studyreport import Options, build_report

    opts = Options(method=method, max_thumbnails=max_thumbnails, n_misclassified=n_misclassified, k=k, leaks=leaks,
                   allow_different_splits=allow_different_splits, title=title, n_boot=n_boot, selfcheck=selfcheck,
                   command=shlex.join(["embedkit", *sys.argv[1:]]))
    log = None if quiet else (lambda m: click.echo(m, err=True))
    res = build_report(results, store_path, out, explain=explain_dir, options=opts, log=log)
    for note in res.notes:
        click.echo(note, err=True)
    click.echo(f"wrote {res.out} ({res.n_results} models, {res.n_images} images inline)")


COMMANDS = [report]
