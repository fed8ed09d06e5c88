"""The ``trimkit`` command line. Each subcommand lives in :mod:`trimkit.commands` and registers
itself with ``register(subparsers)``; its handler returns the process exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "train", "eval", "check", "profile", "plugins")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimkit",
        description="SmartTrim for vision-language transformers: learned, cross-modal token and head trimming.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"trimkit.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"trimkit.commands.{name}":
                raise
            continue  # not shipped in this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
