"""``embedkit finetune``: fine-tune a whole network on the probes' splits."""

from __future__ import annotations

import click

from .common import balance_option


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--model", default="efficientnet_lite0", show_default=True,
              help="timm architecture (efficientnet_b3, resnet50, timm:<name>) or efficientnet_lite0/1/2 (offline weights).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Result folder (checkpoint, metrics, plots).")
@click.option("--splits", "splits_file", type=click.Path(exists=True, dir_okay=False),
              help="splits.json saved by 'embedkit probe': train, validate and test on exactly those items.")
@click.option("--group-by", help="Without --splits: group rule (manifest/store column, preset mitocheck/parent/file, or regex).")
@click.option("--folds", type=click.IntRange(2), help="Without --splits: K group folds instead of one train/val/test split.")
@click.option("--test-size", default=0.2, show_default=True, type=float, help="Without --splits: test fraction.")
@click.option("--val-size", default=0.2, show_default=True, type=float, help="Without --splits: validation fraction.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for splits, sampling, augmentation and the new head.")
@click.option("--fold", "fold", multiple=True, type=int, help="Train only these folds (repeatable) [default: all].")
@click.option("--weights", type=click.Path(exists=True), help="Local checkpoint to start from instead of the hub/package weights.")
@click.option("--random-init", is_flag=True, help="Start from random weights on purpose (tests only). Never the default.")
@click.option("--image-size", type=click.IntRange(16), help="Training/inference resolution [default: the model's].")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=3e-4, show_default=True, type=float, help="Peak AdamW learning rate (after warm-up).")
@click.option("--weight-decay", default=0.05, show_default=True, type=float)
@click.option("--warmup-epochs", default=1.0, show_default=True, type=float, help="Linear warm-up, then cosine decay.")
@click.option("--patience", default=8, show_default=True, type=click.IntRange(1),
              help="Stop after this many epochs without a better validation balanced accuracy.")
@balance_option("Class imbalance: inverse-frequency weighted sampler, over- or under-sampling, or none.")
@click.option("--samples-per-epoch", type=click.IntRange(1), help="Draws per epoch [default: the training set size].")
@click.option("--no-augment", is_flag=True, help="Turn off rotations/flips and intensity jitter.")
@click.option("--label-smoothing", default=0.0, show_default=True, type=float)
@click.option("--channels", help="Map source channels to RGB, e.g. '0', '2,1,0', '1,0,-' (as in embed).")
@click.option("--percentiles", default="1,99.8", show_default=True, help="Robust LOW,HIGH percentiles for 16-bit/float images.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--no-amp", is_flag=True, help="Full precision on GPU (mixed precision is the default there).")
@click.option("--workers", type=click.IntRange(0), help="Image decoding workers [default: 0 on CPU, up to 8 on GPU].")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(1),
              help="Train with DistributedDataParallel in N processes (torchrun): one per GPU (NCCL), or gloo on CPU. "
                   "--batch-size is per process.")
@click.option("--name", help="Row name in 'embedkit compare' [default: '<model> fine-tuned'].")
@click.option("--restart", is_flag=True, help="Discard an interrupted or finished run in --out and train from scratch.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def finetune(source, model, out, splits_file, group_by, folds, test_size, val_size, seed, fold, weights, random_init,
             image_size, epochs, batch_size, lr, weight_decay, warmup_epochs, patience, balance, samples_per_epoch,
             no_augment, label_smoothing, channels, percentiles, device, no_amp, workers, nproc, name, restart, quiet):
    """Fine-tune a whole timm network on labelled images, on the same group splits as the probes.

    \b
    SOURCE is a store (its cell crops, or the files it lists) or a folder of class
    folders / CSV manifest, as for 'embed'. Typical use, after 'embedkit probe ... --out results/':
      embedkit finetune store/cells.h5 --model efficientnet_b3 --splits results/splits.json --out results/finetune
      embedkit compare results/

    The best epoch (by validation balanced accuracy) is kept as model.safetensors + model.json.
    A killed run resumes from its last completed epoch when the same command is run again.
    """
    from ..finetune import TrainConfig
    from ..finetune import finetune as run_finetune
    from ..images import Conversion, parse_channels, parse_percentiles
    from ..splits import SplitSpec

    conv = Conversion(channels=parse_channels(channels), percentiles=parse_percentiles(percentiles))
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                      patience=patience, balance=balance, samples_per_epoch=samples_per_epoch, augment=not no_augment,
                      label_smoothing=label_smoothing, seed=seed, amp=not no_amp)
    opts = SplitSpec(splits_file, test_size, val_size, folds, 1, seed, group_by)
    res = run_finetune(source, out, model, split_opts=opts, train=cfg, weights=weights, pretrained=not random_init,
                       image_size=image_size, conv=conv, folds=list(fold) or None, device=device, workers=workers,
                       name=name, restart=restart, progress=not quiet, log=_quiet if quiet else _echo, nproc=nproc)
    if not res.record:  # a process other than rank 0 of --nproc: rank 0 reports
        return
    m, ci = res.record["metrics"], res.record["ci"]
    click.echo(f"{res.record['name']}: balanced accuracy {m['balanced_accuracy']:.3f} "
               f"[{ci['balanced_accuracy'][0]:.3f}, {ci['balanced_accuracy'][1]:.3f}] on {m['n']} test items; "
               f"trained {res.record['fit_seconds']:.0f}s; results in {res.out}")


def _echo(line: str) -> None:
    """Progress lines on stderr (a module-level function, so --nproc can hand it to its processes)."""
    click.echo(line, err=True)


def _quiet(_: str) -> None:
    """No progress lines (--quiet)."""


COMMANDS = [finetune]
