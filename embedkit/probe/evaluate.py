"""``embedkit probe`` as a function: splits, one fit per head and run, result folders, saved probes.

Every run fits on its train part, picks hyper-parameters on its val part and is scored on its test part;
items without a label are predicted by every run and never scored. Each head gets one result folder
(``OUT/<head>/``: metrics.json, predictions.csv, confusion.png, roc.png, summary.md, probe/), and the
splits are saved as ``OUT/splits.json`` so that other encoders and fine-tuning reuse the same items.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from ..atomic import atomic_write_text
from ..baselines import BASELINES
from ..errors import EmbedkitError
from ..items import as_store
from ..results import predictions_frame, write_results
from ..splits import PARTS, Fold, Splits, SplitSpec, check_splits, load_or_make_splits
from .data import ProbeData, load_probe_data
from ..balance import normalise_balance
from .diagnostics import search_notes
from .features import Preprocessor, balance, threads_for
from .heads import FitInput, HeadOptions, class_vote_weights, fit_head, solver_device
from .layers import choice_lines, layer_candidates, layer_table, parse_layer_choice, probe_layers
from .saved import HEADS, Probe

if TYPE_CHECKING:
    from ..baselines.anchoring import Anchoring
    from .layers import LayerChoice


DEFAULT_SEEDS = 5  # probe's repeated grouped splits when neither --seeds, --folds nor --splits says otherwise
REFITS = ("train", "trainval")


def parse_heads(spec: str | Sequence[str]) -> list[str]:
    """'all', or a comma list of logreg, svm, knn (order kept, duplicates dropped)."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise EmbedkitError(f"no heads given; choose from {', '.join(HEADS)} or all")
    out: list[str] = []
    for n in names:
        expanded = list(HEADS) if n == "all" else [n]
        for h in expanded:
            if h not in HEADS:
                raise EmbedkitError(f"unknown head {h!r}; choose from {', '.join(HEADS)} or all")
            if h not in out:
                out.append(h)
    return out


@dataclass
class ProbeSettings:
    """Everything that shapes a probe run besides the store and the output folder."""

    heads: Sequence[str] = HEADS
    balance: str = "weights"
    standardise: bool = True
    l2: bool = False
    pca_whiten: bool = False
    pca_dim: int | None = None
    split: SplitSpec = field(default_factory=SplitSpec)
    classes: Sequence[str] | None = None
    head_options: HeadOptions = field(default_factory=HeadOptions)
    n_boot: int = 1000
    baselines: Sequence[str] = BASELINES  # random-init, handcrafted, prior (embedkit.baselines), as the CLI
    refit: str = "train"  # "trainval": refit on train + val with the chosen hyper-parameters before the test
    leak_check: bool = True  # when the groups look unsafe, a bounded copy check (embedkit.leaks.auto_leak_check)
    layers: str | None = None  # "best": probe every layer key of the encoder, choose per head on validation (probe.layers)

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(standardise=self.standardise, l2=self.l2, pca_whiten=self.pca_whiten, pca_dim=self.pca_dim)


@dataclass
class HeadResult:
    head: str
    folder: Path
    record: dict
    probe: Probe  # the run-0 probe, saved under folder/probe


@dataclass
class ProbeReport:
    data: ProbeData
    classes: list[str]
    splits: Splits
    run_names: list[str]
    results: list[HeadResult]
    notes: list[str]
    out: Path
    anchoring: "Anchoring | None" = None  # baseline rows and paired differences (embedkit.baselines.anchoring)
    leak_check: str = ""  # the automatic leak check's verdict line; '' when the grouping looked safe or it was off
    layers: "LayerChoice | None" = None  # every layer's scores and the layer chosen on validation (--layers best)


# --------------------------------------------------------------------------- labels and splits


