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

from . import store as st
from .configdiff import describe_differences
from .store.schema import upgrade_message
from .store.writing import append_items, commit_embedding
from .device import autocast, resolve_device, use_cpu_threads, worker_init
from .encoders import Encoder, Preprocess
from .engines.preprocess import device_batch, group_by_shape, resize_normalise
from .errors import BadImageError, EmbedkitError
from .images import Conversion, load_rgb
from .channelbag import fix_channels, fold_channels, output_dim, split_channels
from .selftest import preprocess_selftest, recheck_run
from .sources import Source


def to_tensor(rgb: np.ndarray, pre: Preprocess, per_channel: bool = False) -> torch.Tensor:
    """RGB float [0, 1] (H, W, 3) -> normalised [3, S, S] tensor (pad to square, antialiased resize);
    with ``per_channel`` (H, W, C) -> [3C, S, S], each channel a grayscale image (``--channels bag|mean``)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    return resize_normalise(x[None], pre, per_channel)[0]


def embed_images(encoder: Encoder, images: Sequence[str | np.ndarray], conv: Conversion = Conversion(),
                 device: str = "cpu", batch_size: int = 32) -> np.ndarray:
    """Embed a few image files or raw (H, W, C) arrays in memory (queries, notebooks); returns [N, D] float32.

    With a layer selected (an encoder rebuilt for a layer key) the vectors are that layer's; ``conv`` may ask for
    ``--channels bag|mean``.
    """
    from .images import to_rgb

    dev = resolve_device(device)
    model = encoder.to(dev).eval()
    per_channel = conv.per_channel is not None
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            batch = [to_tensor(load_rgb(im, conv) if isinstance(im, (str, os.PathLike)) else to_rgb(np.asarray(im), conv),
                               encoder.preprocess, per_channel) for im in images[s:s + batch_size]]
            out.append(encode(model, torch.stack(batch).to(dev), conv.per_channel)[-1])
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes files (or store pixels) into encoder-ready tensors; a bad file yields its error instead.

    With ``raw=True`` it yields the decoded RGB at native size instead (uint8 for 8-bit data), for the
    encoder's device to resize and normalise (:mod:`embedkit.engines.preprocess`).
    """

    def __init__(self, entries: Sequence[tuple[str, str]], pre: Preprocess, conv: Conversion,
                 store_path: str | None = None, store_rows: Sequence[int] | None = None, raw: bool = False):
        self.entries = list(entries)  # (item id, absolute path)
        self.pre, self.conv = pre, conv
        self.store_path, self.store_rows = store_path, store_rows
        self.raw = raw
        self._store: st.Store | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def _rgb(self, i: int, keep_uint8: bool = False) -> np.ndarray:
        from .images import read_image, to_rgb

        if self.store_path is None:
            return to_rgb(read_image(self.entries[i][1]), self.conv, self.entries[i][1], keep_uint8)
        if self._store is None:  # opened lazily, in the worker process that reads
            self._store = st.Store(self.store_path)
        return to_rgb(self._store.pixels(int(self.store_rows[i])), self.conv, self.entries[i][1], keep_uint8)

    def __getitem__(self, i: int):
        item_id = self.entries[i][0]
        try:
            if self.raw:
                rgb = self._rgb(i, keep_uint8=True)
                return item_id, rgb if rgb.dtype == np.uint8 else rgb.astype(np.float32, copy=False), None
            return item_id, to_tensor(self._rgb(i), self.pre, self.conv.per_channel is not None), None
        except BadImageError as exc:
            return item_id, None, exc.reason


def collate(batch):
    ids = [b[0] for b in batch]
    good = [b for b in batch if b[1] is not None]
    bad = [(b[0], b[2]) for b in batch if b[1] is None]
    x = torch.stack([b[1] for b in good]) if good else None
    return ids, [b[0] for b in good], x, bad


def collate_raw(batch):
    """Like :func:`collate` for native-size images: their shape groups instead of one stacked tensor."""
    ids = [b[0] for b in batch]
    good = [b for b in batch if b[1] is not None]
    bad = [(b[0], b[2]) for b in batch if b[1] is None]
    return ids, [b[0] for b in good], group_by_shape([b[1] for b in good]), bad


