"""``--engine ray``: embed, segment and patches on a Ray cluster, writing the store's shards in parallel.

The driver (the embedkit command) does everything that decides *what* is computed, exactly as the local
engine does: refusals, the store lock, the pinned run, which items are pending, and at the end the one
commit with its provenance. Ray only does the work in between, as a Ray Data pipeline:

* the pending items are cut into blocks (one block becomes one shard of the run);
* **decode** tasks on CPUs read the block's files (or store pixels) into native-size arrays, uint8 for
  8-bit data, so that a block travels to the model small;
* an **actor pool** holds the model (one replica per GPU with ``num_gpus=1``, or per CPU slot), converts
  the block on its device (:mod:`.preprocess`), runs the model and writes the block's shard straight into
  the run folder beside the store.

A block's shard has a fixed name, so a block that Ray retries after a worker died rewrites the same file
(written under a temporary name and renamed: never half a shard). A driver that dies leaves the shards
already written; the same command run again finds them and computes only the rest.

Blocks travel as pickled bytes rather than as Arrow columns: ragged lists of arrays and item records are
stored the same way on every Ray Data version.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import EmbedkitError
from ..store.faults import fault
from .local import load_or_error

#: The environment variable whose value the workers receive as ``EMBEDKIT_FAULT`` (crash tests of the workers).
WORKER_FAULT_ENV = "EMBEDKIT_WORKER_FAULT"
#: CPUs a decode task asks the scheduler for (they read and decode files; the models get the rest).
DECODE_CPUS = 0.5
#: On CPU-only clusters, the share of the CPUs kept for decoding (at least one decode task's worth).
DECODE_SHARE = 0.1
#: Field blocks aim for this many blocks per model replica, so that work spreads while shards stay large.
BLOCKS_PER_REPLICA = 4


@dataclass(frozen=True)
class Plan:
    """How the actor pool is laid out on the cluster."""

    replicas: int
    device: str  # 'cuda' or 'cpu', as seen inside an actor
    actor_cpus: float
    actor_gpus: float
    threads: int  # torch threads per replica


def plan_pool(resources: dict[str, float], device: str = "auto", replicas: int | None = None) -> Plan:
    """Model replicas for a cluster with ``resources`` (``ray.cluster_resources()``).

    With GPUs (device auto or cuda): one replica per GPU. On CPUs: by default one single-threaded replica
    per CPU slot, keeping a tenth of the CPUs (at least half a CPU) for decoding; with ``replicas`` given, the
    CPUs are shared among them.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise EmbedkitError(f"--device {device}: with --engine ray use auto, cpu or cuda")
    if device.startswith("cuda") and gpus == 0:
        raise EmbedkitError("--device cuda asked for, but the Ray cluster has no GPUs; use --device cpu or auto")
    if replicas is not None and replicas < 1:
        raise EmbedkitError("--replicas must be at least 1")
    if gpus and device != "cpu":
        n = replicas or gpus
        if n > gpus:
            raise EmbedkitError(f"--replicas {n}: the Ray cluster has {gpus} GPU(s), one replica each")
        return Plan(n, "cuda", actor_cpus=1.0, actor_gpus=1.0, threads=1)
    spare = max(cpus - max(DECODE_CPUS, DECODE_SHARE * cpus), 0.5)
    n = replicas or max(1, int(spare))
    if n > spare / 0.25:
        raise EmbedkitError(f"--replicas {n}: the Ray cluster has {cpus:g} CPUs; use at most {int(spare / 0.25)}")
    share = spare / n
    return Plan(n, "cpu", actor_cpus=share, actor_gpus=0.0, threads=max(1, int(share + 0.5)))


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive blocks of ``size`` covering ``n`` items."""
    return [(s, min(n, s + size)) for s in range(0, n, max(1, size))]


def _pack(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack(batch: dict) -> Any:
    """The payload of a one-row batch."""
    return pickle.loads(batch["payload"][0])


def _one_row(**values: Any) -> dict[str, list]:
    return {k: [v] for k, v in values.items()}


def full_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` padded with zero images to ``size`` rows. A model replica always runs full batches, so on CPU the
    kernels (whose choice depends on the work per thread) are those of the local engine whatever its thread
    count, and on GPU every batch has one shape."""
    return x if len(x) >= size else torch.cat([x, x.new_zeros((size - len(x),) + tuple(x.shape[1:]))])


