"""``dpo-sims simulate``: analytic and empirical trajectories side by side.

JAX and ``dynamics`` are imported when the command runs, not at import, so
``dpo-sims simulate --help`` is instant.
Exit codes: 0; 1 when a trajectory diverged (NaN/inf, or the loss rose far above its
start: ``dynamics.divergence``), after printing the table and a warning; 2 bad input.
"""
from __future__ import annotations

import argparse

_COLUMNS = ("loss", "reward_accuracy")

#: ``dynamics.LOSSES`` (kept here so ``--help`` needs no JAX; a test checks they agree)
LOSS_CHOICES = ("sigmoid", "cdpo", "robust", "hinge", "ipo")


def register(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="one configuration: population vs empirical loss, accuracy, weight change",
        description="Train the last-layer head on one Gaussian preference distribution and print the "
        "population (N → ∞) prediction beside the empirical run (training and held-out) at a few steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--distinguishability", type=float, default=1.0, help="Δ = ‖μ⁺ − μ⁻‖")
    p.add_argument("--d", type=int, default=16, help="embedding dimension")
    p.add_argument("--sigma", type=float, default=1.0, help="per-coordinate std of the embeddings")
    p.add_argument("--p", type=float, default=0.5, help="probability that the preferred answer is 'Yes'")
    p.add_argument("--dist", default=None, help="a distribution .npz file (docs/theory.md §2.4) (overrides the above)")
    p.add_argument("--beta", type=float, default=1.0, help="DPO β")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate on the head W")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps on the head")
    p.add_argument("--loss", default="sigmoid", choices=LOSS_CHOICES, help="preference loss (TRL loss_type names)")
    p.add_argument("--eps", type=float, default=0.0, help="label smoothing ε (cdpo, robust)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "momentum", "adam"),
                   help="sgd = plain (minibatch) gradient descent")
    p.add_argument("--n", type=int, default=1024, help="training pairs")
    p.add_argument("--n-eval", type=int, default=4096, help="held-out pairs")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size; omit or 0 for full-batch GD")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (>= 0) of the sampled pairs and batch order")
    p.add_argument("--rows", type=int, default=6, help="number of steps shown")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    """One-line errors for bad flags, before JAX is imported or anything is sampled."""
    if args.rows < 2:
        raise ValueError(f"--rows must be >= 2, got {args.rows}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0 (as in sweep configs), got {args.seed}")
    if args.batch_size is not None and args.batch_size < 0:
        raise ValueError(f"--batch-size must be >= 1, or 0 / omitted for full batch; got {args.batch_size}")
    if args.batch_size is not None and args.batch_size > args.n:
        raise ValueError(f"--batch-size {args.batch_size} exceeds --n {args.n}; pass --batch-size <= --n, "
                         "or 0 for full batch")
    for flag in ("steps", "n", "n_eval", "d"):
        if getattr(args, flag) < (0 if flag == "steps" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'steps' else 1}, "
                             f"got {getattr(args, flag)}")


def run(args) -> int:
    _check_args(args)
    import jax
    import numpy as np

    import dynamics as dd

    if args.dist:
        try:
            dist = dd.GaussianPreference.load(args.dist)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--dist: {e}") from None
    else:
        dist = dd.GaussianPreference.single(args.distinguishability, d=args.d, sigma=args.sigma, p=args.p)
    rows = max(2, min(args.rows, args.steps + 1))
    shown = np.unique(np.linspace(0, args.steps, rows).round().astype(int))
    common = dict(beta=args.beta, lr=args.lr, steps=args.steps, loss=args.loss, eps=args.eps,
                  optimizer=None if args.optimizer == "sgd" else args.optimizer)
    pop = dd.population_trajectory(dist, **common)
    emp = dd.empirical_trajectory(dist, jax.random.key(args.seed), n=args.n, n_eval=args.n_eval,
                                  batch_size=args.batch_size or None, **common)
    print(f"# one behaviour set: K={dist.num_behaviors}, d={dist.dim}, "
          f"distinguishability={np.round(np.asarray(dist.distinguishability), 4).tolist()}, "
          f"loss={args.loss}, beta={args.beta}, lr={args.lr}, optimizer={args.optimizer}, "
          f"n={args.n}, n_eval={args.n_eval}, seed={args.seed}")
    header = ["step"]
    for col in _COLUMNS:
        header += [f"{col}:pop", f"{col}:train", f"{col}:eval"]
    header += ["weight_change:pop", "weight_change:emp"]  # one head: the same on both splits
    widths = [max(len(h), 8) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for t in shown:
        vals = [str(t)]
        for col in _COLUMNS:
            vals += [f"{float(pop.metrics[col][t]):.4f}", f"{float(emp.train[col][t]):.4f}",
                     f"{float(emp.eval[col][t]):.4f}"]
        vals += [f"{float(pop.metrics['weight_change'][t]):.4f}", f"{float(emp.train['weight_change'][t]):.4f}"]
        print("  ".join(v.rjust(w) for v, w in zip(vals, widths)))
    if bool(emp.diverged) or bool(pop.diverged):
        from dynamics.divergence import LOSS_RISE_FACTOR

        which = [w for w, t in (("population", pop), ("empirical", emp)) if bool(t.diverged)]
        print(f"# WARNING: the {' and '.join(which)} trajector{'ies' if len(which) > 1 else 'y'} diverged (NaN/inf, or the loss rose more than "
              f"{LOSS_RISE_FACTOR:g}x max(|loss_0|, 1) above its start); lower lr or beta")
        return 1
    return 0
