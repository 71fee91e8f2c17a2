"""``embedkit probe``, ``embedkit predict`` and ``embedkit proportions``: thin wrappers over embedkit.probe."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import EmbedkitError
from .common import balance_option


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EmbedkitError(f"{name} takes comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise EmbedkitError(f"{name} needs positive numbers, got {text!r}")
    return values


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--encoder", "key", help="Embedding key or encoder name [default: the only key in the store].")
@click.option("--heads", default="all", show_default=True, help="Comma list of logreg, svm, knn; or all.")
@click.option("--out", type=click.Path(file_okay=False), help="Result folder [default: results/<store>-<key>].")
@click.option("--group-by", help="Group rule for splits: an item column, a preset (mitocheck, parent, file) or a regex "
                                 "over paths, or leaks:FILE (the grouping 'embedkit leaks --suggest-groups FILE' wrote) "
                                 "[default: the store's group column].")
@click.option("--splits", "splits_path", type=click.Path(exists=True, dir_okay=False),
              help="Reuse a splits.json (from an earlier probe of any encoder) instead of making new splits.")
@click.option("--test-size", default=0.2, show_default=True, type=float, help="Fraction of groups held out for test.")
@click.option("--val-size", default=0.2, show_default=True, type=float, help="Fraction of groups for choosing hyper-parameters.")
@click.option("--folds", type=click.IntRange(2), help="Stratified group K-fold: every group is tested once.")
@click.option("--seeds", type=click.IntRange(1), help="Repeat with N different grouped splits; the mean is reported with a "
              "CI holding split and group variance [default: 5; 1 with --folds or --splits]. --seeds 1 is a quick look.")
@click.option("--seed", default=0, show_default=True, type=int, help="First random seed.")
@click.option("--classes", help="Probe only these classes (comma list); other labelled items are left out.")
@balance_option("Class imbalance: class weights, random over-/under-sampling of train, or none.")
@click.option("--standardise/--no-standardise", default=True, show_default=True, help="Standardise with train mean and sd.")
@click.option("--l2", is_flag=True, help="L2-normalise each vector first.")
@click.option("--pca-whiten", is_flag=True, help="PCA-whiten (fitted on train) after standardising.")
@click.option("--pca-dim", type=click.IntRange(1), help="Keep this many principal components when whitening.")
@click.option("--C", "c_grid", default="1e-6,1e-5,1e-4,1e-3,1e-2,0.1,1,10,100,1e3,1e4,1e5", show_default=True,
              help="Values of C tried for logreg and svm (chosen on validation).")
@click.option("--k", "k_grid", default="1,5,10,20,50,100,200", show_default=True, help="Values of k tried for knn.")
@click.option("--temperature", default=0.07, show_default=True, type=float, help="kNN vote temperature (DINO: 0.07).")
@click.option("--max-iter", default=300, show_default=True, type=click.IntRange(1), help="L-BFGS iterations per C.")
@click.option("--device", default="auto", show_default=True, help="Where logreg/svm are solved: auto (CUDA GPU when present), cpu, cuda or cuda:N.")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(100), help="Bootstrap replicates for CIs.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Score random-init, handcrafted and prior baselines on the same splits (missing keys are computed).")
@click.option("--leak-check/--no-leak-check", default=True, show_default=True,
              help="When the groups look unsafe (no group column, one item per group, or mostly single-item groups), "
                   "check a sample of test items for copies in train/val and print the verdict.")
@click.option("--refit", type=click.Choice(["train", "trainval"]), default="train", show_default=True,
              help="trainval: after choosing hyper-parameters on validation, refit on train + validation before the test.")
@click.option("--layers", help="best: also probe every layer key of the encoder (<key>@block-N / <key>@stage-N from "
                               "'embed --layers') on the same splits, list every layer's scores and choose the layer per "
                               "head on validation only (OUT/layers/<layer>/, OUT/layers.json).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def probe(store, key, heads, out, group_by, splits_path, test_size, val_size, folds, seeds, seed, classes, balance,
          standardise, l2, pca_whiten, pca_dim, c_grid, k_grid, temperature, max_iter, device, n_boot, baselines, refit, leak_check,
          layers, quiet):
    """Fit linear, SVM and kNN probes on stored embeddings and report test metrics with 95% CIs.

    \b
    Splits keep every group (image, movie, well) in one part: train fits the head, validation picks its
    hyper-parameters (C, k), test is scored once. Items without a label are predicted, never scored.
    Writes OUT/splits.json (reuse it with --splits), OUT/summary.md and, per head, OUT/<head>/ with
    metrics.json, predictions.csv, confusion.png, roc.png, summary.md and the saved probe (probe/).

    \b
    Example:
      embedkit probe store/cells.h5 --heads all --out results/lite0
      embedkit probe store/cells.h5 --encoder dinov2_vits14 --splits results/lite0/splits.json --out results/dino
    """
    from ..probe import HeadOptions, ProbeSettings, run_probe, summary_table
    from ..baselines import BASELINES
    from ..probe.evaluate import baseline_lines, fixed_width, summary_header
    from ..probe.heads import solver_device
    from ..probe.layers import choice_lines, layer_table, parse_layer_choice
    from ..splits import SplitSpec
    from ..store import Store

    layers = parse_layer_choice(layers)

    k_values = [int(v) for v in _floats(k_grid, "--k")]
    opts = HeadOptions(c_grid=_floats(c_grid, "--C"), k_grid=k_values, temperature=temperature, max_iter=max_iter,
                       device=str(solver_device(device)))
    settings = ProbeSettings(heads=heads, balance=balance, standardise=standardise, l2=l2, pca_whiten=pca_whiten,
                             pca_dim=pca_dim, split=SplitSpec(splits_path, test_size, val_size, folds, seeds, seed),
                             classes=[c.strip() for c in classes.split(",")] if classes else None,
                             head_options=opts, n_boot=n_boot, baselines=BASELINES if baselines else (), refit=refit,
                             leak_check=leak_check, layers=layers)
    s = Store(store)
    if out is None:
        out = os.path.join("results", f"{Path(store).stem}-{s.resolve_key(key)}")
    report = run_probe(s, out, key=key, group_by=group_by, splits_path=splits_path, settings=settings,
                       progress=not quiet)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(summary_header(report))
    click.echo(summary_table(report))
    if report.layers:
        click.echo("layers (chosen per head on validation only):")
        click.echo(fixed_width(layer_table(report.layers)))
        for line in choice_lines(report.layers):
            click.echo(line)
    for line in baseline_lines(report):
        click.echo(line)
    if report.leak_check:
        click.echo(report.leak_check)
    click.echo(f"results in {report.out}/ (splits: {report.out / 'splits.json'}, probes: {report.out}/<head>/probe)")


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--probe", "probe_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A saved probe folder (OUT/<head>/probe from 'embedkit probe').")
@click.option("--encoder", "key", help="Embedding key to use [default: the key made with the probe's encoder configuration].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV to write: id, group, true, pred, p_<class>...")
def predict(store, probe_dir, key, out):
    """Apply a saved probe to the items of a store (refuses embeddings from another encoder configuration)."""
    from ..atomic import atomic_write_csv
    from ..probe import load_probe
    from ..probe.predict import predict_store
    from ..store import Store

    p = load_probe(probe_dir)
    res = predict_store(Store(store), p, key)
    df = res.frame
    atomic_write_csv(out, df)
    counts = df["pred"].value_counts()
    click.echo(f"{len(df)} items of {store} (key {res.key!r}) predicted by {p.name}; wrote {out}")
    click.echo("predicted: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    if p.head == "knn":
        click.echo("note: kNN votes come from the probe's training items; items that were in training find themselves", err=True)


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--probe", "probe_dirs", required=True, multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A saved probe folder; repeat to average an ensemble (several heads or encoders).")
@click.option("--encoder", "key", help="Embedding key for a single probe [default: the one matching its encoder].")
@click.option("--group-by", help="Populations: an item column, a preset or a regex over paths [default: the group column].")
@click.option("--populations", "populations_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV with columns id,population instead (an item may belong to several populations).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for proportions.csv/.json/.png.")
def proportions(store, probe_dirs, key, group_by, populations_csv, out):
    """Estimate the class fractions of each population (image, well, pool) from fitted probes.

    \b
    Three estimates per population: classify-and-count, probability averaging, and the adjusted count
    (classify-and-count corrected with the probe's validation confusion matrix). With labels, prints the
    RMSE of each against the true fractions.
    """
    from ..probe import load_probe
    from ..probe.proportions import METHODS, rmse_table, run_proportions
    from ..store import Store

    probes = [load_probe(d) for d in probe_dirs]
    res = run_proportions(Store(store), probes, key=key, group_by=group_by, populations_csv=populations_csv, out=out)
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    n_pop = res.table["population"].nunique()
    click.echo(f"{n_pop} populations, {len(res.classes)} classes, {len(probes)} probe(s)")
    show = res.table[res.table["method"] == "adjusted_count"].head(10)
    for _, row in show.iterrows():
        fr = ", ".join(f"{c} {row[f'est_{c}']:.2f}" for c in res.classes)
        click.echo(f"  {row['population']} (n={row['n']}): {fr}")
    if n_pop > 10:
        click.echo(f"  ... {n_pop - 10} more" + (f" in {out}/proportions.csv" if out else ""))
    if res.n_with_truth:
        click.echo(rmse_table(res))
    if out:
        click.echo(f"wrote {out}/proportions.csv ({', '.join(METHODS)})")


COMMANDS = [probe, predict, proportions]
