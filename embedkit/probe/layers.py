"""``probe --layers best``: every layer key of an encoder (``<key>@block-N`` / ``<key>@stage-N``, from ``embed
--layers``) is probed on the probe's own splits, and for each head the layer is chosen on validation only.

A layer's validation score is the mean over runs of the validation balanced accuracy at its chosen
hyper-parameters; test items never take part in the choice. Every layer's test score is still reported, and
the chosen layer is compared with the plain key (the encoder's usual output) on the same test items.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_write_text
from ..encoders.layers import layer_siblings, split_layer_key
from ..errors import EmbedkitError
from ..results import json_text

if TYPE_CHECKING:
    from .evaluate import HeadResult, ProbeReport, ProbeSettings

CHOICES = ("best",)


def parse_layer_choice(spec: str | None) -> str | None:
    """None (probe the one key) or 'best' (every layer key, chosen on validation)."""
    if spec is None or not str(spec).strip():
        return None
    value = str(spec).strip().lower()
    if value not in CHOICES:
        raise EmbedkitError(f"--layers {spec!r}: probe takes --layers best (every layer key of the encoder, the layer "
                            f"chosen on validation); pick layers to store with 'embedkit embed --layers'")
    return value


@dataclass
class LayerRow:
    """One layer's probe: its name, store key and one result per head."""

    layer: str
    key: str
    results: list["HeadResult"]

    def val_score(self, head: str) -> float:
        """Mean over runs of the validation balanced accuracy at the chosen hyper-parameters."""
        r = next(r for r in self.results if r.head == head)
        return float(np.mean([run["val_balanced_accuracy"] for run in r.record["hyperparameters_per_run"]]))

    def test_record(self, head: str) -> dict:
        return next(r for r in self.results if r.head == head).record

    def folder(self, head: str):
        return next(r for r in self.results if r.head == head).folder


@dataclass
class LayerChoice:
    rows: list[LayerRow]
    chosen: dict[str, str]  # head -> layer name
    comparisons: list[dict] = field(default_factory=list)  # chosen layer − plain key, per head (paired, group CI)

    def row(self, layer: str) -> LayerRow:
        return next(r for r in self.rows if r.layer == layer)


def layer_candidates(store, key: str) -> list[tuple[str, str]]:
    """(layer name, store key) of the plain key and each of its layer keys; refuse a key without layer keys."""
    base = split_layer_key(key)[0]
    siblings = layer_siblings(store.keys, base)
    if not siblings:
        raise EmbedkitError(f"key {base!r} has no layer keys ({base}@block-N or {base}@stage-N); store them first with "
                            f"'embedkit embed ... --key {base} --layers all'")
    plain = str(store.config(siblings[0]).get("layer", {}).get("plain_key_is", ""))
    plain_name = plain if plain.startswith(("block-", "stage-")) else "final"
    return [(plain_name, base)] + [(str(split_layer_key(k)[1]), k) for k in siblings]


def probe_layers(report: "ProbeReport", settings: "ProbeSettings", group_by: str | None, progress: bool) -> LayerChoice:
    """Probe every layer key on ``report``'s splits (``OUT/layers/<layer>/<head>/``) and choose per head on validation."""
    from ..baselines.anchoring import compare_rows
    from .evaluate import run_probe

    data = report.data
    candidates = layer_candidates(data.store, data.key)
    rows = [LayerRow(candidates[0][0], data.key, report.results)]
    sub = replace(settings, baselines=(), leak_check=False, layers=None, split=replace(settings.split, seeds=None, folds=None))
    for name, key in candidates[1:]:
        rep = run_probe(data.store, report.out / "layers" / name, key=key, group_by=group_by,
                        splits_path=str(report.out / "splits.json"), settings=sub, progress=progress)
        for r in rep.results:
            atomic_write_text(r.folder / "metrics.json", json_text(r.record | {"layer": name, "layer_of": data.key}))
        rows.append(LayerRow(name, key, rep.results))
    heads = [r.head for r in report.results]
    chosen = {h: max(rows, key=lambda row: row.val_score(h)).layer for h in heads}  # ties keep the earlier row
    choice = LayerChoice(rows, chosen)
    for h in heads:
        best = choice.row(chosen[h])
        if best.key != data.key:
            choice.comparisons += [c | {"head": h} for c in compare_rows(
                [(f"{best.layer}/{h}", best.folder(h))], [(f"{rows[0].layer}/{h}", rows[0].folder(h))], report.classes,
                n_boot=settings.n_boot)]
    atomic_write_text(report.out / "layers.json", json_text(choice_record(choice)))
    return choice


def choice_record(choice: LayerChoice) -> dict:
    """layers.json: every layer's validation and test scores per head, the chosen layers and the paired differences."""
    heads = list(choice.chosen)
    return {"selected_on": "validation only (mean over runs of balanced accuracy at the chosen hyper-parameters)",
            "chosen": choice.chosen,
            "layers": [{"layer": row.layer, "key": row.key,
                        "heads": {h: {"val_balanced_accuracy": row.val_score(h),
                                      "test_balanced_accuracy": row.test_record(h)["metrics"]["balanced_accuracy"],
                                      "test_ci": row.test_record(h)["ci"].get("balanced_accuracy")} for h in heads}}
                       for row in choice.rows],
            "chosen_minus_plain": choice.comparisons}


def layer_table(choice: LayerChoice) -> list[list[str]]:
    """Header plus one row per layer and head: validation score, test score [CI], and which layer was chosen."""
    rows = [["layer", "key", "head", "val balanced acc", "test balanced acc [95% CI]", "chosen"]]
    for row in choice.rows:
        for h, picked in choice.chosen.items():
            rec = row.test_record(h)
            ci = rec["ci"].get("balanced_accuracy", [float("nan")] * 2)
            rows.append([row.layer, row.key, h, f"{row.val_score(h):.3f}",
                         f"{rec['metrics']['balanced_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
                         "<- chosen on validation" if picked == row.layer else ""])
    return rows


def choice_lines(choice: LayerChoice) -> list[str]:
    """One sentence per head: which layer validation chose, and how it compares with the plain key on test."""
    out = []
    plain = choice.rows[0]
    for h, layer in choice.chosen.items():
        row = choice.row(layer)
        line = (f"{h}: validation chose {layer} ({row.key}, val {row.val_score(h):.3f}); test balanced accuracy "
                f"{row.test_record(h)['metrics']['balanced_accuracy']:.3f}")
        c = next((c for c in choice.comparisons if c["head"] == h), None)
        if c is None:
            line += f", the plain key {plain.key} itself"
        else:
            lo, hi = c["ci"]
            line += (f"; {layer} − {plain.layer} ({plain.key}) = {c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] on the same test "
                     f"items (group-paired bootstrap p {c['p']:.2g})")
        out.append(line)
    return out
