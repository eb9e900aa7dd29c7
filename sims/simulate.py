"""``dpo-sims simulate``: analytic and empirical trajectories side by side.

One configuration of the sweep's model: the flags are generated from the sweep
schema (:data:`sims.sweep.schema.FIELDS`, via :func:`sims.sweep.schema.add_arguments`), so
their names, types, choices, ranges, help and defaults are those of a sweep config's
``[base]`` keys (docs/sweeps.md); ``--seed`` is the sweep's base seed. Only the display
flags (``--rows``) and ``--dist`` are simulate's own. The distribution is the sweep's
(:func:`sims.sweep.build_distribution`: K behaviours from a list of distinguishabilities,
orthogonal preference directions), and the table comes from the core
:func:`dynamics.population_trajectory` / :func:`dynamics.empirical_trajectory`.

JAX and ``dynamics`` are imported when the command runs, not at import, so
``dpo-sims simulate --help`` is instant.
Exit codes: 0; 1 when a trajectory diverged (NaN/inf, or the loss rose far above its
start: ``dynamics.divergence``), after printing the table and a warning; 2 bad input.
"""
from __future__ import annotations

import argparse

from .sweep.schema import FIELDS, LOSS_NAMES, OBJECTIVE_HPARAMS, add_arguments, parse_token_pairs

_COLUMNS = ("loss", "reward_accuracy")
#: the columns of a vocabulary run (behaviour-weighted means; docs/sweeps.md names)
_VOCAB_COLUMNS = ("loss", "reward_accuracy", "logps_chosen", "displacement")

#: the sweep fields simulate takes as flags (same names, rules and defaults as a sweep's [base])
SIMULATE_FIELDS = ("distinguishability", "d", "sigma", "p", "beta", "lr", "steps", "loss", "label_smoothing",
                   "optimizer", "n", "n_eval", "batch_size", "vocab_size", "token_pairs", "loss_weights",
                   *OBJECTIVE_HPARAMS)

#: ``dynamics.LOSSES``, the margin losses of the paper's engine (the sweep schema's JAX-free copy; a test
#: checks they agree); ``--loss`` takes every objective of the registry (``FIELDS["loss"].choices``)
LOSS_CHOICES = LOSS_NAMES


def register(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="one configuration: population vs empirical loss, accuracy, weight change",
        description="Train the last-layer head on one Gaussian preference distribution and print the "
        "population (N → ∞) prediction beside the empirical run (training and held-out) at a few steps. "
        "The model flags are the sweep config's [base] keys (docs/sweeps.md), with the same defaults; "
        "a list of distinguishabilities gives K behaviours with orthogonal preference directions.",
    )
    add_arguments(p, [FIELDS[name] for name in SIMULATE_FIELDS])
    p.add_argument("--seed", type=int, default=0,
                   help="base PRNG seed (>= 0) of the sampled pairs and batch order, as a sweep's seed (default 0)")
    p.add_argument("--dist", default=None,
                   help="a distribution .npz file (docs/theory.md §2.4); replaces --distinguishability, --d, "
                        "--sigma and --p")
    p.add_argument("--rows", type=int, default=6, help="number of steps shown (default 6)")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    """One-line errors for what the per-flag rules cannot see, before JAX is imported or anything is sampled.

    The cross-field rules are the sweep config's (``batch_size ≤ n``, ``d ≥ K``, per-behaviour lists of
    1 or K values); ``--seed`` and ``--rows`` are checked here.
    """
    if args.rows < 2:
        raise ValueError(f"--rows must be >= 2, got {args.rows}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0 (as in sweep configs), got {args.seed}")
    k = 1 if args.dist else len(_values(args.distinguishability))
    if not args.dist:  # a file's K is known once it is read (run checks the pairs again)
        parse_token_pairs(args.token_pairs, args.vocab_size, k)
    if args.batch_size > args.n:
        raise ValueError(f"--batch-size {args.batch_size} exceeds --n {args.n}; pass --batch-size <= --n, "
                         "or 0 for full batch")
    if args.dist:
        return
    k = len(_values(args.distinguishability))
    for name in ("sigma", "p"):
        if len(_values(getattr(args, name))) not in (1, k):
            raise ValueError(f"--{name} takes 1 value or one per behaviour (K = {k}, from --distinguishability), "
                             f"got {len(_values(getattr(args, name)))}")
    if args.d < k:
        raise ValueError(f"--d {args.d} is smaller than K = {k} behaviours; pass --d >= {k}")


def _values(v) -> list:
    """A per-behaviour flag as a list (its default is the field's scalar default)."""
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _distribution(args):
    """The sweep's distribution of these flags (or the ``--dist`` file)."""
    import dynamics as dd

    if args.dist:
        try:
            return dd.GaussianPreference.load(args.dist)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--dist: {e}") from None
    from .sweep import build_distribution

    delta = _values(args.distinguishability)
    per = lambda v: _values(v) * len(delta) if len(_values(v)) == 1 else _values(v)
    fields = {"distinguishability": delta, "sigma": per(args.sigma), "p": per(args.p),
              "angle": FIELDS["angle"].default}
    return build_distribution(fields, d=args.d)[0]


