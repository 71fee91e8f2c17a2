"""``embedkit adapt``: self-supervised adaptation of an encoder to unlabelled cells."""

from __future__ import annotations

import click


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--encoder", default="efficientnet_lite0", show_default=True,
              help="Encoder to adapt: a registry name, timm:<name>, hf:<repo|folder> or local:<folder>.")
@click.option("--method", type=click.Choice(["dino", "simclr"]), default="dino", show_default=True,
              help="dino: student/teacher self-distillation with multi-crop; simclr: contrastive pairs.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the adapted encoder, e.g. encoders/lite0-adapted (use it as --encoder local:FOLDER).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--splits", "splits_file", type=click.Path(exists=True, dir_okay=False),
              help="splits.json saved by 'embedkit probe', for --exclude-split.")
@click.option("--exclude-split", "exclude", multiple=True, type=click.Choice(["test", "val", "train"]),
              help="Leave out these parts of --splits (repeatable), so a later probe on them is honest.")
@click.option("--fold", type=click.IntRange(0), help="With a multi-fold splits file: whose parts to exclude.")
@click.option("--image-size", type=click.IntRange(16), help="Global view size [default: the encoder's input size].")
@click.option("--weights", type=click.Path(exists=True), help="Local checkpoint to start from (as in embed).")
@click.option("--pooling", type=click.Choice(["cls", "mean", "cls+mean"]), help="ViT pooling that is trained and kept.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(2))
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Peak AdamW learning rate (after warm-up).")
@click.option("--head-lr-scale", default=10.0, show_default=True, type=float,
              help="Learning-rate multiplier of the new projection head (the encoder gets --lr).")
@click.option("--weight-decay", default=0.04, show_default=True, type=float)
@click.option("--warmup-epochs", default=1.0, show_default=True, type=float, help="Linear warm-up, then cosine decay.")
@click.option("--samples-per-epoch", type=click.IntRange(2), help="Images per epoch [default: all cells once].")
@click.option("--local-crops", default=4, show_default=True, type=click.IntRange(0), help="DINO multi-crop: local views per image.")
@click.option("--teacher-momentum", default=0.99, show_default=True, type=float,
              help="DINO: start of the teacher's EMA momentum (cosine to 1).")
@click.option("--temperature", default=0.2, show_default=True, type=float, help="SimCLR: NT-Xent temperature.")
@click.option("--channels", help="Map source channels to RGB, e.g. '0', '2,1,0', '1,0,-' (as in embed).")
@click.option("--percentiles", default="1,99.8", show_default=True, help="Robust LOW,HIGH percentiles for 16-bit/float images.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for heads, sampling and views.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--no-amp", is_flag=True, help="Full precision on GPU (mixed precision is the default there).")
@click.option("--workers", type=click.IntRange(0), help="Image decoding workers [default: 0 on CPU, up to 8 on GPU].")
@click.option("--restart", is_flag=True, help="Discard an interrupted or finished run in --out and start again.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
def adapt(source, encoder, method, out, epochs, splits_file, exclude, fold, image_size, weights, pooling, batch_size, lr,
          head_lr_scale, weight_decay, warmup_epochs, samples_per_epoch, local_crops, teacher_momentum, temperature, channels,
          percentiles, seed, device, no_amp, workers, restart, quiet):
    """Continue self-supervised training of an encoder on your own unlabelled cells.

    \b
    SOURCE is a store (its cell crops, or the files it lists), a folder or a CSV manifest. Labels are never
    read. Views: crops with small scale jitter, the 8 rotations/flips, mild contrast, brightness and gamma
    jitter alike on every channel; DINO adds small local crops. Typical use:
      embedkit probe store/cells.h5 --encoder lite0_96 --out results/frozen
      embedkit adapt store/cells.h5 --encoder efficientnet_lite0 --image-size 96 --method dino --epochs 20 \\
          --splits results/frozen/splits.json --exclude-split test --out encoders/lite0-adapted
      embedkit embed CELLS/ --store store/cells.h5 --encoder local:encoders/lite0-adapted --key lite0_adapted

    Writes OUT/encoder.safetensors + encoder.json (base encoder, method, data fingerprint, epochs),
    history.json and loss_curve.png. A killed run resumes from its last completed epoch when the same
    command is run again. See docs/adapt.md.
    """
    from ..adapt import AdaptConfig, MethodConfig, ViewConfig
    from ..adapt import adapt as run_adapt
    from ..adapt.train import result_summary
    from ..images import Conversion, parse_channels, parse_percentiles

    conv = Conversion(channels=parse_channels(channels), percentiles=parse_percentiles(percentiles))
    cfg = AdaptConfig(method=method, epochs=epochs, batch_size=batch_size, lr=lr, head_lr_scale=head_lr_scale,
                      weight_decay=weight_decay, warmup_epochs=warmup_epochs, samples_per_epoch=samples_per_epoch,
                      seed=seed, amp=not no_amp)
    mcfg = MethodConfig(teacher_momentum=teacher_momentum, temperature=temperature)
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    res = run_adapt(source, out, encoder, cfg=cfg, views=ViewConfig(n_local=local_crops), method_cfg=mcfg,
                    image_size=image_size, pooling=pooling, weights=weights, splits_file=splits_file, exclude=exclude,
                    fold=fold, conv=conv, device=device, workers=workers, restart=restart, progress=not quiet, log=log)
    click.echo(result_summary(res))


COMMANDS = [adapt]
