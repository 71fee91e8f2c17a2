"""A study in one YAML file (``configs/*.yaml``): stages run in order by ``embedkit run``.

::

    name: mitocheck_demo
    state: results/demo/run_state.json    # optional; default results/<file stem>/run_state.json
    stages:
      - name: embed                         # unique; defaults to the command
        command: embed                      # any embedkit command ('store check' for a subcommand)
        options:                            # that command's option names, as for --config
          source: [tests/data/mitocheck]
          store: store/demo.h5

Each finished stage is recorded in the state file (written atomically) with a fingerprint of its command
line; a re-run skips it while its options are unchanged. An interrupted stage is simply run again: every
command resumes its own work (embed, segment, finetune journal their progress).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from .configfile import read_yaml, to_argv
from .errors import EmbedkitError

STUDY_KEYS = ("name", "description", "state", "stages")
STAGE_KEYS = ("name", "command", "options")


@dataclass
class Stage:
    """One step of a study: an embedkit command and its options."""

    name: str
    command: str
    options: dict = field(default_factory=dict)


@dataclass
class Study:
    """A parsed study file."""

    path: Path
    name: str
    stages: list[Stage]
    state_path: Path


def _check_keys(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(allowed)}"
            raise EmbedkitError(f"{where}: unknown key {key!r}{hint}")


def load_study(path: str | os.PathLike) -> Study:
    """Read and check a study file (top-level and stage keys; option keys are checked against each command)."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise EmbedkitError(f"{path}: a study needs a 'stages' list (see docs/configs.md)")
    _check_keys(data, STUDY_KEYS, str(path))
    stages, seen = [], set()
    for i, raw in enumerate(data["stages"]):
        where = f"{path}: stage {i + 1}"
        if not isinstance(raw, dict) or "command" not in raw:
            raise EmbedkitError(f"{where}: each stage needs a 'command' (and usually 'options')")
        _check_keys(raw, STAGE_KEYS, where)
        stage = Stage(str(raw.get("name") or raw["command"]), str(raw["command"]), raw.get("options") or {})
        if stage.name in seen:
            raise EmbedkitError(f"{where}: stage name {stage.name!r} is used twice; give each stage a unique 'name'")
        seen.add(stage.name)
        stages.append(stage)
    state = Path(data.get("state") or Path("results") / path.stem / "run_state.json")
    return Study(path, str(data.get("name") or path.stem), stages, state)


def read_state(path: Path) -> dict:
    """The state file: {stage name: {status, fingerprint, seconds, finished}}; empty when absent."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise EmbedkitError(f"{path}: unreadable run state; delete it to run every stage again") from None
    return data.get("stages", {}) if isinstance(data, dict) else {}


def _write_state(path: Path, study: Study, stages: dict) -> None:
    from .atomic import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"study": study.name, "config": str(study.path), "stages": stages})


def stage_argv(stage: Stage, command: click.Command, study: Study) -> list[str]:
    """The command line a stage runs, with the stage's options checked against the command."""
    return to_argv(stage.options, command, f"{study.path}: stage {stage.name!r}")


def run_study(study: Study, lookup: Callable[[list[str]], click.Command], *, only: tuple[str, ...] = (),
              dry_run: bool = False, log: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Run the study's stages in order, skipping those finished with the same options; returns (stage, outcome)."""
    unknown = [n for n in only if n not in {s.name for s in study.stages}]
    if unknown:
        raise EmbedkitError(f"--only {unknown[0]!r}: no such stage in {study.path} "
                            f"(stages: {', '.join(s.name for s in study.stages)})")
    plans = []
    for stage in study.stages:  # check every stage before running any
        words = stage.command.split()
        cmd = lookup(words)
        argv = stage_argv(stage, cmd, study)
        plans.append((stage, cmd, words, argv, hashlib.sha256(json.dumps([words, argv]).encode()).hexdigest()[:16]))
    state = read_state(study.state_path)
    outcomes = []
    for stage, cmd, words, argv, fp in plans:
        prev = state.get(stage.name, {})
        line = "embedkit " + " ".join(words + argv)
        if only and stage.name not in only:
            outcomes.append((stage.name, "not selected"))
            continue
        if prev.get("status") == "done" and prev.get("fingerprint") == fp:
            log(f"[{stage.name}] done earlier; skipped")
            outcomes.append((stage.name, "skipped"))
            continue
        resumed = prev.get("status") == "running"
        log(f"[{stage.name}] {'resuming' if resumed else 'running'}: {line}")
        if dry_run:
            outcomes.append((stage.name, "would run"))
            continue
        state[stage.name] = {"status": "running", "fingerprint": fp, "command": line}
        _write_state(study.state_path, study, state)
        t0 = time.perf_counter()
        try:
            cmd.main(args=argv, prog_name="embedkit " + " ".join(words), standalone_mode=False)
        except click.exceptions.Exit as exc:
            if exc.exit_code:
                raise EmbedkitError(f"stage {stage.name!r} stopped with status {exc.exit_code}") from None
        state[stage.name] = {"status": "done", "fingerprint": fp, "command": line,
                             "seconds": round(time.perf_counter() - t0, 2),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_state(study.state_path, study, state)
        outcomes.append((stage.name, "resumed" if resumed else "ran"))
    return outcomes
