"""``embedkit patches`` as a library call: fields -> sliding windows -> empty filter -> (GMM labels) -> store.

Finished fields go into the run's shards and one commit stitches them, like segmentation. Labels from a paired channel are
assigned at commit, after the mixture is fitted on every patch of the run (or taken from saved thresholds).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from ..formats.lazy import is_large_field
from ..formats.tiled_patches import large_field_patches
from .. import store as st
from ..engines.local import LocalEngine
from ..errors import BadImageError, EmbedkitError
from ..images import Conversion, read_image, to_uint8
from ..sources import Item, Source
from . import outputs, storeio
from .fields import Field, load_field
from .filters import LearnedFilter, SimpleFilter, decide
from .gmm_labels import GmmThresholds, fit_thresholds, plot_thresholds
from .patches import cut_patches, patch_offsets, window_means
from .pipeline import fail_or_record, sidecar

RUN_KIND = "patches"
PATCH_COLUMNS = ("offset", "foreground", "std", "filter_score", "paired_mean")


@dataclass(frozen=True)
class PairedChannel:
    """Where a field's paired fluorescence plane is: a channel of the field, or of a file named by a
    path substitution (``replace``) or by a manifest column (``column``)."""

    channel: int = 0
    replace: tuple[str, str] | None = None
    column: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["replace"] = None if self.replace is None else list(self.replace)
        return d

    def path(self, source: Source, item: Item) -> str:
        if self.column:
            rel = item.meta.get(self.column, "")
            if not rel:
                raise BadImageError(source.abspath(item), f"manifest column {self.column!r} gives no paired image")
            return os.path.join(source.root, rel)
        if self.replace:
            old, new = self.replace
            if old not in item.path:
                raise BadImageError(source.abspath(item), f"--paired-replace: {old!r} does not occur in its path")
            return os.path.join(source.root, item.path.replace(old, new))
        return source.abspath(item)

    def plane(self, source: Source, item: Item, raw: np.ndarray) -> np.ndarray:
        """The paired plane in raw intensity units (float64), the same size as the field."""
        path = self.path(source, item)
        arr = raw if path == source.abspath(item) else read_image(path)
        if self.channel >= arr.shape[2]:
            raise BadImageError(path, f"has {arr.shape[2]} channel(s) but the paired channel is {self.channel}")
        if arr.shape[:2] != raw.shape[:2]:
            raise BadImageError(path, f"paired image is {arr.shape[:2]}, the field {raw.shape[:2]}")
        return arr[:, :, self.channel].astype(np.float64)


def paired_from_options(channel: int | None, replace: str | None, column: str | None) -> PairedChannel | None:
    """The paired plane from the CLI options (--paired-channel, --paired-replace OLD=NEW, --paired-column); None if none."""
    if replace is not None and column is not None:
        raise EmbedkitError("give at most one of --paired-replace and --paired-column")
    if channel is None and replace is None and column is None:
        return None
    pair = None
    if replace is not None:
        old, sep, new = replace.partition("=")
        if not sep or not old:
            raise EmbedkitError(f"--paired-replace {replace!r}: write it as OLD=NEW, e.g. _BF=_PI")
        pair = (old, new)
    return PairedChannel(channel=channel or 0, replace=pair, column=column)


@dataclass
class PatchResult:
    store: str
    n_fields: int
    n_resumed: int
    n_windows: int = 0
    n_empty: int = 0
    n_written: int = 0
    n_ambiguous: int = 0
    thresholds: GmmThresholds | None = None
    thresholds_path: str | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)
    report: str | None = None
    seconds: float = 0.0


def run_config(size: int, stride: int, conv: Conversion, filt, paired: PairedChannel | None,
               gmm: GmmThresholds | None, classes: tuple[str, str]) -> dict:
    return {"patches": {"size": size, "stride": stride}, "conversion": conv.to_dict(),
            "filter": filt.config if filt is not None else {"filter": "none"},
            "paired": None if paired is None else paired.to_dict(),
            "gmm": None if paired is None else {"classes": list(classes), "thresholds": gmm.to_dict() if gmm else "fit"}}


def extract_patches(source: Source, store_path: str | os.PathLike, *, size: int = 224, stride: int = 112,
                    conv: Conversion = Conversion(), filt: SimpleFilter | LearnedFilter | None = SimpleFilter(),
                    paired: PairedChannel | None = None, thresholds: GmmThresholds | None = None,
                    classes: tuple[str, str] = ("live", "dead"), thresholds_out: str | None = None,
                    device: str = "auto", batch_size: int = 32, skip_bad: bool = False, progress: bool = True,
                    report_path: str | None = None, checkpoint_fields: int | None = None, engine=None) -> PatchResult:
    """Cut every field of ``source`` into patches in the store (resuming an interrupted run).

    ``engine``: None works here; a :class:`~embedkit.engines.ray_engine.RayEngine` loads fields in Ray tasks and
    cuts and filters them in its actor pool, each worker writing shards of the same run (``checkpoint_fields``
    fields per shard), committed here."""
    store_path = str(store_path)
    t0 = time.perf_counter()
    if size < 8 or stride < 1:
        raise EmbedkitError(f"--size {size} / --stride {stride}: patches need size >= 8 and stride >= 1")
    config = run_config(size, stride, conv, filt, paired, thresholds, classes)
    res = PatchResult(store_path, len(source.items), 0)
    with st.write_lock(store_path):
        in_store = storeio.finished_fields(store_path, "patches", config)
        # labelling happens at commit, so a run may resume with other GMM settings (e.g. after a failed fit)
        run = storeio.open_run(store_path, RUN_KIND, {k: v for k, v in config.items() if k != "gmm"})
        done = storeio.done_fields(run)
        todo = [(k, it) for k, it in enumerate(source.items) if it.id not in in_store and it.id not in done]
        res.n_resumed = len(source.items) - len(todo)
        where = Source(source.root, [], source.kind)  # what a worker needs of the source: its root
        _, res.failed = (engine or LocalEngine()).map_fields(
            todo, PatchLoader(where, conv, paired),
            PatchCutter(where, size, stride, conv, filt, paired, device, batch_size, skip_bad), run, desc="patches",
            device=device if isinstance(filt, LearnedFilter) else "cpu", fields_per_block=checkpoint_fields,
            progress=progress, total=len(source.items), initial=res.n_resumed)
        done = storeio.done_fields(run)
        new_fields = [it.id for it in source.items if it.id in done and it.id not in in_store]
        attrs = {}
        if paired is not None:
            thresholds = thresholds or _stored_thresholds(store_path)
            if thresholds is None and new_fields:
                cache: dict = {}
                values = np.concatenate([storeio.field_rows(done[f], ["paired_mean"], cache)["paired_mean"] for f in new_fields])
                thresholds = fit_thresholds(values, classes)
                out = thresholds_out or sidecar(store_path, ".gmm.json")
                res.thresholds_path = str(thresholds.save(out))
                if len(values):
                    plot_thresholds(values, thresholds, os.path.splitext(out)[0] + ".png")
            if thresholds is not None:
                attrs["gmm_thresholds"] = thresholds.to_dict()
            res.thresholds = thresholds
        if res.failed:
            res.report = str(outputs.write_failures(report_path or sidecar(store_path, ".patches-failed.csv"), res.failed))
        if new_fields or res.failed or not os.path.exists(store_path):
            storeio.commit(store_path, run, "patches", config, source.root,
                           _batches(source, done, new_fields, store_path, res, thresholds, size),
                           (size, size, 3), new_fields, res.failed, attrs)
        else:
            run.finish()
    res.seconds = time.perf_counter() - t0
    return res


def _stored_thresholds(store_path: str) -> GmmThresholds | None:
    d = storeio.run_attr(store_path, "gmm_thresholds")
    if d is None:
        return None
    return GmmThresholds.from_dict(d)


@dataclass(frozen=True)
class PatchLoader:
    """Loads one field and its paired plane where fields are decoded (this process, or a Ray task)."""

    source: Source
    conv: Conversion
    paired: PairedChannel | None

    def __call__(self, k: int, item: Item) -> tuple[Field, np.ndarray | None] | None:
        path = self.source.abspath(item)
        if is_large_field(path):  # read tile by tile where it is cut, never whole
            return None
        fld = load_field(path, self.conv)
        return fld, self.paired.plane(self.source, item, fld.raw) if self.paired is not None else None


@dataclass
class PatchCutter:
    """Cuts and filters one loaded field into the run's shards where the filter lives (this process, or a Ray actor)."""

    source: Source
    size: int
    stride: int
    conv: Conversion
    filt: SimpleFilter | LearnedFilter | None
    paired: PairedChannel | None
    device: str
    batch_size: int
    skip_bad: bool

    def __call__(self, k: int, item: Item, loaded, shards: storeio.FieldShards, failed: list) -> None:
        _one_field(self.source, k, item, self.size, self.stride, self.conv, self.filt, self.paired, shards, self.device,
                   self.batch_size, self.skip_bad, failed, loaded)