def _start_worker(threads: int, worker_fault: str) -> None:
    torch.set_num_threads(threads)
    if worker_fault:
        os.environ["EMBEDKIT_FAULT"] = worker_fault


# --------------------------------------------------------------------------------------- embed


def decode_images(batch: dict, pre, conv, store_path: str | None) -> dict:
    """Ray Data task: one block's images at native size (uint8 for 8-bit data), or each bad one's reason."""
    from ..embed import ImageDataset

    block, entries, rows = _unpack(batch)
    ds = ImageDataset(entries, pre, conv, store_path, rows if store_path else None, raw=True)
    images, reasons = [], []
    for i in range(len(ds)):
        _, img, reason = ds[i]
        images.append(img)
        reasons.append(reason or "")
    return _one_row(payload=_pack((block, entries, rows, images, reasons)))


class EmbedActor:
    """Ray Data actor: one model replica; converts each block on its device, encodes it, writes its shard."""

    def __init__(self, encoder: list, outputs: list, per_channel: str | None, dtype: str, batch_size: int, skip_bad: bool,
                 plan: Plan, worker_fault: str):
        import ray

        from ..device import autocast

        _start_worker(plan.threads, worker_fault)
        self.dev = torch.device(plan.device)
        self.encoder = ray.get(encoder[0]).to(self.dev).to(memory_format=torch.channels_last)
        self.amp = autocast(self.dev)
        self.outputs, self.dtype, self.batch_size, self.skip_bad = outputs, dtype, batch_size, skip_bad
        self.per_channel = per_channel  # --channels bag|mean

    def __call__(self, batch: dict) -> dict:
        from ..embed import encode, write_outputs
        from .preprocess import device_batch, group_by_shape

        block, entries, rows, images, reasons = _unpack(batch)
        first_bad = next((k for k, r in enumerate(reasons) if r), None)
        if first_bad is not None and not self.skip_bad:
            return _one_row(block=block, n=len(entries), error="", bad_path=entries[first_bad][1],
                            bad_reason=reasons[first_bad], n_bad=sum(bool(r) for r in reasons))
        vecs = [np.full((len(entries), o.dim), np.nan, dtype=np.float32) for o in self.outputs]
        try:
            with torch.inference_mode(), self.amp:
                for s in range(0, len(entries), self.batch_size):  # the local engine's batches, bad items left out
                    pos = [k for k in range(s, min(s + self.batch_size, len(entries))) if not reasons[k]]
                    if not pos:
                        continue
                    x = device_batch(group_by_shape([images[k] for k in pos]), len(pos), self.encoder.preprocess, self.dev,
                                     self.per_channel is not None)
                    for v, got in zip(vecs, encode(self.encoder, full_batch(x, self.batch_size), self.per_channel)):
                        v[pos] = got[:len(pos)]
            write_outputs(self.outputs, "ray", [i for i, _ in entries], rows, vecs, reasons, [p for _, p in entries],
                          self.dtype)
        except EmbedkitError as exc:  # e.g. a full disk: one clear line for the driver to raise
            return _one_row(block=block, n=len(entries), error=str(exc), bad_path="", bad_reason="", n_bad=0)
        return _one_row(block=block, n=len(entries), error="", bad_path="", bad_reason="", n_bad=0)


# --------------------------------------------------------------------------------------- fields


def load_fields(batch: dict, loader: Callable) -> dict:
    """Ray Data task: load one block of fields with the pipeline's ``loader`` (a field, or the BadImageError)."""
    block, fields = _unpack(batch)
    return _one_row(payload=_pack((block, fields, [load_or_error(loader, k, item) for k, item in fields])))


