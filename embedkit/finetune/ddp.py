"""``finetune --nproc N``: DistributedDataParallel on N processes, launched by torchrun's launcher.

:func:`launch` runs ``finetune`` in N processes through ``torch.distributed.launcher`` (what the ``torchrun``
command runs: a standalone c10d rendezvous on this machine), NCCL on GPUs (one per process) and gloo on CPU.
In each process:

* every epoch's draws of the balanced sampler are split as ``DistributedSampler`` splits a dataset, so each
  process trains on its own share and DDP averages the gradients (``--batch-size`` is per process);
* every process validates on the full validation set, and rank 0's numbers decide the best epoch and early
  stopping for all, so every process stops at the same epoch;
* only rank 0 writes: checkpoints, training state, history, test predictions and metrics.

A resumed run reads the same training state in every process, so resume works as with one process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import secrets
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..errors import EmbedkitError

#: Environment variables torchrun sets in each process it starts.
_LAUNCH_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE")


def is_launched() -> bool:
    """Whether this process was started by torchrun (as one of several)."""
    return all(v in os.environ for v in _LAUNCH_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); return this process's device."""
    if not is_launched():
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise EmbedkitError(f"--nproc {os.environ['WORLD_SIZE']}: this machine has {torch.cuda.device_count()} GPU(s), "
                                f"one per process; use --nproc {torch.cuda.device_count()} or --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise EmbedkitError(f"--nproc runs on CUDA GPUs or on the CPU, not on {device.type}")
    if not active():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world()))
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to train: ``model`` inside DistributedDataParallel when distributed, else ``model`` itself."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class ShardedSampler(torch.utils.data.Sampler):
    """This process's share of another sampler's draws, split the way ``DistributedSampler`` splits a dataset
    (padded by wrapping around, so every process takes the same number of steps)."""

    def __init__(self, sampler: torch.utils.data.Sampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        draws = list(self.sampler)
        share = torch.utils.data.DistributedSampler(draws, num_replicas=self.world, rank=self.rank, shuffle=False)
        return iter([draws[i] for i in share])

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.world)


def shard(sampler: torch.utils.data.Sampler) -> torch.utils.data.Sampler:
    """``sampler`` itself in one process, else this process's :class:`ShardedSampler` share of it."""
    return sampler if world() == 1 else ShardedSampler(sampler, rank(), world())


def share(obj: Any) -> Any:
    """Rank 0's ``obj`` in every process (``obj`` itself in one process)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(*values: float) -> list[float]:
    """Sums over all processes."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------- launching


def _entry(fn: Callable, kwargs: dict) -> Any:
    """What each launched process runs: ``fn(**kwargs)``; a user error is recorded for the launcher to report."""
    try:
        return fn(**kwargs)
    except EmbedkitError as exc:
        path = os.environ.get("EMBEDKIT_DDP_ERRORS")
        if path:
            with open(f"{path}.{os.environ['RANK']}", "w") as fh:
                json.dump({"error": str(exc)}, fh)
        raise
    finally:
        if active():
            dist.destroy_process_group()


def launch(nproc: int, fn: Callable, kwargs: dict) -> Any:
    """Run ``fn(**kwargs)`` in ``nproc`` processes on this machine (torchrun, standalone); return rank 0's result.

    A user error in any process stops all of them and is raised here as its one line.
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    try:
        pickle.dumps((fn, kwargs))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise EmbedkitError(f"--nproc: the arguments must be picklable to start processes ({exc})") from None
    with tempfile.TemporaryDirectory(prefix="embedkit-ddp-") as tmp:
        errors = os.path.join(tmp, "error")
        os.environ["EMBEDKIT_DDP_ERRORS"] = errors  # inherited by the processes started below
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"embedkit-{secrets.token_hex(4)}",
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                              start_method="spawn")
        elastic_log = logging.getLogger("torch.distributed.elastic")
        level = elastic_log.level
        elastic_log.setLevel(logging.CRITICAL)  # a user error is reported below as its one line, not as a traceback
        try:
            results = elastic_launch(config, _entry)(fn, kwargs)
        except ChildFailedError:
            recorded = sorted(f for f in os.listdir(tmp) if f.startswith("error."))
            if recorded:
                with open(os.path.join(tmp, recorded[0])) as fh:
                    raise EmbedkitError(json.load(fh)["error"]) from None
            raise  # not a user error: the launcher's report, with the failing process's traceback
        finally:
            elastic_log.setLevel(level)
            os.environ.pop("EMBEDKIT_DDP_ERRORS", None)
    return results[0]