def _classes(data: ProbeData, wanted: Sequence[str] | None) -> tuple[list[str], np.ndarray, list[str]]:
    """The probe's classes and which items take part in fitting/scoring (labelled, in those classes)."""
    labelled = data.labels != ""
    if not labelled.any():
        raise EmbedkitError(f"{data.store_path}: no item under key {data.key!r} has a label; probes need labels "
                            f"(class folders, or a 'label' column in the manifest)")
    present = sorted(set(data.labels[labelled]))
    notes = []
    if wanted:
        unknown = [c for c in wanted if c not in present]
        if unknown:
            raise EmbedkitError(f"class(es) {', '.join(map(repr, unknown))} have no labelled items with vectors "
                                f"under {data.key!r} (classes here: {', '.join(present)})")
        classes = sorted(set(wanted))
        dropped = int((labelled & ~np.isin(data.labels, classes)).sum())
        if dropped:
            notes.append(f"{dropped} labelled items of other classes are left out (--classes)")
    else:
        classes = present
    if len(classes) < 2:
        raise EmbedkitError(f"only one class ({classes[0]!r}) among the labelled items; a probe needs at least two")
    return classes, np.isin(data.labels, classes), notes


def _make_runs(data: ProbeData, use: np.ndarray, s: ProbeSettings) -> tuple[Splits, list[str]]:
    splits, names = load_or_make_splits(data.ids[use], data.labels[use], data.groups[use], s.split, data.group_by)
    splits.meta.update({"n_labelled": int(use.sum()), "store": data.store_path})
    return splits, names


def _load_runs(spec: SplitSpec, data: ProbeData, use: np.ndarray, notes: list[str]) -> tuple[Splits, list[str]]:
    path = spec.splits_file
    splits, names = load_or_make_splits(data.ids[use], data.labels[use], data.groups[use], spec, data.group_by)
    all_ids = set(map(str, data.store.ids))
    have = set(data.ids)
    for k, f in enumerate(splits.folds):
        for part in PARTS:
            lacking = [i for i in f.part(part) if i in all_ids and i not in have]
            if lacking:
                raise EmbedkitError(f"{path}: {len(lacking)} items of fold {k} ({lacking[0]!r}, ...) have no vectors "
                                    f"under {data.key!r}; finish 'embedkit embed' so every encoder sees the same items")
    check_splits(splits, dict(zip(data.ids, data.groups)))
    if splits.group_by != data.group_by:
        notes.append(f"splits were made grouping by {splits.group_by!r}; checked for leaks under {data.group_by!r} too")
    keep = set(data.ids[use])
    dropped = 0
    folds = []
    for f in splits.folds:
        parts = {p: [i for i in f.part(p) if i in keep] for p in PARTS}
        dropped += sum(len(f.part(p)) - len(parts[p]) for p in PARTS)
        folds.append(Fold(**parts))
    if dropped:
        notes.append(f"{dropped} split entries are unlabelled or outside the chosen classes and are left out")
    return Splits(folds, group_by=splits.group_by, seed=splits.seed, meta=splits.meta), list(names)


def _check_classes_in_train(splits: Splits, names: list[str], label_of: dict, classes: list[str],
                            groups_of_class: dict) -> None:
    for fold, name in zip(splits.folds, names):
        empty = [p for p in PARTS if not fold.part(p)]
        if empty:
            raise EmbedkitError(f"run {name} has no {' or '.join(empty)} items among the chosen classes; "
                                f"use splits made for these classes, or more groups")
        in_train = {label_of[i] for i in fold.train}
        missing = [c for c in classes if c not in in_train]
        if missing:
            c = missing[0]
            raise EmbedkitError(f"class {c!r} has no training items in run {name} (its items come from "
                                f"{groups_of_class[c]} group(s); whole groups go to one part). Each class needs items "
                                f"in at least 3 groups: add data, or leave it out with --classes")


# --------------------------------------------------------------------------- the run


