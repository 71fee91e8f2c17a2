"""``embedkit view``: a 2-D map (t-SNE, UMAP or PCA) of one embedding key."""

from __future__ import annotations

import click

from .common import KEY_HELP, echo_err


@click.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--encoder", "key", help=KEY_HELP)
@click.option("--method", type=click.Choice(["tsne", "umap", "pca"]), default="tsne", show_default=True,
              help="tsne: openTSNE on FAISS k-NN affinities; umap: umap-learn on a FAISS k-NN graph; pca: linear.")
@click.option("--color", "color", default=None,
              help="label, group, prediction (needs --predictions) or any item column [default: label, or prediction "
                   "when --predictions is given].")
@click.option("--predictions", type=click.Path(exists=True, dir_okay=False),
              help="A probe's predictions.csv: colour by prediction and mark misclassified items with a cross.")
@click.option("--run", help="Which run of predictions.csv to use [default: each item's most frequent prediction].")
@click.option("--thumbnails", is_flag=True, help="Draw the cell images at their positions (one per grid cell).")
@click.option("--max-thumbnails", default=400, show_default=True, type=click.IntRange(1),
              help="About how many thumbnails: the map is divided into a grid of this many cells.")
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write [default: beside the store, <store>.<key>.<method>.png].")
@click.option("--perplexity", type=click.FloatRange(1, None), help="t-SNE perplexity [30].")
@click.option("--n-neighbors", type=click.IntRange(2), help="UMAP neighbours [15].")
@click.option("--min-dist", type=click.FloatRange(0, 1), help="UMAP minimum distance [0.1].")
@click.option("--seed", type=int, help="Random seed [0].")
@click.option("--recompute", is_flag=True, help="Recompute the layout even when the store holds a current one.")
@click.option("--no-save", is_flag=True, help="Do not write the coordinates into the store (read-only stores).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def view(store, key, method, color, predictions, run, thumbnails, max_thumbnails, out, perplexity, n_neighbors, min_dist,
         seed, recompute, no_save, quiet):
    """Draw a 2-D map (t-SNE, UMAP or PCA) of one embedding key as a PNG scatter or thumbnail plot.

    t-SNE uses openTSNE on FAISS k-NN affinities, so 100,000+ cells are fine. The coordinates are saved
    in the store (/views/<key>/<method>), so redrawing with another --color or --thumbnails is instant.
    """
    from ..images import Conversion
    from ..store import Store
    from ..views import METHOD_NAMES, colouring, default_plot_path, make_layout, plot_layout, view_params

    s = Store(store)
    key = s.resolve_key(key)
    params = view_params(method, perplexity=perplexity, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
    colour = colouring(s, color or ("prediction" if predictions else "label"), predictions, run)
    layout = make_layout(store, key, method, params, recompute=recompute, save=not no_save, progress=not quiet,
                         log=None if quiet else echo_err)
    name = METHOD_NAMES[method]
    if layout.reused:
        click.echo(f"reusing the saved {name} of '{key}' (/views/{key}/{method}); --recompute to redo it")
    else:
        where = "" if no_save else f"; saved to /views/{key}/{method} in {store}"
        click.echo(f"computed {name} of {int(layout.placed.sum()):,} rows in {layout.seconds:.1f} s{where}")
    out = out or default_plot_path(store, key, method, thumbnails)
    conv = Conversion.from_dict(s.config(key).get("conversion"))
    path = plot_layout(s, layout, colour, out, thumbnails=thumbnails, max_thumbnails=max_thumbnails, conv=conv)
    if colour.misclassified is not None:
        click.echo(f"{colour.note}; {int(colour.misclassified.sum()):,} misclassified items marked with a cross")
    click.echo(f"wrote {path}")


COMMANDS = [view]
