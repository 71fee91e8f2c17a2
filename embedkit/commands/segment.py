"""``embedkit segment`` (fields -> cell crops) and ``embedkit patches`` (fields -> sliding-window patches)."""

from __future__ import annotations

import contextlib

import click

from ..engines.options import engine_from_options, engine_options
from ..formats.options import expand_source, plane_options

_FIELDS_HELP = """
    \b
    FIELDS is one of:
      a folder of class folders     (every cell inherits the folder name as its label)
      a CSV manifest                (columns path,label,group; other columns are kept as metadata)
      a folder or list of images    (no labels)
"""


#: Options that only one backend uses; giving them to the other is a mistake worth a clear error.
_BACKEND_ONLY = {"cellpose": ("model", "flow_threshold", "cellprob_threshold", "batch_size"), "watershed": ("polarity",)}


def _refuse_unused_options(backend: str) -> None:
    from click.core import ParameterSource

    from ..errors import EmbedkitError

    ctx = click.get_current_context()
    for owner, names in _BACKEND_ONLY.items():
        for name in names:
            if owner != backend and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
                raise EmbedkitError(f"--{name.replace('_', '-')} applies to --backend {owner}, not {backend}")


@click.command(help=f"""Cut whole microscope fields into single-cell crops in an HDF5 store.

    Cellpose 4 (model cpsam) segments by default; --backend watershed is a classical method that needs
    no weights. Every cell records its source field, mask id, bounding box, centroid, area and whether
    it touches the field edge; its crop goes to the store's pixels, so that

      embedkit embed S.h5 --store S.h5

    embeds the cells straight from the store. Label TIFFs (one per field) are saved beside the store.
    An interrupted run resumes when the same command is run again.
    {_FIELDS_HELP}""")