@dataclass
class Output:
    """One key a run writes (the plain key, or a layer key of ``--layers``): its vector size, provenance and run.

    ``have`` marks the store rows the key already holds (done, or pending in the run's shards): they are not
    written again when other keys of the same run still need them.
    """

    key: str
    dim: int
    config: dict
    run: st.Run
    have: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


@dataclass
class EmbedWork:
    """What an engine embeds: pending items, where their pixels are, and the keys (runs) their vectors go to."""

    entries: list[tuple[str, str]]  # (item id, file path or 'store[row]')
    rows: list[int]  # store row of each entry
    store_path: str | None  # the store whose pixels are read; None for files
    encoder: Encoder
    conv: Conversion
    outputs: list[Output]  # one per encoder output: the plain key first, then each chosen layer
    dtype: str
    batch_size: int
    skip_bad: bool
    checkpoint_rows: int

    def dataset(self, raw: bool = False) -> "ImageDataset":
        return ImageDataset(self.entries, self.encoder.preprocess, self.conv, self.store_path,
                            self.rows if self.store_path else None, raw=raw)


def write_vectors(run: st.Run, writer: str, ids: Sequence[str], rows: np.ndarray, vectors: np.ndarray,
                  bad: Sequence[str], paths: Sequence[str], dtype: str) -> None:
    """Write one shard of a run's vectors, in the layout :func:`~embedkit.store.writing.commit_embedding` stitches."""
    rows = np.asarray(rows, dtype=np.int64)
    run.write(st.Run.shard_name(writer, "r", int(rows.min()), int(rows.max()) + 1),
              {"rows": rows, "ids": np.array(list(ids), dtype=object), "vectors": np.asarray(vectors).astype(np.dtype(dtype)),
               "bad": np.array(list(bad), dtype=object), "paths": np.array(list(paths), dtype=object)})


