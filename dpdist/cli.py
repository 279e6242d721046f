"""``dpdist`` command line: one subcommand per module in ``dpdist.commands``."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("train", "account", "audit", "bench", "tokenize", "export", "eval", "plot", "generate", "plan")


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one ``error:`` line, like every other refused input (argparse prints the
    whole usage block first); ``--help`` still shows it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="dpdist", description="distributed differentially private LM training")
    subparsers = parser.add_subparsers(dest="command", required=True)
    # Only the named command's module is imported (some import the accountant or the training loop, which
    # take seconds); without a known command every one is, for the usage message.
    for name in [argv[0]] if argv and argv[0] in COMMANDS else COMMANDS:
        importlib.import_module(f"dpdist.commands.{name}").add_parser(subparsers)
    args, extra = parser.parse_known_args(argv)
    # argparse fills a '*' positional from its first run of words only, so overrides after a flag
    # (``a=1 --dry-run b=2``) come back unparsed; they are overrides all the same, in their order.
    if extra and hasattr(args, "overrides") and not any(word.startswith("-") for word in extra):
        args.overrides += extra
    elif extra:
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
