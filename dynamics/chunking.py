"""One policy for running many configurations through one compiled program.

Every site that batches configurations — the factored engines (:mod:`dynamics.batched`) and
their entry point :func:`dynamics.trajectories`, ``dpo-sims sweep``'s planning
(``sims.sweep.plan``) and ``sims.distributed`` — asks this module two questions:

* **how many configurations per chunk**: :func:`configs_per_chunk` divides a working-memory
  budget (:data:`CHUNK_BUDGET`, or a share :data:`MEMORY_FRACTION` of the memory available) by
  the bytes one configuration needs (:func:`empirical_bytes_per_config`,
  :func:`population_bytes_per_config`), capped and rounded to a multiple of the device count;
  :func:`balanced_chunk` evens the chunks out so every chunk has one shape (one compile);
* **which compile**: :func:`compile_mode` picks XLA's ``"fast"`` compile (backend optimisation
  off: about 3x faster compiles, 2-3x slower runs on CPU) when the estimated work is below
  :data:`FAST_WORK_LIMIT` floating-point operations — there compile time dominates — and the
  ``"optimized"`` one otherwise; :func:`compiler_options` gives the ``jax.jit`` options.

The module is pure Python (no JAX import), so command-line ``--help`` paths may use it.
"""
from __future__ import annotations

import math

__all__ = [
    "CHUNK_BUDGET",
    "MEMORY_FRACTION",
    "MAX_EMPIRICAL_CHUNK",
    "MAX_POPULATION_CHUNK",
    "COMPILE_MODES",
    "FAST_WORK_LIMIT",
    "FAST_COMPILE_OPTIONS",
    "empirical_bytes_per_config",
    "population_bytes_per_config",
    "configs_per_chunk",
    "balanced_chunk",
    "compile_mode",
    "compiler_options",
]

#: bytes of working memory one automatic chunk may use (its temporaries; inputs and results aside).
#: On 2 shared CPU cores (C = 4096, N = 1024, d = 64, T = 200) three chunks of 1,366 ran the factored
#: engine in 2.7 s against 6.9 s for one chunk of 4,096 (one run each; under heavy load the two were
#: within the noise).
CHUNK_BUDGET = 256 << 20
#: share of the available memory a chunk may use when the caller bounds by memory (``--chunk-size``)
MEMORY_FRACTION = 0.5
#: caps on automatic chunks (configurations) of the empirical and population engines
MAX_EMPIRICAL_CHUNK = 4096
MAX_POPULATION_CHUNK = 16384
#: nodes of the reference quadrature the population kernel may hold per component (its largest rule)
_QUADRATURE_NODES = 1344

COMPILE_MODES = ("auto", "fast", "optimized")
#: estimated floating-point operations below which ``compile_mode("auto")`` is "fast"
FAST_WORK_LIMIT = 2e10
#: XLA options of the "fast" compile (backend optimisation off)
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def empirical_bytes_per_config(*, n: int, n_eval: int, d: int, num_behaviors: int = 1, records: int = 2,
                               vocab_size: int = 2, num_roots: int = 1, itemsize: int = 4,
                               implementation: str = "factored", independent: bool = False) -> int:
    """Working bytes one configuration of the empirical layer needs (one seed).

    ``"factored"`` (the common-random-number engine, :mod:`dynamics.batched`): per pair about
    ``12 + 2·J·(1 + 2V)`` numbers (step and record temporaries, the fixed head projections;
    J covariance roots, V vocabulary rows), ``d`` more per pair for independent draws (each
    configuration's own noise), ``2K(d + d²)`` for the distribution and ``4d`` for the head.
    ``"vmap"`` (``jax.vmap`` of the core): each configuration holds its own ``(n + n_eval, d)``
    embeddings of both answers and their class draws, ``(n + n_eval)·d·(2K + 4) + n·d``
    numbers. Both add the recorded metrics, ``records·(2(9 + 3K) + 2 + d)`` numbers.

    Args:
      n, n_eval: training and held-out pairs; d: embedding dimension; num_behaviors: K;
      records: recorded steps; vocab_size: V; num_roots: J; itemsize: bytes per number.
      implementation: "factored" or "vmap". independent: factored, independent draws.

    Returns:
      bytes (an int).

    Raises:
      ValueError: a non-positive size or an unknown implementation.
    """
    n, n_eval, d = _positive_int("n", n), _positive_int("n_eval", n_eval), _positive_int("d", d)
    k, records = _positive_int("num_behaviors", num_behaviors), _positive_int("records", records)
    recorded = records * (2 * (9 + 3 * k) + 2 + d)
    if implementation == "factored":
        per_pair = 12 + 2 * num_roots * (1 + 2 * vocab_size) + (d if independent else 0)
        numbers = (n + n_eval) * per_pair + 2 * k * (d + d * d) + 4 * d + recorded
    elif implementation == "vmap":
        numbers = (n + n_eval) * d * (2 * k + 4) + n * d + recorded
    else:
        raise ValueError(f"implementation must be 'factored' or 'vmap', got {implementation!r}")
    return int(itemsize * numbers)