def run_probe(store, out: str | os.PathLike, *, key: str | None = None,
              group_by: str | None = None, splits_path: str | None = None, settings: ProbeSettings | None = None,
              progress: bool = True) -> ProbeReport:
    """Fit and evaluate every requested head on every run; write result folders and saved probes to ``out``.

    ``store`` is a :class:`~embedkit.store.Store` or the path of one (opened once, here).
    """
    s = settings or ProbeSettings()
    heads = parse_heads(s.heads)
    s = replace(s, balance=normalise_balance(s.balance))
    if splits_path:
        s = replace(s, split=replace(s.split, splits_file=str(splits_path)))
    s = replace(s, split=s.split.repeated(DEFAULT_SEEDS))
    if s.refit not in REFITS:
        raise EmbedkitError(f"unknown refit {s.refit!r}; choose from {', '.join(REFITS)}")
    s = replace(s, layers=parse_layer_choice(s.layers))
    store = as_store(store)
    if s.layers:  # the plain key is probed first; its layer keys follow on the same splits
        key = layer_candidates(store, store.resolve_key(key))[0][1]
    data = load_probe_data(store, key, group_by)
    notes = list(data.notes)
    classes, use, class_notes = _classes(data, s.classes)
    notes += class_notes
    if s.split.splits_file:
        splits, names = _load_runs(s.split, data, use, notes)
    else:
        splits, names = _make_runs(data, use, s)
    label_of = dict(zip(data.ids, data.labels))
    groups_of_class = {c: len(set(data.groups[use & (data.labels == c)])) for c in classes}
    _check_classes_in_train(splits, names, label_of, classes, groups_of_class)
    notes += check_splits(splits, dict(zip(data.ids, data.groups)), label_of)
    leak_line = _leak_check(data, splits, progress) if s.leak_check else ""
    # load only what any run needs: its split items plus the unlabelled items (predicted, never scored)
    pos_of = {i: p for p, i in enumerate(data.ids)}
    needed = sorted({pos_of[i] for f in splits.folds for p in PARTS for i in f.part(p)}
                    | set(np.flatnonzero(data.labels == "").tolist()))
    needed = np.asarray(needed, dtype=np.int64)
    x = data.vectors(needed)  # refuses NaN rows before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits.save(out / "splits.json")
    local = {int(p): j for j, p in enumerate(needed)}
    class_index = {c: k for k, c in enumerate(classes)}
    y = np.array([class_index.get(data.labels[p], -1) for p in needed], dtype=np.int64)
    unlabelled = np.array([local[p] for p in np.flatnonzero(data.labels == "")], dtype=np.int64)

    def at(ids: Sequence[str]) -> np.ndarray:
        return np.array([local[pos_of[i]] for i in ids], dtype=np.int64)

    total_steps = len(heads) * len(names)
    bar = _progress(total_steps, progress)
    per_head: dict[str, dict] = {h: {"frames": [], "fit": [], "pred_items": 0, "pred_seconds": 0.0, "chosen": [],
                                     "probe": None} for h in heads}
    for r, (fold, name) in enumerate(zip(splits.folds, names)):
        train, val, test = at(fold.train), at(fold.val), at(fold.test)
        with threads_for(len(train) * x.shape[1]):
            _run_heads(r, name, fold, train, val, test, unlabelled, x, y, data, needed, classes, heads, splits, s,
                       per_head, bar)
    bar.close()

    results = []
    for head in heads:
        h = per_head[head]
        folder = out / head
        info = _info(data, head, splits, h, s, names)
        record = write_results(folder, pd.concat(h["frames"], ignore_index=True), classes, info, n_boot=s.n_boot,
                               title=f"{data.key} / {head}")
        h["probe"].save(folder / "probe")
        results.append(HeadResult(head=head, folder=folder, record=record, probe=h["probe"]))
    notes += search_notes(results)
    report = ProbeReport(data=data, classes=classes, splits=splits, run_names=names, results=results, notes=notes, out=out,
                         leak_check=leak_line)
    if s.layers:
        report.layers = probe_layers(report, s, group_by, progress)
    if s.baselines:
        from ..baselines.anchoring import score_baselines

        report.anchoring = score_baselines(report, s, s.baselines, group_by, device=s.head_options.device, progress=progress)
        notes += report.anchoring.notes
    atomic_write_text(out / "summary.md", summary_markdown(report))
    return report


