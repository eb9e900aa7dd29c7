"""Side-by-side benchmark of the batched DPO engine (``dpo-sims bench``; docs/performance.md).

* :mod:`benchmarks.engines` — the contenders on the same work: our batched
  engine (common random numbers), the authors'-style PyTorch loop, a NumPy
  loop, a plain ``jax.vmap`` of the core engine, a GEMM of the same FLOP count
  (the roofline) and the batched population engine.
* :mod:`benchmarks.suite` — the measurement plan, cost-exponent fits, and the
  JSON report.
* :mod:`benchmarks.rss` — peak resident memory of one engine run (run in a
  fresh process per size).
"""
