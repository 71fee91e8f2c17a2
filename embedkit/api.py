"""The Python front door (``import embedkit as ek``): one call per stage, each a thin layer over the library.

Every function here does what the command of the same name does, with the same defaults, and returns an
object instead of printing: results, tables as pandas DataFrames, fitted probes. See docs/python.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # imported lazily at run time: `import embedkit` stays light
    import numpy as np
    import pandas as pd

    from .embed import EmbedResult
    from .encoders import Encoder
    from .explain import ExplainResult
    from .finetune import FinetuneResult
    from .probe import Probe, ProbeReport
    from .report import Comparison
    from .segment.pipeline import SegmentResult
    from .store import Store

PathLike = str | os.PathLike


def _store(store: "Store | PathLike") -> "Store":
    from .items import as_store

    return as_store(store)


def _conversion(channels: str | None, percentiles: str | Sequence[float]):
    from .images import make_conversion

    return make_conversion(channels, percentiles)


# --------------------------------------------------------------------------- encoders


def list_encoders(local: bool = False) -> "pd.DataFrame":
    """The encoder registry as a table (name, family, dim, size, pooling, weights); ``local``: weights present only."""
    from .encoders.catalogue import encoder_table

    return encoder_table(local)


def create_encoder(name: str, weights: PathLike | None = None, pooling: str | None = None, *,
                   image_size: int | None = None, pretrained: bool = True) -> "Encoder":
    """Build a frozen encoder by registry name, ``timm:<name>`` or ``hf:<repo|folder>`` (see ``list_encoders``)."""
    from .encoders import create_encoder as build

    return build(name, weights=weights, pooling=pooling, image_size=image_size, pretrained=pretrained)


# --------------------------------------------------------------------------- stages


def embed(source: PathLike | Sequence[PathLike], store: PathLike, encoder: "str | Encoder" = "efficientnet_lite0", *,
          key: str | None = None, group_by: str | None = None, channels: str | None = None,
          percentiles: str | Sequence[float] = "1,99.8", device: str = "auto", batch_size: int = 32,
          workers: int | None = None, dtype: str = "float32", skip_bad: bool = False,
          progress: bool = True, layers: str | Sequence[int] | None = None) -> "EmbedResult":
    """Embed images (class folders, a manifest, files, or the store's own crops) into ``store`` under ``key``.

    ``layers`` ('all', '-1,-2,-4') also stores intermediate layers under ``<key>@block-N`` / ``<key>@stage-N``.
    """
    from .embed import embed as run_embed
    from .sources import discover
    from .store import write_lock

    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    same = len(paths) == 1 and os.path.abspath(paths[0]) == os.path.abspath(store)
    src = str(store) if same else discover([str(p) for p in paths], group_by=group_by)
    with write_lock(store):
        return run_embed(src, store, enc, key=key, conv=_conversion(channels, percentiles), device=device,
                         batch_size=batch_size, workers=workers, dtype=dtype, skip_bad=skip_bad, progress=progress,
                         layers=layers)


def segment(fields: PathLike | Sequence[PathLike], store: PathLike, backend: str = "cellpose", *,
            crop_size: int = 96, mask: bool = False, edge: str = "drop", min_area: int = 15,
            max_area: int | None = None, group_by: str | None = None, channels: str | None = None,
            percentiles: str | Sequence[float] = "1,99.8", progress: bool = True,
            **segmenter: Any) -> "SegmentResult":
    """Cut whole fields into single-cell crops in ``store``; ``segmenter`` keywords go to the backend (diameter, model...)."""
    from .segment.backends import create_segmenter
    from .segment.crops import CropParams
    from .segment.pipeline import segment_fields
    from .sources import discover
    from .store import write_lock

    paths = [fields] if isinstance(fields, (str, os.PathLike)) else list(fields)
    src = discover([str(p) for p in paths], group_by=group_by)
    crop = CropParams(size=crop_size, mask=mask, edge=edge, min_area=min_area, max_area=max_area)
    with write_lock(store):
        seg = create_segmenter(backend, **segmenter)
        return segment_fields(src, store, seg, crop, conv=_conversion(channels, percentiles), progress=progress)


@dataclass
class ProbeResults:
    """What ``ek.probe`` returns: a metrics table, every test prediction, the fitted probes and the raw report."""

    metrics: "pd.DataFrame"
    predictions: "pd.DataFrame"
    probes: dict[str, "Probe"]
    out: Path
    report: "ProbeReport" = field(repr=False)

    @property
    def splits(self) -> Path:
        """The splits file every other encoder or a fine-tune should reuse."""
        return self.out / "splits.json"


def probe(store: "Store | PathLike", key: str | None = None, heads: str | Sequence[str] = "all",
          splits: PathLike | None = None, *, out: PathLike | None = None, group_by: str | None = None,
          progress: bool = True, **settings: Any) -> ProbeResults:
    """Fit and test logreg/svm/kNN probes on group splits (new, or ``splits`` reused).

    ``settings``: ProbeSettings fields (balance, l2, ...) and SplitSpec fields (test_size, folds, seeds, seed)."""
    import pandas as pd

    from .probe import ProbeSettings, run_probe
    from .splits import SplitSpec

    split = SplitSpec(**{k: settings.pop(k) for k in ("test_size", "val_size", "folds", "seeds", "seed") if k in settings})
    s = _store(store)
    out = Path(out) if out is not None else Path("results") / f"{s.path.stem}-{s.resolve_key(key)}"
    rep = run_probe(s, out, key=key, group_by=group_by, splits_path=str(splits) if splits else None,
                    settings=ProbeSettings(heads=heads, split=split, **settings), progress=progress)
    rows, preds = [], []
    for r in rep.results:
        m, ci = r.record["metrics"], r.record["ci"]
        rows.append({"head": r.head, **{k: m[k] for k in ("balanced_accuracy", "accuracy", "macro_f1", "auroc")},
                     "balanced_accuracy_low": ci["balanced_accuracy"][0],
                     "balanced_accuracy_high": ci["balanced_accuracy"][1], "n_test": m["n"],
                     "fit_seconds": r.record["fit_seconds"]})
        preds.append(pd.read_csv(r.folder / "predictions.csv", dtype={"id": str, "group": str, "true": str, "pred": str},
                                 keep_default_na=False).assign(head=r.head))
    return ProbeResults(metrics=pd.DataFrame(rows).set_index("head"), predictions=pd.concat(preds, ignore_index=True),
                        probes={r.head: r.probe for r in rep.results}, out=rep.out, report=rep)


def load_probe(path: PathLike) -> "Probe":
    """Read a saved probe folder (``OUT/<head>/probe``); ``.predict_proba(X)`` takes raw encoder vectors."""
    from .probe import load_probe as read

    return read(path)


def finetune(source: "Store | PathLike", out: PathLike, model: str = "efficientnet_lite0", *,
             splits: PathLike | None = None, group_by: str | None = None, weights: PathLike | None = None,
             pretrained: bool = True, image_size: int | None = None, device: str = "auto", progress: bool = True,
             name: str | None = None, **train: Any) -> "FinetuneResult":
    """Fine-tune a whole network on the probes' splits; ``train`` keywords are TrainConfig fields (epochs, lr, ...)."""
    from .finetune import TrainConfig
    from .finetune import finetune as run_finetune
    from .splits import SplitSpec

    spec = SplitSpec(splits_file=str(splits) if splits else None, group_by=group_by)
    return run_finetune(source, out, model, split_opts=spec, train=TrainConfig(**train), weights=weights,
                        pretrained=pretrained, image_size=image_size, device=device, name=name, progress=progress,
                        log=(lambda _s: None) if not progress else print)


def compare(*results: PathLike, out: PathLike | None = None, pairs: Sequence[tuple[str, str]] = (),
            allow_different_splits: bool = False, n_boot: int = 2000, seed: int = 0) -> "Comparison":
    """One table across probe and fine-tune result folders with paired group-bootstrap tests; writes ``out``."""
    from .report import compare_results

    return compare_results([str(r) for r in results], out=out, pairs=pairs,
                           allow_different_splits=allow_different_splits, n_boot=n_boot, seed=seed)


def explain(model: PathLike, items: Sequence[str] = (), *, out: PathLike, store: "Store | PathLike | None" = None,
            select: str | None = None, n: int | None = None, predictions: PathLike | None = None,
            methods: str | Sequence[str] = ("hirescam",), target: str = "predicted", layer: str | None = None,
            faithfulness: bool = False, device: str = "auto", batch_size: int = 8,
            progress: bool = True) -> "ExplainResult":
    """Class activation maps for a fine-tuned model or a saved linear probe (its encoder is rebuilt)."""
    from .explain import choose_items, load_model
    from .explain import explain as run_explain
    from .items import ItemSet

    s = _store(store) if store is not None else None
    chosen, _ = choose_items(model, list(items), ItemSet.from_store(s) if s is not None else None, select=select, n=n,
                             predictions=predictions)
    return run_explain(load_model(model), chosen, out, methods=methods, target=target, layer=layer, store=s,
                       faithfulness=faithfulness, device=device, batch_size=batch_size, progress=progress)


def neighbors(store: "Store | PathLike", query: str, key: str | None = None, k: int = 12, *,
              exclude_same_group: bool = False, exact: bool = False, device: str = "cpu") -> "pd.DataFrame":
    """The ``k`` most similar items of each query (item id, image file or CSV): query, rank, id, label, group, similarity."""
    from .lookup import find_neighbors

    return find_neighbors(_store(store), query, key, k, exclude_same_group=exclude_same_group, exact=exact,
                          device=device).table


def view(store: PathLike, key: str | None = None, method: str = "tsne", *, progress: bool = False,
         **params: Any) -> "np.ndarray":
    """2-D coordinates [N, 2] of one key (t-SNE, UMAP or PCA), computed once and saved in the store."""
    from .views import make_layout, view_params

    s = _store(store)
    layout = make_layout(s.path, s.resolve_key(key), method, view_params(method, **params), progress=progress)
    return layout.coords


__all__ = ["ProbeResults", "compare", "create_encoder", "embed", "explain", "finetune", "list_encoders", "load_probe",
           "neighbors", "probe", "segment", "view"]