def _leak_check(data: ProbeData, splits: Splits, progress: bool) -> str:
    """The verdict line of the automatic leak check, run only when the groups look unsafe (else '')."""
    from ..leaks import auto_leak_check

    verdict = auto_leak_check(data.store, data.key, splits, dict(zip(data.ids, data.groups)), progress=progress)
    return "" if verdict is None else verdict.line


def _run_heads(r: int, name: str, fold: Fold, train: np.ndarray, val: np.ndarray, test: np.ndarray,
               unlabelled: np.ndarray, x: np.ndarray, y: np.ndarray, data: ProbeData, needed: np.ndarray,
               classes: list[str], heads: list[str], splits: Splits, s: ProbeSettings, per_head: dict, bar) -> None:
    """Fit every head on one run (train/val/test positions into ``x``) and collect its test predictions."""
    t0 = time.perf_counter()
    pre = s.preprocessor().fit(x, train)
    pre_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(s.split.seed + r)
    bal_pos, bal_w = balance(y[train], s.balance, rng)
    fit_input = FitInput(x=x, y=y, train=train[bal_pos], train_weight=bal_w, val=val, classes=classes,
                         class_vote_weight=class_vote_weights(y[train], len(classes), s.balance))
    for head in heads:
        bar.set_description(f"{head} {name}")
        t0 = time.perf_counter()
        probe = fit_head(head, fit_input, pre, s.head_options, progress=bar.set_postfix_str)
        if s.refit == "trainval":
            probe = _refit_trainval(head, probe, x, y, train, val, classes, s, rng)
        fit_seconds = time.perf_counter() - t0 + pre_seconds
        _stamp(probe, data, splits, name, s, len(train) + (len(val) if s.refit == "trainval" else 0), fold.val)
        targets = np.concatenate([test, unlabelled])
        t0 = time.perf_counter()
        proba = probe.predict_proba(x, targets)
        h = per_head[head]
        h["pred_seconds"] += time.perf_counter() - t0
        h["pred_items"] += len(targets)
        h["fit"].append(fit_seconds)
        h["chosen"].append({"run": name, **_chosen(probe)})
        true = [classes[k] for k in y[test]] + [""] * len(unlabelled)
        h["frames"].append(predictions_frame(list(fold.test) + list(data.ids[needed[unlabelled]]),
                                             list(data.groups[needed[targets]]), true, proba, classes, run=name))
        if r == 0:
            h["probe"] = probe
        bar.update(1)


def _refit_trainval(head: str, chosen: Probe, x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray,
                    classes: list[str], s: ProbeSettings, rng: np.random.Generator) -> Probe:
    """Refit ``head`` on train + val with the hyper-parameters chosen on val (DINOv2's protocol), before the test.

    The calibration temperature and the validation record stay those of the selection fit: val is training data now.
    """
    both = np.concatenate([train, val])
    pre = s.preprocessor().fit(x, both)
    pos, weight = balance(y[both], s.balance, rng)
    fixed = {"k_grid": (int(chosen.params["k"]),)} if head == "knn" else {"c_grid": (float(chosen.params["C"]),)}
    fit = FitInput(x=x, y=y, train=both[pos], train_weight=weight, val=val, classes=classes,
                   class_vote_weight=class_vote_weights(y[both], len(classes), s.balance))
    probe = fit_head(head, fit, pre, replace(s.head_options, **fixed))
    refit_search = probe.params.get("search") or []
    probe.calibration = chosen.calibration
    probe.validation = chosen.validation
    probe.arrays.update({k: chosen.arrays[k] for k in ("val_proba", "val_labels")})
    probe.params.update({"search": chosen.params.get("search"), "refit": "train+val",
                         "refit_converged": all(r.get("converged", True) for r in refit_search)})
    return probe


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="fit", leave=False)


