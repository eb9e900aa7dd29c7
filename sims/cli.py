"""``dpo-sims``: the command-line entry point.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds an ``argparse`` sub-parser whose ``func(args) -> int`` runs it.
Exit codes: 0 success, 1 a check failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, in the order ``dpo-sims --help`` lists them
COMMAND_MODULES = (
    "sims.simulate",
    "sims.sweep",
    "sims.plots",
    "sims.reproduce",
    "sims.validate",
    "sims.embed",
    "sims.real",
    "sims.study",
    "sims.bench",
)


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-sims",
        description="Simulate last-layer DPO learning dynamics (Im & Li, ICML 2024): "
        "analytic (population) and empirical (finite-sample) side by side.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a subcommand not shipped in this build
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"dpo-sims {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpo-sims {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
