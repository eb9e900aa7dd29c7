"""Peak resident memory of one batched-engine run; run once per size in a fresh process.

``python -m benchmarks.rss --configs 100000 --n 1024 --d 64 --steps 10 --chunk-size 1024``
prints one JSON line: ``configs``, ``chunk_size``, ``baseline_rss_mib`` (peak RSS
after importing JAX and the package and compiling nothing), ``peak_rss_mib``
(``VmHWM`` after the run), ``seconds`` (including compilation), and
``output_mib`` (the returned arrays, which necessarily grow with C).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _peak_mib() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` from /proc/self/status (Linux; it
    starts afresh at exec, unlike ``ru_maxrss``, which a child inherits from its parent), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, required=True)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=1024)
    args = p.parse_args(argv)
    import jax
    import numpy as np

    from benchmarks.engines import BETA, LR, make_batch
    from dynamics.batched import batched_empirical_trajectory

    baseline = _peak_mib()
    t0 = time.perf_counter()
    batch = make_batch(args.configs, args.d)
    out = batched_empirical_trajectory(batch, jax.random.key(0), n=args.n, n_eval=args.n, beta=BETA, lr=LR,
                                       steps=args.steps, record_every=args.steps, chunk_size=args.chunk_size,
                                       return_delta=False)
    seconds = time.perf_counter() - t0
    leaves = jax.tree_util.tree_leaves((out.train, out.eval, out.delta_final, out.diverged))
    output = sum(np.asarray(v).nbytes for v in leaves) / 2**20
    print(json.dumps({"configs": args.configs, "chunk_size": args.chunk_size, "n": args.n, "d": args.d,
                      "steps": args.steps, "baseline_rss_mib": round(baseline, 1),
                      "peak_rss_mib": round(_peak_mib(), 1), "output_mib": round(output, 2),
                      "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
