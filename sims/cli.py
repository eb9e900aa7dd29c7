"""``dpo-sims``: the command-line entry point.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds an ``argparse`` sub-parser whose ``func(args) -> int`` runs it.
Only the module of the subcommand being run is imported, so ``dpo-sims --help``
lists the subcommands without importing JAX (the listing's one-line helps are in
:data:`COMMANDS`).
Exit codes: 0 success, 1 a check failed, 2 bad input, 130 interrupted (Ctrl-C).

Ctrl-C: the first one stops cleanly (``sweep`` and ``reproduce`` finish and save the
running chunk; rerun to resume); a second one exits at once with code 130, losing
only the running chunk — like ``kill -9``, which the stores survive.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

#: (name, module, one-line help) of every subcommand, in the order ``dpo-sims --help`` lists them
COMMANDS = (
    ("simulate", "sims.simulate", "one configuration: population vs empirical loss, accuracy, weight change"),
    ("sweep", "sims.sweep", "run a grid of configurations (TOML) into a zarr results store"),
    ("plot", "sims.plots", "plot a metric from a sweep's results store (PNG)"),
    ("verify", "sims.verify",
     "check a results store's chunks against their checksums (--repair: mark damaged ones for recompute)"),
    ("reproduce", "sims.reproduce",
     "the main job: the paper's three phenomena, analytic and empirical, with report.md"),
    ("validate", "sims.validate",
     "check claims C0–C5 (docs/theory.md §4): analytic vs empirical vs bound; exit 0 when all pass"),
    ("embed", "sims.embed", "persona statements or TRL preference data → embeddings (emb.npz) with a real model"),
    ("properties", "sims.embed", "per-behaviour n, class balance, distinguishability, concentration, trace"),
    ("fit", "sims.embed", "Gaussian fit of an emb.npz → distribution .npz (docs/theory.md §2.4)"),
    ("real", "sims.real", "last-layer DPO on real embeddings vs the Gaussian prediction"),
    ("study", "sims.study",
     "studies beyond the paper: objectives, re-weighting, generalisation, optimizer, Gaussian equivalence"),
    ("bench", "sims.bench",
     "benchmark the batched engine against a PyTorch loop, a NumPy loop and the GEMM roofline"),
)

# subcommand modules, in the order ``dpo-sims --help`` lists them
COMMAND_MODULES = tuple(module for _, module, _ in COMMANDS)

# True while main() runs as the process's entry point (console script, ``python -m sims``):
# only then does a second Ctrl-C end the process at once
_PROCESS_ENTRY = False


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


def second_interrupt(command: str = "") -> None:
    """Handle a second Ctrl-C: exit the process now with code 130 when running as the CLI.

    Raising ``KeyboardInterrupt`` again while XLA is compiling or calling back into Python
    can crash the interpreter (a segfault, exit 139), so the CLI leaves with ``os._exit(130)``:
    finished chunks are on disk, the running one is lost. Called in-process (tests,
    notebooks) it raises ``KeyboardInterrupt`` instead.
    """
    if not _PROCESS_ENTRY:
        raise KeyboardInterrupt
    name = f"dpo-sims {command}".strip()
    try:
        os.write(2, f"\n{name}: interrupted again; stopped now (finished chunks are kept)\n".encode())
    finally:
        os._exit(130)


def _on_sigint(signum, frame):
    """First Ctrl-C: KeyboardInterrupt (clean stop); any later one: :func:`second_interrupt`."""
    signal.signal(signal.SIGINT, lambda s, f: second_interrupt(_current_command))
    raise KeyboardInterrupt


def _unraisable(hook_args, _default=sys.unraisablehook):
    """A first Ctrl-C that landed in a callback whose exceptions Python ignores (JAX's gc
    callback): no traceback; deliver it again, so it still stops the command."""
    if isinstance(hook_args.exc_value, KeyboardInterrupt) and _PROCESS_ENTRY:
        import _thread
        import threading

        signal.signal(signal.SIGINT, _on_sigint)  # still the first Ctrl-C
        timer = threading.Timer(0.05, _thread.interrupt_main, (signal.SIGINT,))  # raised outside the callback
        timer.daemon = True
        timer.start()
        return
    _default(hook_args)


_current_command = ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``dpo-sims`` parser.

    Args:
      only: import and register just this subcommand's module (with every subcommand it
        registers; the others get a stub sub-parser with their one-line help, for the listing); ``""``: import none (for
        ``dpo-sims --help``); ``None``: import every module (the full parser).
    """
    parser = argparse.ArgumentParser(
        prog="dpo-sims",
        description="Simulate last-layer DPO learning dynamics (Im & Li, ICML 2024): "
        "analytic (population) and empirical (finite-sample) side by side.",
        epilog="Run `dpo-sims COMMAND --help` for a command's options. "
        "Exit codes: 0 success, 1 a check failed, 2 bad input, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    only_module = next((m for n, m, _ in COMMANDS if n == only), None) if only else None
    for name, module_name, help_text in COMMANDS:
        if name in sub.choices:  # registered by an earlier module (sims.embed adds embed, properties, fit)
            continue
        if only is not None and module_name != only_module:
            sub.add_parser(name, help=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a subcommand not shipped in this build
            if e.name == module_name:
                continue
            raise
        module.register(sub)
    return parser


def _command_in(argv) -> str:
    """The subcommand named in ``argv`` ("" when none, or an unknown one)."""
    names = {name for name, _, _ in COMMANDS}
    for tok in argv:
        if tok == "--":
            break
        if not tok.startswith("-"):
            return tok if tok in names else ""
    return ""


def main(argv=None) -> int:
    global _PROCESS_ENTRY, _current_command
    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    if entry and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _PROCESS_ENTRY, _current_command = True, command
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable
    try:
        parser = build_parser(only=command)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        try:
            rc = int(args.func(args) or 0)
        except (UsageError, ValueError, FileNotFoundError) as e:
            print(f"dpo-sims {args.command}: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        if _PROCESS_ENTRY:  # from now on a Ctrl-C leaves at once
            signal.signal(signal.SIGINT, lambda s, f: second_interrupt(command))
        print(f"{f'dpo-sims {command}'.strip()}: interrupted", file=sys.stderr)
        rc = 130
    if rc == 130 and _PROCESS_ENTRY:
        # interrupted: skip the interpreter's teardown (XLA's threads and callbacks, where a
        # further Ctrl-C could crash it); everything saved is already on disk
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return rc


if __name__ == "__main__":
    sys.exit(main())
