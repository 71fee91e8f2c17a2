"""``embedkit explain``: class activation maps for a fine-tuned network or a frozen encoder + probe."""

from __future__ import annotations

import click


@click.command()
@click.argument("model", type=click.Path())
@click.argument("items", nargs=-1)
@click.option("--method", "-m", "method", default="hirescam", show_default=True,
              help="gradcam, hirescam, gradcam++, eigencam or scorecam; comma-separated to compare several.")
@click.option("--target", default="predicted", show_default=True,
              help="Explain the predicted class, or name a class to see the evidence for it.")
@click.option("--layer", help="Target layer by name (see --list-layers) [default: chosen for the architecture].")
@click.option("--list-layers", is_flag=True, help="List the layers a CAM can use, with output shapes, and exit.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False), help="Store whose item ids ITEMS name (and --select reads).")
@click.option("--select", type=click.Choice(["misclassified", "per-class"]),
              help="Pick items from a predictions.csv: the most confident mistakes, or the most typical items per class.")
@click.option("--n", "n", type=click.IntRange(1), help="How many to --select (per class for per-class) [default: 16 / 4].")
@click.option("--predictions", type=click.Path(dir_okay=False),
              help="predictions.csv for --select [default: the one in or above MODEL's folder].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (required unless --list-layers).")
@click.option("--faithfulness", is_flag=True, help="Score each method by deletion/insertion AUC (with 95% CIs) against a random map.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(2, 200), help="Deletion/insertion curve steps.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def explain(model, items, method, target, layer, list_layers, store_path, select, n, predictions, out_dir, faithfulness,
            steps, device, batch_size, quiet):
    """Show which pixels drove a classifier's decision (Grad-CAM, HiResCAM, Grad-CAM++, EigenCAM, ScoreCAM).

    \b
    MODEL is a folder written by
      embedkit finetune   (model.json + model.safetensors), or
      embedkit probe      (probe.json; its frozen encoder is rebuilt and composed with the linear head)
    ITEMS are image files or folders, or item ids of --store; or use --select with --store.

    \b
    Examples:
      embedkit explain results/finetune/ cell1.png cell2.png --method gradcam,hirescam --out cams/
      embedkit explain results/lite0/logreg --store store/cells.h5 --select misclassified --n 16 --out cams/
      embedkit explain results/lite0/logreg --store store/cells.h5 --select per-class --n 4 \\
          --method gradcam,hirescam,scorecam --faithfulness --out cams/

    Writes overlays/<item>.png (true and predicted label, score), maps/<item>.<method>.npy, grid.png,
    items.csv, explain.json, and with --faithfulness faithfulness.csv/.png.
    """
    from ..errors import EmbedkitError
    from ..explain import choose_items, explain as run_explain, load_model, parse_methods
    from ..items import ItemSet
    from ..store import Store

    methods = parse_methods(method)
    if list_layers:
        _print_layers(load_model(model))
        return
    if not out_dir:
        raise EmbedkitError("--out DIR is required: the folder for overlays, maps and the grid figure")
    store = Store(store_path) if store_path else None
    in_store = ItemSet.from_store(store) if store is not None else None
    chosen, how = choose_items(model, items, in_store, select=select, n=n, predictions=predictions)
    if select is not None:
        click.echo(how, err=True)
    mdl = load_model(model)
    res = run_explain(mdl, chosen, out_dir, methods=methods, target=target, layer=layer, store=store,
                      faithfulness=faithfulness, steps=steps, device=device, batch_size=batch_size, progress=not quiet)
    click.echo(f"explained {len(res.items)} images with {', '.join(res.methods)} at layer {res.layer}; "
               f"overlays, maps and grid.png in {res.out_dir}")
    changed = [r for r in res.items if r["recorded_pred"] and r["recorded_pred"] != r["pred"]]
    if changed:
        click.echo(f"note: {len(changed)} of {len(res.items)} items are predicted differently now than in the "
                   f"predictions file (a different model or fold made it)", err=True)
    if res.empty_maps:
        click.echo(f"note: {len(res.empty_maps)} maps are all zero (no positive evidence for the target at this layer), "
                   f"e.g. {res.empty_maps[0][0]} ({res.empty_maps[0][1]})", err=True)
    if res.faithfulness:
        click.echo("faithfulness (mean AUC over images, 95% CI; deletion: lower is better, insertion and "
                   "ins - del: higher; gain: paired ins - del over the random map):")
        keys = ("deletion", "insertion", "insertion_minus_deletion", "vs_random")
        click.echo(f"  {'method':10s} " + " ".join(f"{h:>24s}" for h in ("deletion", "insertion", "ins - del", "gain vs random")))
        for r in res.faithfulness:
            cells = [f"{r[k]:.3f} [{r[k + '_ci'][0]:.3f}, {r[k + '_ci'][1]:.3f}]" if k in r else "" for k in keys]
            click.echo(f"  {r['method']:10s} " + " ".join(f"{c:>24s}" for c in cells))


def _print_layers(mdl) -> None:
    import torch

    from ..explain import default_layer, layer_table, trace_layers

    size = mdl.preprocess.size
    trace = trace_layers(mdl, torch.zeros(1, 3, size, size))
    default = default_layer(mdl, trace)
    rows = layer_table(mdl, trace, default)
    widths = [max(len(r[i]) for r in rows + [("name", "type", "output", "")]) for i in range(3)]
    for r in [("name", "type", "output", "")] + rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + ("  <- default" if r[3] else ""))


COMMANDS = [explain]
