"""The benchmark contenders, each doing the same work.

The work: ``C`` one-behaviour configurations ``μ± = ±(Δ_c/2) e₁``,
``Σ = I_d``, p = 1/2, with Δ_c spread over [0.5, 2]; each samples ``N``
preference pairs and trains a zero-initialised last-layer head (V = 2) with
DPO (sigmoid loss, β = 1) by full-batch GD for ``T`` steps at η = 0.1. A
configuration-step is one GD step of one configuration; its GEMM work is
``4·N·d`` FLOPs (forward ``N×d`` and backward ``d×N`` products).

Every function returns ``(seconds, result)`` where ``result`` allows checking
that the contenders computed the same thing (tests/test_batched.py does).
Timings exclude compilation: each JAX function is run once before timing.
"""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dynamics as dd
from dynamics.batched import PreferenceBatch, batched_empirical_trajectory, batched_population_trajectory

__all__ = [
    "distinguishabilities",
    "make_batch",
    "engine_callable",
    "engine_run",
    "gemm_callable",
    "paired_run",
    "population_run",
    "vmap_core_run",
    "vmap_core_population_run",
    "gemm_run",
    "square_gemm_gflops",
    "numpy_loop",
    "torch_loop",
    "torch_available",
]

BETA = 1.0
LR = 0.1


def distinguishabilities(c: int) -> np.ndarray:
    """Δ_c of configuration c: ``linspace(0.5, 2, C)``."""
    return np.linspace(0.5, 2.0, c)


def make_batch(c: int, d: int) -> PreferenceBatch:
    """The benchmark's C configurations (float32 unless x64 is enabled)."""
    return PreferenceBatch.single(distinguishabilities(c), d=d, sigma=1.0)


def _best(fn, repeats: int):
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def engine_callable(c: int, n: int, d: int, steps: int, *, draws: str = "common", chunk_size: int | None = None,
                    executor=None, seed: int = 0):
    """A compiled, warmed-up zero-argument call of our engine on the benchmark work, returning δ_T."""
    batch = make_batch(c, d)
    key = jax.random.key(seed)
    run = lambda: batched_empirical_trajectory(batch, key, n=n, n_eval=n, beta=BETA, lr=LR, steps=steps,
                                               record_every=steps, draws=draws, chunk_size=chunk_size,
                                               return_delta=False, executor=executor).delta_final
    run()  # compile
    return run


def engine_run(c: int, n: int, d: int, steps: int, *, repeats: int = 2, draws: str = "common",
               chunk_size: int | None = None, executor=None, seed: int = 0):
    """Our batched engine (records at steps 0 and T only, n_eval = N). Returns ``(seconds, δ_T (C, d))``."""
    return _best(engine_callable(c, n, d, steps, draws=draws, chunk_size=chunk_size, executor=executor, seed=seed),
                 repeats)


def population_run(c: int, d: int, steps: int, *, repeats: int = 2):
    """The batched population (N → ∞) engine. Returns ``(seconds, δ_T (C, d))``."""
    batch = make_batch(c, d)
    run = lambda: batched_population_trajectory(batch, beta=BETA, lr=LR, steps=steps, record_every=steps,
                                                return_delta=False).delta_final
    run()
    return _best(run, repeats)


def vmap_core_population_run(c: int, d: int, steps: int, *, repeats: int = 1):
    """``jax.vmap`` of :func:`dynamics.population_trajectory` (full d×d covariances, O(K d²) per
    configuration-step). Returns ``(seconds, δ_T (C, d))``."""
    dists = make_batch(c, d).stacked()

    @jax.jit
    def run_all(dists):
        return jax.vmap(lambda g: dd.population_trajectory(g, beta=BETA, lr=LR, steps=steps,
                                                           record_every=steps).delta[-1])(dists)

    run = lambda: jax.block_until_ready(run_all(dists))
    run()
    return _best(run, repeats)


def vmap_core_run(c: int, n: int, d: int, steps: int, *, repeats: int = 1, seed: int = 0):
    """``jax.vmap`` of :func:`dynamics.empirical_trajectory` over configurations (per-configuration
    data arrays, the straightforward way). Returns ``(seconds, δ_T (C, d))``."""
    dists = make_batch(c, d).stacked()
    key = jax.random.key(seed)

    @jax.jit
    def run_all(dists):
        return jax.vmap(lambda g: dd.empirical_trajectory(g, key, n=n, n_eval=n, beta=BETA, lr=LR, steps=steps,
                                                          record_every=steps).delta[-1])(dists)

    run = lambda: jax.block_until_ready(run_all(dists))
    run()
    return _best(run, repeats)