def run(args) -> int:
    _check_args(args)
    import jax
    import numpy as np

    import dynamics as dd

    dist = _distribution(args)
    rows = max(2, min(args.rows, args.steps + 1))
    shown = np.unique(np.linspace(0, args.steps, rows).round().astype(int))
    from .sweep.config import objective_options
    from .sweep.plan import GroupSpec

    from .sweep.config import takes_hparam

    for name in OBJECTIVE_HPARAMS:
        if getattr(args, name) is not None and not takes_hparam(args.loss, name):
            raise ValueError(f"--{name.replace('_', '-')} has no effect with --loss {args.loss}; drop it or choose a "
                             "loss that takes it (dynamics.get_objective(name).hparams)")
    opts = objective_options(vars(args))
    pairs = parse_token_pairs(args.token_pairs, args.vocab_size, dist.num_behaviors)
    probe = GroupSpec(mode="both", kind="gaussian", num_behaviors=dist.num_behaviors, d=dist.dim, loss=args.loss,
                      optimizer=args.optimizer, method="gd", n=args.n, n_eval=args.n_eval, batch_size=args.batch_size,
                      steps=args.steps, record_every=1, vocab_size=args.vocab_size, token_pairs=pairs,
                      loss_weights=opts["loss_weights"], hparams=tuple(sorted(opts["hparams"].items())))
    if probe.vocab:
        return _run_vocab(args, dist, pairs, opts, shown)
    common = dict(beta=args.beta, lr=args.lr, steps=args.steps, loss=args.loss, label_smoothing=args.label_smoothing,
                  optimizer=None if args.optimizer == "sgd" else args.optimizer)
    pop = dd.population_trajectory(dist, **common)
    from .sweep import seed_key

    # seed index 0 of a sweep with this base seed: the same pairs as the sweep's first seed
    emp = dd.empirical_trajectory(dist, seed_key(args.seed, 0), n=args.n, n_eval=args.n_eval,
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


def _run_vocab(args, dist, pairs, opts, shown) -> int:
    """A vocabulary run (an objective other than the margin losses, V > 2 or token pairs): the population
    and empirical layers (:func:`dynamics.vocab_population_trajectory`, :func:`dynamics.vocab_empirical_trajectory`)
    from the zero head, the table of the behaviour-weighted means of :data:`_VOCAB_COLUMNS`."""
    import numpy as np

    import dynamics as dd

    from .sweep import seed_key
    from .sweep.build import vocab_metrics

    head = dd.Head.zeros(dist.dim, vocab_size=args.vocab_size, pairs=pairs)
    ls = {"label_smoothing": args.label_smoothing} if any(
        "label_smoothing" in dd.get_objective(n).hparams for n in args.loss.split("+")) else {}
    if not ls and args.label_smoothing != 0:
        raise ValueError(f"--label-smoothing has no effect with --loss {args.loss}; drop it or choose a loss that "
                         "takes it (cdpo, robust, exo_pair, cpo, simpo, aot)")
    common = dict(head=head, loss_type=opts["loss"], beta=args.beta, lr=args.lr, steps=args.steps,
                  optimizer=None if args.optimizer == "sgd" else args.optimizer, loss_weights=opts["loss_weights"],
                  **opts["hparams"], **ls)
    pop = vocab_metrics(dd.vocab_population_trajectory(dist, **common))
    train, held = dd.vocab_empirical_trajectory(dist, seed_key(args.seed, 0), n=args.n, n_eval=args.n_eval,
                                                batch_size=args.batch_size or None, **common)
    train, held = vocab_metrics(train), vocab_metrics(held)
    print(f"# vocabulary layers: K={dist.num_behaviors}, d={dist.dim}, V={args.vocab_size}, "
          f"token_pairs={[list(p) for p in head.token_pairs(dist.num_behaviors).tolist()]}, loss={args.loss}, "
          f"beta={args.beta}, lr={args.lr}, optimizer={args.optimizer}, n={args.n}, n_eval={args.n_eval}, "
          f"seed={args.seed}" + "".join(f", {k}={v}" for k, v in opts["hparams"].items()))
    header = ["step"] + [f"{col}:{split}" for col in _VOCAB_COLUMNS for split in ("pop", "train", "eval")]
    widths = [max(len(h), 8) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for t in shown:
        vals = [str(t)] + [f"{float(np.asarray(src[col])[t]):.4f}" for col in _VOCAB_COLUMNS
                           for src in (pop, train, held)]
        print("  ".join(v.rjust(w) for v, w in zip(vals, widths)))
    bad = [w for w, m in (("population", pop), ("empirical", train)) if not np.all(np.isfinite(np.asarray(m["loss"])))]
    if bad:
        print(f"# WARNING: the {' and '.join(bad)} trajector{'ies' if len(bad) > 1 else 'y'} diverged (NaN/inf "
              "objective); lower lr or beta")
        return 1
    return 0
