"""``embedkit compare``: one table across encoders, heads and fine-tuned models, with paired tests."""

from __future__ import annotations

import click


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False),
              help="Where to write comparison.md/.csv/.html/.json [default: RESULTS/comparison for one folder, else ./comparison].")
@click.option("--pair", nargs=2, multiple=True, metavar="A B",
              help="Paired test of B against A (row names or folders; repeatable) [default: every row against the best].")
@click.option("--allow-different-splits", is_flag=True,
              help="Compare results made on different splits anyway (a warning is printed in the table).")
@click.option("--n-boot", default=2000, show_default=True, type=click.IntRange(100), help="Bootstrap replicates for paired CIs.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the paired bootstrap.")
def compare(results, out, pair, allow_different_splits, n_boot, seed):
    """One table across encoders x heads x fine-tuned models, with paired tests.

    \b
    RESULTS are result folders (with metrics.json) or folders holding them, e.g.:
      embedkit compare results/
      embedkit compare results/logreg results/finetune --pair results/logreg results/finetune

    Rows show balanced accuracy with its 95% group-bootstrap CI, macro-F1, AUROC, training time and
    inference throughput. The paired test resamples whole test groups for the difference in balanced
    accuracy (B - A) and adds McNemar's test on the same test items.
    """
    from ..report import compare_results

    rep = compare_results(list(results), out=out, pairs=[tuple(p) for p in pair], allow_different_splits=allow_different_splits,
                          n_boot=n_boot, seed=seed)
    click.echo(rep.markdown)
    click.echo(f"wrote {rep.out}/comparison.md, .csv, .json and .html", err=True)


COMMANDS = [compare]
