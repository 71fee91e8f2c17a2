"""``embedkit run CONFIG``: run a study file (configs/*.yaml) stage by stage, skipping finished stages."""

from __future__ import annotations

import click


@click.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--only", multiple=True, help="Run only this stage (repeatable); the others are left as they are.")
@click.option("--dry-run", is_flag=True, help="Print what would run, run nothing.")
def run(config_file, only, dry_run):
    """Run a study described in YAML (see configs/): each stage is an embedkit command and its options.

    \b
    Finished stages are recorded in a state file beside the outputs and skipped on the next run while
    their options are unchanged; an interrupted stage resumes (every command keeps its own progress).
      embedkit run configs/mitocheck_demo.yaml
    """
    from ..errors import EmbedkitError
    from ..study import load_study, run_study

    root = click.get_current_context().find_root().command

    def lookup(words: list[str]) -> click.Command:
        cmd = root
        for w in words:
            sub = cmd.commands.get(w) if isinstance(cmd, click.Group) else None
            if sub is None or w == "run":
                raise EmbedkitError(f"{config_file}: unknown command {' '.join(words)!r} in a stage")
            cmd = sub
        return cmd

    study = load_study(config_file)
    outcomes = run_study(study, lookup, only=tuple(only), dry_run=dry_run, log=lambda s: click.echo(s, err=True))
    ran = sum(o in ("ran", "resumed") for _, o in outcomes)
    skipped = sum(o == "skipped" for _, o in outcomes)
    click.echo(f"study {study.name}: {ran} stage(s) run, {skipped} skipped; state in {study.state_path}")


COMMANDS = [run]
