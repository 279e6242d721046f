"""``dpdist`` command line: one subcommand per module in ``dpdist.commands``."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("train", "account", "audit", "bench", "tokenize", "export", "eval")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpdist", description="distributed differentially private LM training")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dpdist.commands.{name}").add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
