"""``embedkit info``, ``embedkit export`` and ``embedkit store check|pack|upgrade``: look into a store,
verify it, and hand it to other tools."""

from __future__ import annotations

import click


@click.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
def info(store):
    """Summarise a store: items, labels, groups and embedding keys with their provenance."""
    from ..store import Store

    s = Store(store)
    attrs = s.attrs
    n = len(s)
    click.echo(f"{store}: schema {attrs.get('schema_version')}, embedkit {attrs.get('embedkit_version')}, created {attrs.get('created')}")
    if n:
        labels = s.labels
        counts: dict[str, int] = {}
        for lab in labels:
            counts[lab or "(none)"] = counts.get(lab or "(none)", 0) + 1
        click.echo(f"items: {n}  groups: {len(set(s.groups))}  pixels: {'yes' if s.has_pixels else 'no'}  root: {s.root}")
        click.echo("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    for key in s.keys:
        cfg = s.config(key)
        done = s.done(key)
        click.echo(f"embeddings/{key}: {cfg.get('encoder')} dim {cfg.get('dim')} {cfg.get('dtype')}, "
                   f"{int(done.sum())}/{len(done)} done, pooling {cfg.get('pooling') or 'avg'}, "
                   f"size {cfg.get('preprocess', {}).get('size')}, weights {cfg.get('weights')} [{cfg.get('weights_fingerprint')}]")


@click.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--encoder", "key", help="Embedding key or encoder name [default: the only one].")
@click.option("--format", "fmt", type=click.Choice(["h5ad", "csv", "npy"]), default="h5ad", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Output file [default: next to the store].")
@click.option("--all-rows", is_flag=True, help="Include items without a vector (as NaN rows).")
def export(store, key, fmt, out, all_rows):
    """Export one embedding key with its items: AnnData (.h5ad, for scanpy), CSV, or NumPy (.npy + .csv)."""
    from ..export import export_embeddings

    path = export_embeddings(store, key, fmt, out, only_done=not all_rows)
    click.echo(f"wrote {path}")


@click.group()
def store():
    """Check, pack or upgrade a store (see docs/store.md)."""


@store.command("check")
@click.argument("store_path", metavar="STORE", type=click.Path(exists=True, dir_okay=False))
def store_check(store_path):
    """Verify every shard of a store against the size and checksum recorded when it was committed."""
    from ..errors import EmbedkitError
    from ..store.tools import check

    rep = check(store_path)
    for line in rep.problems:
        click.echo(f"damaged: {line}", err=True)
    if rep.strays:
        click.echo(f"{len(rep.strays)} shard file(s) are not part of the store yet (work of an interrupted run; "
                   f"re-run that command to commit it), e.g. {rep.strays[0]}")
    if rep.problems:
        raise EmbedkitError(f"{store_path}: {len(rep.problems)} of {rep.n_shards} shards are damaged, first "
                            f"{rep.problems[0]}; restore the shards folder from a copy of the store")
    click.echo(f"{store_path}: {rep.n_shards} shard{'' if rep.n_shards == 1 else 's'}, all present and matching their checksums")


@store.command("pack")
@click.argument("store_path", metavar="STORE", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def store_pack(store_path, out):
    """Write STORE with every shard read in as one self-contained HDF5 file OUT, for sharing."""
    from ..store.tools import pack

    click.echo(f"wrote {pack(store_path, out)}")


@store.command("upgrade")
@click.argument("store_path", metavar="STORE", type=click.Path(exists=True, dir_okay=False))
def store_upgrade(store_path):
    """Move an older or packed store's pixels and vectors into shards, so that writes stop copying them."""
    from ..store.tools import upgrade

    moved = upgrade(store_path)
    click.echo(f"{store_path}: schema 2; moved {', '.join(moved)} into shards" if moved else f"{store_path}: already schema 2 with shards")


COMMANDS = [info, export, store]
