"""``embedkit compare``: one table across probe and fine-tuning result folders, with paired tests.

Every result folder (``embedkit.results`` format) is read alike. Rows show balanced accuracy, macro-F1
and AUROC with their 95% group-bootstrap CIs, training time and inference throughput. Paired tests
compare two rows on the same test items: a paired group bootstrap of the difference in balanced
accuracy (B - A) and McNemar's test. Results made on different splits are refused unless allowed,
and then flagged in every output. Outputs: comparison.md, .csv, .json, and a self-contained .html.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_path, atomic_write_text
from .errors import EmbedkitError
from .figures import pyplot
from .metrics import holm, mcnemar, paired_bootstrap

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
FIGURES = ("training_curve.png", "confusion.png", "roc.png")


@dataclass
class Result:
    """One result folder: its metrics.json record and its scored predictions."""

    path: Path
    record: dict
    pred: object  # pandas DataFrame of scored rows
    name: str = ""

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.record.get("classes", [])]

    @property
    def fingerprint(self) -> str | None:
        return self.record.get("splits_fingerprint")


@dataclass
class Comparison:
    out: Path
    rows: list[dict]
    pairs: list[dict]
    warnings: list[str]
    markdown: str
    results: list[Result] = field(default_factory=list)


# --------------------------------------------------------------------------- finding and reading results


def find_results(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Result folders named directly (holding metrics.json) or found below the given folders, without duplicates."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / METRICS_FILE).is_file():
            hits = [p]
        else:
            hits = sorted(m.parent for m in p.rglob(METRICS_FILE)
                          if not any(part.startswith(".") for part in m.relative_to(p).parts))
        if not hits:
            raise EmbedkitError(f"{p}: no result folders (none holds {METRICS_FILE}); pass folders written by "
                                f"'embedkit probe' or 'embedkit finetune'")
        found += hits
    unique = list(dict.fromkeys(h.resolve() for h in found))
    return unique


def load_result(path: str | os.PathLike) -> Result:
    """Read a result folder's metrics.json and predictions.csv (scored rows only)."""
    import pandas as pd

    path = Path(path)
    try:
        record = json.loads((path / METRICS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise EmbedkitError(f"{path / METRICS_FILE}: unreadable ({exc})") from None
    if "metrics" not in record or "ci" not in record:
        raise EmbedkitError(f"{path / METRICS_FILE}: not an embedkit result (no metrics/ci); written by another tool?")
    pred_path = path / PREDICTIONS_FILE
    if not pred_path.exists():
        raise EmbedkitError(f"{pred_path}: missing; paired tests need each result's predictions")
    pred = pd.read_csv(pred_path, dtype={"id": str, "group": str, "true": str, "pred": str}, keep_default_na=False)
    missing = {"id", "group", "true", "pred", "run"} - set(pred.columns)
    if missing:
        raise EmbedkitError(f"{pred_path}: missing columns {', '.join(sorted(missing))}")
    pred["run"] = pred["run"].astype(str)
    return Result(path, record, pred[pred["true"] != ""].reset_index(drop=True))


def _name_results(results: list[Result]) -> None:
    """Row names: the recorded name, else the folder name; made unique with the folder path when needed."""
    base = [str(r.record.get("name") or r.path.name) for r in results]
    for r, b in zip(results, base):
        r.name = b if base.count(b) == 1 else f"{b} ({r.path.parent.name}/{r.path.name})"
    names = [r.name for r in results]
    for r in results:
        if names.count(r.name) > 1:
            r.name = f"{r.name} [{r.path}]"


def check_splits_match(results: list[Result], allow: bool) -> list[str]:
    """Refuse results scored on different (or unrecorded) splits unless ``allow``; return the warning to print."""
    fps = {r.name: r.fingerprint for r in results}
    distinct = {fp for fp in fps.values()}
    if len(distinct) <= 1 and None not in distinct:
        return []
    by_fp: dict[str, list[str]] = {}
    for n, fp in fps.items():
        by_fp.setdefault(fp or "none recorded", []).append(n)
    detail = "; ".join(f"{fp}: {', '.join(ns[:3])}{' ...' if len(ns) > 3 else ''}" for fp, ns in by_fp.items())
    if not allow:
        raise EmbedkitError(f"these results were not made on the same splits ({detail}); a fair comparison needs "
                            f"identical splits: re-run with --splits <one>/splits.json, or pass --allow-different-splits")
    return [f"WARNING: results made on different splits ({len(by_fp)} split sets: {detail}). Differences mix "
            f"model and split effects; paired tests use only the test items two results share."]


# --------------------------------------------------------------------------- table


def _ci(record: dict, metric: str) -> tuple[float, float, float]:
    v = record["metrics"].get(metric, float("nan"))
    lo, hi = (record.get("ci", {}).get(metric) or [float("nan"), float("nan")])[:2]
    return float(v), float(lo), float(hi)


def summary_rows(results: list[Result]) -> list[dict]:
    """One dict per result, sorted by balanced accuracy (best first)."""
    rows = []
    for r in results:
        rec = r.record
        row = {"name": r.name, "path": str(r.path), "kind": "baseline" if rec.get("baseline") else rec.get("kind", ""), "encoder": rec.get("encoder", ""),
               "head": rec.get("head", ""), "model": rec.get("model", ""), "n_test": int(rec["metrics"].get("n", len(r.pred))),
               "n_test_groups": rec.get("n_test_groups"), "n_runs": len(rec.get("runs", {})) or 1,
               "splits_fingerprint": r.fingerprint or ""}
        for m in ("balanced_accuracy", "macro_f1", "auroc", "accuracy"):
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = _ci(rec, m)
        row["fit_seconds"] = rec.get("fit_seconds")
        row["predict_items_per_second"] = rec.get("predict_items_per_second")
        rows.append(row)
    rows.sort(key=lambda x: -np.nan_to_num(x["balanced_accuracy"], nan=-1))
    return rows


# --------------------------------------------------------------------------- paired tests


def _one_per_id(pred, classes: list[str]):
    """Collapse several runs per item into one prediction (argmax of the mean probabilities)."""
    cols = [f"p_{c}" for c in classes]
    if not pred["id"].duplicated().any():
        return pred.set_index("id")[["group", "true", "pred"]], False
    if not all(c in pred.columns for c in cols):
        raise EmbedkitError("predictions with several runs per item need their p_<class> columns to be paired")
    mean = pred.groupby("id", sort=False)[cols].mean()
    first = pred.groupby("id", sort=False)[["group", "true"]].first()
    first["pred"] = [classes[i] for i in mean.to_numpy().argmax(axis=1)]
    return first, True


def align(a: Result, b: Result) -> dict:
    """Match two results' predictions on the same test items.

    Rows pair on (item, run) when both hold the same items and runs (e.g. the same folds); otherwise each
    result is reduced to one prediction per item (mean probability over its runs) and items are matched.
    """
    keys_a = set(zip(a.pred["id"], a.pred["run"]))
    keys_b = set(zip(b.pred["id"], b.pred["run"]))
    note = ""
    if keys_a == keys_b:
        left = a.pred.set_index(["id", "run"])[["group", "true", "pred"]]
        right = b.pred.set_index(["id", "run"])[["true", "pred"]]
    else:
        left, avg_a = _one_per_id(a.pred, a.classes)
        right, avg_b = _one_per_id(b.pred, b.classes)
        right = right[["true", "pred"]]
        if avg_a or avg_b:
            note = "runs averaged per item"
    merged = left.join(right, how="inner", lsuffix="_a", rsuffix="_b")
    if len(merged) and (merged["true_a"] != merged["true_b"]).any():
        bad = merged.index[merged["true_a"] != merged["true_b"]][0]
        raise EmbedkitError(f"{a.name} and {b.name} disagree on the true label of item {bad!r}; were they made on the same data?")
    n_a = len(set(a.pred["id"]))
    n_b = len(set(b.pred["id"]))
    n_common = len(set(merged.index.get_level_values(0)))
    if n_common and (n_common < n_a or n_common < n_b):
        note = "; ".join(filter(None, [note, f"only {n_common} of {n_a}/{n_b} test items shared"]))
    return {"frame": merged, "note": note}


def paired_test(a: Result, b: Result, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """B - A in balanced accuracy with a paired group-bootstrap CI, and McNemar's test, on shared test items."""
    al = align(a, b)
    m = al["frame"]
    out = {"a": a.name, "b": b.name, "n_paired": int(len(m)), "note": al["note"]}
    if len(m) == 0:
        out["note"] = "no test items in common: cannot pair"
        return out
    classes = sorted(set(m["true_a"]) | set(m["pred_a"]) | set(m["pred_b"]))
    idx = {c: i for i, c in enumerate(classes)}
    y = m["true_a"].map(idx).to_numpy()
    pa = m["pred_a"].map(idx).to_numpy()
    pb = m["pred_b"].map(idx).to_numpy()
    boot = paired_bootstrap(y, pa, pb, m["group"].to_numpy(), len(classes), n_boot=n_boot, seed=seed)
    mc = mcnemar(y, pa, pb)
    out.update({"n_groups": int(m["group"].nunique()), "diff_balanced_accuracy": boot["diff_balanced_accuracy"],
                "ci": boot["ci"], "p_boot": boot["p_boot"], "mcnemar": mc})
    return out


def _pick(results: list[Result], key: str) -> Result:
    """A result by row name, folder path or folder name."""
    p = Path(key)
    hits = [r for r in results if r.name == key]
    hits = hits or [r for r in results if p.exists() and r.path == p.resolve()]
    hits = hits or [r for r in results if r.path.name == key or str(r.record.get("name")) == key]
    if len(hits) != 1:
        what = "matches several results" if hits else "matches no result"
        raise EmbedkitError(f"--pair {key!r} {what}; use a row name or folder: {', '.join(r.name for r in results)}")
    return hits[0]


# --------------------------------------------------------------------------- rendering


def _fmt_ci(v: float, lo: float, hi: float) -> str:
    if v is None or np.isnan(v):
        return "n/a"
    if np.isnan(lo):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_seconds(s) -> str:
    if s is None:
        return "n/a"
    s = float(s)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _fmt_rate(r) -> str:
    if r is None:
        return "n/a"
    r = float(r)
    return f"{r:,.0f}/s" if r >= 10 else f"{r:.2f}/s"


def _fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


TABLE_HEAD = ["#", "result", "kind", "encoder / model", "head", "test items", "balanced accuracy [95% CI]",
              "macro-F1 [95% CI]", "AUROC [95% CI]", "training time", "inference"]
PAIR_HEAD = ["A", "B", "paired items (groups)", "Δ balanced accuracy B − A [95% CI]", "p (group bootstrap)",
             "McNemar: only A right / only B right", "McNemar p (items, ignores groups)", "note"]


def table_cells(rows: list[dict]) -> list[list[str]]:
    return [[str(i + 1), r["name"], r["kind"], r["encoder"] or r["model"], r["head"], str(r["n_test"]),
             _fmt_ci(r["balanced_accuracy"], r["balanced_accuracy_lo"], r["balanced_accuracy_hi"]),
             _fmt_ci(r["macro_f1"], r["macro_f1_lo"], r["macro_f1_hi"]),
             _fmt_ci(r["auroc"], r["auroc_lo"], r["auroc_hi"]),
             _fmt_seconds(r["fit_seconds"]), _fmt_rate(r["predict_items_per_second"])] for i, r in enumerate(rows)]


def pair_cells(pairs: list[dict]) -> list[list[str]]:
    out = []
    for p in pairs:
        if "ci" not in p:
            out.append([p["a"], p["b"], "0", "n/a", "n/a", "n/a", "n/a", p["note"]])
            continue
        mc = p["mcnemar"]
        out.append([p["a"], p["b"], f"{p['n_paired']} ({p['n_groups']})",
                    f"{p['diff_balanced_accuracy']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]",
                    _fmt_p(p["p_holm"]) + " (Holm)" if "p_holm" in p else _fmt_p(p["p_boot"]),
                    f"{mc['a_only_correct']} / {mc['b_only_correct']}", _fmt_p(mc["p_value"]), p["note"]])
    return out


def _md_table(head: list[str], cells: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]


def render_markdown(rows: list[dict], pairs: list[dict], warnings: list[str]) -> str:
    lines = ["# Comparison", ""]
    lines += [f"> **{w}**" for w in warnings] + ([""] if warnings else [])
    fps = sorted({r["splits_fingerprint"] for r in rows if r["splits_fingerprint"]})
    lines.append(f"Splits fingerprint: {', '.join(fps) or 'not recorded'}. 95% CIs resample whole test groups; "
                 f"training time is wall time of fitting; inference is items per second as each result measured it.")
    lines += [""] + _md_table(TABLE_HEAD, table_cells(rows))
    if pairs:
        lines += ["", "## Paired tests on the same test items", "",
                  "Δ is B − A; its CI and p come from a paired bootstrap over test groups (the default test: cells of one "
                  "group are not independent). When every row is tested against the best row, p is Holm-adjusted. "
                  "McNemar counts single items, so it overstates significance; it is shown for reference.", ""]
        lines += _md_table(PAIR_HEAD, pair_cells(pairs))
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def forest_plot(rows: list[dict]) -> str:
    """Balanced accuracy with 95% CIs per row, as a base64 PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        color = "C1" if r["kind"] == "finetune" else "C0"
        v, lo, hi = r["balanced_accuracy"], r["balanced_accuracy_lo"], r["balanced_accuracy_hi"]
        err = None if np.isnan(lo) else [[v - lo], [hi - v]]
        ax.errorbar([v], [y], xerr=err, fmt="o", color=color, capsize=3)
    ax.set_yticks(ys, [r["name"] for r in rows], fontsize=8)
    ax.set_xlabel("balanced accuracy (95% group-bootstrap CI); orange: fine-tuned")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def pairs_plot(pairs: list[dict]) -> str:
    """Paired differences B − A with 95% CIs, as a base64 PNG."""
    plt = pyplot()
    ok = [p for p in pairs if "ci" in p]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(ok) + 1.2))
    ys = np.arange(len(ok))[::-1]
    for y, p in zip(ys, ok):
        d, (lo, hi) = p["diff_balanced_accuracy"], p["ci"]
        color = "C2" if lo > 0 else ("C3" if hi < 0 else "0.4")
        ax.errorbar([d], [y], xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(ys, [f"{p['b']} − {p['a']}" for p in ok], fontsize=8)
    ax.set_xlabel("Δ balanced accuracy, B − A (95% paired group-bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.warn{background:#fff3cd;border:1px solid #e0b000;padding:8px 12px;font-weight:600}
img{max-width:100%}details{margin:0.5em 0}summary{cursor:pointer;font-weight:600}.figs img{max-width:32%;vertical-align:top}
.note{color:#555;font-size:13px}"""


def _html_table(head: list[str], cells: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(rows: list[dict], pairs: list[dict], warnings: list[str], results: list[Result]) -> str:
    """A single HTML file with every plot embedded as base64: no external files or network needed."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>embedkit comparison</title>",
             f"<style>{_CSS}</style></head><body><h1>Comparison</h1>"]
    parts += [f"<p class='warn'>{html.escape(w)}</p>" for w in warnings]
    fps = sorted({r["splits_fingerprint"] for r in rows if r["splits_fingerprint"]})
    parts.append(f"<p class='note'>Splits fingerprint: {html.escape(', '.join(fps) or 'not recorded')}. "
                 "95% CIs resample whole test groups.</p>")
    parts.append(_html_table(TABLE_HEAD, table_cells(rows)))
    parts.append(f"<img alt='balanced accuracy with 95% CIs' src='data:image/png;base64,{forest_plot(rows)}'>")
    if pairs:
        parts.append("<h2>Paired tests on the same test items</h2><p class='note'>Δ is B − A; CI from a paired "
                     "bootstrap over test groups; McNemar counts items only one of the two got right.</p>")
        parts.append(_html_table(PAIR_HEAD, pair_cells(pairs)))
        if any("ci" in p for p in pairs):
            parts.append(f"<img alt='paired differences' src='data:image/png;base64,{pairs_plot(pairs)}'>")
    parts.append("<h2>Each result</h2>")
    by_name = {r.name: r for r in results}
    for row in rows:
        r = by_name[row["name"]]
        figs = "".join(f"<img alt='{f}' src='data:image/png;base64,{base64.b64encode((r.path / f).read_bytes()).decode()}'>"
                       for f in FIGURES if (r.path / f).exists())
        parts.append(f"<details><summary>{html.escape(r.name)}</summary><p class='note'>{html.escape(str(r.path))}</p>"
                     f"<div class='figs'>{figs}</div></details>")
    parts.append("</body></html>")
    return "".join(parts)


def _default_out(paths: Sequence[str | os.PathLike]) -> Path:
    if len(paths) == 1 and not (Path(paths[0]) / METRICS_FILE).exists():
        return Path(paths[0]) / "comparison"
    return Path("comparison")


def compare_results(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None,
                    pairs: Sequence[tuple[str, str]] = (), allow_different_splits: bool = False, n_boot: int = 2000,
                    seed: int = 0) -> Comparison:
    """Read result folders, check their splits, tabulate them, run paired tests and write all outputs.

    Without ``pairs``, every row is paired against the best row (A = best, B = the row).
    """
    results = [load_result(p) for p in find_results(paths)]
    _name_results(results)
    warnings = check_splits_match(results, allow_different_splits)
    rows = summary_rows(results)
    by_name = {r.name: r for r in results}
    if pairs:
        chosen = [(_pick(results, a), _pick(results, b)) for a, b in pairs]
    else:
        best = by_name[rows[0]["name"]]
        chosen = [(best, by_name[r["name"]]) for r in rows[1:]]
    tests = [paired_test(a, b, n_boot=n_boot, seed=seed) for a, b in chosen]
    tested = [t for t in tests if "p_boot" in t]
    for t, p in zip(tested, holm([t["p_boot"] for t in tested]) if not pairs else [t["p_boot"] for t in tested]):
        t["p_holm" if not pairs else "p_adjusted_none"] = p
    md = render_markdown(rows, tests, warnings)
    dest = Path(out) if out is not None else _default_out(paths)
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest / "comparison.md", md)
    _write_csv(dest / "comparison.csv", rows, warnings)
    atomic_write_text(dest / "comparison.json", json.dumps({"warnings": warnings, "rows": rows, "pairs": tests}, indent=1,
                                                           default=float))
    atomic_write_text(dest / "comparison.html", render_html(rows, tests, warnings, results))
    return Comparison(dest, rows, tests, warnings, md, results)


def _write_csv(path: Path, rows: list[dict], warnings: list[str]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    df["warning"] = " ".join(warnings)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