def minibatch_run(n: int, d: int, batch_size: int, steps: int, *, order_table: bool, repeats: int = 2):
    """Seconds (best of ``repeats``) of one minibatch-SGD run of the core empirical layer, with the
    per-epoch order table (``order_table=True``, the default path) or a permutation drawn at every step
    (the table-free path used past ``dynamics._train.PERM_TABLE_MAX``), and its final training loss.
    """
    from dynamics import _train

    saved = _train.PERM_TABLE_MAX
    _train.PERM_TABLE_MAX = saved if order_table else 0
    jax.clear_caches()  # the threshold is read at trace time
    try:
        dist = dd.GaussianPreference.single(1.0, d)
        fn = jax.jit(lambda key: dd.empirical_trajectory(dist, key, n=n, n_eval=256, beta=BETA, lr=LR, steps=steps,
                                                         batch_size=batch_size, record_every=steps).train["loss"])
        jax.block_until_ready(fn(jax.random.key(0)))  # compile
        return _best(lambda: jax.block_until_ready(fn(jax.random.key(0))), repeats)
    finally:
        _train.PERM_TABLE_MAX = saved
        jax.clear_caches()


def gemm_callable(c: int, n: int, d: int, steps: int, *, dtype=jnp.float32):
    """A compiled, warmed-up zero-argument call of the roofline loop (see :func:`gemm_run`)."""
    e = jax.random.normal(jax.random.key(1), (n, d), dtype)
    w0 = jax.random.normal(jax.random.key(2), (c, d), dtype) / np.sqrt(n * d)

    @jax.jit
    def loop(w):
        return jax.lax.fori_loop(0, steps, lambda i, w: ((w @ e.T) @ e) * (1.0 / n), w)

    run = lambda: jax.block_until_ready(loop(w0))
    run()
    return run


def gemm_run(c: int, n: int, d: int, steps: int, *, repeats: int = 2, dtype=jnp.float32):
    """The roofline: per step the same two GEMMs as the engine, ``(C×d)·(d×N)`` and
    ``(C×N)·(N×d)`` (``4·N·d·C`` FLOPs), and nothing else. Returns ``(seconds, GFLOP/s)``."""
    sec, _ = _best(gemm_callable(c, n, d, steps, dtype=dtype), repeats)
    return sec, 4.0 * n * d * c * steps / sec / 1e9


def paired_run(c: int, n: int, d: int, steps: int, *, repeats: int = 3):
    """Engine and roofline timed alternately (best of ``repeats`` each), so that load from other
    processes hits both alike. Returns ``(engine seconds, gemm seconds)``."""
    eng = engine_callable(c, n, d, steps)
    gemm = gemm_callable(c, n, d, steps)
    best_e = best_g = np.inf
    for _ in range(repeats):
        best_e = min(best_e, _best(eng, 1)[0])
        best_g = min(best_g, _best(gemm, 1)[0])
    return best_e, best_g