def write_outputs(outputs: Sequence[Output], writer: str, ids: Sequence[str], rows: Sequence[int],
                  vectors: Sequence[np.ndarray], bad: Sequence[str], paths: Sequence[str], dtype: str) -> None:
    """Write one shard per output key, of the rows that key does not hold yet (``vectors``: one array per output)."""
    rows = np.asarray(rows, dtype=np.int64)
    ids, bad, paths = (np.array(list(a), dtype=object) for a in (ids, bad, paths))
    for out, vecs in zip(outputs, vectors):
        keep = ~out.have[rows]
        if keep.any():
            write_vectors(out.run, writer, ids[keep], rows[keep], np.asarray(vecs)[keep], bad[keep], paths[keep], dtype)


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
    keys: list[str] = field(default_factory=list)  # every key written: the plain key, then one per chosen layer
    dims: list[int] = field(default_factory=list)  # their vector sizes

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
          report_path: str | None = None, preprocess: str = "auto", engine=None, layers=None) -> EmbedResult:
    """Embed every item of ``source`` (or a store's own pixels when ``source`` is the store path) into the store.

    Every check that can refuse the run happens before anything is written. Progress is the set of vector
    shards the run has written; re-running after an interruption resumes from them. ``preprocess``: where
    images are resized and normalised, 'workers' (decoding processes), 'device' (the encoder's device, from
    uint8) or 'auto' (device on CUDA). ``engine``: None runs here; a :class:`~embedkit.engines.ray_engine.RayEngine`
    runs the encoding on a Ray cluster, with the same checks, resume and commit. ``layers``: intermediate layers
    stored besides the usual output, each under ``<key>@block-N`` / ``<key>@stage-N`` ('all', '-1,-2,-4', or a
    :class:`~embedkit.encoders.layers.LayerRequest`; see :meth:`Encoder.select_layers`).
    """
    from .encoders.layers import LayerRequest, parse_layers

    store_path = str(store_path)
    key = st.validate_key(key or st.key_for(encoder.spec.name))
    if layers is not None:
        encoder.select_layers(layers if isinstance(layers, LayerRequest) else parse_layers(layers))
    conv, channels = fix_channels(conv, *_first_pixels(source, store_path, skip_bad)) if conv.per_channel else (conv, {})
    cfg = run_config(encoder, conv, dtype)
    if channels:
        cfg["channels"] = channels
    if preprocess not in ("auto", "workers", "device"):
        raise EmbedkitError(f"preprocess={preprocess!r}: choose auto, workers or device")
    dev = resolve_device(device) if engine is None else None
    t0 = time.perf_counter()
    cfg["selftest"] = preprocess_selftest(encoder, conv, dev or torch.device("cpu"))  # refuses a broken transform before anything is written
    keys = [st.validate_key(k) for k in encoder.output_keys(key)]
    dims = [output_dim(d, conv) for d in (encoder.dim, *encoder.layer_dims)]
    outputs = [Output(k, d, {**c, "dim": d}, st.Run(store_path, "embed", k))
               for k, d, c in zip(keys, dims, encoder.output_configs(key, cfg))]
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
        done = {o.key: _check_existing(s, o) for o in outputs}
        for o in outputs:
            o.run.start({"config": o.config, "batch_size": batch_size}, _fingerprint(o.config),
                        lambda a, b: describe_differences(a.get("config", {}), b.get("config", {})))
        if new_items:
            append_items(store_path, new_items, source.root)
        s = st.Store(store_path)
        ids = s.ids
        row_of = {i: r for r, i in enumerate(ids)}
        for o in outputs:
            have = np.zeros(len(ids), bool)
            if done[o.key] is not None:
                have[:len(done[o.key])] = done[o.key]
            have[[int(r) for p in o.run.shards() for r in st.Run.read(p, "rows")["rows"]]] = True
            o.have = have
        todo = [(i, p) for i, p in entries if not all(o.have[row_of[i]] for o in outputs)]
        n_resumed = len(entries) - len(todo)
        if todo:
            work = EmbedWork(todo, [row_of[i] for i, _ in todo], store_path if from_store else None, encoder, conv,
                             outputs, dtype, batch_size, skip_bad, checkpoint_rows)
            if engine is None:
                on_device = preprocess == "device" or (preprocess == "auto" and dev.type == "cuda")
                _run(work, dev, workers, on_device, progress, total=len(entries), initial=n_resumed)
            else:
                engine.embed(work, device, progress=progress, total=len(entries), initial=n_resumed)
        shards = {o.key: o.run.shards() for o in outputs}
        if any(shards.values()):  # also after a resume that found every vector already written
            pixels_from = store_path if from_store else None
            every = ImageDataset(entries, encoder.preprocess, conv, pixels_from, [row_of[i] for i, _ in entries] if pixels_from else None)
            checks = recheck_run(every, lambda x: encode(encoder, x, conv.per_channel), [o.run for o in outputs],
                                 dev or torch.device("cpu"))
            for o, check in zip(outputs, checks):
                o.config["selftest"] = {**o.config["selftest"], "determinism": check}
        bad = {}
        for p in (p for o in outputs for p in shards[o.key]):
            c = st.Run.read(p, "ids", "bad", "paths")
            bad.update({str(i): (str(path), str(r)) for i, r, path in zip(c["ids"], c["bad"], c["paths"]) if r})
        skipped = list(bad.values())
        report = _write_report(skipped, report_path or f"{os.path.splitext(store_path)[0]}.{key}.skipped.csv") if skipped else None
        for o in outputs:
            if shards[o.key] or o.key not in s.keys:
                commit_embedding(store_path, o.run, o.key, o.dim, dtype, o.config, skipped)
            else:
                o.run.finish()
    n_new = sum(1 for i, _ in todo if i not in bad)
    return EmbedResult(store_path, key, len(entries), n_new, n_resumed, skipped, time.perf_counter() - t0, report,
                       keys=keys, dims=dims)


def _first_pixels(source: Source | str, store_path: str, skip_bad: bool) -> tuple[np.ndarray, str]:
    """The raw pixels and path of the first readable item, which fix the channel count of ``--channels bag|mean``."""
    from .images import read_image

    if isinstance(source, str):
        if not os.path.exists(store_path) or not st.Store(store_path).has_pixels:
            raise EmbedkitError(f"{store_path} holds no pixels; embed from the image files instead")
        return st.Store(store_path).pixels(0), ""
    error = None
    for it in source.items:
        try:
            return read_image(source.abspath(it)), source.abspath(it)
        except BadImageError as exc:
            if not skip_bad:
                raise bad_image(exc.path, exc.reason) from None
            error = error or exc
    raise error or EmbedkitError("no images to embed")


