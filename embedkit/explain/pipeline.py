"""The ``explain`` run: items -> model input -> CAMs per method -> maps, overlays, grid, faithfulness.

Output folder::

    overlays/<item>.png            the image and one overlay per method, titled true / predicted (score)
    maps/<item>.<method>.npy       the map on the image's own pixels, float32 in [0, 1] (normalised per map)
    maps/<item>.<method>.grid.npy  the map at the layer's resolution, unnormalised (comparable across images)
    grid.png                       every image and its maps in one figure
    items.csv, explain.json        per-item predictions; provenance (model, layer, methods, preprocessing)
    faithfulness.csv/.png          with --faithfulness: deletion/insertion AUC per method, 95% CIs, curves
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..atomic import atomic_path, atomic_write_json
from ..device import resolve_device
from ..embed import to_tensor
from ..store import now_iso
from . import faithfulness as fa
from .cams import GRADIENT_FREE, compute_cam, parse_methods
from ..items import Item, ItemSet
from .models import ExplainModel
from .render import Panel, faithfulness_figure, grid_figure, overlay_figure
from .reshape import TokensToGrid, to_image_geometry, token_layout
from .targets import resolve_layer, trace_layers

if TYPE_CHECKING:
    from ..store import Store

GRID_PIXELS = 192  # longest side of an image in the grid figure


@dataclass
class ExplainResult:
    """What a run wrote and found."""

    out_dir: Path
    layer: str
    methods: list[str]
    items: list[dict] = field(default_factory=list)
    faithfulness: list[dict] | None = None
    empty_maps: list[tuple[str, str]] = field(default_factory=list)


def safe_names(ids: Sequence[str]) -> list[str]:
    """File-name-safe, unique stems for item ids ('Anaphase/cell 1.png' -> 'Anaphase_cell_1')."""
    out, used = [], set()
    for i in ids:
        stem = re.sub(r"\.(png|jpe?g|tiff?|bmp)$", "", str(i), flags=re.I)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[-120:] or "item"
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        out.append(name)
    return out


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def _save_csv(path: Path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _thumb(img: np.ndarray) -> np.ndarray:
    """Shrink an image or map so its longest side is at most GRID_PIXELS (grid figures stay small)."""
    h, w = img.shape[:2]
    s = max(h, w)
    if s <= GRID_PIXELS:
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if img.ndim == 3 else t[None, None]
    size = (max(1, round(h * GRID_PIXELS / s)), max(1, round(w * GRID_PIXELS / s)))
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return (t.permute(1, 2, 0) if img.ndim == 3 else t[0]).clamp(0, 1).numpy()


def explain(model: ExplainModel, items: ItemSet | Sequence[Item], out_dir: str | os.PathLike, *,
            methods: str | Sequence[str] = ("hirescam",), target: str = "predicted", layer: str | None = None,
            store: Store | None = None, faithfulness: bool = False, steps: int = 20, device: str = "cpu",
            batch_size: int = 8, progress: bool = True, seed: int = 0, title: str | None = None) -> ExplainResult:
    """Explain ``items`` with each method; write maps, overlays, the grid and (optionally) faithfulness scores.

    Items with a store ``row`` read their pixels from ``store`` (its crops, or the file it lists); the others
    from their image files.
    """
    from tqdm.auto import tqdm

    from ..errors import EmbedkitError

    methods = parse_methods(methods)
    if not len(items):
        raise EmbedkitError("nothing to explain: no items given or selected")
    if not isinstance(items, ItemSet):
        items = ItemSet.from_items(items, store)
    fixed_target = None if target == "predicted" else model.class_index(target)
    dev = resolve_device(device)
    model.to(dev)
    names = safe_names(list(items.ids))
    layout = token_layout(model.backbone, model.num_prefix_tokens)
    reshape = TokensToGrid(layout) if layout is not None else None
    result = ExplainResult(Path(out_dir), "", methods)
    panels: list[Panel] = []
    faith = _Faithfulness() if faithfulness else None
    first = to_tensor(items.rgb(0, model.conversion), model.preprocess)[None].to(dev)
    result.layer, module = resolve_layer(model, layer, trace_layers(model, first))
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(items), unit="img", desc=f"explain {','.join(methods)}", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        for start in range(0, len(items), batch_size):
            batch = [items.item(i) for i in range(start, min(start + batch_size, len(items)))]
            rgbs = [items.rgb(i, model.conversion) for i in range(start, start + len(batch))]
            x = torch.stack([to_tensor(rgb, model.preprocess) for rgb in rgbs]).to(dev)
            with torch.no_grad():
                proba = torch.softmax(model.net(x).float(), dim=1).cpu().numpy()
            preds = proba.argmax(axis=1)
            targets = preds if fixed_target is None else np.full(len(batch), fixed_target)
            cams = {m: compute_cam(model.net, x, m, module, targets.tolist(), reshape) for m in methods}
            for k, (it, rgb) in enumerate(zip(batch, rgbs)):
                panel = Panel(it.id, rgb, it.label, model.classes[preds[k]], float(proba[k, preds[k]]),
                              model.classes[targets[k]], {}, float(proba[k, targets[k]]))
                panels.append(_write_item(out, names[start + k], it, panel, {m: (c.maps[k], c.grid[k]) for m, c in cams.items()},
                                          model, result))
                if faith is not None:
                    maps = {m: c.maps[k] for m, c in cams.items()}
                    maps[fa.RANDOM] = fa.random_saliency(tuple(x.shape[-2:]), cams[methods[0]].grid.shape[1:], seed + start + k)
                    faith.score(model, x[k:k + 1], maps, int(targets[k]), it, steps, seed + start + k)
            bar.update(len(batch))
    finally:
        bar.close()
    grid_title = title or f"{', '.join(methods)} at layer {result.layer} of {model.describe()}"
    grid_figure(panels, methods, grid_title, out / "grid.png")
    _write_items_csv(out / "items.csv", result.items)
    if faith is not None:
        result.faithfulness = fa.summarize(faith.rows, seed=seed)
        _write_faithfulness(out, faith.rows, result.faithfulness)
        faithfulness_figure(faith.fractions, {m: {k: np.stack(v) for k, v in c.items()} for m, c in faith.curves.items()},
                            out / "faithfulness.png")
    atomic_write_json(out / "explain.json", _provenance(model, result, target, steps if faithfulness else None))
    return result


def _write_item(out: Path, name: str, it: Item, panel: Panel, cams: dict[str, tuple[np.ndarray, np.ndarray]],
                model: ExplainModel, result: ExplainResult) -> Panel:
    """Save one item's maps (image-size and grid) and overlay, record its row; return its grid-sized panel."""
    for m, (cam, grid) in cams.items():
        panel.maps[m] = np.clip(to_image_geometry(cam, panel.rgb.shape[:2], model.preprocess), 0, 1).astype(np.float32)
        _save_npy(out / "maps" / f"{name}.{m}.npy", panel.maps[m])
        _save_npy(out / "maps" / f"{name}.{m}.grid.npy", grid.astype(np.float32))
        if float(grid.max()) <= 0:
            result.empty_maps.append((it.id, m))
    overlay_figure(panel, result.layer, out / "overlays" / f"{name}.png")
    result.items.append({"id": it.id, "group": it.group, "true": it.label, "pred": panel.pred, "score": panel.score,
                         "target": panel.target, "target_score": panel.target_score, "recorded_pred": it.meta.get("recorded_pred", ""),
                         "overlay": f"overlays/{name}.png", **{f"map_{m}": f"maps/{name}.{m}.npy" for m in cams}})
    return replace(panel, rgb=_thumb(panel.rgb), maps={m: _thumb(v) for m, v in panel.maps.items()})


