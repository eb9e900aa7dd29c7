"""``dpo-sims``: the command-line entry point.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds an ``argparse`` sub-parser whose ``func(args) -> int`` runs it.
Only the module of the subcommand being run is imported, so ``dpo-sims --help``
lists the subcommands without importing JAX (the listing's one-line helps are in
:data:`COMMANDS`).
Exit codes: 0 success, 1 a check failed, 2 bad input, 130 interrupted (Ctrl-C).

Ctrl-C: the first one stops cleanly (``sweep`` and ``reproduce`` finish and save the
running chunk; rerun to resume); a second one exits at once with code 130, losing
only the running chunk — like ``kill -9``, which the stores survive. Either way the
command ends with one line on stderr and no traceback (an error that a first Ctrl-C
caused inside a library, e.g. an ``ImportError`` raised ``from`` it, counts as the
interruption).

Errors: bad input (:class:`UsageError`, ``ValueError``, a missing file, and an in-graph
check of a traced value, ``dynamics._checks.traced_check_message``) is one line on
stderr and exit 2; any other exception keeps its traceback.
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


#: Ctrl-Cs received by the CLI's handler (the first raises KeyboardInterrupt, any later one exits)
_INTERRUPTS = 0
#: every Ctrl-C this process's handlers took (never reset; one re-delivered after a swallowed
#: KeyboardInterrupt counts once): a command that saw one exits 130, even when library code caught
#: the KeyboardInterrupt it raised (e.g. NumPy's ImportError, caught by an optional import)
_RECEIVED = 0


def note_interrupt() -> int:
    """Count a Ctrl-C taken by a command's own SIGINT handler (``dpo-sims sweep`` installs one that
    finishes the running chunk); returns how many this process has taken in all. Only counted when
    running as the CLI (in-process calls return 0)."""
    global _RECEIVED
    if _PROCESS_ENTRY:
        _RECEIVED += 1
    return _RECEIVED


def interrupts_received() -> int:
    """How many Ctrl-Cs the CLI's handlers have taken (0 when not running as the CLI)."""
    return _RECEIVED


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
        _release_store_locks()
    finally:
        os._exit(130)


def _release_store_locks() -> None:
    """Remove the lock files of the stores this process writes (``os._exit`` skips their release)."""
    store = sys.modules.get("sims.store")
    if store is not None:
        try:
            store.release_all_locks()
        except Exception:  # noqa: BLE001 — a stale lock file is taken over by the next writer anyway
            pass


#: True while the subcommand's modules are imported: a first Ctrl-C then only is recorded (raised in a C
#: extension's initialisation, e.g. jaxlib's, KeyboardInterrupt can crash the interpreter: exit -11)
_DEFER = False


def _on_sigint(signum, frame):
    """The CLI's SIGINT handler: the first Ctrl-C raises KeyboardInterrupt (a clean stop; during the
    imports it is only recorded, and raised once they are done), any later one ends the process at once
    (:func:`second_interrupt`). It never changes the installed handler, so no Ctrl-C can arrive while
    none or the wrong one is installed."""
    global _INTERRUPTS, _RECEIVED
    _INTERRUPTS += 1
    _RECEIVED += 1
    if _INTERRUPTS > 1 or _RECEIVED > 1:
        second_interrupt(_current_command)
    if not _DEFER:
        raise KeyboardInterrupt


def _quiet_exit(signum, frame):
    """SIGINT after the command returned (interpreter teardown): leave at once, quietly, with 130."""
    os._exit(130)


_REDELIVER = None  # threading.Event set by _unraisable; a daemon thread then re-raises the first Ctrl-C


#: SIGINTs re-delivered by :func:`_redeliverer` (they reach the wakeup pipe too, and are not the user's)
_REDELIVERED = 0


def _redeliverer(event) -> None:
    import _thread
    import time

    global _REDELIVERED
    while True:
        event.wait()
        event.clear()
        time.sleep(0.05)  # outside the callback that swallowed it
        _REDELIVERED += 1
        _thread.interrupt_main(signal.SIGINT)


def _start_second_interrupt_watch() -> None:
    """Make a second Ctrl-C end the process at once even while the main thread is inside XLA.

    Python runs a signal handler only when the main thread returns to the interpreter, so while a chunk
    computes (C code, tens of seconds) the handler's ``os._exit`` waits for it. ``signal.set_wakeup_fd``
    has the C-level handler write each signal's number to a pipe at once; a daemon thread reads it and, at
    the second user Ctrl-C (re-deliveries of a swallowed first one not counted), exits 130 as
    :func:`second_interrupt` does. Must be called from the main thread.
    """
    import threading

    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main thread, or no wakeup support: the handlers alone decide
        os.close(r)
        os.close(w)
        return

    def watch():
        seen = 0
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            seen += data.count(bytes([int(signal.SIGINT)]))
            if seen - _REDELIVERED >= 2:
                second_interrupt(_current_command)

    threading.Thread(target=watch, name="dpo-sims-second-sigint", daemon=True).start()


def _start_redeliverer() -> None:
    """Start (once, at CLI start: no thread is created inside a hook) the thread that re-delivers a
    first Ctrl-C swallowed by a callback whose exceptions Python ignores."""
    global _REDELIVER
    import threading

    _REDELIVER = threading.Event()
    threading.Thread(target=_redeliverer, args=(_REDELIVER,), name="dpo-sims-sigint", daemon=True).start()


