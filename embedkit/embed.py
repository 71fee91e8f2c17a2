"""The embedding engine: source -> DataLoader (parallel decode) -> frozen encoder -> vector shards -> store.

Progress is the set of shards a run has written beside the store (see :mod:`embedkit.store.runs`), so an
interrupted run (even ``kill -9``) resumes where it stopped and ends with the same vectors as an
uninterrupted one.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import store as st
from .configdiff import describe_differences
from .store.schema import upgrade_message
from .store.writing import append_items, commit_embedding
from .device import autocast, resolve_device, worker_init
from .encoders import Encoder, Preprocess
from .errors import BadImageError, EmbedkitError
from .images import Conversion, load_rgb
from .selftest import preprocess_selftest, recheck_run
from .sources import Source


def to_tensor(rgb: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """RGB float [0, 1] (H, W, 3) -> normalised [3, S, S] tensor (pad to square, antialiased resize)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    h, w = x.shape[1:]
    if pre.resize == "pad" and h != w:
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        x = F.pad(x, (left, s - w - left, top, s - h - top))
    if x.shape[1] != pre.size or x.shape[2] != pre.size:
        mode = pre.interpolation if pre.interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
        kw = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        x = F.interpolate(x[None], size=(pre.size, pre.size), mode=mode, **kw)[0]
        if mode == "bicubic":
            x = x.clamp_(0.0, 1.0)
    mean = torch.tensor(pre.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre.std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def embed_images(encoder: Encoder, images: Sequence[str | np.ndarray], conv: Conversion = Conversion(),
                 device: str = "cpu", batch_size: int = 32) -> np.ndarray:
    """Embed a few image files or raw (H, W, C) arrays in memory (queries, notebooks); returns [N, D] float32."""
    from .images import to_rgb

    dev = resolve_device(device)
    model = encoder.to(dev).eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            batch = [to_tensor(load_rgb(im, conv) if isinstance(im, (str, os.PathLike)) else to_rgb(np.asarray(im), conv),
                               encoder.preprocess) for im in images[s:s + batch_size]]
            out.append(model(torch.stack(batch).to(dev)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes files (or store pixels) into encoder-ready tensors; a bad file yields its error instead."""

    def __init__(self, entries: Sequence[tuple[str, str]], pre: Preprocess, conv: Conversion,
                 store_path: str | None = None, store_rows: Sequence[int] | None = None):
        self.entries = list(entries)  # (item id, absolute path)
        self.pre, self.conv = pre, conv
        self.store_path, self.store_rows = store_path, store_rows
        self._store: st.Store | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def _rgb(self, i: int) -> np.ndarray:
        if self.store_path is None:
            return load_rgb(self.entries[i][1], self.conv)
        from .images import to_rgb

        if self._store is None:  # opened lazily, in the worker process that reads
            self._store = st.Store(self.store_path)
        return to_rgb(self._store.pixels(int(self.store_rows[i])), self.conv, self.entries[i][1])

    def __getitem__(self, i: int):
        item_id = self.entries[i][0]
        try:
            return item_id, to_tensor(self._rgb(i), self.pre), None
        except BadImageError as exc:
            return item_id, None, exc.reason


def collate(batch):
    ids = [b[0] for b in batch]
    good = [b for b in batch if b[1] is not None]
    bad = [(b[0], b[2]) for b in batch if b[1] is None]
    x = torch.stack([b[1] for b in good]) if good else None
    return ids, [b[0] for b in good], x, bad


@dataclass
class EmbedResult:
    store: str
    key: str
    n_items: int
    n_embedded: int
    n_resumed: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    report: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.n_embedded / self.seconds if self.seconds > 0 else 0.0


def run_config(encoder: Encoder, conv: Conversion, dtype: str) -> dict:
    cfg = dict(encoder.config)
    cfg["conversion"] = conv.to_dict()
    cfg["dtype"] = dtype
    return cfg


def embed(source: Source | str, store_path: str | os.PathLike, encoder: Encoder, *, key: str | None = None,
          conv: Conversion = Conversion(), device: str = "auto", batch_size: int = 32, workers: int | None = None,
          dtype: str = "float32", skip_bad: bool = False, checkpoint_rows: int = 1024, progress: bool = True,
          report_path: str | None = None) -> EmbedResult:
    """Embed every item of ``source`` (or a store's own pixels when ``source`` is the store path) into the store.

    Every check that can refuse the run happens before anything is written. Progress is the set of vector
    shards the run has written; re-running after an interruption resumes from them.
    """
    store_path = str(store_path)
    key = st.validate_key(key or st.key_for(encoder.spec.name))
    cfg = run_config(encoder, conv, dtype)
    cfg_fp = st.fingerprint(st.comparable_config(cfg))
    dev = resolve_device(device)
    t0 = time.perf_counter()
    cfg["selftest"] = preprocess_selftest(encoder, conv, dev)  # refuses a broken transform before anything is written
    with st.write_lock(store_path):
        s = _open_for_writing(store_path)
        from_store = isinstance(source, str)
        if from_store:
            if os.path.abspath(source) != os.path.abspath(store_path):
                raise EmbedkitError("to embed a store's pixels, pass the same store as SOURCE and --store")
            if s is None or not s.has_pixels:
                raise EmbedkitError(f"{store_path} holds no pixels; embed from the image files instead")
            new_items = []
            entries = [(i, f"{store_path}[{r}]") for r, i in enumerate(s.ids)]
        else:
            new_items = _new_items(source, s, skip_bad)
            entries = [(it.id, source.abspath(it)) for it in source.items]
        done = None
        if s is not None and key in s.keys:
            old = s.config(key)
            if st.fingerprint(st.comparable_config(old)) != cfg_fp:
                raise EmbedkitError(st.config_mismatch_message(key, old, cfg))
            done = s.done(key)
        run = st.Run(store_path, "embed", key)
        run.start({"config": cfg, "batch_size": batch_size}, cfg_fp, lambda a, b: describe_differences(a.get("config", {}), b.get("config", {})))
        if new_items:
            append_items(store_path, new_items, source.root)
        s = st.Store(store_path)
        ids = s.ids
        row_of = {i: r for r, i in enumerate(ids)}
        done = np.zeros(len(ids), bool) if done is None else np.concatenate([done, np.zeros(len(ids) - len(done), bool)])
        pending = {int(r) for p in run.shards() for r in st.Run.read(p, "rows")["rows"]}
        todo = [(i, p) for i, p in entries if not done[row_of[i]] and row_of[i] not in pending]
        n_resumed = len(entries) - len(todo)
        if todo:
            ds = ImageDataset(todo, encoder.preprocess, conv, store_path if from_store else None,
                              [row_of[i] for i, _ in todo] if from_store else None)
            _run(ds, encoder, run, row_of, dev, batch_size, workers, dtype, skip_bad, checkpoint_rows, progress,
                 total=len(entries), initial=n_resumed)
            cfg["selftest"]["determinism"] = recheck_run(ds, encoder, run, dev)
        shards = run.shards()
        bad = {}
        for p in shards:
            c = st.Run.read(p, "ids", "bad", "paths")
            bad.update({str(i): (str(path), str(r)) for i, r, path in zip(c["ids"], c["bad"], c["paths"]) if r})
        skipped = list(bad.values())
        report = _write_report(skipped, report_path or f"{os.path.splitext(store_path)[0]}.{key}.skipped.csv") if skipped else None
        if shards or key not in s.keys:
            commit_embedding(store_path, run, key, encoder.dim, dtype, cfg, skipped)
        else:
            run.finish()
    n_new = sum(1 for i, _ in todo if i not in bad)
    return EmbedResult(store_path, key, len(entries), n_new, n_resumed, skipped, time.perf_counter() - t0, report)


def _open_for_writing(store_path: str) -> st.Store | None:
    """The existing store (None when there is none yet), refusing one this version cannot append to."""
    if not os.path.exists(store_path):
        return None
    s = st.Store(store_path)
    if s.schema < st.SCHEMA_VERSION:
        raise EmbedkitError(upgrade_message(store_path))
    return s


def _new_items(source: Source, s: st.Store | None, skip_bad: bool) -> list:
    """Items of the source that the store does not hold yet; refuse missing files unless skipping bad ones."""
    known = set(s.ids) if s is not None and len(s) else set()
    new = [it for it in source.items if it.id not in known]
    if not skip_bad:
        from .formats import exists  # item paths may be locators such as movie.ome.tiff::t=3

        missing = [it for it in new if not exists(source.abspath(it))]
        if missing:
            raise BadImageError(source.abspath(missing[0]), f"file not found{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                f"fix the source or pass --skip-bad to skip and list them")
    return new


def _run(ds: ImageDataset, encoder: Encoder, run: st.Run, row_of: dict[str, int], dev: torch.device, batch_size: int,
         workers: int | None, dtype: str, skip_bad: bool, checkpoint_rows: int, progress: bool,
         total: int, initial: int) -> None:
    from tqdm.auto import tqdm

    cuda = dev.type == "cuda"
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if cuda else (1 if (os.cpu_count() or 1) > 1 else 0)
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate, pin_memory=cuda,
        worker_init_fn=worker_init if workers else None, persistent_workers=False,
        prefetch_factor=4 if workers else None)
    model = encoder.to(dev)
    model = model.to(memory_format=torch.channels_last)
    amp = autocast(dev)
    buf_ids: list[str] = []
    buf_vecs: list[np.ndarray] = []
    buf_bad: list[str] = []
    last_flush = time.monotonic()
    np_dtype = np.dtype(dtype)
    path_of = dict(ds.entries)

    def flush():
        nonlocal buf_ids, buf_vecs, buf_bad, last_flush
        if buf_ids:
            rows = np.array([row_of[i] for i in buf_ids], dtype=np.int64)
            run.write(st.Run.shard_name("w0", "r", int(rows.min()), int(rows.max()) + 1),
                      {"rows": rows, "ids": np.array(buf_ids, dtype=object), "vectors": np.concatenate(buf_vecs).astype(np_dtype),
                       "bad": np.array(buf_bad, dtype=object), "paths": np.array([path_of[i] for i in buf_ids], dtype=object)})
        buf_ids, buf_vecs, buf_bad, last_flush = [], [], [], time.monotonic()

    bar = tqdm(total=total, initial=initial, unit="img", desc=f"embed {encoder.spec.name}", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        with torch.inference_mode(), amp:
            for ids, good_ids, x, bad in loader:
                if bad and not skip_bad:
                    item, reason = bad[0]
                    raise BadImageError(path_of[item], f"{reason}; fix or remove it, or pass --skip-bad to skip and list bad files "
                                              f"(progress so far is kept and resumes)")
                vecs = np.full((len(ids), encoder.dim), np.nan, dtype=np.float32)
                if x is not None:
                    x = x.to(dev, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
                    pos = {i: k for k, i in enumerate(ids)}
                    vecs[[pos[i] for i in good_ids]] = model(x).float().cpu().numpy()
                reasons = dict(bad)
                buf_ids += ids
                buf_vecs.append(vecs)
                buf_bad += [reasons.get(i, "") for i in ids]
                bar.update(len(ids))
                if len(buf_ids) >= checkpoint_rows or time.monotonic() - last_flush > 60:
                    flush()
        flush()
    except KeyboardInterrupt:
        flush()  # the buffer holds whole batches only, so keeping them is safe
        raise
    finally:
        bar.close()


def _write_report(skipped: list[tuple[str, str]], path: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        w.writerows(skipped)
    return path
