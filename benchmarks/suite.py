"""The measurement plan of ``dpo-sims bench`` and its JSON report.

All contenders run in this one process on the same work (:mod:`benchmarks.engines`);
peak-RSS points run in fresh subprocesses (:mod:`benchmarks.rss`), since peak
RSS only grows within a process. Sizes (full / ``--quick``):

==========================  ====================================  ===========================
measurement                 full                                  quick
==========================  ====================================  ===========================
headline (keys)             C = 4096, N = 1024, d = 64, T = 200   C = 1024, N = 1024, d = 64, T = 100
sweep CLI end to end        the headline's work                   the headline's work
roofline vs C               C ∈ {256, 1024, 4096}                 C ∈ {256, 1024}
independent draws           C = 256                               C = 64
PyTorch / NumPy loops       4 / 16 configurations                 2 / 4 configurations
vmap of the core engine     C = 256                               C = 64
population engine           C = 2048, T = 100                     C = 512, T = 50
population vs vmap(core)    C = 256, d = 512, T = 20              C = 64, d = 256, T = 10
population by quadrature    C = 2048, T = 100, fast vs reference  C = 512, T = 50
cost exponents              4 sizes per axis around               3 sizes per axis around
                            C=1024, N=512, d=64, T=100            C=512, N=256, d=32, T=40
peak RSS vs C (subprocess)  C ∈ {10³, 10⁴, 10⁵}, T = 10           C ∈ {10³, 10⁴}, T = 4
==========================  ====================================  ===========================

The loops' rates are per configuration, so measuring them on a few
configurations and comparing with the engine at C = 4096 is the issue's
"speedup at C = 4096".
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import engines

__all__ = ["SIZES", "run_benchmarks", "fit_exponent", "machine_info"]

SIZES = {
    "full": {
        "headline": dict(c=4096, n=1024, d=64, steps=200),
        "roofline_c": (256, 1024, 4096),
        "torch_configs": 4, "numpy_configs": 16, "vmap_configs": 256,
        "population": dict(c=2048, d=64, steps=100),
        "population_vs_core": dict(c=256, d=512, steps=20),
        "exponent_base": dict(c=1024, n=512, d=64, steps=100),
        "exponent_factors": (0.5, 1, 2, 4),
        "rss_configs": (1_000, 10_000, 100_000), "rss": dict(n=1024, d=64, steps=10, chunk_size=1024),
        "minibatch": dict(n=65536, d=16, batch_size=128, steps=400),
        "repeats": 2,
    },
    "quick": {
        "headline": dict(c=1024, n=1024, d=64, steps=100),
        "roofline_c": (256, 1024),
        "torch_configs": 2, "numpy_configs": 4, "vmap_configs": 64,
        "population": dict(c=512, d=64, steps=50),
        "population_vs_core": dict(c=64, d=256, steps=10),
        "exponent_base": dict(c=512, n=256, d=32, steps=40),
        "exponent_factors": (0.5, 1, 2),
        "rss_configs": (1_000, 10_000), "rss": dict(n=512, d=64, steps=4, chunk_size=1024),
        "minibatch": dict(n=8192, d=16, batch_size=128, steps=200),
        "repeats": 1,
    },
}


def fit_exponent(sizes, seconds) -> float:
    """Least-squares slope of ``log(seconds)`` against ``log(size)`` (cost ∝ size^slope)."""
    return float(np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float)), 1)[0])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Machine, device and library versions for the report."""
    import jax
    import jaxlib

    import dynamics

    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "dynamics": dynamics.__version__,
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "torch": None,
    }
    if engines.torch_available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def _rate(configs, steps, seconds):
    return configs * steps / seconds