def _chosen(probe: Probe) -> dict:
    if probe.head == "knn":
        return {"k": int(probe.params["k"]), "temperature": float(probe.params["temperature"]),
                "val_balanced_accuracy": probe.validation.get("balanced_accuracy")}
    out = {"C": float(probe.params["C"])}
    out["val_balanced_accuracy"] = probe.validation.get("balanced_accuracy")
    if probe.calibration.get("method") == "temperature":
        out["temperature"] = float(probe.calibration["temperature"])
    search = probe.params.get("search") or []
    out["converged"] = all(r.get("converged", True) for r in search if r.get("C") == out["C"]) \
        and probe.params.get("refit_converged", True)
    out["not_converged_C"] = [float(r["C"]) for r in search if r.get("converged") is False]
    return out


def _stamp(probe: Probe, data: ProbeData, splits: Splits, run: str, s: ProbeSettings, n_train: int,
           val_ids: Sequence[str]) -> None:
    """Provenance a saved probe carries: encoder configuration, splits, run, balance."""
    from ..store import fingerprint

    probe.encoder_key = data.key
    probe.encoder_config = data.config
    probe.config_fingerprint = data.config_fingerprint
    probe.validation["ids_fingerprint"] = fingerprint(list(val_ids))  # val_proba rows follow this order
    probe.provenance.update({"store": os.path.abspath(data.store_path), "run": run, "group_by": data.group_by,
                             "splits_fingerprint": splits.fingerprint(), "balance": s.balance, "n_train": n_train})


def _info(data: ProbeData, head: str, splits: Splits, h: dict, s: ProbeSettings, names: list[str]) -> dict:
    probe: Probe = h["probe"]
    opts = s.head_options
    grid = {"C": [float(c) for c in opts.c_grid]} if head != "knn" else \
        {"k": [int(k) for k in opts.k_grid], "temperature": opts.temperature}
    return {
        "kind": "probe",
        "name": f"{data.key}/{head}",
        "encoder": data.key,
        "encoder_name": data.config.get("encoder", ""),
        "encoder_config_fingerprint": data.config_fingerprint,
        "head": head,
        "store": os.path.abspath(data.store_path),
        "splits_fingerprint": splits.fingerprint(),
        "group_by": data.group_by,
        "run_names": names,
        "fit_seconds": float(np.mean(h["fit"])),
        "fit_seconds_per_run": [round(float(t), 4) for t in h["fit"]],
        "predict_items_per_second": h["pred_items"] / h["pred_seconds"] if h["pred_seconds"] > 0 else None,
        "hyperparameters": h["chosen"][0] | {"selected_on": "validation (balanced accuracy, ties: log-loss)"},
        "hyperparameters_per_run": h["chosen"],
        "search_grid": grid,
        "validation_search": probe.params.get("search"),
        "preprocessing": s.preprocessor().flags,
        "balance": s.balance,
        "refit": "train+val" if s.refit == "trainval" else "train only",
        "single_split_quick_look": s.split.single_quick_look,
        "calibration": probe.calibration,
        "device": str(solver_device(opts.device)) if head != "knn" else "faiss",
        "saved_probe": "probe (fitted on run " + names[0] + ")",
    }


# --------------------------------------------------------------------------- summaries


def _chosen_text(r: HeadResult) -> str:
    per_run = r.record["hyperparameters_per_run"]
    key = "k" if r.head == "knn" else "C"
    values = sorted({run[key] for run in per_run})
    shown = ",".join(f"{v:g}" for v in values[:4]) + ("..." if len(values) > 4 else "")
    bad = sum(1 for run in per_run if run.get("converged") is False)
    return f"{key}={shown}" + (f" NOT CONVERGED ({bad}/{len(per_run)} runs)" if bad else "")