def population_bytes_per_config(*, d: int, num_components: int, num_behaviors: int = 1, records: int = 2,
                                full_cov: bool = False, itemsize: int = 4) -> int:
    """Working bytes one configuration of the factored population kernel needs.

    Per kernel component (J of them): its mean and root (``d`` and ``d²`` numbers for full
    covariances, ``d`` otherwise), four copies of each in the step, and the quadrature values
    at up to 1,344 nodes (8 numbers each); per recorded step ``d + 6 + 3K`` numbers.
    """
    d, j = _positive_int("d", d), _positive_int("num_components", num_components)
    k, records = _positive_int("num_behaviors", num_behaviors), _positive_int("records", records)
    numbers = j * (d + (d * d if full_cov else d)) * 4 + _QUADRATURE_NODES * j * 8 + records * (d + 6 + 3 * k)
    return int(itemsize * numbers)


def configs_per_chunk(num_configs: int, bytes_per_config: int, *, budget: int | None = None,
                      memory: int | None = None, cap: int | None = None, multiple: int = 1) -> int:
    """Configurations per chunk: as many as fit the budget, at most ``cap`` and ``num_configs``.

    The budget is ``budget`` bytes, else ``MEMORY_FRACTION · memory`` when ``memory`` (bytes
    available) is given, else :data:`CHUNK_BUDGET`. The result is at least 1, and a multiple of
    ``multiple`` (devices sharing a chunk) when that is at least ``multiple``: rounded down, or up
    to ``multiple`` when fewer fit (each device then holds at most one configuration).

    Example: 10,000 configurations of 184,320 bytes (the empirical engine at N = n_eval = 1024,
    d = 64) in the default 256 MiB: ``268435456 // 184320 = 1456`` per chunk.

    Raises:
      ValueError: a non-positive count, size, budget or multiple.
    """
    c = _positive_int("num_configs", num_configs)
    per = _positive_int("bytes_per_config", bytes_per_config)
    multiple = _positive_int("multiple", multiple)
    if budget is None:
        budget = CHUNK_BUDGET if memory is None else int(MEMORY_FRACTION * _positive_int("memory", memory))
    budget = _positive_int("budget", max(1, int(budget)))
    fit = max(1, budget // per)
    chunk = min(c, fit, c if cap is None else _positive_int("cap", cap))
    if multiple > 1:
        chunk = max(multiple, chunk // multiple * multiple)
    return int(chunk)


def balanced_chunk(num_configs: int, chunk: int, multiple: int = 1) -> int:
    """The chunk size that covers ``num_configs`` in as few chunks of at most ``chunk`` as possible,
    evened out (``ceil(C / ceil(C / chunk))``) and rounded up to a multiple of ``multiple``.

    Example: C = 4096 in chunks of at most 1456 → 3 chunks of 1366 (the last one padded by 2).
    """
    c, chunk, multiple = (_positive_int("num_configs", num_configs), _positive_int("chunk", chunk),
                          _positive_int("multiple", multiple))
    n_chunks = math.ceil(c / chunk)
    size = math.ceil(c / n_chunks)
    return int(math.ceil(size / multiple) * multiple)


def compile_mode(work: float, mode: str = "auto", *, limit: float = FAST_WORK_LIMIT) -> str:
    """The compile of a program: ``mode`` itself, or for ``"auto"`` "fast" when ``work`` (estimated
    floating-point operations of everything the program will run) is below ``limit``, else "optimized".

    Example: ``compile_mode(1e9) == "fast"``, ``compile_mode(1e11) == "optimized"``.

    Raises:
      ValueError: an unknown mode (naming the valid ones) or a negative or non-finite work.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {list(COMPILE_MODES)}")
    if mode != "auto":
        return mode
    work = float(work)
    if not math.isfinite(work) or work < 0:
        raise ValueError(f"work must be a finite number of operations >= 0, got {work!r}")
    return "fast" if work < limit else "optimized"


def compiler_options(mode: str) -> dict | None:
    """``jax.jit(..., compiler_options=…)`` of a resolved mode: :data:`FAST_COMPILE_OPTIONS` for
    "fast", ``None`` (XLA's defaults) for "optimized".

    Raises:
      ValueError: any other mode (resolve "auto" with :func:`compile_mode` first).
    """
    if mode == "fast":
        return dict(FAST_COMPILE_OPTIONS)
    if mode == "optimized":
        return None
    raise ValueError(f"compile mode {mode!r}: pass 'fast' or 'optimized' (resolve 'auto' with compile_mode)")