def _rss_point(c: int, spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.rss", "--configs", str(c), "--n", str(spec["n"]), "--d", str(spec["d"]),
           "--steps", str(spec["steps"]), "--chunk-size", str(spec["chunk_size"])]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    except subprocess.TimeoutExpired:
        return {"configs": c, "error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        return {"configs": c, "error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def population_by_quadrature(c: int, d: int, steps: int, *, repeats: int = 1) -> dict:
    """The batched population engine with the ``"fast"`` and the ``"reference"`` quadrature rule.

    Alternates the rules ``repeats`` times (best time of each; compilation
    excluded), so both see the same machine load. Returns sizes, both rates, the
    speedup (reference time / fast time), the nodes per component of each rule and
    the largest ``|δ_T(fast) − δ_T(reference)|`` (float32 unless x64 is enabled).
    """
    from dynamics import gaussian_integrals as gi

    best, deltas = {}, {}
    for _ in range(max(1, repeats)):
        for rule in ("reference", "fast"):
            with gi.quadrature_rule(rule):
                sec, delta = engines.population_run(c, d, steps, repeats=1)
            best[rule] = min(best.get(rule, np.inf), sec)
            deltas[rule] = np.asarray(delta)
    return {"c": c, "d": d, "steps": steps,
            "fast_config_steps_per_s": _rate(c, steps, best["fast"]),
            "reference_config_steps_per_s": _rate(c, steps, best["reference"]),
            "speedup": best["reference"] / best["fast"],
            "fast_nodes": gi.quadrature_nodes("fast"), "reference_nodes": gi.quadrature_nodes("reference"),
            "max_abs_delta_difference": float(np.max(np.abs(deltas["fast"] - deltas["reference"])))}


def run_benchmarks(quick: bool = False, *, log=None, rss: bool = True, torch: bool = True) -> dict:
    """Run every measurement; return the report (the ``--json`` content).

    Keys: ``engine_config_steps_per_s``, ``engine_gflops``,
    ``gemm_gflops``, ``roofline_fraction``, ``torch_loop_config_steps_per_s``,
    ``speedup_vs_torch_loop`` (None when torch is absent, with
    ``torch_loop_skipped`` saying why), ``numpy_loop_config_steps_per_s``,
    ``population_config_steps_per_s``; plus ``machine``, ``sizes``,
    ``roofline_vs_configs``, ``exponents``, ``exponent_points``, ``peak_rss``,
    ``vmap_core_config_steps_per_s``, ``independent_draws_config_steps_per_s``,
    ``torch_loop_by_threads``, ``population_vs_core``,
    ``sweep_cli_config_steps_per_s`` (the engine row's work through ``sims.sweep.run_sweep``, config →
    store, warm) and ``sweep_cli_fraction_of_engine`` (that ÷ ``engine_config_steps_per_s``),
    ``population_quadrature`` and ``population_speedup_vs_reference_quadrature`` (the batched
    population engine with the 96-node vs the 1344-node quadrature, :func:`population_by_quadrature`),
    ``square_gemm_gflops``, ``minibatch_order`` (minibatch SGD of the core layer with the
    per-epoch order table vs a permutation per step: seconds, speedup, identical losses),
    ``load_average`` (start, end) and ``seconds``.
    """
    log0 = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    stages, last = {}, [None, time.perf_counter()]

    def log(msg):  # also records how long each stage took (report["stage_seconds"])
        now = time.perf_counter()
        if last[0] is not None:
            stages[last[0]] = stages.get(last[0], 0.0) + now - last[1]
        last[0], last[1] = msg.split(":")[0], now
        log0(msg)

    plan = SIZES["quick" if quick else "full"]
    reps = plan["repeats"]
    t_start = time.perf_counter()
    report = {"mode": "quick" if quick else "full", "machine": machine_info(),
              "load_average_start": list(os.getloadavg())}
    h = plan["headline"]
    c, n, d, steps = h["c"], h["n"], h["d"], h["steps"]
    flops = 4.0 * n * d  # per configuration-step
    report["sizes"] = {"configs": c, "n": n, "d": d, "steps": steps, "beta": engines.BETA, "lr": engines.LR,
                       "dtype": "float32", "flops_per_config_step": flops, "loss": "sigmoid", "optimizer": "sgd"}

    log(f"engine: C={c} N={n} d={d} T={steps}, timed alternately with the roofline GEMM")
    sec, gsec = engines.paired_run(c, n, d, steps, repeats=reps + 1)
    gflops = 4.0 * n * d * c * steps / gsec / 1e9
    report["engine_seconds"] = sec
    report["engine_config_steps_per_s"] = _rate(c, steps, sec)
    report["engine_gflops"] = report["engine_config_steps_per_s"] * flops / 1e9
    report["gemm_seconds"] = gsec
    report["gemm_gflops"] = gflops
    report["roofline_fraction"] = report["engine_gflops"] / gflops
    log("square GEMM")
    report["square_gemm_gflops"] = engines.square_gemm_gflops(1024 if quick else 2048)

    rows = []
    for cc in plan["roofline_c"]:
        if cc == c:
            rows.append({"configs": cc, "engine_gflops": report["engine_gflops"], "gemm_gflops": gflops,
                         "roofline_fraction": report["roofline_fraction"]})
            continue
        log(f"roofline at C={cc}")
        es, gs = engines.paired_run(cc, n, d, steps, repeats=reps + 1)
        ef = _rate(cc, steps, es) * flops / 1e9
        gf = 4.0 * n * d * cc * steps / gs / 1e9
        rows.append({"configs": cc, "engine_gflops": ef, "gemm_gflops": gf, "roofline_fraction": ef / gf})
    report["roofline_vs_configs"] = rows

    log(f"dpo-sims sweep end to end (config → store) on the engine row's work: C={c}")
    ssec = engines.sweep_cli_run(c, n, d, steps, repeats=reps)
    report["sweep_cli_seconds"] = ssec
    report["sweep_cli_config_steps_per_s"] = _rate(c, steps, ssec)
    report["sweep_cli_fraction_of_engine"] = report["sweep_cli_config_steps_per_s"] / report["engine_config_steps_per_s"]

    log("independent draws (memory-bound mode)")
    ci = min(c, 64 if quick else 256)
    isec, _ = engines.engine_run(ci, n, d, steps, repeats=1, draws="independent")
    report["independent_draws_config_steps_per_s"] = _rate(ci, steps, isec)

    if torch and engines.torch_available():
        k = plan["torch_configs"]
        log(f"PyTorch loop: {k} configurations")
        # torch's default threads and one thread; the faster counts (the fairest to torch)
        by_threads = {}
        for threads in (None, 1):
            engines.torch_loop(1, n, d, 5, threads=threads)  # warm-up (lazy initialisation, thread pool)
            tsec, _ = engines.torch_loop(k, n, d, steps, threads=threads)
            by_threads["default" if threads is None else str(threads)] = _rate(k, steps, tsec)
        report["torch_loop_by_threads"] = by_threads
        report["torch_loop_config_steps_per_s"] = max(by_threads.values())
        report["speedup_vs_torch_loop"] = report["engine_config_steps_per_s"] / report["torch_loop_config_steps_per_s"]
        report["torch_loop_skipped"] = None
    else:
        report["torch_loop_config_steps_per_s"] = None
        report["speedup_vs_torch_loop"] = None
        report["torch_loop_skipped"] = "torch is not installed (pip install 'dpo-dynamics[bench]')" if torch else "disabled"
    k = plan["numpy_configs"]
    log(f"NumPy loop: {k} configurations")
    engines.numpy_loop(1, n, d, 5)
    nsec = min(engines.numpy_loop(k, n, d, steps)[0] for _ in range(reps))
    report["numpy_loop_config_steps_per_s"] = _rate(k, steps, nsec)
    report["speedup_vs_numpy_loop"] = report["engine_config_steps_per_s"] / report["numpy_loop_config_steps_per_s"]
    k = plan["vmap_configs"]
    log(f"vmap of the core engine: {k} configurations")
    vsec, _ = engines.vmap_core_run(k, n, d, steps)
    report["vmap_core_config_steps_per_s"] = _rate(k, steps, vsec)

    p = plan["population"]
    log(f"population engine: C={p['c']} T={p['steps']}")
    psec, _ = engines.population_run(p["c"], p["d"], p["steps"], repeats=reps)
    report["population_config_steps_per_s"] = _rate(p["c"], p["steps"], psec)
    pv = plan["population_vs_core"]
    log(f"population: batched vs vmap of the core at d={pv['d']}")
    bsec, _ = engines.population_run(pv["c"], pv["d"], pv["steps"], repeats=reps)
    vsec, _ = engines.vmap_core_population_run(pv["c"], pv["d"], pv["steps"], repeats=reps)
    report["population_vs_core"] = dict(pv, batched_config_steps_per_s=_rate(pv["c"], pv["steps"], bsec),
                                        vmap_core_config_steps_per_s=_rate(pv["c"], pv["steps"], vsec))
    log(f"population engine by quadrature rule (fast vs reference): C={p['c']} T={p['steps']}")
    report["population_quadrature"] = population_by_quadrature(p["c"], p["d"], p["steps"], repeats=max(2, reps))
    report["population_speedup_vs_reference_quadrature"] = report["population_quadrature"]["speedup"]

    mb = plan["minibatch"]
    log(f"minibatch SGD order: per-epoch table vs a permutation per step, {mb}")
    t_table, loss_table = engines.minibatch_run(**mb, order_table=True, repeats=reps)
    t_step, loss_step = engines.minibatch_run(**mb, order_table=False, repeats=reps)
    report["minibatch_order"] = dict(mb, table_seconds=t_table, per_step_seconds=t_step,
                                     speedup=t_step / t_table,
                                     identical=bool(np.array_equal(np.asarray(loss_table), np.asarray(loss_step))))

    base = plan["exponent_base"]
    exps, points = {}, {}
    for axis in ("c", "n", "d", "steps"):
        sizes, secs = [], []
        for f in plan["exponent_factors"]:
            kw = dict(base)
            kw[axis] = max(1, int(round(base[axis] * f)))
            log(f"exponent {axis}: {kw}")
            # along C the chunk is fixed at the smallest C, so all C points share one compiled chunk
            chunk = int(round(base["c"] * min(plan["exponent_factors"]))) if axis == "c" else None
            s, _ = engines.engine_run(kw["c"], kw["n"], kw["d"], kw["steps"], repeats=reps, chunk_size=chunk)
            sizes.append(kw[axis])
            secs.append(s)
        name = {"c": "C", "n": "N", "d": "d", "steps": "T"}[axis]
        exps[name] = fit_exponent(sizes, secs)
        points[name] = {"sizes": sizes, "seconds": secs}
    report["exponents"] = exps
    report["exponent_points"] = points
    report["exponent_base"] = base

    if rss:
        spec = plan["rss"]
        pts = []
        for cc in plan["rss_configs"]:
            log(f"peak RSS: C={cc} (subprocess)")
            pts.append(_rss_point(cc, spec, timeout=300 if not quick else 90))
        report["peak_rss"] = {"spec": spec, "points": pts}
    log("done")
    report["stage_seconds"] = {k: round(v, 2) for k, v in stages.items()}
    report["load_average_end"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - t_start
    return report
