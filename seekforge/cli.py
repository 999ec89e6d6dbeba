"""The `seekforge` command line: one entry point, one module per subcommand.

Each module named in COMMANDS defines `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed arguments and returning an exit code. Modules are
imported only when listed here, so adding a command never slows the others' start-up much.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from seekforge.errors import SeekforgeError

COMMANDS = [
    "seekforge.commands.info",
    "seekforge.commands.plan",
    "seekforge.commands.train",
    "seekforge.commands.quickstart",
    "seekforge.commands.tokenizer",
    "seekforge.commands.data",
    "seekforge.commands.report",
    "seekforge.commands.grpo",
    "seekforge.commands.sft",
    "seekforge.commands.sample",
    "seekforge.commands.distill",
    "seekforge.commands.rm",
    "seekforge.commands.extend",
    "seekforge.commands.eval",
    "seekforge.commands.eval_long",
    "seekforge.commands.generate",
    "seekforge.commands.chat",
    "seekforge.commands.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seekforge", description="DeepSeek-V3/R1, end to end.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SeekforgeError as err:
        print(f"seekforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
