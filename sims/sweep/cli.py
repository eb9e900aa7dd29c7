"""``dpo-sims sweep``: the sub-parser (JAX-free: ``--help`` imports no JAX) and the command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..cli import UsageError
from .config import builtin_configs, load_config
from .schema import COMPILE_MODES, FIELDS, MAX_CONFIGS, fields_help


# --------------------------------------------------------------------------- CLI
_EPILOG = """\
config (TOML; full reference in docs/sweeps.md):
  name = "my-sweep"            # optional label
  seeds = 4                    # seeds per configuration (dimension `seed`)
  seed = 0                     # base seed: seed s uses fold_in(key(seed), s)
  [base]                       # one configuration; every field has a default
  mode = "both"
  distinguishability = 1.0
  lr = 0.1
  steps = 100
  [grid]                       # axes: lists or {{linspace|logspace = [a, b, k]}}
  distinguishability = [0.5, 1.0, 2.0, 4.0]
  lr = {{logspace = [-2, -1, 3]}}
  # per-behaviour element: distinguishability_1 = [0.5, 1, 2]

fields ([base] keys; sweepable ones are [grid] axes):
{fields}

shipped configs (pass builtin:NAME): {builtins}
results: xarray.open_zarr(RESULTS.zarr); rerun the same command to resume.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of configurations (TOML) into a zarr results store",
        description="Run every configuration of a TOML sweep config (base + grid axes, seeds), "
        "compiled once per shape and vmapped, in chunks written as they finish; rerun to resume.",
        epilog=_EPILOG.format(fields=fields_help(FIELDS.values()), builtins=", ".join(builtin_configs())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="sweep config .toml, or builtin:NAME for a shipped one")
    p.add_argument("--out", required=True, help="results store directory (e.g. results.zarr)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="configurations per compute chunk (default: automatic from memory, at most 256)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dpo-sims store of a different config (only a directory dpo-sims "
                   "wrote, holding nothing else, is ever deleted)")
    p.add_argument("--allow-version-change", action="store_true",
                   help="resume a store begun with another dpo-sims, code, JAX or jaxlib version (recorded in the "
                   "store's `resumes` attribute; default: refused)")
    p.add_argument("--allow-huge", action="store_true",
                   help=f"run a grid of more than {MAX_CONFIGS:,} configurations (default: refused; see --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (configs, chunks, memory, estimated time and store size) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--step-progress", action="store_true",
                   help="also show the share of the running chunk's steps done (one device; compiles a second "
                   "program)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto", dest="compile_mode",
                   help="XLA compile: fast (quick compile, slower run), optimized, or auto (fast for small sweeps)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a Python module (dotted name) or file (path.py) before reading the config, e.g. "
                   "one that calls sims.sweep.register_family for a custom family; repeatable")
    distributed.add_distributed_arguments(p)
    p.set_defaults(func=run)


_IMPORTED: set[str] = set()


def import_plugins(specs) -> None:
    """Import each ``MODULE`` (dotted name) or ``FILE.py`` (``--import``), e.g. to register custom families.

    Raises:
      UsageError: a file that does not exist, a module that cannot be found, or an error while
        importing it (its message included).
    """
    import importlib
    import importlib.util

    for spec in specs:
        path = Path(spec)
        ident = str(path.resolve()) if (spec.endswith(".py") or path.is_file()) else spec
        if ident in _IMPORTED:  # the same plugin twice: once is enough
            continue
        try:
            if spec.endswith(".py") or path.is_file():
                if not path.is_file():
                    raise UsageError(f"--import {spec}: no such file; pass an existing .py file or a module name")
                mod_name = f"dpo_sims_plugin_{path.stem}"
                module_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[mod_name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
            _IMPORTED.add(ident)
        except UsageError:
            raise
        except ModuleNotFoundError as e:
            raise UsageError(f"--import {spec}: {e}; pass an importable module name or a .py file path") from None
        except Exception as e:  # the plugin's own error, named
            raise UsageError(f"--import {spec}: importing it failed: {type(e).__name__}: {e}") from None


def run(args) -> int:
    # first, before any JAX computation: join a multi-process run (--coordinator, --num-processes,
    # --process-id or $DPO_COORDINATOR, $DPO_NUM_PROCESSES, $DPO_PROCESS_ID) and pick --devices
    pid, nproc, executor = distributed.distributed_from_args(args)
    import_plugins(args.imports)
    cfg = load_config(args.config)
    from .plan import (_fmt_bytes, _fmt_seconds, _static_combos, estimate_cost, plan_sweep, resolve_compile_mode,
                       work_estimate)
    from .run import _plan_layout, run_sweep

    out = Path(args.out)
    if args.dry_run:
        plan = plan_sweep(cfg, args.chunk_size)
        groups = len(_static_combos(cfg))
        secs, nbytes = estimate_cost(cfg, plan, _plan_layout(cfg, plan), args.compile_mode)
        cap = (f"; above {MAX_CONFIGS:,} configurations: needs --allow-huge" if cfg.num_configs > MAX_CONFIGS
               else "")
        print(f"# sweep {cfg.name}: {cfg.num_configs} configurations x {cfg.seeds} seeds, axes "
              f"{dict(zip(cfg.axes, cfg.shape))}; {groups} compile group(s); {len(plan.chunks)} chunks of "
              f"{plan.chunk_configs} configurations (block {plan.block}); about "
              f"{plan.bytes_per_config * plan.chunk_configs / 2**20:.1f} MiB per chunk of "
              f"{plan.memory_available / 2**30:.1f} GiB available; compile "
              f"{resolve_compile_mode(cfg, args.compile_mode)} (~{work_estimate(cfg):.2g} flops); estimated "
              f"{_fmt_seconds(secs)} on 2 CPU cores and a store of at most {_fmt_bytes(nbytes)} "
              f"(uncompressed){cap}")
        return 0
    res = run_sweep(cfg, out, chunk_size=args.chunk_size, overwrite=args.overwrite,
                    progress=not args.no_progress and pid == 0, step_progress=args.step_progress,
                    compile_mode=args.compile_mode, executor=executor,
                    allow_version_change=args.allow_version_change, allow_huge=args.allow_huge)
    if pid != 0:  # process 0 reports for the whole run
        return 130 if res.interrupted else 0
    if res.interrupted:
        print(f"interrupted: {res.skipped + res.computed} of {res.n_chunks} chunks are saved in {out}; "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"# wrote {out}: {res.n_chunks} chunks ({res.computed} computed, {res.skipped} resumed) in "
          f"{res.seconds:.1f} s; open with xarray.open_zarr({str(out)!r})")
    if res.diverged:
        print(f"# diverged (NaN/inf, or a finite loss blow-up: the loss rose far above its start; see the "
              f"`diverged` variable): {res.diverged}")
    return 0