@dataclass
class _Faithfulness:
    """Deletion/insertion results accumulated over a run."""

    rows: list[dict] = field(default_factory=list)
    curves: dict[str, dict[str, list]] = field(default_factory=dict)
    fractions: np.ndarray | None = None

    def score(self, model: ExplainModel, x: torch.Tensor, maps: dict[str, np.ndarray], target: int, it: Item,
              steps: int, seed: int) -> None:
        for m, sal in maps.items():
            c = fa.deletion_insertion(model.net, x, sal, target, model.preprocess, steps=steps, seed=seed)
            self.fractions = c.fractions
            self.rows.append({"id": it.id, "group": it.group or it.id, "method": m, "deletion": c.deletion_auc,
                              "insertion": c.insertion_auc})
            self.curves.setdefault(m, {"deletion": [], "insertion": []})
            self.curves[m]["deletion"].append(c.deletion)
            self.curves[m]["insertion"].append(c.insertion)


def _write_items_csv(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    _save_csv(path, pd.DataFrame(rows))


def _write_faithfulness(out: Path, rows: list[dict], summary: list[dict]) -> None:
    import pandas as pd

    per_item = pd.DataFrame(rows)
    per_item["insertion_minus_deletion"] = per_item["insertion"] - per_item["deletion"]
    _save_csv(out / "faithfulness_items.csv", per_item)
    flat = []
    for rec in summary:
        row = {"method": rec["method"], "n_images": rec["n_images"], "n_groups": rec["n_groups"]}
        for key in ("deletion", "insertion", "insertion_minus_deletion", "vs_random"):
            if key in rec:
                row[key] = rec[key]
                row[f"{key}_ci_low"], row[f"{key}_ci_high"] = rec[f"{key}_ci"]
        flat.append(row)
    _save_csv(out / "faithfulness.csv", pd.DataFrame(flat))


def _provenance(model: ExplainModel, result: ExplainResult, target: str, steps: int | None) -> dict:
    import pytorch_grad_cam  # noqa: F401  (its version is recorded below)
    from importlib.metadata import version

    from .. import __version__

    return {
        "created": now_iso(),
        "embedkit_version": __version__,
        "grad_cam_version": version("grad-cam"),
        "model": {"kind": model.kind, "source": model.source, "classes": model.classes, **model.info},
        "preprocess": model.preprocess.to_dict(),
        "conversion": model.conversion.to_dict(),
        "layer": result.layer,
        "methods": result.methods,
        "class_agnostic_methods": [m for m in result.methods if m == "eigencam"],
        "gradient_free_methods": [m for m in result.methods if m in GRADIENT_FREE],
        "target": target,
        "n_items": len(result.items),
        "empty_maps": [list(e) for e in result.empty_maps],
        "faithfulness": None if result.faithfulness is None else {
            "metric": "deletion (to black) and insertion (from blur) AUC of the target-class probability",
            "steps": steps, "ci": "95% bootstrap over groups", "methods": result.faithfulness},
    }