def _unraisable(hook_args, _default=sys.unraisablehook):
    """A first Ctrl-C that landed in a callback whose exceptions Python ignores (JAX's gc
    callback): no traceback; deliver it again, so it still stops the command. Nothing here
    allocates a thread or takes a blocking lock, so a second Ctrl-C arriving meanwhile exits."""
    global _INTERRUPTS, _RECEIVED
    if isinstance(hook_args.exc_value, KeyboardInterrupt) and _PROCESS_ENTRY:
        if _REDELIVER is not None and _INTERRUPTS == 1:
            _INTERRUPTS = _RECEIVED = 0  # the re-delivered one counts as the first again
            _REDELIVER.set()
        return
    _default(hook_args)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt or was raised from one (its cause/context chain), e.g.
    NumPy's ``ImportError`` when a Ctrl-C lands in its import."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


#: path arguments (argparse dest → how the user wrote it) that must not be an empty string
_PATH_ARGS = {"out": "--out", "json": "--json", "config": "CONFIG", "store": "STORE", "results": "RESULTS",
              "dist": "--dist", "data": "--data", "cache": "--cache"}


def _empty_path(args) -> str | None:
    """The first path argument given as an empty string (``--out ""``, which ``Path`` reads as ``.``)."""
    for dest, shown in _PATH_ARGS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            return shown
    return None


def _check_error(exc: BaseException):
    """The one-line message of an in-graph input check (``dynamics._checks``) carried by ``exc``, else None.
    (Only looked up when ``dynamics`` is already imported: no JAX import for it.)"""
    checks = sys.modules.get("dynamics._checks")
    return checks.traced_check_message(exc) if checks is not None else None


_current_command = ""

#: subcommands that never import JAX (every other one has it imported up front, Ctrl-C deferred)
_NO_JAX_COMMANDS = ("verify",)


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
    """Run ``dpo-sims`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (0, 1, 2 or 130).

    As the process's entry point (``argv`` None) it installs the Ctrl-C handling described above.
    """
    global _PROCESS_ENTRY, _current_command, _INTERRUPTS, _RECEIVED, _DEFER
    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    if entry and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _PROCESS_ENTRY, _current_command, _INTERRUPTS, _RECEIVED = True, command, 0, 0
        signal.signal(signal.SIGINT, _on_sigint)
        _start_redeliverer()
        _start_second_interrupt_watch()
        sys.unraisablehook = _unraisable
    interrupted = False
    try:
        _DEFER = _PROCESS_ENTRY
        try:
            parser = build_parser(only=command)
        finally:
            _DEFER = False
        if _PROCESS_ENTRY and _RECEIVED:  # a Ctrl-C during the imports: stop now
            raise KeyboardInterrupt
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if _PROCESS_ENTRY and args.command not in _NO_JAX_COMMANDS:
            # import JAX now, with a Ctrl-C only recorded: raised inside jaxlib's or NumPy's extension
            # initialisation it can crash the interpreter, or become an ImportError that an optional
            # import swallows
            _DEFER = True
            try:
                importlib.import_module("jax")
            finally:
                _DEFER = False
        if _PROCESS_ENTRY and _RECEIVED:
            raise KeyboardInterrupt
        empty = _empty_path(args)
        if empty:
            print(f"dpo-sims {args.command}: error: {empty} is empty (it would mean the current directory); "
                  "pass a path", file=sys.stderr)
            return 2
        try:
            rc = int(args.func(args) or 0)
            if _PROCESS_ENTRY and _RECEIVED:  # a Ctrl-C that library code caught: still a stop
                raise KeyboardInterrupt
        except (UsageError, ValueError, FileNotFoundError) as e:
            if _PROCESS_ENTRY and _INTERRUPTS:
                raise
            print(f"dpo-sims {args.command}: error: {e}", file=sys.stderr)
            return 2
        except Exception as e:
            message = None if (_PROCESS_ENTRY and _INTERRUPTS) or _caused_by_interrupt(e) else _check_error(e)
            if message is None:
                raise
            print(f"dpo-sims {args.command}: error: {message}", file=sys.stderr)
            return 2
    except BaseException as e:  # noqa: BLE001 — only an interruption is handled here
        if not (isinstance(e, KeyboardInterrupt) or (_PROCESS_ENTRY and _INTERRUPTS and not isinstance(e, SystemExit))
                or (not isinstance(e, SystemExit) and _caused_by_interrupt(e))):
            raise
        interrupted = True
    if interrupted:
        print(f"{f'dpo-sims {command}'.strip()}: interrupted", file=sys.stderr)
        rc = 130
    if _PROCESS_ENTRY:
        # from here on a Ctrl-C (interpreter teardown) leaves at once, quietly, with 130
        signal.signal(signal.SIGINT, _quiet_exit)
        if rc == 130:
            # interrupted: skip the interpreter's teardown (XLA's threads and callbacks, where a
            # further Ctrl-C could crash it); everything saved is already on disk
            sys.stdout.flush()
            sys.stderr.flush()
            _release_store_locks()
            os._exit(130)
    return rc


if __name__ == "__main__":
    # ``python -m sims.cli``: run the package's module, not this ``__main__`` copy, so that the UsageError
    # the commands raise (imported from ``sims.cli``) is the class main() catches (one line, exit 2)
    from sims.cli import main as _package_main

    sys.exit(_package_main())
