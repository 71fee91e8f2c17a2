"""``embedkit index`` and ``embedkit neighbors`` (``leaks`` lives in commands/leaks.py, ``view`` in commands/view.py)."""

from __future__ import annotations

import sys

import click

from ..errors import EmbedkitError
from ..neighbors import KINDS
from .common import KEY_HELP, echo_err as _echo_err


def _write_csv(frame, path: str) -> None:
    from ..atomic import atomic_write_csv

    atomic_write_csv(path, frame)
    click.echo(f"wrote {path}")


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
    from ..atomic import atomic_write_csv
    from ..lookup import find_neighbors
    from ..store import Store

    s = Store(store)
    res = find_neighbors(s, query, key, k, exclude_same_group=exclude_same_group, index_path=index_path, exact=exact,
                         weights=weights, device=device)
    for note in res.notes:
        _echo_err(note)
    key, queries, sims, rows, excl = s.resolve_key(key), res.queries, res.sims, res.rows, res.excluded
    labels, ids, groups = s.labels, s.ids, s.groups
    for qi, q in enumerate(queries):
        desc = f"item, label {labels[q.row] or '-'}, group {groups[q.row]}" if q.is_item else (
            "image file" + (f" of item {ids[q.row]}" if q.row is not None else ""))
        click.echo(f"query {q.name} ({desc}); {k} nearest under '{key}' by {res.how}"
                   f"{', other groups only' if exclude_same_group and excl and excl[qi] else ''}:")
        click.echo(f"{'rank':>4}  {'similarity':>10}  {'label':<20} {'group':<18} id")
        for rank, (sim, row) in enumerate(zip(sims[qi], rows[qi]), start=1):
            if row >= 0:
                click.echo(f"{rank:>4}  {sim:>10.4f}  {str(labels[row])[:20]:<20} {str(groups[row])[:18]:<18} {ids[row]}")
    if csv_out:
        atomic_write_csv(csv_out, res.table)
        click.echo(f"wrote {csv_out}")
    if sheet:
        from ..sheets import neighbor_sheet

        path = neighbor_sheet(s, key, queries, sims, rows, sheet)
        click.echo(f"wrote {path}")


COMMANDS = [index, neighbors]