@click.argument("fields", nargs=-1, required=True, type=click.Path())
@click.option("--out", "store_path", required=True, type=click.Path(dir_okay=False), help="HDF5 store to create or add fields to.")
@click.option("--backend", type=click.Choice(["cellpose", "watershed"]), default="cellpose", show_default=True)
@click.option("--model", default="cpsam", show_default=True, help="Cellpose model name (cpsam, cpsam_v2) or a Cellpose 4 model file.")
@click.option("--diameter", type=click.FloatRange(min=0, min_open=True), help="Typical cell diameter in pixels [default: Cellpose's own; watershed estimates it per field].")
@click.option("--channels", help="Map field channels to the RGB crops, e.g. '0', '2,1,0', '1,0,-' (as in embed).")
@click.option("--seg-channels", help="Field channels the segmenter sees, e.g. '0' or '1,0' (nuclear first for watershed) [default: the RGB rendering].")
@click.option("--percentiles", default="1,99.8", show_default=True, help="Robust LOW,HIGH percentiles for 16-bit/float fields.")
@click.option("--polarity", type=click.Choice(["auto", "bright", "dark"]), default="auto", show_default=True, help="Watershed: bright objects on dark (fluorescence) or dark on bright (transmitted light).")
@click.option("--flow-threshold", default=0.4, show_default=True, type=float, help="Cellpose flow error threshold (0 keeps every mask).")
@click.option("--cellprob-threshold", default=0.0, show_default=True, type=float, help="Cellpose cell probability threshold.")
@click.option("--min-size", type=click.IntRange(0), help="Smallest object the segmenter keeps, in pixels [default: 15 Cellpose, 20 watershed].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Cellpose tiles per network batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps (Cellpose).")
@click.option("--crop", "crop_size", default=96, show_default=True, type=click.IntRange(8), help="Crop side in pixels, centred on each cell.")
@click.option("--mask/--no-mask", default=False, show_default=True, help="Zero the background and neighbouring cells in each crop.")
@click.option("--scale", "scale_spec", default="none", show_default=True, help="Resample crops: none, pixel:UM_PER_PX, diameter:PX (field median) or cell:PX (each cell).")
@click.option("--pixel-size", type=click.FloatRange(min=0, min_open=True), help="Field pixel size in µm (for --scale pixel:...; a manifest 'pixel_size' column overrides it).")
@click.option("--edge", type=click.Choice(["drop", "keep"]), default="drop", show_default=True, help="Cells touching the field border: drop them, or keep them flagged in the 'edge' column.")
@click.option("--min-area", default=15, show_default=True, type=click.IntRange(0), help="Drop cells smaller than this (pixels).")
@click.option("--max-area", type=click.IntRange(1), help="Drop cells larger than this (pixels).")
@click.option("--group-by", help="Group rule: a manifest column, a preset (mitocheck, parent, file) or a regex [default: each field is a group].")
@click.option("--labels-dir", type=click.Path(file_okay=False), help="Folder for the label TIFFs [default: <store>_labels/].")
@click.option("--overlays", default=0, show_default=True, type=click.IntRange(0), help="Save outline PNGs of the first N fields in <store>_overlays/.")
@click.option("--skip-bad", is_flag=True, help="Skip fields that cannot be read or segmented, and list them in a report, instead of stopping.")
@click.option("--checkpoint-fields", type=click.IntRange(1), help="Save progress every N fields [default: every 64 MB of crops or 20 s].")
@engine_options
@click.option("--quiet", is_flag=True, help="No progress bar and no preamble; only the summary and errors.")
@plane_options(pixel_size=False)
def segment(fields, store_path, backend, model, diameter, channels, seg_channels, percentiles, polarity, flow_threshold,
            cellprob_threshold, min_size, batch_size, device, crop_size, mask, scale_spec, pixel_size, edge, min_area,
            max_area, group_by, labels_dir, overlays, skip_bad, checkpoint_fields, engine, address, replicas, quiet, z_rule,
            t_frames):
    from ..images import Conversion, parse_channels, parse_percentiles
    from ..segment.backends import create_segmenter
    from ..segment.crops import CropParams, ScaleSpec
    from ..segment.fields import parse_seg_channels
    from ..segment.pipeline import segment_fields
    from ..sources import discover
    from ..store import write_lock

    _refuse_unused_options(backend)
    conv = Conversion(channels=parse_channels(channels), percentiles=parse_percentiles(percentiles))
    crop = CropParams(size=crop_size, mask=mask, scale=ScaleSpec.parse(scale_spec), edge=edge, min_area=min_area, max_area=max_area)
    seg_ch = parse_seg_channels(seg_channels)
    src = discover(list(fields), group_by=group_by)
    src = expand_source(src, z_rule, t_frames, None, group_by, skip_bad, quiet)
    if not quiet:
        click.echo(f"{len(src.items)} fields from {src.kind.replace('_', ' ')} "
                   f"({sum(bool(it.label) for it in src.items)} labelled, {len({it.group for it in src.items})} groups)", err=True)
    runner = engine_from_options(engine, address, replicas)
    with write_lock(store_path), runner or contextlib.nullcontext():  # refused before the model loads
        segmenter = create_segmenter(backend, model=model, diameter=diameter, device=device, batch_size=batch_size,
                                     flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold, min_size=min_size,
                                     polarity=polarity)
        res = segment_fields(src, store_path, segmenter, crop, conv=conv, seg_channels=seg_ch, pixel_size=pixel_size,
                             labels_dir=labels_dir, overlays=overlays, skip_bad=skip_bad, progress=not quiet,
                             checkpoint_fields=checkpoint_fields, engine=runner)
    msg = (f"segmented {res.n_fields - res.n_resumed - len(res.failed)} of {res.n_fields} fields with {backend} "
           f"({res.n_resumed} already done, {len(res.failed)} failed): {res.n_cells} cells added to {res.store}; "
           f"{res.n_found} objects found at {res.cells_per_second:.1f} objects/s; label TIFFs in {res.labels_dir}")
    if res.overlays_dir:
        msg += f"; overlays in {res.overlays_dir}"
    click.echo(msg)
    if res.failed:
        click.echo(f"skipped {len(res.failed)} fields that failed; list in {res.report}", err=True)


