"""The `seekforge` subcommands, one module each (`register` adds its parser, `run` runs it).

The top layer: may import any part of seekforge, the heavy ones (torch, the engine, the trainers) inside the
functions that use them, so that `seekforge --help` and the commands that do not train or serve start fast.
Nothing but seekforge.cli imports this package."""

from __future__ import annotations


RUN_DIRECTORY = "run directory (checkpoints, metrics, final model, report)"


def add_run_arguments(p, fields: str | None, out_help: str = RUN_DIRECTORY,
                      resume_help: str = "continue the run in --out from its last checkpoint") -> None:
    """What every training command takes: --out, --config (a file of `fields`' fields; None: the command adds its
    own), --resume and key=value overrides."""
    p.add_argument("--out", required=True, help=out_help)
    if fields is not None:
        p.add_argument("--config", help=f"a .yaml/.toml file of {fields} fields (command-line values win)")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("overrides", nargs="*", metavar="key=value")
