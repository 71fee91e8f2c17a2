"""``embedkit embed`` and ``embedkit encoders``."""

from __future__ import annotations

import contextlib
import os

import click

from ..engines.options import engine_options
from ..formats.options import expand_source, plane_options


@click.command()
@click.argument("source", nargs=-1, required=True, type=click.Path())
@click.option("--store", "store_path", required=True, type=click.Path(dir_okay=False), help="HDF5 store to create or add to.")
@click.option("--encoder", default="efficientnet_lite0", show_default=True, help="Registry name, timm:<name> or hf:<repo|folder>.")
@click.option("--weights", type=click.Path(), help="Local checkpoint: .pth/.safetensors file (official DINOv2/v3 too) or a transformers folder.")
@click.option("--pooling", type=click.Choice(["cls", "mean", "cls+mean"]), help="ViT pooling (register tokens are always excluded).")
@click.option("--image-size", type=int, help="Input size; ViTs interpolate position embeddings to it.")
@click.option("--key", help="Embedding key in the store [default: derived from the encoder name].")
@click.option("--group-by", help="Group rule: a manifest column, a preset (mitocheck, parent, file) or a regex with capture groups.")
@click.option("--channels", help="Map source channels to RGB, e.g. '0' (gray), '2,1,0', '1,0,-', or by name 'DAPI,Phalloidin,-'; "
                                 "or bag: every channel through the encoder alone as a grayscale image, vectors "
                                 "concatenated (dim x channels); or mean: those vectors averaged (dim). Needed for >4 channels.")
@click.option("--percentiles", default="1,99.8", show_default=True, help="Robust LOW,HIGH percentiles for 16-bit/float images.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", type=click.IntRange(0), help="Decoding worker processes [default: 1 on CPU, up to 8 on GPU].")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Stored vector precision.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable or missing images and list them in a report, instead of stopping.")
@click.option("--checkpoint-rows", default=1024, show_default=True, type=click.IntRange(1), help="Save progress every N images (resume point).")
@click.option("--random-init", is_flag=True, help="Use randomly initialised weights on purpose (tests, baselines). Never the default.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the --random-init weights (recorded in provenance).")
@click.option("--layers", help="Also store pooled features of intermediate layers (ViT blocks, CNN stages), each under its own "
                               "key <key>@block-N or <key>@stage-N (N from 0; -1 is the last): e.g. -1,-2,-4, or all. "
                               "<key> itself stays the usual output; a layer equal to it is not stored twice.")
@click.option("--baselines", is_flag=True, help="Also store the random-init (<key>@random-init) and handcrafted baseline keys that 'probe' compares against.")
@engine_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@plane_options()
def embed(source, store_path, encoder, weights, pooling, image_size, key, group_by, channels, percentiles, device,
          batch_size, workers, dtype, skip_bad, checkpoint_rows, random_init, seed, layers, baselines, engine, address, replicas,
          quiet, z_rule, t_frames, target_pixel_size):
    """Embed images with a frozen encoder into an HDF5 store.

    \b
    SOURCE is one of:
      a folder of class folders     (label = folder name)
      a CSV manifest                (columns path,label,group; other columns are kept as metadata)
      a folder or list of images    (no labels)
      the store itself              (embeds the cell crops that 'embedkit segment' saved)

    An interrupted run resumes where it stopped when the same command is run again.
    """
    from ..embed import embed as run_embed
    from ..encoders import create_encoder
    from ..encoders.layers import parse_layers
    from ..engines.options import engine_from_options
    from ..images import make_conversion
    from ..sources import discover
    from ..store import validate_key, write_lock

    if key is not None:
        validate_key(key)
    layer_request = parse_layers(layers)
    conv = make_conversion(channels, percentiles)
    if len(source) == 1 and os.path.abspath(source[0]) == os.path.abspath(store_path):
        src = store_path
    else:
        src = discover(list(source), group_by=group_by)
        src = expand_source(src, z_rule, t_frames, target_pixel_size, group_by, skip_bad, quiet)
        labelled = sum(bool(it.label) for it in src.items)
        click.echo(f"{len(src.items)} images from {src.kind.replace('_', ' ')} ({labelled} labelled, "
                   f"{len({it.group for it in src.items})} groups)", err=True)
    runner = engine_from_options(engine, address, replicas)
    with write_lock(store_path), runner or contextlib.nullcontext():  # refused before the model loads
        if random_init and weights is None:
            from ..baselines.random_init import random_encoder

            enc = random_encoder(encoder, seed, pooling=pooling, image_size=image_size)
        else:
            enc = create_encoder(encoder, weights=weights, pooling=pooling, image_size=image_size, pretrained=not random_init)
        res = run_embed(src, store_path, enc, key=key, conv=conv, device=device, batch_size=batch_size, workers=workers,
                        dtype=dtype, skip_bad=skip_bad, checkpoint_rows=checkpoint_rows, progress=not quiet,
                        engine=runner, layers=layer_request)
    msg = (f"embedded {res.n_embedded} images into {res.store} under key '{res.key}' "
           f"({res.images_per_second:.1f} img/s, dim {res.dims[0]})")
    if res.n_resumed:
        msg += f"; {res.n_resumed} were already done"
    click.echo(msg)
    if layer_request is not None:
        click.echo(_layers_line(enc, res.keys, res.dims))
    if res.skipped:
        click.echo(f"skipped {len(res.skipped)} bad images; list in {res.report}", err=True)
    if baselines:
        from ..baselines import ensure_baselines
        from ..store import Store

        keys, _ = ensure_baselines(Store(store_path), res.key, ["random-init", "handcrafted"], seed=seed, device=device,
                                   progress=not quiet)
        click.echo(f"baselines stored under keys {', '.join(repr(k) for k in keys.values())}")


def _layers_line(enc, keys: list[str], dims: list[int]) -> str:
    """Which layer each key holds, e.g. "layers: 'k@block-8' (dim 384); 'k' is block-11"."""
    shown = "; ".join(f"'{k}' (dim {d})" for k, d in zip(keys[1:], dims[1:])) or "no other layer"
    plain = f"'{keys[0]}' is {enc.final_layer}" if enc.final_layer else f"'{keys[0]}' is the usual output"
    return f"layers: {shown}; {plain}"


@click.command()
@click.option("--local", is_flag=True, help="Only encoders whose weights are present on this machine.")
def encoders(local):
    """List the encoder registry and whether each one's weights are present locally."""
    from ..encoders.catalogue import encoder_table

    table = encoder_table(local).astype(str)
    header = list(table.columns)
    rows = [header] + table.values.tolist()
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    click.echo("\nAlso: timm:<model name> and hf:<repo id or folder>; --weights PATH loads a local checkpoint.")


COMMANDS = [embed, encoders]