def _one_field(source: Source, k: int, item: Item, size: int, stride: int, conv: Conversion, filt,
               paired: PairedChannel | None, shards: storeio.FieldShards, device: str, batch_size: int, skip_bad: bool,
               failed: list, loaded: tuple[Field, np.ndarray | None] | BadImageError | None) -> None:
    """Cut and filter one field loaded by :class:`PatchLoader` (None for a large field, read here tile by tile)."""
    path = source.abspath(item)
    if is_large_field(path):  # read tile by tile with bounded memory (embedkit.formats.tiled_patches)
        try:
            got = large_field_patches(path, size, stride, conv=conv, filt=filt, paired=paired, device=device,
                                      batch_size=batch_size)
        except BadImageError as exc:
            fail_or_record(exc.path, exc.reason, skip_bad, failed)
            return
        shards.add(k, item.id, {"n_windows": int(got.pop("n_windows")[0])}, got)
        return
    if isinstance(loaded, BadImageError):
        fail_or_record(loaded.path, loaded.reason, skip_bad, failed)
        return
    fld, plane = loaded
    rgb = to_uint8(fld.rgb)
    offsets = patch_offsets(fld.shape, size, stride)
    patches = cut_patches(rgb, offsets, size)
    background = float(np.median(SimpleFilter.gray(rgb[None])[0]))
    fg, sd, score, keep = decide(filt, patches, background, device, batch_size)
    means = window_means(plane, offsets[keep], size) if plane is not None else np.full(int(keep.sum()), np.nan)
    shards.add(k, item.id, {"n_windows": len(patches)},
               {"offset": offsets[keep], "foreground": fg[keep], "std": sd[keep], "filter_score": score[keep],
                "paired_mean": means.astype(np.float64), "pixels": patches[keep]})