@click.command(help=f"""Cut whole fields into sliding-window patches in an HDF5 store (e.g. bright-field live/dead).

    Every patch records its source field and its (y, x) offset. Empty patches are filtered out:
    'simple' thresholds foreground fraction and variance, 'learned' is an SVM on encoder embeddings
    fitted from a few example patches you sort into empty/ and kept/ folders (saved for reuse).

    \b
    With a paired fluorescence channel, patches are labelled from it: a 2-component Gaussian mixture
    is fitted to the per-patch mean intensity; patches below the low component's mean + sd get the
    first --gmm-classes name, those above the high component's mean - sd the second, and the
    ambiguous middle is discarded. The thresholds are saved (--gmm-out) and reusable (--gmm-thresholds).
    {_FIELDS_HELP}""")
@click.argument("fields", nargs=-1, required=True, type=click.Path())
@click.option("--out", "store_path", required=True, type=click.Path(dir_okay=False), help="HDF5 store to create or add fields to.")
@click.option("--size", default=224, show_default=True, type=click.IntRange(8), help="Patch side in pixels.")
@click.option("--stride", default=112, show_default=True, type=click.IntRange(1), help="Step between patches (a last patch is added flush with each edge).")
@click.option("--channels", help="Map field channels to the RGB patches, e.g. '0' (the bright-field channel).")
@click.option("--percentiles", default="1,99.8", show_default=True, help="Robust LOW,HIGH percentiles for 16-bit/float fields.")
@click.option("--filter", "filter_name", type=click.Choice(["none", "simple", "learned"]), default="simple", show_default=True, help="Empty-patch filter.")
@click.option("--min-foreground", default=0.01, show_default=True, type=click.FloatRange(0, 1), help="simple: keep patches with at least this fraction of non-background pixels...")
@click.option("--min-std", default=0.02, show_default=True, type=click.FloatRange(0), help="simple: ...and at least this standard deviation (intensities in [0, 1]).")
@click.option("--fg-delta", default=0.1, show_default=True, type=click.FloatRange(0, 1), help="simple: how far from the field's median a pixel must be to count as foreground.")
@click.option("--filter-examples", type=click.Path(exists=True, file_okay=False), help="learned: folder with empty/ and kept/ example patches to fit the filter on.")
@click.option("--filter-model", type=click.Path(file_okay=False), help="learned: folder where the fitted filter is saved, or an already fitted one to reuse.")
@click.option("--filter-encoder", default="efficientnet_lite0", show_default=True, help="learned: encoder whose embeddings the SVM separates.")
@click.option("--paired-channel", type=click.IntRange(0), help="Label patches from this channel (of the field, or of the paired file).")
@click.option("--paired-replace", help="Paired file = field path with OLD replaced by NEW, given as OLD=NEW (e.g. _BF=_PI).")
@click.option("--paired-column", help="Paired file from this manifest column.")
@click.option("--gmm-classes", help="LOW,HIGH class names, the low-intensity population first [default: live,dead, or those saved with --gmm-thresholds].")
@click.option("--gmm-thresholds", type=click.Path(exists=True, dir_okay=False), help="Reuse thresholds saved by an earlier run instead of fitting.")
@click.option("--gmm-out", type=click.Path(dir_okay=False), help="Where fitted thresholds are saved [default: <store>.gmm.json, with a .png plot].")
@click.option("--group-by", help="Group rule: a manifest column, a preset (mitocheck, parent, file) or a regex [default: each field is a group].")
@click.option("--device", default="auto", show_default=True, help="Device for the learned filter's encoder: auto, cpu, cuda, mps.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Learned filter: patches per encoder batch.")
@click.option("--skip-bad", is_flag=True, help="Skip fields that cannot be read, and list them in a report, instead of stopping.")
@click.option("--checkpoint-fields", type=click.IntRange(1), help="Save progress every N fields [default: every 64 MB of crops or 20 s].")
@engine_options
@click.option("--quiet", is_flag=True, help="No progress bar and no preamble; only the summary and errors.")
@plane_options()
def patches(fields, store_path, size, stride, channels, percentiles, filter_name, min_foreground, min_std, fg_delta,
            filter_examples, filter_model, filter_encoder, paired_channel, paired_replace, paired_column, gmm_classes,
            gmm_thresholds, gmm_out, group_by, device, batch_size, skip_bad, checkpoint_fields, engine, address, replicas,
            quiet, z_rule, t_frames, target_pixel_size):
    from ..errors import EmbedkitError
    from ..images import Conversion, parse_channels, parse_percentiles
    from ..segment.filters import LearnedFilter, make_filter
    from ..segment.gmm_labels import GmmThresholds
    from ..segment.patch_pipeline import extract_patches, paired_from_options
    from ..sources import discover
    from ..store import write_lock

    conv = Conversion(channels=parse_channels(channels), percentiles=parse_percentiles(percentiles))
    classes = tuple(c.strip() for c in (gmm_classes or "live,dead").split(","))
    if len(classes) != 2 or not all(classes) or classes[0] == classes[1]:
        raise EmbedkitError(f"--gmm-classes {gmm_classes!r}: give two different names, low-intensity class first, e.g. live,dead")
    paired = paired_from_options(paired_channel, paired_replace, paired_column)
    if gmm_thresholds and paired is None:
        raise EmbedkitError("--gmm-thresholds labels patches from a paired channel; give --paired-channel, --paired-replace or --paired-column")
    thresholds = GmmThresholds.load(gmm_thresholds) if gmm_thresholds else None
    if thresholds is not None:
        if gmm_classes and tuple(thresholds.classes) != classes:
            raise EmbedkitError(f"--gmm-classes {gmm_classes} differ from the classes saved in {gmm_thresholds} "
                                f"({','.join(thresholds.classes)}); leave --gmm-classes out to use the saved ones")
        classes = tuple(thresholds.classes)

    src = discover(list(fields), group_by=group_by)
    src = expand_source(src, z_rule, t_frames, target_pixel_size, group_by, skip_bad, quiet)
    if not quiet:
        click.echo(f"{len(src.items)} fields from {src.kind.replace('_', ' ')}", err=True)
    runner = engine_from_options(engine, address, replicas)
    with write_lock(store_path), runner or contextlib.nullcontext():  # refused before the filter's model loads
        filt = make_filter(filter_name, min_foreground=min_foreground, min_std=min_std, delta=fg_delta, model_dir=filter_model,
                           examples=filter_examples, encoder=filter_encoder, conv=conv, device=device, batch_size=batch_size)
        if isinstance(filt, LearnedFilter) and filter_examples:
            click.echo(f"fitted the learned filter on {filt.info['n_empty']} empty + {filt.info['n_kept']} kept examples "
                       f"({filt.info['cv']} accuracy {filt.info['cv_accuracy']:.2f}); saved in {filter_model}", err=True)
        res = extract_patches(src, store_path, size=size, stride=stride, conv=conv, filt=filt, paired=paired,
                              thresholds=thresholds, classes=classes, thresholds_out=gmm_out, device=device,
                              batch_size=batch_size, skip_bad=skip_bad, progress=not quiet, checkpoint_fields=checkpoint_fields,
                              engine=runner)
    msg = (f"cut {res.n_fields - res.n_resumed - len(res.failed)} of {res.n_fields} fields ({res.n_resumed} already done, "
           f"{len(res.failed)} failed) into {res.n_windows} patches: {res.n_empty} empty, {res.n_written} added to {res.store}")
    if res.thresholds is not None:
        t = res.thresholds
        msg += (f"; labelled {t.classes[0]} below {t.low:.4g} and {t.classes[1]} above {t.high:.4g}, "
                f"{res.n_ambiguous} ambiguous discarded")
    if res.thresholds_path:
        msg += f"; thresholds saved in {res.thresholds_path}"
    click.echo(msg)
    if res.failed:
        click.echo(f"skipped {len(res.failed)} fields that failed; list in {res.report}", err=True)


COMMANDS = [segment, patches]
