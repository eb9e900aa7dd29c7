"""``dpo-sims bench``: our batched engine against what a user would otherwise write.

In one process, on the same work (DPO, full-batch GD, one behaviour, N pairs
in d dimensions, T steps, C configurations): (a) the batched engine with
common random numbers, (b) the authors'-style PyTorch loop (skipped when torch
is absent: ``pip install 'dpo-dynamics[bench]'``), (c) a NumPy loop, (d) a
GEMM of the same shapes and FLOP count (the roofline), (e) the batched
population engine (also with the 1344-node reference quadrature); plus
fitted cost exponents and peak RSS against C. The code lives in
``benchmarks/``; docs/performance.md records measured results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import UsageError

#: the keys the JSON report carries
REPORT_KEYS = (
    "engine_config_steps_per_s", "engine_gflops", "gemm_gflops", "roofline_fraction",
    "torch_loop_config_steps_per_s", "speedup_vs_torch_loop", "numpy_loop_config_steps_per_s",
    "population_config_steps_per_s", "population_speedup_vs_reference_quadrature",
    "sweep_cli_config_steps_per_s", "sweep_cli_fraction_of_engine",
)


def _import_suite():
    """``benchmarks.suite``: installed, or from the source checkout beside this package."""
    try:
        from benchmarks import suite
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.suite"):
            raise
        root = Path(__file__).resolve().parents[1]
        if not (root / "benchmarks" / "suite.py").is_file():
            raise UsageError("the benchmarks package is not installed; run `dpo-sims bench` from a source "
                             "checkout of dpo-dynamics") from None
        sys.path.insert(0, str(root))
        from benchmarks import suite
    return suite


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the batched engine against a PyTorch loop, a NumPy loop and the GEMM roofline",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes on 2 CPU cores)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop even if torch is installed")
    p.set_defaults(func=run)


def _fmt(v, spec=",.0f"):
    return "skipped" if v is None else format(v, spec)


def run(args) -> int:
    if args.json is not None:
        parent = Path(args.json).resolve().parent
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--json {args.json}: {parent} is a file, not a directory; pick another path")
        if not parent.is_dir():
            raise UsageError(f"--json {args.json}: directory {parent} does not exist; create it or pick another path")
        from .store import check_output_file

        check_output_file(args.json, option="--json")  # a directory, or an unwritable place: refused before the run
    suite = _import_suite()
    rep = suite.run_benchmarks(args.quick, rss=not args.no_rss, torch=not args.no_torch)
    s = rep["sizes"]
    m = rep["machine"]
    print(f"# dpo-sims bench ({rep['mode']}): C={s['configs']} N={s['n']} d={s['d']} T={s['steps']} "
          f"DPO full-batch GD, float32, {s['flops_per_config_step']:.0f} FLOP per config-step")
    print(f"# {m['cpu']} ({m['cpu_count']} cores), {m['backend']} {m['devices']}; jax {m['jax']}, "
          f"numpy {m['numpy']}, torch {m['torch'] or 'absent'}; load average "
          f"{rep['load_average_start'][0]:.2f} -> {rep['load_average_end'][0]:.2f}")
    rows = [
        ("batched engine (common random numbers)", rep["engine_config_steps_per_s"], rep["engine_gflops"]),
        ("batched engine, independent draws", rep["independent_draws_config_steps_per_s"], None),
        ("GEMM roofline (same shapes/FLOPs)", None, rep["gemm_gflops"]),
        ("PyTorch loop (authors' style)", rep["torch_loop_config_steps_per_s"], None),
        ("NumPy loop", rep["numpy_loop_config_steps_per_s"], None),
        ("jax.vmap of the core engine", rep["vmap_core_config_steps_per_s"], None),
        ("dpo-sims sweep, config -> store", rep["sweep_cli_config_steps_per_s"], None),
        ("population engine (N -> inf)", rep["population_config_steps_per_s"], None),
    ]
    print(f"{'contender':<42} {'config-steps/s':>15} {'GFLOP/s':>9}")
    for name, rate, gf in rows:
        rate_s = "-" if rate is None and "GEMM" in name else _fmt(rate)
        gf_s = "-" if gf is None else f"{gf:.1f}"
        print(f"{name:<42} {rate_s:>15} {gf_s:>9}")
    print(f"roofline_fraction {rep['roofline_fraction']:.3f}; speedup_vs_torch_loop "
          f"{_fmt(rep['speedup_vs_torch_loop'], ',.1f')}"
          + (f" ({rep['torch_loop_skipped']})" if rep["torch_loop_skipped"] else "")
          + f"; speedup_vs_numpy_loop {rep['speedup_vs_numpy_loop']:,.1f}")
    if rep.get("torch_loop_by_threads"):
        print("PyTorch loop by torch threads: " + ", ".join(f"{k}: {v:,.0f}" for k, v in rep["torch_loop_by_threads"].items())
              + " config-steps/s (the faster one is reported)")
    print(f"sweep_cli_fraction_of_engine {rep['sweep_cli_fraction_of_engine']:.2f} (dpo-sims sweep end to end "
          "on the engine row's work, through dynamics.trajectories)")
    pv = rep["population_vs_core"]
    print(f"population at d={pv['d']}, C={pv['c']}: batched {pv['batched_config_steps_per_s']:,.0f} vs jax.vmap of the "
          f"core {pv['vmap_core_config_steps_per_s']:,.0f} config-steps/s")
    pq = rep["population_quadrature"]
    print(f"population quadrature at d={pq['d']}, C={pq['c']}: fast rule ({pq['fast_nodes']} nodes) "
          f"{pq['fast_config_steps_per_s']:,.0f} vs reference ({pq['reference_nodes']} nodes) "
          f"{pq['reference_config_steps_per_s']:,.0f} config-steps/s = {pq['speedup']:.1f}x "
          f"(population_speedup_vs_reference_quadrature); max |delta difference| {pq['max_abs_delta_difference']:.1e}")
    mb = rep["minibatch_order"]
    print(f"minibatch SGD (core, N={mb['n']}, B={mb['batch_size']}, T={mb['steps']}): per-epoch order table "
          f"{mb['table_seconds']:.3f} s vs a permutation per step {mb['per_step_seconds']:.3f} s = "
          f"{mb['speedup']:.1f}x, identical losses: {mb['identical']}")
    print("roofline vs C: " + ", ".join(f"C={r['configs']}: {r['roofline_fraction']:.2f}"
                                        for r in rep["roofline_vs_configs"]))
    print("cost exponents (time ~ size^k): " + ", ".join(f"{k} {v:.2f}" for k, v in rep["exponents"].items()))
    if "peak_rss" in rep:
        pts = rep["peak_rss"]["points"]
        print("peak RSS vs C: " + ", ".join(
            f"C={p['configs']}: {p['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in p else f"C={p['configs']}: {p['error']}"
            for p in pts))
    print(f"# {rep['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2, default=float) + "\n")
        print(f"# wrote {args.json}")
    return 0
