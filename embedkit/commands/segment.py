"""``embedkit segment`` (fields -> cell crops) and ``embedkit patches`` (fields -> sliding-window patches)."""

from __future__ import annotations

import click

_FIELDS_HELP = """
    \b
    FIELDS is one of:
      a folder of class folders     (every cell inherits the folder name as its label)
      a CSV manifest                (columns path,label,group; other columns are kept as metadata)
      a folder or list of images    (no labels)
"""


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
@click.option("--quiet", is_flag=True, help="No progress bar.")
def segment(fields, store_path, backend, model, diameter, channels, seg_channels, percentiles, polarity, flow_threshold,
            cellprob_threshold, min_size, batch_size, device, crop_size, mask, scale_spec, pixel_size, edge, min_area,
            max_area, group_by, labels_dir, overlays, skip_bad, quiet):
    from ..images import Conversion, parse_channels, parse_percentiles
    from ..segment.backends import create_segmenter
    from ..segment.crops import CropParams, ScaleSpec
    from ..segment.fields import parse_seg_channels
    from ..segment.pipeline import segment_fields
    from ..sources import discover

    conv = Conversion(channels=parse_channels(channels), percentiles=parse_percentiles(percentiles))
    crop = CropParams(size=crop_size, mask=mask, scale=ScaleSpec.parse(scale_spec), edge=edge, min_area=min_area, max_area=max_area)
    seg_ch = parse_seg_channels(seg_channels)
    src = discover(list(fields), group_by=group_by)
    click.echo(f"{len(src.items)} fields from {src.kind.replace('_', ' ')} "
               f"({sum(bool(it.label) for it in src.items)} labelled, {len({it.group for it in src.items})} groups)", err=True)
    segmenter = create_segmenter(backend, model=model, diameter=diameter, device=device, batch_size=batch_size,
                                 flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold, min_size=min_size,
                                 polarity=polarity)
    res = segment_fields(src, store_path, segmenter, crop, conv=conv, seg_channels=seg_ch, pixel_size=pixel_size,
                         labels_dir=labels_dir, overlays=overlays, skip_bad=skip_bad, progress=not quiet)
    msg = (f"segmented {res.n_fields - res.n_resumed - len(res.failed)} fields with {backend}: {res.n_cells} cells into "
           f"{res.store} ({res.n_found} objects found, {res.cells_per_second:.1f} objects/s); label TIFFs in {res.labels_dir}")
    if res.n_resumed:
        msg += f"; {res.n_resumed} fields were already done"
    if res.overlays_dir:
        msg += f"; overlays in {res.overlays_dir}"
    click.echo(msg)
    if res.failed:
        click.echo(f"skipped {len(res.failed)} fields that failed; list in {res.report}", err=True)


COMMANDS = [segment]