def _batches(source: Source, done: dict[str, storeio.FieldRef], fields: list[str], store_path: str, res: PatchResult,
             thresholds: GmmThresholds | None, size: int) -> Iterator[storeio.Batch]:
    by_id = {it.id: it for it in source.items}
    stored = storeio.path_writer(store_path, source.root)
    cache: dict = {}
    for fid in fields:
        it, ref = by_id[fid], done[fid]
        c = storeio.field_rows(ref, PATCH_COLUMNS, cache)
        n = ref.count
        res.n_windows += ref.info["n_windows"]
        res.n_empty += ref.info["n_windows"] - n
        labels = np.array([it.label] * n, dtype=object)
        keep = np.ones(n, bool)
        if thresholds is not None:
            labels = thresholds.assign(c["paired_mean"])
            keep = labels != ""
            res.n_ambiguous += int((~keep).sum())
        res.n_written += int(keep.sum())
        off = c["offset"][keep].astype(np.int32)
        if not len(off):
            continue
        rel = stored(it.path)
        items = [Item(id=f"{it.id}@{y},{x}", path=it.path, label=str(lab), group=it.group, meta=dict(it.meta))
                 for (y, x), lab in zip(off, labels[keep])]
        columns = {"source": np.array([rel] * len(off), dtype=object), "offset": off,
                   "bbox": np.concatenate([off, off + size], axis=1).astype(np.int32),
                   "foreground": c["foreground"][keep], "std": c["std"][keep], "filter_score": c["filter_score"][keep],
                   "paired_mean": c["paired_mean"][keep].astype(np.float32)}
        yield items, columns, ref.shard, ref.start + np.flatnonzero(keep)