def summary_rows(report: ProbeReport) -> list[list[str]]:
    """Header plus one row per head; a mean ± sd column appears when there are several runs."""
    several = len(report.run_names) > 1
    first = "balanced acc, mean of runs [95% CI]" if several else "balanced acc [95% CI]"
    rows = [["head", first] + (["sd over runs"] if several else [])
            + ["macro-F1", "AUROC", "chosen", "fit s", "items/s"]]
    named = [(r.head, r.record, _chosen_text(r)) for r in report.results]
    if report.anchoring:
        named += [(f"baseline {b.name}" + ("" if b.name == "prior" else " (logreg)"), b.record,
                   "majority" if b.name == "prior" else _chosen_text(b)) for b in report.anchoring.rows]
    for name, rec, chosen in named:
        m, ci, ar = rec["metrics"], rec["ci"], rec["across_runs"]
        bci = ci.get("balanced_accuracy", [float("nan")] * 2)
        rows.append([name, f"{m['balanced_accuracy']:.3f} [{bci[0]:.3f}, {bci[1]:.3f}]"]
                    + ([f"± {ar['balanced_accuracy']['sd']:.3f}"] if several else [])
                    + [f"{m['macro_f1']:.3f}", f"{m['auroc']:.3f}", chosen, f"{rec['fit_seconds']:.2f}",
                       f"{rec['predict_items_per_second'] or 0:,.0f}"])
    return rows


def baseline_lines(report: ProbeReport) -> list[str]:
    """The paired-difference table (encoder − baseline) and one plain sentence per baseline for the best head."""
    from ..baselines.anchoring import difference_table, verdict

    a = report.anchoring
    if not a or not a.comparisons:
        return []
    lines = ["paired differences in balanced accuracy (encoder − baseline) on the same test items, 95% CI resampling "
             "whole groups; p: group-paired bootstrap, Holm-adjusted over this table",
             fixed_width(difference_table(a))]
    best = max(report.results, key=lambda r: r.record["metrics"]["balanced_accuracy"])
    lines += [verdict(c) for c in a.comparisons if c["encoder"] == f"{report.data.key}/{best.head}"]
    return lines


def fixed_width(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns, for the terminal."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def summary_header(report: ProbeReport) -> str:
    d = report.data
    first = report.results[0].record if report.results else {}
    n_lab = len(set(i for f in report.splits.folds for p in PARTS for i in f.part(p)))
    runs = len(report.run_names)
    tested = f"test {first.get('metrics', {}).get('n', 0)} items" + (f" over {runs} runs" if runs > 1 else "")
    how = (f"mean of {runs} runs; 95% CIs resample whole test groups within each run, pooled over runs (split-to-split "
           f"and group variance)") if runs > 1 else "95% CIs resample whole test groups"
    quick = ("SINGLE-SPLIT QUICK LOOK (--seeds 1): one split can mislead; drop --seeds 1 for 5 repeated splits. "
             if first.get("single_split_quick_look") else "")
    refit = "; refit on train+val before the test" if first.get("refit") == "train+val" else ""
    return (f"{quick}probe {d.key} on {d.store_path}: {n_lab} labelled items in {len(report.classes)} classes, groups by "
            f"{d.group_by!r}; {tested}, from {first.get('n_test_groups', 0)} groups; {how}{refit}")


def summary_table(report: ProbeReport) -> str:
    """Fixed-width table of every head's headline numbers, for the terminal."""
    return fixed_width(summary_rows(report))


def summary_markdown(report: ProbeReport) -> str:
    rows = summary_rows(report)
    lines = [f"# Probes: {report.data.key}", "", summary_header(report), "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += ["", "Hyper-parameters were chosen on the validation part only. Per-head details: "
              + ", ".join(f"[{r.head}]({r.head}/summary.md)" for r in report.results) + "."]
    if report.layers:
        lines += ["", "## Layers", "", "Every layer key probed on the same splits; the layer is chosen per head on the "
                  "validation parts only (test items take no part in the choice).", ""]
        table = layer_table(report.layers)
        lines += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        lines += [""] + [f"- {ln}" for ln in choice_lines(report.layers)]
    extra = baseline_lines(report)
    if extra:
        lines += ["", "## Baselines", "", extra[0] + ".", "", "```", extra[1], "```", ""] + [f"- {v}" for v in extra[2:]]
    if report.leak_check:
        lines += ["", "## Leak check", "", report.leak_check]
    if report.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"