def _fingerprint(config: dict) -> str:
    return st.fingerprint(st.comparable_config(config))


def _check_existing(s: st.Store | None, out: Output) -> np.ndarray | None:
    """The done mask of an existing key made with the same configuration (None for a new key); refuse another one."""
    if s is None or out.key not in s.keys:
        return None
    old = s.config(out.key)
    if _fingerprint(old) != _fingerprint(out.config):
        raise EmbedkitError(st.config_mismatch_message(out.key, old, out.config))
    return s.done(out.key)


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


def bad_image(path: str, reason: str) -> BadImageError:
    """The error that stops a run at an unreadable image (finished shards are kept and resume)."""
    return BadImageError(path, f"{reason}; fix or remove it, or pass --skip-bad to skip and list bad files "
                               f"(progress so far is kept and resumes)")


def encode(model: Encoder, x: torch.Tensor, per_channel: str | None = None) -> list[np.ndarray]:
    """Vectors of one prepared batch (channels-last on the model's device) as float32 on the CPU, one array per
    output of the encoder (its usual output, then each chosen layer). ``per_channel`` ('bag' / 'mean'): ``x`` holds
    each channel as a grayscale image, encoded one by one and then concatenated or averaged."""
    if per_channel is None:
        return [v.float().cpu().numpy() for v in model.outputs(x.contiguous(memory_format=torch.channels_last))]
    parts = model.outputs(split_channels(x).contiguous(memory_format=torch.channels_last))
    return [fold_channels(v.float(), x.shape[0], per_channel).cpu().numpy() for v in parts]


def _run(work: EmbedWork, dev: torch.device, workers: int | None, on_device: bool, progress: bool,
         total: int, initial: int) -> None:
    from tqdm.auto import tqdm

    cuda = dev.type == "cuda"
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if cuda else (1 if (os.cpu_count() or 1) > 1 else 0)
    if not cuda:
        use_cpu_threads()
    ds = work.dataset(raw=on_device)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=work.batch_size, shuffle=False, num_workers=workers, collate_fn=collate_raw if on_device else collate,
        pin_memory=cuda, worker_init_fn=worker_init if workers else None, persistent_workers=False,
        prefetch_factor=4 if workers else None)
    encoder = work.encoder
    model = encoder.to(dev).to(memory_format=torch.channels_last)
    amp = autocast(dev)
    dims = [o.dim for o in work.outputs]
    buf_ids: list[str] = []
    buf_vecs: list[list[np.ndarray]] = []  # per batch: one array per output
    buf_bad: list[str] = []
    last_flush = time.monotonic()
    path_of = dict(ds.entries)
    row_of = dict(zip((i for i, _ in work.entries), work.rows))

    def flush():
        nonlocal buf_ids, buf_vecs, buf_bad, last_flush
        if buf_ids:
            write_outputs(work.outputs, "w0", buf_ids, [row_of[i] for i in buf_ids],
                          [np.concatenate([b[k] for b in buf_vecs]) for k in range(len(dims))], buf_bad,
                          [path_of[i] for i in buf_ids], work.dtype)
        buf_ids, buf_vecs, buf_bad, last_flush = [], [], [], time.monotonic()

    bar = tqdm(total=total, initial=initial, unit="img", desc=f"embed {encoder.spec.name}", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        with torch.inference_mode(), amp:
            for ids, good_ids, x, bad in loader:
                if bad and not work.skip_bad:
                    raise bad_image(path_of[bad[0][0]], bad[0][1])
                vecs = [np.full((len(ids), d), np.nan, dtype=np.float32) for d in dims]
                if good_ids:
                    if on_device:
                        x = device_batch(x, len(good_ids), encoder.preprocess, dev, work.conv.per_channel is not None)
                    where = {i: k for k, i in enumerate(ids)}
                    pos = [where[i] for i in good_ids]
                    for v, got in zip(vecs, encode(model, x.to(dev, non_blocking=cuda), work.conv.per_channel)):
                        v[pos] = got
                reasons = dict(bad)
                buf_ids += ids
                buf_vecs.append(vecs)
                buf_bad += [reasons.get(i, "") for i in ids]
                bar.update(len(ids))
                if len(buf_ids) >= work.checkpoint_rows or time.monotonic() - last_flush > 60:
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
