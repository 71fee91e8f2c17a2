"""The ``--engine / --address / --replicas`` options that embed, segment and patches share, and the engine they name."""

from __future__ import annotations

import importlib.util
from typing import Callable

import click

from ..errors import EmbedkitError
from . import ENGINES


def engine_options(command: Callable) -> Callable:
    """Add ``--engine``, ``--address`` and ``--replicas`` to a click command."""
    for option in reversed((
        click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
                     help="Run in this process, or on a Ray cluster: decoding tasks and a model actor pool "
                          "writing the store's shards (docs/scale.md)."),
        click.option("--address", help="--engine ray: join this cluster ('auto' or HOST:PORT) "
                                       "[default: start a local one with this machine's cores]."),
        click.option("--replicas", type=click.IntRange(1),
                     help="--engine ray: model replicas [default: one per GPU, or one per CPU slot]."),
    )):
        command = option(command)
    return command


def engine_from_options(engine: str, address: str | None, replicas: int | None):
    """The engine the options ask for: None (this process) or a :class:`~.ray_engine.RayEngine`."""
    if engine == "local":
        if address is not None or replicas is not None:
            raise EmbedkitError("--address and --replicas apply to --engine ray")
        return None
    if importlib.util.find_spec("ray") is None:
        raise EmbedkitError("--engine ray needs Ray: pip install 'embedkit[ray]' (or 'ray[data]')")
    from .ray_engine import RayEngine

    return RayEngine(address, replicas)
