"""Study part (c): squeezing and likelihood displacement of L-position responses against ρ and V.

``run_part_c(quick, out_dir)`` trains the full ``V×d`` head with DPO (``loss_type="sigmoid"``) on
:class:`dynamics.sequence.SequencePreference` pairs (``L = 3`` positions, K = 2 behaviours, a peaked
random reference head ``W_ref = W_0``, rejected tokens the reference's least likely tokens) for
``ρ ∈ {0, 0.5, 0.9}`` (vmapped: one compilation per V) and ``V ∈ {3, 5, 8}``, and reports, per
configuration, the final ``squeeze/argmax_change`` (change of ``max_v π(v|x⁻_t)`` at the rejected
positions; Ren & Sutherland's squeezing), ``displacement`` (fraction of pairs whose chosen sequence
log-prob fell), the change of ``logps/chosen`` and the mean CHES (Razin et al. 2025, on the contexts;
closed form ``−L (1 − ρ) tr S``, docs/theory.md §9.3). It writes ``out_dir/displacement_c.png``.

The model and metrics: docs/theory.md §9. Called by ``dpo-sims study displacement``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["run_part_c", "RHOS", "VOCAB_SIZES"]

RHOS = (0.0, 0.5, 0.9)
VOCAB_SIZES = (3, 5, 8)
LENGTH = 3
DIM = 8


def _setup(v: int, seed: int):
    """The distribution (ρ to be replaced), head and tokens of one vocabulary size (NumPy float64 inputs)."""
    import dynamics as dd
    from dynamics.sequence import SequencePreference

    rng = np.random.default_rng(seed)
    k = 2
    mu_pos = rng.normal(size=(k, DIM)) * 0.6
    mu_neg = rng.normal(size=(k, DIM)) * 0.6
    cov = np.stack([np.eye(DIM)] * k) * 0.5
    base = dd.GaussianPreference.create(mu_pos, mu_neg, cov, cov)
    w_ref = rng.normal(size=(v, DIM)) * 2.0 / np.sqrt(DIM)
    # chosen: the reference's most likely token at the behaviour's mean; rejected: its least likely ones
    tokens = np.zeros((k, 2, LENGTH), dtype=np.int64)
    for j in range(k):
        order = np.argsort(w_ref @ mu_pos[j])  # ascending logits
        tokens[j, 0] = order[-1 - np.arange(LENGTH) % max(1, v // 2)]
        tokens[j, 1] = order[np.arange(LENGTH) % max(1, v // 2)]
    dist = SequencePreference.create(base, length=LENGTH, rho=1.0, tokens=tokens)
    return dist, dd.Head.create(w_ref)


def run_part_c(quick: bool, out_dir) -> dict:
    """Squeezing against ρ and V; writes ``out_dir/displacement_c.png``; returns the numbers (JSON-serialisable).

    Args:
      quick: small run (n = 256 pairs, 40 steps; < 1 min on 2 CPU cores) or the full one (n = 2048, 200 steps).
      out_dir: folder for the figure (created).

    Returns:
      ``{"rho": [...], "vocab_size": [...], "length": L, "steps": T, "n": n, "split": {"train": {...},
      "eval": {...}}, "ches_displacement_spearman": {...}, "figure": path}``; each split holds ``(V, ρ)``
      nested lists of the final ``squeeze_argmax_change``, ``squeeze_argmax_prob``, ``displacement``,
      ``logps_chosen_change`` and ``ches``.

    Raises:
      OSError: ``out_dir`` cannot be created or written.
    """
    import jax
    import jax.numpy as jnp
    from scipy.stats import spearmanr

    from dynamics.sequence import sequence_empirical_trajectory

    n, steps = (256, 40) if quick else (2048, 200)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("squeeze/argmax_change", "squeeze/argmax_prob", "displacement", "logps/chosen", "ches")
    res = {split: {k: [] for k in keys} for split in ("train", "eval")}
    rhos = jnp.asarray(RHOS, jnp.result_type(float))
    for v in VOCAB_SIZES:
        dist, head = _setup(v, seed=v)

        def run(rho, dist=dist, head=head):
            tr, ev = sequence_empirical_trajectory(dist.replace(rho=rho), jax.random.key(0), head=head,
                                                   loss_type="sigmoid", beta=1.0, lr=0.5, steps=steps, n=n,
                                                   n_eval=n, record_every=steps)
            pick = lambda t: {k: t.mean(k) for k in keys}
            return pick(tr), pick(ev)

        outs = jax.vmap(run)(rhos)  # one compilation for the three ρ
        for split, out in zip(("train", "eval"), outs):
            for k in keys:
                arr = np.asarray(out[k])  # (ρ, T=2)
                res[split][k].append(arr[:, -1] - arr[:, 0] if k == "logps/chosen" else arr[:, -1])
    rename = {"squeeze/argmax_change": "squeeze_argmax_change", "squeeze/argmax_prob": "squeeze_argmax_prob",
              "displacement": "displacement", "logps/chosen": "logps_chosen_change", "ches": "ches"}
    numbers = {split: {rename[k]: np.asarray(vals).round(6).tolist() for k, vals in d.items()}
               for split, d in res.items()}
    def rank_corr(c, disp):
        c, disp = np.ravel(c), np.ravel(disp)
        return float(spearmanr(c, disp).statistic) if np.ptp(c) > 0 and np.ptp(disp) > 0 else None

    # Razin et al.'s prediction: higher CHES, more displacement (pooled over (V, ρ), and across ρ within each V)
    corr = {split: rank_corr(d["ches"], d["displacement"]) for split, d in res.items()}
    within = {split: [rank_corr(c, disp) for c, disp in zip(d["ches"], d["displacement"])] for split, d in res.items()}
    fig_path = out_dir / "displacement_c.png"
    _figure(numbers, fig_path)
    return {"rho": list(RHOS), "vocab_size": list(VOCAB_SIZES), "length": LENGTH, "dim": DIM, "steps": steps, "n": n,
            "loss_type": "sigmoid", "split": numbers, "ches_displacement_spearman": corr,
            "ches_displacement_spearman_within_v": within, "figure": str(fig_path)}


def _figure(numbers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (("squeeze_argmax_change", "Δ max_v π(v|x⁻) (squeezing)"), ("displacement", "displacement"),
              ("ches", "CHES (contexts)"))
    for ax, (key, title) in zip(axes, panels):
        for i, v in enumerate(VOCAB_SIZES):
            for split, style in (("train", "-o"), ("eval", "--x")):
                ax.plot(RHOS, numbers[split][key][i], style, color=f"C{i}",
                        label=f"V={v} ({split})" if key == "squeeze_argmax_change" else None)
        ax.set_xlabel("ρ (shared context)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle("DPO on L=3 responses: squeezing and likelihood displacement vs ρ, V")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
