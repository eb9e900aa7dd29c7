"""``dpo-sims verify``: check a results store's chunks against their checksums; ``--repair``.

Every finished chunk of a store written by ``dpo-sims sweep`` carries a checksum of its values
(``chunk_digest``), recorded when the chunk is written. ``verify`` reads the store once and
compares; a deleted, truncated or altered chunk file, and a deleted variable (its folder, e.g.
``rm -r STORE/loss``, or ``chunk_digest``), are reported (exit 1). ``--repair`` rebuilds
missing zarr metadata (``.zmetadata`` from the per-array files, or the reverse), recreates a
deleted variable from the template recorded in the store, and marks the damaged chunks
unfinished, so that rerunning the same ``dpo-sims sweep CONFIG.toml --out STORE`` recomputes
exactly them (a deleted coordinate is recreated by that rerun, from the template). ``dpo-sims sweep`` does all of this by itself whenever it resumes a
store, and ``dpo-sims plot`` refuses a damaged one (docs/sweeps.md §3).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a results store's chunks against their checksums (--repair: mark damaged ones for recompute)",
        description="Check every finished chunk of a results store against the checksum recorded when it was "
        "written, and the zarr metadata. Exit 0 when intact, 1 when something is damaged, 2 for bad input.",
        epilog="A sweep recomputes damaged chunks by itself on resume: rerun the same "
        "`dpo-sims sweep CONFIG.toml --out STORE`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="results store (RESULTS.zarr) written by `dpo-sims sweep`")
    p.add_argument("--repair", action="store_true",
                   help="rebuild missing metadata and mark damaged chunks unfinished, so that rerunning the sweep "
                   "recomputes them (default: only report)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .store import verify_store

    rep = verify_store(args.store, repair=args.repair)
    tail = f"; {rep.unverified} without a checksum (older store)" if rep.unverified else ""
    for line in rep.repaired:
        print(f"# {args.store}: {line}")
    for what in rep.metadata:
        print(f"{args.store}: metadata: {what}", file=sys.stderr)
    if rep.missing:
        names = ", ".join(rep.missing[:6]) + (" …" if len(rep.missing) > 6 else "")
        how = (f"rerun `dpo-sims sweep CONFIG.toml --out {args.store}` to recreate them from the template"
               if args.repair else "pass --repair to recreate them (their chunks are then recomputed by a rerun of "
               "the sweep)")
        print(f"{args.store}: {len(rep.missing)} array(s) missing ({names}); {how}", file=sys.stderr)
    if rep.bad:
        how = (f"rerun `dpo-sims sweep CONFIG.toml --out {args.store}` to recompute them" if args.repair else
               f"rerun `dpo-sims sweep CONFIG.toml --out {args.store}` (it recomputes them), or pass --repair")
        print(f"{args.store}: {rep.bad_text(limit=10)}; {how}", file=sys.stderr)
        return 1
    if rep.missing:
        return 1
    if rep.metadata:
        print(f"{args.store}: metadata damaged; pass --repair to rebuild it" if not args.repair else
              f"{args.store}: metadata could not be rebuilt; rebuild the store with `dpo-sims sweep CONFIG.toml "
              f"--out {args.store} --overwrite`", file=sys.stderr)
        return 1
    print(f"# {args.store}: intact — {rep.checked} of {rep.done} finished chunks match their checksums "
          f"({rep.n_chunks} chunks in all, {rep.n_chunks - rep.done} unfinished){tail}")
    return 0
