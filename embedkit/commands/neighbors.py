"""``embedkit index``, ``embedkit neighbors`` and ``embedkit view`` (``leaks`` lives in commands/leaks.py)."""

from __future__ import annotations

import sys

import click

from ..errors import EmbedkitError
from ..neighbors import KINDS

KEY_HELP = "Embedding key or encoder name [default: the store's only key]."


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def _use_gpu(device: str) -> bool:
    from ..neighbors import faiss_gpu_available

    if device == "gpu":
        if not faiss_gpu_available():
            raise EmbedkitError("--device gpu: the installed FAISS has no GPU support or sees no GPU; use --device cpu "
                                "(or install faiss-gpu on a GPU machine)")
        return True
    return device == "auto" and faiss_gpu_available()


@click.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--encoder", "key", help=KEY_HELP)
@click.option("--kind", type=click.Choice(["auto", *KINDS]), default="auto", show_default=True,
              help="flat: exact; ivf: clustered lists (large stores); hnsw: graph; ivfpq: compressed codes (huge stores, "
                   "lower recall). auto: flat below 50,000 rows, else ivf.")
@click.option("--out", type=click.Path(dir_okay=False), help="Index file [default: beside the store, <store>.<key>.faiss].")
@click.option("--nlist", type=click.IntRange(1), help="IVF lists [default: about 4 sqrt(rows)].")
@click.option("--target-recall", type=click.FloatRange(0.5, 1.0), default=0.95, show_default=True,
              help="Search depth (nprobe / efSearch) is raised until Recall@10 against exact search, measured on 500 "
                   "sampled rows, reaches this (lower end of its 95% confidence interval).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="gpu needs faiss-gpu and a GPU; auto uses one when both are present.")
@click.option("--status", is_flag=True, help="Build nothing: say whether the saved index is up to date (exit 1 if stale or missing).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def index(store, key, kind, out, nlist, target_recall, device, status, quiet):
    """Build a FAISS index of one embedding key (cosine similarity) and save it beside the store.

    The index records which store, key, encoder configuration and rows it covers; rows embedded later
    make it stale, and 'neighbors' then says so and searches exactly instead.
    """
    from ..store import Store
    from ..store_index import build_store_index, index_paths, index_status

    s = Store(store)
    key = s.resolve_key(key)
    if status:
        record, stale = index_status(store, key, out)
        path = index_paths(store, key, out)[0]
        if record is None:
            click.echo(f"no index for key '{key}' ({path} does not exist); build one with 'embedkit index {store} --encoder {key}'")
            sys.exit(1)
        if stale:
            click.echo(f"stale: {path.name}: {'; '.join(stale)}; rebuild with 'embedkit index {store} --encoder {key}'")
            sys.exit(1)
        click.echo(f"up to date: {path.name} ({record['kind']}, {record['n_rows']:,} rows of '{key}', "
                   f"Recall@10 {record.get('recall_at_10', 1.0):.3f}, built {record['built']})")
        return
    saved = build_store_index(store, key, kind, out=out, nlist=nlist, target_recall=target_recall, use_gpu=_use_gpu(device),
                              log=_echo_err, progress=not quiet)
    r = saved.record
    if r.get("reason"):
        click.echo(f"auto: {r['reason']}")
    if r["kind"] != "flat" and r["recall_at_10_ci95"][0] < target_recall:
        click.echo(f"warning: {r['kind']} reaches Recall@10 {r['recall_at_10']:.3f} at most, below the target "
                   f"{target_recall}; use --kind ivf or flat when accuracy matters", err=True)
    click.echo(f"wrote {saved.path} ({saved.describe().split(': ', 1)[1]}; {r['build_seconds']:.1f} s)")


@click.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.argument("query")
@click.option("--encoder", "key", help=KEY_HELP)
@click.option("-k", "k", default=12, show_default=True, type=click.IntRange(1), help="Neighbours per query.")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Save a contact sheet (PNG): each query and its neighbours.")
@click.option("--exclude-same-group", is_flag=True, help="Hide neighbours from the query's own group (image, movie, well).")
@click.option("--out", "csv_out", type=click.Path(dir_okay=False), help="Also write the table as CSV.")
@click.option("--index", "index_path", type=click.Path(dir_okay=False), help="Saved index file [default: the one beside the store].")
@click.option("--exact", is_flag=True, help="Ignore any saved index and scan the store exactly.")
@click.option("--weights", type=click.Path(exists=True), help="The local checkpoint the key was embedded with, if it moved.")
@click.option("--device", default="cpu", show_default=True, help="Device for embedding image queries (cpu, cuda, mps, auto).")
def neighbors(store, query, key, k, sheet, exclude_same_group, csv_out, index_path, exact, weights, device):
    """Find the items most similar to QUERY: an item id, an image file, or a CSV of them.

    \b
    QUERY is one of:
      an item id of the store        e.g. 'Anaphase/PLLT0017_19--...png'
      an image file                  embedded exactly as the store key was (same encoder, weights, size)
      a CSV file                     a column 'id' (item ids) or 'path' (image files, relative to the CSV),
                                     or one id/path per line
    Prints rank, id, label, group and cosine similarity per neighbour. An item is its own first neighbour
    (similarity 1) unless --exclude-same-group hides its whole group.
    """
    import os

    from ..lookup import neighbors_frame, parse_queries, query_vectors, search_store
    from ..store import Store
    from ..store_index import open_index, stale_message

    s = Store(store)
    key = s.resolve_key(key)
    queries = parse_queries(s, query)
    saved = None
    if not exact:
        saved = open_index(store, key, index_path)
        if saved is not None and not saved.fresh:
            _echo_err(f"warning: {stale_message(saved)}; searching exactly instead")
            saved = None
    qvecs = query_vectors(s, key, queries, weights=weights, device=device)
    groups = s.groups
    excl = [str(groups[q.row]) if q.row is not None else None for q in queries] if exclude_same_group else None
    if exclude_same_group and any(q.row is None for q in queries):
        _echo_err("note: --exclude-same-group: image files that are not items of the store have no group; nothing hidden for them")
    sims, rows = search_store(s, key, qvecs, k, exclude_groups=excl, index=saved)
    table = neighbors_frame(s, queries, sims, rows)
    how = f"index {saved.path.name} ({saved.record['kind']})" if saved is not None else "exact scan"
    labels, ids = s.labels, s.ids
    for qi, q in enumerate(queries):
        desc = f"item, label {labels[q.row] or '-'}, group {groups[q.row]}" if q.is_item else (
            "image file" + (f" of item {ids[q.row]}" if q.row is not None else ""))
        click.echo(f"query {q.name} ({desc}); {k} nearest under '{key}' by {how}"
                   f"{', other groups only' if exclude_same_group and excl and excl[qi] else ''}:")
        click.echo(f"{'rank':>4}  {'similarity':>10}  {'label':<20} {'group':<18} id")
        for rank, (sim, row) in enumerate(zip(sims[qi], rows[qi]), start=1):
            if row >= 0:
                click.echo(f"{rank:>4}  {sim:>10.4f}  {str(labels[row])[:20]:<20} {str(groups[row])[:18]:<18} {ids[row]}")
    if csv_out:
        tmp = f"{csv_out}.tmp-{os.getpid()}"
        table.to_csv(tmp, index=False)
        os.replace(tmp, csv_out)
        click.echo(f"wrote {csv_out}")
    if sheet:
        from ..sheets import neighbor_sheet

        path = neighbor_sheet(s, key, queries, sims, rows, sheet)
        click.echo(f"wrote {path}")


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
                         log=None if quiet else _echo_err)
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


COMMANDS = [index, neighbors, view]
