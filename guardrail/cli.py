"""``guardrail``: the command line, and nothing more than its frame.

Each command is registered by the package that implements it, as an entry point in the group
``guardrail.commands`` (pyproject.toml): ``serve`` by server/, ``check`` by offline/. So the
core imports neither, server/ and offline/ never import each other, and a command's heavy
imports load only when it runs. An entry point names a function that adds its subparser and
sets ``handler`` (a function of the parsed arguments that returns the exit status).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

COMMAND_GROUP = "guardrail.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardrail",
                                     description="Guard a reasoning model's stream, step by step.")
    commands = parser.add_subparsers(dest="command", required=True)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda entry: entry.name):
        register: Callable[[Any], None] = entry.load()
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