def square_gemm_gflops(size: int = 2048, repeats: int = 3, dtype=jnp.float32) -> float:
    """Peak-style figure: one ``size³`` f32 GEMM (``2·size³`` FLOPs), GFLOP/s."""
    a = jax.random.normal(jax.random.key(3), (size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    sec, _ = _best(lambda: f(a).block_until_ready(), repeats)
    return 2.0 * size**3 / sec / 1e9


def numpy_loop(c: int, n: int, d: int, steps: int, *, seed: int = 0, data=None):
    """A NumPy loop over configurations: sample, then full-batch GD on the reduced head δ
    (``h = s·xδ``, ``g = mean(ℓ'(h) s x)``, ``δ ← δ − 2η g``). Returns ``(seconds, δ_T (C, d))``.

    ``data``: optional list of C pairs ``(x (N, d), s (N,))`` to train on instead of sampling
    (tests use it to check the contenders compute the same thing)."""
    rng = np.random.default_rng(seed)
    deltas = np.zeros((c, d), np.float32)
    t0 = time.perf_counter()
    for i, dist in enumerate(distinguishabilities(c)):
        if data is None:
            s = np.where(rng.random(n) < 0.5, 1.0, -1.0).astype(np.float32)
            x = rng.standard_normal((n, d), dtype=np.float32)
            x[:, 0] += (s * dist / 2).astype(np.float32)
        else:
            x, s = (np.asarray(v, np.float32) for v in data[i])
        z = s[:, None] * x
        delta = np.zeros(d, np.float32)
        for _ in range(steps):
            h = z @ delta
            w = -BETA / (1.0 + np.exp(BETA * h))
            delta -= (2.0 * LR / n) * (w @ z)
        deltas[i] = delta
    return time.perf_counter() - t0, deltas


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_loop(c: int, n: int, d: int, steps: int, *, seed: int = 0, data=None, threads: int | None = None):
    """The authors'-style PyTorch loop, one configuration at a time: an ``nn.Linear(d, 2,
    bias=False)`` head (zero init = the reference head), ``nn.LogSoftmax``, the DPO loss on
    chosen/rejected log-ratios against a frozen reference, ``torch.optim.SGD``, ``backward()``
    every step. Returns ``(seconds, δ_T (C, d))`` with ``δ = W_a − W_b − (W_ref,a − W_ref,b)``.

    ``data``: optional list of C pairs ``(x (N, d), s (N,))`` to train on instead of sampling.
    ``threads``: ``torch.set_num_threads`` for the run (restored after); default: torch's own.

    Raises ImportError when torch is absent (the ``[bench]`` extra).
    """
    import torch
    from torch import nn

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _torch_loop(torch, nn, c, n, d, steps, seed, data)
    finally:
        torch.set_num_threads(old_threads)


def _torch_loop(torch, nn, c, n, d, steps, seed, data):
    gen = torch.Generator().manual_seed(seed)
    deltas = np.zeros((c, d), np.float32)
    t0 = time.perf_counter()
    for i, dist in enumerate(distinguishabilities(c)):
        if data is None:
            s = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0)
            x = torch.randn(n, d, generator=gen)
            x[:, 0] += s * float(dist) / 2
        else:
            x, s = (torch.tensor(np.asarray(v, np.float32)) for v in data[i])
        chosen = torch.where(s > 0, 0, 1).long()  # token a = row 0 ("Yes"), b = row 1 ("No")
        rejected = 1 - chosen
        head = nn.Linear(d, 2, bias=False)
        ref = nn.Linear(d, 2, bias=False)
        with torch.no_grad():
            head.weight.zero_()
            ref.weight.zero_()
        logsoftmax = nn.LogSoftmax(dim=-1)
        with torch.no_grad():
            ref_lp = logsoftmax(ref(x))
            ref_c = ref_lp.gather(1, chosen[:, None])[:, 0]
            ref_r = ref_lp.gather(1, rejected[:, None])[:, 0]
        opt = torch.optim.SGD(head.parameters(), lr=LR)
        for _ in range(steps):
            lp = logsoftmax(head(x))
            pc = lp.gather(1, chosen[:, None])[:, 0]
            pr = lp.gather(1, rejected[:, None])[:, 0]
            loss = -nn.functional.logsigmoid(BETA * ((pc - ref_c) - (pr - ref_r))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            w = head.weight
            deltas[i] = (w[0] - w[1]).numpy()
    return time.perf_counter() - t0, deltas


def sweep_cli_callable(c: int, n: int, d: int, steps: int, *, seed: int = 0):
    """A warmed-up call of ``sims.sweep.run_sweep`` on the engine row's work, end to end.

    The same C configurations (Δ_c = ``linspace(0.5, 2, C)``, σ = 1, β, η as the engine row, one
    seed, N training and N held-out pairs, records at steps 0 and T) from a config to a zarr store,
    in the sweep's automatic chunks (the engine's own chunking policy, :mod:`dynamics.chunking`):
    the config is parsed, planned, built (``build_distribution``), run through
    ``dynamics.trajectories`` and written chunk by chunk. ``run(out)`` writes a new store at ``out``.
    Returns ``(run, temporary directory)``.
    """
    import tempfile

    from sims.sweep import parse_config, run_sweep

    cfg = parse_config({"name": "bench", "seeds": 1, "seed": seed,
                        "base": {"d": d, "n": n, "n_eval": n, "steps": steps, "record_every": steps,
                                 "beta": BETA, "lr": LR, "sigma": 1.0, "mode": "empirical"},
                        "grid": {"distinguishability": [float(v) for v in distinguishabilities(c)]}},
                       source="<bench>")
    tmp = Path(tempfile.mkdtemp(prefix="dpo-bench-sweep-"))
    run = lambda out: run_sweep(cfg, out, progress=False, log=lambda msg: None,
                                compile_mode="optimized")
    run(tmp / "warmup.zarr")  # compile
    return run, tmp


def sweep_cli_run(c: int, n: int, d: int, steps: int, *, repeats: int = 1) -> float:
    """Seconds of a warm ``run_sweep`` of :func:`sweep_cli_callable` into a new store (best of
    ``repeats``; removing the stores is not timed)."""
    import shutil

    run, tmp = sweep_cli_callable(c, n, d, steps)
    best = np.inf
    try:
        for i in range(max(1, repeats)):
            t0 = time.perf_counter()
            run(tmp / f"run{i}.zarr")
            best = min(best, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return best