class FieldActor:
    """Ray Data actor: runs the pipeline's ``cutter`` (segmenter or patch filter) on each loaded field of a
    block and writes the block's fields as one shard of the run."""

    def __init__(self, cutter: list, run, plan: Plan, worker_fault: str):
        import ray

        _start_worker(plan.threads, worker_fault)
        self.cutter = ray.get(cutter[0])
        self.run = run

    def __call__(self, batch: dict) -> dict:
        from ..segment.storeio import FieldShards

        block, fields, loaded = _unpack(batch)
        shards = FieldShards(self.run, flush_bytes=1 << 62, flush_seconds=math.inf)  # one shard per block
        failed: list[tuple[str, str]] = []
        found = 0
        try:
            for (k, item), fld in zip(fields, loaded):
                found += self.cutter(k, item, fld, shards, failed) or 0
            shards.flush()
        except EmbedkitError as exc:
            return _one_row(block=block, n=len(fields), error=str(exc), payload=_pack(([], 0)))
        return _one_row(block=block, n=len(fields), error="", payload=_pack((failed, found)))


# --------------------------------------------------------------------------------------- the engine


class RayEngine:
    """Runs the work of one embed / segment / patches call on Ray (see the module docstring).

    ``address``: None starts a local cluster with this machine's cores; 'auto' or 'HOST:PORT' joins a running
    one (``ray start --head``, KubeRay, ``ray up``). When this process is already connected to Ray (``ray.init``
    in a notebook or a test), that connection is used. Used as a context manager it connects on entry (so an
    unreachable cluster is refused before anything is written) and disconnects on exit.
    """

    def __init__(self, address: str | None = None, replicas: int | None = None):
        self.address = address
        self.replicas = replicas
        self._started = False

    def __enter__(self) -> "RayEngine":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # connection ----------------------------------------------------------------------------------
    def connect(self):
        """Connect to (or start) the cluster once; return the ``ray`` module."""
        import ray

        if not ray.is_initialized():
            kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            try:
                if self.address:
                    _check_reachable(self.address)
                    ray.init(address=self.address, **kw)
                else:
                    ray.init(num_cpus=os.cpu_count() or 1, **kw)
            except (ConnectionError, RuntimeError, OSError) as exc:
                where = f"at --address {self.address}" if self.address else "on this machine"
                raise EmbedkitError(f"could not reach a Ray cluster {where} ({str(exc).splitlines()[0][:200]}); start one "
                                    f"with 'ray start --head', or leave out --address to start a local one") from None
            self._started = True
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return ray

    def close(self) -> None:
        """Disconnect, stopping the local cluster if this engine started it."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def _stream(self, ray, blocks: list[bytes], decode: Callable, decode_kwargs: dict, actor: type,
                actor_kwargs: dict, plan: Plan) -> Iterator[dict]:
        """Results of the pipeline decode -> actor pool, one row per block, as blocks finish."""
        ds = ray.data.from_items([{"payload": b} for b in blocks], override_num_blocks=len(blocks))
        ds = ds.map_batches(decode, batch_size=1, fn_kwargs=decode_kwargs, num_cpus=DECODE_CPUS)
        ds = ds.map_batches(actor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=plan.replicas),
                            fn_constructor_kwargs={**actor_kwargs, "plan": plan,
                                                   "worker_fault": os.environ.get(WORKER_FAULT_ENV, "")},
                            num_cpus=plan.actor_cpus, num_gpus=plan.actor_gpus or None)
        yield from ds.iter_rows()

    # embed ---------------------------------------------------------------------------------------
    def embed(self, work, device: str = "auto", *, progress: bool = True, total: int | None = None,
              initial: int = 0) -> None:
        """Encode ``work`` (an :class:`~embedkit.embed.EmbedWork`) into shards of its runs (one per output key, so
        ``--layers`` works here too); the caller commits."""
        from tqdm.auto import tqdm

        from ..embed import bad_image

        ray = self.connect()
        plan = plan_pool(ray.cluster_resources(), device, self.replicas)
        # whole batches per block: each batch holds the items the local engine batches together (same numbers)
        size = math.ceil(min(work.checkpoint_rows, math.ceil(len(work.entries) / plan.replicas)) / work.batch_size)
        size *= work.batch_size
        blocks = [_pack((b, work.entries[s:e], work.rows[s:e])) for b, (s, e) in enumerate(chunks(len(work.entries), size))]
        encoder = ray.put(work.encoder)
        bad: dict[int, tuple[str, str, int]] = {}
        with tqdm(total=total or len(work.entries), initial=initial, unit="img", disable=not progress, dynamic_ncols=True,
                  desc=f"embed {work.encoder.spec.name} (ray, {plan.replicas} x {plan.device})", file=sys.stderr) as bar:
            for row in self._stream(ray, blocks, decode_images,
                                    {"pre": work.encoder.preprocess, "conv": work.conv, "store_path": work.store_path},
                                    EmbedActor, {"encoder": [encoder], "outputs": work.outputs,
                                                 "per_channel": work.conv.per_channel, "dtype": work.dtype,
                                                 "batch_size": work.batch_size, "skip_bad": work.skip_bad}, plan):
                if row["error"]:
                    raise EmbedkitError(row["error"])
                if row["bad_path"]:
                    bad[int(row["block"])] = (row["bad_path"], row["bad_reason"], int(row["n_bad"]))
                bar.update(int(row["n"]))
                fault("ray:block-done")
        if bad:
            path, reason, _ = bad[min(bad)]
            more = sum(n for _, _, n in bad.values()) - 1
            raise bad_image(path, reason + (f" (and {more} more)" if more else ""))

    # segment and patches -------------------------------------------------------------------------
    def map_fields(self, todo: Sequence[tuple[int, Any]], loader: Callable, cutter: Callable, run, *, desc: str,
                   device: str = "auto", fields_per_block: int | None = None, progress: bool = True,
                   total: int | None = None, initial: int = 0) -> tuple[int, list[tuple[str, str]]]:
        """Load fields with ``loader(k, item)`` in CPU tasks and cut them with ``cutter(k, item, loaded, shards,
        failed)`` in the actor pool, one shard per block of ``fields_per_block`` fields (default: a few blocks per
        replica, at most 16 fields each); return (objects found, failed fields)."""
        from tqdm.auto import tqdm

        ray = self.connect()
        plan = plan_pool(ray.cluster_resources(), device, self.replicas)
        size = fields_per_block or max(1, min(16, math.ceil(len(todo) / (plan.replicas * BLOCKS_PER_REPLICA))))
        blocks = [_pack((b, list(todo[s:e]))) for b, (s, e) in enumerate(chunks(len(todo), size))]
        ref = ray.put(cutter)
        found, failed, errors = 0, {}, {}
        with tqdm(total=total or len(todo), initial=initial, unit="field", disable=not progress, dynamic_ncols=True,
                  desc=f"{desc} (ray, {plan.replicas} x {plan.device})", file=sys.stderr) as bar:
            for row in self._stream(ray, blocks, load_fields, {"loader": loader}, FieldActor,
                                    {"cutter": [ref], "run": run}, plan):
                if row["error"]:
                    errors[int(row["block"])] = row["error"]
                else:
                    block_failed, block_found = pickle.loads(row["payload"])
                    failed[int(row["block"])] = block_failed
                    found += block_found
                bar.update(int(row["n"]))
                fault("ray:block-done")
        if errors:
            raise EmbedkitError(errors[min(errors)])
        return found, [f for b in sorted(failed) for f in failed[b]]


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast (OSError) when a HOST:PORT cluster address does not accept connections; Ray itself retries for minutes."""
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    socket.create_connection((host, int(port)), timeout=timeout).close()
