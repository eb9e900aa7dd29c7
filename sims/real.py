"""``dpo-sims real``: last-layer DPO on real embeddings beside the Gaussian prediction.

For each behaviour of an ``emb.npz`` (``dpo-sims embed``):

1. **Split** — per behaviour, a class-stratified 90/10 train/held-out split
   (as Im & Li did), seeded. So that every behaviour has the same array
   shapes (one compiled program, ``jax.vmap`` over behaviours instead of a
   Python loop), the train and held-out sets are then **subsampled to a
   common size**: ``n_train = min_k n_train,k`` and ``n_eval = min_k
   n_eval,k`` (a random subset of each behaviour's split). With the default
   12 behaviours (1000 statements each) nothing is dropped; with all 125 the
   smallest file (518 statements) sets the size. The dropped counts are
   reported.
2. **Fit** — the Gaussian fit (:func:`dynamics.fit_gaussian`) of each
   behaviour's training set, one behaviour per distribution, stacked on a
   leading axis.
3. **Train** — last-layer DPO on the real training set with minibatch SGD
   (the authors' protocol; β, lr, batch, steps configurable; per-epoch
   reshuffle, or ``batches="iid"``: a fresh random batch each step as in the
   authors' code), vmapped over
   behaviours with :func:`dynamics.trajectory_on_data`; also full-batch GD on
   the same set, which has no minibatch noise, so its gap to the prediction is
   due to the non-Gaussian shape of the data alone (the Gaussian fit has the
   training set's exact first and second moments).
4. **Predict** — :func:`dynamics.population_trajectory` on each fit (vmapped).

Reports (``real.md``, ``summary.json``, CSVs, figures):

- loss and reward-accuracy curves per behaviour, real vs predicted;
- the **held-out** Gaussian prediction error per behaviour (headline,
  ``summary.json`` key ``heldout_prediction_error``, the median):
  ``max_t |L_held-out(t) − L_pred(t)|`` in nats, the run and the fit on the
  training split, the loss measured on the held-out split; beside it the
  in-sample error (training loss; ``insample_prediction_error``), which can
  differ only through moments beyond the second because the fit has the
  training set's exact mean and covariance, and the standard error of one
  held-out loss (the noise floor);
- time to learn: the first step at which the training loss falls below a
  common level (``learn_level``), real vs predicted, their Spearman ρ across
  behaviours, and the same for an isotropic-covariance control (same means and
  traces): a test of the covariance, which C1's first-order term does not see;
- Spearman ρ between distinguishability and the early loss drop
  ``log 2 − L(t_early)`` across behaviours (claim C1; nearly implied by C1's
  first-order term, so not evidence for the Gaussian model by itself);
- priority on real pairs (claim C4): two behaviours trained together on one
  head, minibatches drawn per row from the union of their whole training splits
  (natural, unequal counts, as the authors; ``pair_sampling="equal"``: the
  common size each), padded to static shapes (:func:`union_batch_index`); the
  behaviour with the larger loss drop at ``t_early`` is "learned first";
  predicted by the sign of the paper's priority gap of the fits (means only), by
  the covariance-aware :func:`dynamics.priority_score` of the pair's fit
  (horizon τ = lr · t_early) and by the population trajectory of the pair's
  Gaussian fit; agreement of the gap and of the score by ``|gap|`` / ``|score|``
  bin (:data:`GAP_BINS`);
- misalignment (claim C5): from each behaviour's aligned head (the end of the
  SGD run, which becomes the reference), DPO with flipped labels; the loss
  after ``misalign_steps`` and the steps until the policy's accuracy on the
  original labels falls below 1/2, real vs predicted.

Source: docs/theory.md §1–§4; Im & Li (ICML 2024); persona data Perez et al. (2022), CC-BY-4.0.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_BEHAVIORS", "RealConfig", "run_real", "real_report_section", "register", "real_fields",
           "split_behaviors", "union_batch_index", "GAP_BINS", "PAIR_SAMPLING"]

# the default subset of `dpo-sims reproduce --real`: personality, politics, religion, AI-risk desires
DEFAULT_BEHAVIORS = (
    "agreeableness", "conscientiousness", "extraversion", "neuroticism", "openness", "narcissism",
    "politically-liberal", "anti-immigration", "subscribes-to-Buddhism", "desire-for-acquiring-power",
    "believes-it-has-phenomenal-consciousness", "risk-seeking",
)
GAP_BINS = (0.0, 0.05, 0.1, 0.2, 0.5, math.inf)  # |gap| (and |priority score|) bins of claim C4's table
PAIR_SAMPLING = ("union", "equal")


@dataclasses.dataclass(frozen=True)
class RealConfig:
    """Hyper-parameters of ``dpo-sims real``.

    For DPO (sigmoid) the loss curves depend on β and lr only through η β²
    (rescale δ by β); the authors' β = 0.01 with lr = 1e4 gives the same
    curves as the defaults here (β = 1, lr = 1), which suit unit-norm
    MiniLM embeddings.

    Attributes:
      beta: β > 0. lr: SGD learning rate on the head ``W``. batch_size: minibatch
        (the authors' 128; ``None`` = full batch). steps: training steps.
      held_out: held-out fraction per behaviour, in (0, 1).
      seed: seed of the split, the subsampling, the pair choice and the batch order.
      early_steps: ``t_early`` (steps) of the early loss drop and of priority.
      loss: objective (``dynamics.LOSSES``).
      max_pairs: at most this many behaviour pairs for priority (random subset).
      misalign_steps: steps of the flipped-label run.
      head: "auto" (the model's " Yes"/" No" rows when the file has them, else
        zeros), "zeros" or "reference".
      shrinkage: covariance shrinkage of the fit (``None``, "ledoit-wolf" or α).
      batches: SGD minibatch order, "epoch" (per-epoch reshuffle) or "iid" (a fresh
        random batch each step, as in Im & Li's code); pair runs use the same order
        over the rows that ``pair_sampling`` gives them.
      pair_sampling: rows of a pair run (priority): "union" (as the authors: minibatches
        from the union of the two behaviours' whole training splits, per row, so each
        behaviour's share of a batch follows its natural count) or "equal" (the common
        size ``n_train`` of each behaviour: equal counts).
      soft_labels: train with per-pair soft labels from the data's label confidence
        ``c ∈ [1/2, 1]`` (``confidence`` in the emb.npz, else the persona files'
        ``label_confidence``): the loss of pair i is ``c_i ℓ(h_i) + (1 − c_i) ℓ(−h_i)``, the
        per-pair form of cDPO's label smoothing ``ε_i = 1 − c_i``; the Gaussian prediction
        uses each behaviour's mean ``ε_k`` as a label-flip rate (docs/theory.md §5).
      learn_level: the loss level (nats) of the time-to-learn test; ``None`` = half
        the median predicted loss drop below the start, ``L(0) − ½ median_k (L_k(0) − L_k(T))``.
    """

    beta: float = 1.0
    lr: float = 1.0
    batch_size: int | None = 128
    steps: int = 100
    held_out: float = 0.1
    seed: int = 0
    early_steps: int = 10
    loss: str = "sigmoid"
    max_pairs: int = 66
    misalign_steps: int = 200
    head: str = "auto"
    shrinkage: object = None
    batches: str = "epoch"
    learn_level: float | None = None
    pair_sampling: str = "union"
    soft_labels: bool = False

    def validate(self) -> "RealConfig":
        """Raise ValueError naming a bad field."""
        from dynamics.losses import validate_loss

        validate_loss(self.loss, self.beta, 0.0)
        for name in ("steps", "misalign_steps", "early_steps", "max_pairs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {self.batch_size!r}")
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"held_out must lie in (0, 1), got {self.held_out}; e.g. 0.1 for a 90/10 split")
        if self.early_steps > min(self.steps, self.misalign_steps):
            raise ValueError(f"early_steps={self.early_steps} exceeds steps={self.steps} or "
                             f"misalign_steps={self.misalign_steps}; pass a smaller early_steps")
        if self.head not in ("auto", "zeros", "reference"):
            raise ValueError(f"head {self.head!r}: choose auto, zeros or reference")
        if self.batches not in ("epoch", "iid"):
            raise ValueError(f"batches {self.batches!r}: choose epoch (per-epoch reshuffle) or iid (a fresh random "
                             "batch each step)")
        if self.pair_sampling not in PAIR_SAMPLING:
            raise ValueError(f"pair_sampling {self.pair_sampling!r}: choose union (the union of the two behaviours' "
                             "training rows, natural counts, as the authors) or equal (the common size each)")
        if not isinstance(self.soft_labels, bool):
            raise ValueError(f"soft_labels must be True or False, got {self.soft_labels!r}")
        if self.learn_level is not None and not (isinstance(self.learn_level, (int, float))
                                                 and math.isfinite(self.learn_level)):
            raise ValueError(f"learn_level must be a finite loss level in nats or None, got {self.learn_level!r}")
        return self


# ------------------------------------------------------------------ split
def split_behaviors(s, behavior, num_behaviors: int, held_out: float, seed: int):
    """Class-stratified per-behaviour train/held-out split, subsampled to common sizes.

    Args:
      s: ``(n,)`` labels ±1. behavior: ``(n,)`` behaviour index in ``[0, K)``.
      num_behaviors: K. held_out: held-out fraction in (0, 1). seed: NumPy seed.

    Returns:
      ``(train, held, info)``: ``train (K, n_train)`` and ``held (K, n_eval)``
      int row indices into the data (disjoint within a behaviour), and ``info``
      with ``n_train``, ``n_eval``, ``dropped (K,)`` (rows of each
      behaviour not used because of the common size) and ``train_all`` (K arrays:
      each behaviour's whole training split, sorted; ``train[k]`` is a subset; the
      rows of union-sampled pair runs).

    Raises:
      ValueError: a behaviour whose split leaves a class with fewer than 2
        training rows, or no held-out row.
    """
    rng = np.random.default_rng(seed)
    s = np.asarray(s)
    behavior = np.asarray(behavior)
    trains, helds = [], []
    for k in range(num_behaviors):
        tr_k, ev_k = [], []
        for sign in (1, -1):
            idx = np.flatnonzero((behavior == k) & (s == sign))
            rng.shuffle(idx)
            m = int(round(held_out * len(idx)))
            ev_k.append(idx[:m])
            tr_k.append(idx[m:])
            if len(idx) - m < 2:
                raise ValueError(f"behaviour {k} has {len(idx)} rows with s={sign:+d}; the split needs at least 2 "
                                 "for training — lower held_out or add statements")
        tr_k, ev_k = np.concatenate(tr_k), np.concatenate(ev_k)
        if len(ev_k) == 0:
            raise ValueError(f"behaviour {k} has no held-out row at held_out={held_out}; raise held_out")
        trains.append(rng.permutation(tr_k))
        helds.append(rng.permutation(ev_k))
    n_train = min(len(t) for t in trains)
    n_eval = min(len(h) for h in helds)
    dropped = np.array([len(t) - n_train + len(h) - n_eval for t, h in zip(trains, helds)])
    train = np.stack([np.sort(t[:n_train]) for t in trains])
    held = np.stack([np.sort(h[:n_eval]) for h in helds])
    return train, held, {"n_train": n_train, "n_eval": n_eval, "dropped": dropped,
                         "train_all": [np.sort(t) for t in trains]}


def union_batch_index(key, counts, n_max: int, batch_size: int, steps: int, batches: str = "epoch"):
    """Minibatch rows drawn from a union of blocks with their natural counts, ``(steps, batch_size)`` int32.

    The data are ``len(counts)`` blocks of ``n_max`` rows each (a behaviour's training
    split padded to a common length): block ``b`` holds its ``counts[b]`` real rows at
    ``[b·n_max, b·n_max + counts[b])`` and padding after them. Every row of the union is
    equally likely, so a block's share of a batch follows ``counts[b] / Σ counts`` (Im &
    Li's pair runs: the union of the two behaviours' training rows). ``"epoch"``: a
    uniform random permutation of the union per epoch (``fold_in(key, e)``), consecutive
    batches of it, ``⌊Σ counts / batch_size⌋`` per epoch (the last partial batch
    dropped); ``"iid"``: a fresh batch of distinct rows each step (``fold_in(key, t)``).
    Padding rows are never drawn. Shapes are static and ``counts`` may be traced, so the
    function vmaps over pairs.

    Args:
      key: PRNG key. counts: ``(nb,)`` int real rows per block, ``1 ≤ counts ≤ n_max``.
      n_max: rows per block (static). batch_size: rows per batch, ``≤ Σ counts`` (static).
      steps: batches (static). batches: "epoch" or "iid" (static).

    Returns:
      ``(steps, batch_size)`` int32 row indices into the ``nb · n_max`` padded rows.

    Raises:
      ValueError: ``batches`` not epoch/iid.
    """
    import jax
    import jax.numpy as jnp

    if batches not in ("epoch", "iid"):
        raise ValueError(f"batches {batches!r}: choose epoch or iid")
    counts = jnp.asarray(counts, jnp.int32)
    size = counts.shape[0] * n_max
    valid = (jnp.arange(size) % n_max) < jnp.repeat(counts, n_max, total_repeat_length=size)

    def order(k):  # the real rows first, in a uniform random order (padding sorts last)
        return jnp.argsort(jnp.where(valid, jax.random.uniform(k, (size,)), 2.0)).astype(jnp.int32)

    t = jnp.arange(steps)
    if batches == "iid":
        return jax.vmap(lambda tt: order(jax.random.fold_in(key, tt))[:batch_size])(t)
    per_epoch = jnp.maximum(jnp.sum(counts) // batch_size, 1)
    return jax.vmap(lambda e, p: jax.lax.dynamic_slice(order(jax.random.fold_in(key, e)), (p * batch_size,),
                                                       (batch_size,)))(t // per_epoch, t % per_epoch)


def _stack_single(dist):
    """A K-behaviour fit → K one-behaviour distributions stacked on a leading axis (vmappable)."""
    from dynamics import GaussianPreference

    return GaussianPreference(dist.mu_pos[:, None], dist.mu_neg[:, None], dist.cov_pos[:, None],
                              dist.cov_neg[:, None], dist.p_pos[:, None], np.ones((dist.num_behaviors, 1),
                                                                                   dtype=dist.p_pos.dtype), ())


def _flip(dist):
    """The distribution of the flipped labels ``s → −s``: swap the classes, ``p → 1 − p``."""
    from dynamics.transforms import flip_labels

    return flip_labels(dist)


def _isotropic(cov):
    """``(…, d, d)`` covariances → ``(tr Σ / d) I`` (same trace, no direction; the time-to-learn control)."""
    d = cov.shape[-1]
    tr = np.trace(np.asarray(cov), axis1=-2, axis2=-1)
    return (tr / d)[..., None, None] * np.eye(d, dtype=np.asarray(cov).dtype)


def _first_step_below(values, steps, threshold=0.5):
    """First recorded step where ``values (T,)`` < threshold; NaN if never (``dynamics.theory.first_step_below``)."""
    from dynamics.theory import first_step_below

    return float(first_step_below(np.asarray(values), threshold, np.asarray(steps)))


def _spearman(a, b):
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan"), float("nan")
    r = spearmanr(a, b)
    return float(r.statistic if hasattr(r, "statistic") else r[0]), float(r.pvalue)


# ------------------------------------------------------------------- run
def run_real(emb, out_dir, config: RealConfig = RealConfig(), *, progress=print) -> dict:
    """Run the real-vs-predicted comparison and write the report into ``out_dir``.

    Args:
      emb: :class:`sims.embed.EmbeddingSet` (at least 1 behaviour; 2 for priority).
      out_dir: output folder (created): ``real.md``, ``summary.json``,
        ``behaviors.csv``, ``curves.csv``, ``priority.csv``, figures ``*.png``.
      config: :class:`RealConfig`.
      progress: callable for one-line progress messages (``None`` = silent).

    Returns:
      the summary dict written to ``summary.json`` (keys ``heldout_prediction_error``
      and ``insample_prediction_error`` (medians over behaviours, nats),
      ``heldout_loss_se``, ``time_to_learn``, ``spearman_rho``,
      ``median_prediction_error`` (= in-sample, kept for older readers),
      ``priority``, ``misalignment``, ``behaviors`` …).

    Raises:
      ValueError: a bad config or data (named).
    """
    import jax
    import jax.numpy as jnp

    import dynamics as dd

    config.validate()
    say = progress or (lambda *a, **k: None)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k_beh = emb.num_behaviors
    names = list(emb.names)
    train_idx, held_idx, info = split_behaviors(emb.s, emb.behavior, k_beh, config.held_out, config.seed)
    n_tr, n_ev = info["n_train"], info["n_eval"]
    if config.batch_size is not None and config.batch_size > n_tr:
        raise ValueError(f"batch_size={config.batch_size} exceeds the common training size n_train={n_tr}; "
                         "pass a smaller --batch-size")
    x = np.asarray(emb.x, np.float32)
    s = np.asarray(emb.s, np.float32)
    X, S = jnp.asarray(x[train_idx]), jnp.asarray(s[train_idx])  # (K, n_tr, d), (K, n_tr)
    Xe, Se = jnp.asarray(x[held_idx]), jnp.asarray(s[held_idx])
    zeros_tr = jnp.zeros((k_beh, n_tr), jnp.int32)
    zeros_ev = jnp.zeros((k_beh, n_ev), jnp.int32)
    # soft labels: per-pair confidences c (training only; metrics stay on the hard labels) and, for the
    # prediction, each behaviour's mean label smoothing ε_k = mean(1 − c) over its training rows as a flip rate
    conf = _confidence(emb) if config.soft_labels else None
    C = None if conf is None else jnp.asarray(conf[train_idx])  # (K, n_tr)
    smoothing_k = np.zeros(k_beh) if conf is None else (1.0 - conf[train_idx].astype(np.float64)).mean(axis=1)
    noise = None if conf is None else jnp.asarray(smoothing_k[:, None], jnp.float32)  # (K, 1) flip rate per fit

    # ---- fit (train split, per behaviour)
    flat = train_idx.reshape(-1)
    fit = dd.fit_gaussian(x[flat], emb.s[flat], emb.behavior[flat], num_behaviors=k_beh, names=names,
                          shrinkage=config.shrinkage, weight="uniform")
    dists = _stack_single(fit)
    props = dd.behavior_properties(x[flat], emb.s[flat], emb.behavior[flat], num_behaviors=k_beh, names=names)
    dist_k = props.distinguishability

    # ---- head
    use_ref = config.head == "reference" or (config.head == "auto" and emb.w_answers is not None)
    if use_ref and emb.w_answers is None:
        raise ValueError("head='reference' needs w_answers in the embedding file (a causal-LM embedding); "
                         "pass head='zeros'")
    head = dd.Head.create(np.asarray(emb.w_answers, np.float32)) if use_ref else dd.Head.zeros(emb.dim,
                                                                                              dtype=jnp.float32)
    common = dict(beta=config.beta, lr=config.lr, loss=config.loss)
    sgd_kw = dict(common, batches=config.batches)
    key = jax.random.key(config.seed)
    k_sgd, k_gd, k_pair, k_mis = jax.random.split(key, 4)

    # ---- alignment runs: SGD, full-batch GD and the population prediction, vmapped over behaviours
    say(f"real: K={k_beh} behaviours, n_train={n_tr}, n_eval={n_ev}, d={emb.dim}; training (vmapped)")

    keys = jax.random.split(k_sgd, k_beh)
    sgd = jax.vmap(lambda *a: dd.trajectory_on_data(a[:3], a[3:6], a[6], num_behaviors=1, steps=config.steps,
                                                    batch_size=config.batch_size, head=head, label_confidence=a[7],
                                                    **sgd_kw)
                   )(X, S, zeros_tr, Xe, Se, zeros_ev, keys, C)
    gd = jax.vmap(lambda *a: dd.trajectory_on_data(a[:3], a[3:6], a[6], num_behaviors=1, steps=config.steps,
                                                   batch_size=None, head=head, label_confidence=a[7], **common)
                  )(X, S, zeros_tr, Xe, Se, zeros_ev, jax.random.split(k_gd, k_beh), C)
    predict = jax.vmap(lambda dist, ln: dd.population_trajectory(dist, steps=config.steps, head=head,
                                                                 label_noise=ln, **common))
    pop = predict(dists, noise)
    steps_arr = np.asarray(pop.step[0])
    curves = {
        "loss": {"train_sgd": np.asarray(sgd.train["loss"]), "train_gd": np.asarray(gd.train["loss"]),
                 "held_out_sgd": np.asarray(sgd.eval["loss"]), "predicted": np.asarray(pop.metrics["loss"])},
        "reward_accuracy": {"train_sgd": np.asarray(sgd.train["reward_accuracy"]),
                            "train_gd": np.asarray(gd.train["reward_accuracy"]),
                            "held_out_sgd": np.asarray(sgd.eval["reward_accuracy"]),
                            "predicted": np.asarray(pop.metrics["reward_accuracy"])},
    }
    te = config.early_steps
    lc = curves["loss"]
    drop_real = lc["train_sgd"][:, 0] - lc["train_sgd"][:, te]
    drop_pred = lc["predicted"][:, 0] - lc["predicted"][:, te]
    err_sgd = np.max(np.abs(lc["train_sgd"] - lc["predicted"]), axis=1)
    err_gd = np.max(np.abs(lc["train_gd"] - lc["predicted"]), axis=1)
    err_eval = np.max(np.abs(lc["held_out_sgd"] - lc["predicted"]), axis=1)
    ac = curves["reward_accuracy"]
    # accuracy after a few SGD steps depends on which minibatches came first; compare from t_early on
    acc_err = np.max(np.abs(ac["train_sgd"] - ac["predicted"])[:, steps_arr >= te], axis=1)
    acc_err_gd = np.max(np.abs(ac["train_gd"] - ac["predicted"])[:, 1:], axis=1)
    total_drop_pred = lc["predicted"][:, 0] - lc["predicted"][:, -1]
    rel_err = err_sgd / np.where(total_drop_pred > 0, total_drop_pred, np.nan)
    rho, rho_p = _spearman(dist_k, drop_real)
    rho_pred, _ = _spearman(dist_k, drop_pred)
    rho_rp, _ = _spearman(drop_real, drop_pred)

    # ---- held-out noise floor: standard error of the final held-out loss (per behaviour, nats)
    from dynamics.losses import loss_fn

    h_ev = np.asarray(Se) * np.einsum("knd,kd->kn", np.asarray(Xe), np.asarray(sgd.delta)[:, -1])
    ell_ev = np.asarray(loss_fn(config.loss, jnp.asarray(h_ev), config.beta, 0.0))
    se_ev = ell_ev.std(axis=1, ddof=1) / math.sqrt(n_ev)

    # ---- time to learn: a test of the Gaussian model that C1's first-order term does not imply. The step at
    # which the loss first reaches a common level depends on how the drop slows down, i.e. on the covariance
    # (docs/theory.md §3); an isotropic fit with the same means and traces is the control.
    iso = dists.replace(cov_pos=_isotropic(dists.cov_pos), cov_neg=_isotropic(dists.cov_neg))
    pop_iso = predict(iso, noise)
    loss_iso = np.asarray(pop_iso.metrics["loss"])
    level = config.learn_level
    if level is None:
        level = float(np.median(lc["predicted"][:, 0]) - 0.5 * np.median(total_drop_pred))
    ttl = {src: np.array([_first_step_below(v, steps_arr, level) for v in arr])
           for src, arr in (("real", lc["train_sgd"]), ("real_gd", lc["train_gd"]), ("predicted", lc["predicted"]),
                            ("isotropic", loss_iso))}
    censor = lambda t: np.where(np.isfinite(t), t, config.steps + 1)  # never reached → ranked last  # noqa: E731
    rho_ttl, rho_ttl_p = _spearman(censor(ttl["predicted"]), censor(ttl["real"]))
    rho_ttl_iso, _ = _spearman(censor(ttl["isotropic"]), censor(ttl["real"]))
    rho_ttl_dist, _ = _spearman(-dist_k, censor(ttl["real"]))
    both = np.isfinite(ttl["predicted"]) & np.isfinite(ttl["real"])
    both_iso = np.isfinite(ttl["isotropic"]) & np.isfinite(ttl["real"])
    time_to_learn = {
        "level": level, "censored_at": config.steps + 1,
        "reached_real": int(np.isfinite(ttl["real"]).sum()), "reached_predicted": int(np.isfinite(ttl["predicted"]).sum()),
        "spearman_predicted_vs_real": rho_ttl, "spearman_p": rho_ttl_p,
        "spearman_isotropic_vs_real": rho_ttl_iso,
        "spearman_minus_distinguishability_vs_real": rho_ttl_dist,
        "median_abs_error_steps": float(np.median(np.abs(ttl["predicted"] - ttl["real"])[both])) if both.any()
        else None,
        "median_abs_error_steps_isotropic": float(np.median(np.abs(ttl["isotropic"] - ttl["real"])[both_iso]))
        if both_iso.any() else None,
        "heldout_prediction_error_isotropic": float(np.median(np.max(np.abs(lc["held_out_sgd"] - loss_iso), axis=1))),
    }
    diverged = bool(np.any(np.asarray(sgd.diverged)) or np.any(np.asarray(pop.diverged)))

    # ---- priority on real pairs (two behaviours, one head)
    priority = None
    pair_rows = []
    bins_gap = bins_score = None
    if k_beh >= 2:
        say(f"real: priority on pairs ({config.pair_sampling} sampling, vmapped)")
        pairs = np.array([(i, j) for i in range(k_beh) for j in range(i + 1, k_beh)])
        if len(pairs) > config.max_pairs:
            rng = np.random.default_rng(config.seed + 1)
            pairs = pairs[np.sort(rng.choice(len(pairs), config.max_pairs, replace=False))]
        pi, pj = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])
        cat = lambda A, i, j: None if A is None else jnp.concatenate([A[i], A[j]], axis=0)  # noqa: E731
        beh_ev = jnp.concatenate([jnp.zeros(n_ev, jnp.int32), jnp.ones(n_ev, jnp.int32)])
        union = config.pair_sampling == "union"
        if union:
            # each behaviour's whole training split padded to n_max rows; padding rows get behaviour 2, loss
            # weight 0, and are never drawn (union_batch_index), so shapes stay static across pairs
            counts = np.array([len(t) for t in info["train_all"]])
            n_max = int(counts.max())
            pad_idx = np.stack([np.concatenate([t, np.full(n_max - len(t), t[0])]) for t in info["train_all"]])
            Xp, Sp = jnp.asarray(x[pad_idx]), jnp.asarray(s[pad_idx])
            Cp = None if conf is None else jnp.asarray(conf[pad_idx])
            pad = jnp.asarray(np.arange(n_max)[None, :] >= counts[:, None])  # (K, n_max)
        else:
            counts = np.full(k_beh, n_tr)
        pair_counts = np.stack([counts[pairs[:, 0]], counts[pairs[:, 1]]], axis=1)  # (P, 2) training rows
        batch_pair = None if config.batch_size is None else min(2 * config.batch_size, int(pair_counts.sum(1).min()))

        def pair_run(i, j, kk):
            ev = (cat(Xe, i, j), cat(Se, i, j), beh_ev)
            if not union:
                beh_tr = jnp.concatenate([jnp.zeros(n_tr, jnp.int32), jnp.ones(n_tr, jnp.int32)])
                return dd.trajectory_on_data((cat(X, i, j), cat(S, i, j), beh_tr), ev, kk, num_behaviors=2,
                                             steps=te, batch_size=batch_pair, head=head,
                                             label_confidence=cat(C, i, j), **sgd_kw)
            beh_tr = jnp.concatenate([jnp.where(pad[i], 2, 0), jnp.where(pad[j], 2, 1)]).astype(jnp.int32)
            cnt = jnp.stack([jnp.asarray(counts)[i], jnp.asarray(counts)[j]])
            lam = jnp.array([1.0, 1.0, 0.0], jnp.float32)
            index = None
            if batch_pair is None:  # full batch over the union: the mean over its real rows
                lam = lam * (2 * n_max) / jnp.sum(cnt)
            else:
                index = union_batch_index(kk, cnt, n_max, batch_pair, te, config.batches)
            return dd.trajectory_on_data((cat(Xp, i, j), cat(Sp, i, j), beh_tr), ev, kk, num_behaviors=3, steps=te,
                                         batch_size=batch_pair, head=head, loss_weight=lam, batch_index=index,
                                         label_confidence=cat(Cp, i, j), **common)

        pair_emp = jax.vmap(pair_run)(pi, pj, jax.random.split(k_pair, len(pairs)))
        # the pair's Gaussian fit, weighted as its rows are sampled (union: natural counts; equal: 1/2 each)
        w_pair = jnp.asarray(pair_counts / pair_counts.sum(1, keepdims=True), fit.p_pos.dtype)
        pair_dist = jax.vmap(lambda i, j, w: dd.GaussianPreference(
            fit.mu_pos[jnp.stack([i, j])], fit.mu_neg[jnp.stack([i, j])], fit.cov_pos[jnp.stack([i, j])],
            fit.cov_neg[jnp.stack([i, j])], fit.p_pos[jnp.stack([i, j])], w, ()))(pi, pj, w_pair)
        pair_noise = None if conf is None else jnp.asarray(
            np.stack([smoothing_k[pairs[:, 0]], smoothing_k[pairs[:, 1]]], 1), jnp.float32)
        pair_pop = jax.vmap(lambda dist, ln: dd.population_trajectory(dist, steps=te, head=head, label_noise=ln,
                                                                      **common))(pair_dist, pair_noise)
        # the covariance-aware priority score of the pair's fit over the horizon τ = η t_early (docs/theory.md §4.4)
        score = np.asarray(jax.vmap(lambda dist: dd.priority_score(dist, beta=config.beta, horizon=config.lr * te,
                                                                   loss=config.loss))(pair_dist))[:, 0, 1]
        bl = np.asarray(pair_emp.train["behavior_loss"])[..., :2]  # (P, T, 2)
        bp = np.asarray(pair_pop.metrics["behavior_loss"])
        real_diff = (bl[:, 0, 0] - bl[:, -1, 0]) - (bl[:, 0, 1] - bl[:, -1, 1])  # > 0: i learned first
        pred_diff = (bp[:, 0, 0] - bp[:, -1, 0]) - (bp[:, 0, 1] - bp[:, -1, 1])
        gap = props.priority_gap[pairs[:, 0], pairs[:, 1]]
        agree_gap = np.sign(gap) == np.sign(real_diff)
        agree_score = np.sign(score) == np.sign(real_diff)
        agree_pop = np.sign(pred_diff) == np.sign(real_diff)
        agree_gap_pop = np.sign(gap) == np.sign(pred_diff)
        bins_gap = _agreement_bins(gap, agree_gap)
        bins_score = _agreement_bins(score, agree_score)
        priority = {"pairs": int(len(pairs)), "steps": te, "pair_sampling": config.pair_sampling,
                    "horizon": config.lr * te,
                    "agreement_gap_vs_real": float(agree_gap.mean()),
                    "agreement_score_vs_real": float(agree_score.mean()),
                    "agreement_population_vs_real": float(agree_pop.mean()),
                    "agreement_gap_vs_population": float(agree_gap_pop.mean()),
                    "by_abs_gap": [dict(b, agreement_gap=b["agreement"]) for b in bins_gap],
                    "by_abs_score": bins_score}
        for p in range(len(pairs)):
            pair_rows.append([names[pairs[p, 0]], names[pairs[p, 1]], f"{gap[p]:.6g}", f"{score[p]:.6g}",
                              f"{real_diff[p]:.6g}", f"{pred_diff[p]:.6g}", int(agree_gap[p]), int(agree_score[p]),
                              int(agree_pop[p]), int(pair_counts[p, 0]), int(pair_counts[p, 1])])

    # ---- misalignment: flipped labels from the aligned (end-of-SGD) head, which is also the reference
    say("real: misalignment with flipped labels (vmapped)")
    aligned_w = sgd.weights  # (K, V, d)
    heads = dd.Head(w_ref=aligned_w, w_init=aligned_w, a=head.a, b=head.b)
    mis = jax.vmap(lambda xx, ss, bb, xe, se, be, kk, h, cc: dd.trajectory_on_data(
        (xx, -ss, bb), (xe, -se, be), kk, num_behaviors=1, steps=config.misalign_steps,
        batch_size=config.batch_size, head=h, label_confidence=cc, **sgd_kw))(
            X, S, zeros_tr, Xe, Se, zeros_ev, jax.random.split(k_mis, k_beh), heads, C)
    mis_pop = jax.vmap(lambda dist, h, ln: dd.population_trajectory(_flip(dist), steps=config.misalign_steps, head=h,
                                                                    label_noise=ln, **common))(dists, heads, noise)
    mis_steps = np.asarray(mis_pop.step[0])
    mis_loss_real = np.asarray(mis.train["loss"])
    mis_loss_pred = np.asarray(mis_pop.metrics["loss"])
    orig_acc_real = 1.0 - np.asarray(mis.train["policy_accuracy"])  # accuracy on the original labels
    orig_acc_pred = 1.0 - np.asarray(mis_pop.metrics["policy_accuracy"])
    t_below_real = np.array([_first_step_below(v, mis_steps) for v in orig_acc_real])
    t_below_pred = np.array([_first_step_below(v, mis_steps) for v in orig_acc_pred])
    mis_drop_real = mis_loss_real[:, 0] - mis_loss_real[:, te]
    rho_mis, _ = _spearman(dist_k, mis_drop_real)
    misalignment = {
        "steps": config.misalign_steps,
        "median_loss_real": float(np.median(mis_loss_real[:, -1])),
        "median_loss_predicted": float(np.median(mis_loss_pred[:, -1])),
        "median_abs_loss_error": float(np.median(np.max(np.abs(mis_loss_real - mis_loss_pred), axis=1))),
        "spearman_rho_distinguishability_vs_early_drop": rho_mis,
    }
    wall = time.perf_counter() - t_start

    # ---- write
    behaviors = []
    for k, name in enumerate(names):
        behaviors.append({
            "behavior": name, "n_train": n_tr, "n_eval": n_ev, "dropped": int(info["dropped"][k]),
            "p_pos": float(props.p_pos[k]), "distinguishability": float(dist_k[k]),
            "concentration": float(props.concentration[k]), "trace": float(props.trace[k]),
            "early_drop_real": float(drop_real[k]), "early_drop_predicted": float(drop_pred[k]),
            "final_loss_real": float(lc["train_sgd"][k, -1]), "final_loss_predicted": float(lc["predicted"][k, -1]),
            "final_held_out_accuracy": float(ac["held_out_sgd"][k, -1]),
            "final_accuracy_predicted": float(ac["predicted"][k, -1]),
            "prediction_error": float(err_sgd[k]), "prediction_error_gd": float(err_gd[k]),
            "prediction_error_held_out": float(err_eval[k]), "held_out_loss_se": float(se_ev[k]),
            "relative_prediction_error": float(rel_err[k]),
            "time_to_learn_real": float(ttl["real"][k]), "time_to_learn_predicted": float(ttl["predicted"][k]),
            "time_to_learn_isotropic": float(ttl["isotropic"][k]),
            "accuracy_prediction_error": float(acc_err[k]), "accuracy_prediction_error_gd": float(acc_err_gd[k]),
            "misalign_loss_real": float(mis_loss_real[k, -1]), "misalign_loss_predicted": float(mis_loss_pred[k, -1]),
            "misalign_steps_below_half_real": float(t_below_real[k]),
            "misalign_steps_below_half_predicted": float(t_below_pred[k]),
            "label_smoothing_mean": float(smoothing_k[k]),
        })
    summary = {
        "model": emb.model, "backend": emb.backend, "num_behaviors": k_beh, "d": emb.dim,
        "n_train": n_tr, "n_eval": n_ev, "dropped_total": int(info["dropped"].sum()),
        "config": {k: v for k, v in dataclasses.asdict(config).items()},
        "head": "reference" if use_ref else "zeros",
        "spearman_rho": rho, "spearman_p": rho_p, "spearman_rho_predicted": rho_pred,
        "spearman_rho_real_vs_predicted_drop": rho_rp,
        "heldout_prediction_error": float(np.median(err_eval)),
        "insample_prediction_error": float(np.median(err_sgd)),
        "heldout_loss_se": float(np.median(se_ev)),
        "time_to_learn": time_to_learn,
        "median_prediction_error": float(np.median(err_sgd)), "max_prediction_error": float(np.max(err_sgd)),
        "median_prediction_error_gd": float(np.median(err_gd)),
        "median_prediction_error_held_out": float(np.median(err_eval)),
        "median_relative_prediction_error": float(np.nanmedian(rel_err)) if np.any(np.isfinite(rel_err)) else None,
        "median_accuracy_prediction_error": float(np.median(acc_err)),
        "median_accuracy_prediction_error_gd": float(np.median(acc_err_gd)),
        "soft_labels": config.soft_labels,
        "priority": priority, "priority_agreement_gap": bins_gap, "priority_agreement_score": bins_score,
        "misalignment": misalignment, "diverged": diverged,
        "wall_seconds": wall, "behaviors": behaviors,
    }
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, default=_json_default) + "\n")
    with open(out / "behaviors.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(behaviors[0]))
        w.writeheader()
        w.writerows(behaviors)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["behavior", "metric", "source", "step", "value"])
        for metric, srcs in curves.items():
            for src, arr in srcs.items():
                for k, name in enumerate(names):
                    for t, v in zip(steps_arr, arr[k]):
                        w.writerow([name, metric, src, int(t), f"{v:.6g}"])
        for src, arr in (("misalign_real", mis_loss_real), ("misalign_predicted", mis_loss_pred)):
            for k, name in enumerate(names):
                for t, v in zip(mis_steps, arr[k]):
                    w.writerow([name, "loss", src, int(t), f"{v:.6g}"])
    if pair_rows:
        with open(out / "priority.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["behavior_i", "behavior_j", "priority_gap", "priority_score", "real_drop_i_minus_j",
                        "predicted_drop_i_minus_j", "gap_agrees", "score_agrees", "population_agrees", "train_rows_i",
                        "train_rows_j"])
            w.writerows(pair_rows)
    figures = _figures(out, names, steps_arr, curves, dist_k, drop_real, drop_pred, err_sgd, err_gd, rho,
                       pair_rows and (props.priority_gap, pairs, real_diff), mis_steps, mis_loss_real,
                       mis_loss_pred, orig_acc_real, orig_acc_pred)
    summary["figures"] = figures
    (out / "real.md").write_text(_markdown(summary, config, figures))
    say(f"real: wrote {out}/real.md in {wall:.1f} s")
    return summary


def _agreement_bins(values, agree):
    """Sign agreement by ``|values|`` bin (:data:`GAP_BINS`): per bin ``lo``, ``hi`` (None = ∞), ``pairs``,
    ``agree`` (count) and ``agreement`` (fraction; NaN for an empty bin)."""
    out = []
    for lo, hi in zip(GAP_BINS[:-1], GAP_BINS[1:]):
        m = (np.abs(values) >= lo) & (np.abs(values) < hi)
        out.append({"lo": lo, "hi": hi if math.isfinite(hi) else None, "pairs": int(m.sum()),
                    "agree": int(agree[m].sum()), "agreement": float(agree[m].mean()) if m.any() else float("nan")})
    return out


def _confidence(emb):
    """Per-row label confidences ``(n,)`` in [1/2, 1] for ``soft_labels``: the emb.npz's ``confidence``, else the
    ``label_confidence`` of each statement's line in its persona file (``files``, ``line``, ``file_sha256``).

    Raises:
      ValueError: no confidence anywhere, a missing value, or one outside [1/2, 1] (named, with the fix).
    """
    conf = emb.confidence
    if conf is None:
        if not emb.files or not any(emb.files) or emb.line is None or not np.any(np.asarray(emb.line) > 0):
            raise ValueError("soft_labels needs per-row label confidences: the embedding file has no confidence array "
                             "and records no persona files; embed TRL data with --confidence-column COL, or drop "
                             "--soft-labels")
        from .persona import read_label_confidence

        conf = np.full(emb.n, np.nan, np.float32)
        sha = emb.file_sha256 or ("",) * emb.num_behaviors
        for k, path in enumerate(emb.files):
            rows = np.flatnonzero(emb.behavior == k)
            conf[rows] = read_label_confidence(path, np.asarray(emb.line)[rows], sha[k] or None)
    conf = np.asarray(conf, np.float32)
    bad = ~np.isfinite(conf)
    if bad.any():
        raise ValueError(f"soft_labels: {int(bad.sum())} of {emb.n} rows have no label confidence; give every row one, "
                         "or drop --soft-labels")
    if conf.min() < 0.5 or conf.max() > 1.0:
        raise ValueError(f"soft_labels: label confidences span [{conf.min():.3g}, {conf.max():.3g}]; they must lie in "
                         "[1/2, 1] (a confidence c < 1/2 is the other label with confidence 1 − c: flip it)")
    return conf


def _finite(v):
    """NaN/inf → None, recursively, so summary.json is strict JSON."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        return None
    return v


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


# ---------------------------------------------------------------- figures
def _panel_order(names, dist_k, limit=16):
    """Behaviours shown in the per-behaviour grids: all up to ``limit``, else evenly spaced in distinguishability."""
    order = np.argsort(dist_k)
    if len(names) <= limit:
        return list(order)
    return list(order[np.unique(np.linspace(0, len(order) - 1, limit).round().astype(int))])


def _short_name(name, width=38):
    """Long behaviour names keep their start and their (distinguishing) end."""
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-(width // 2):]


def _figures(out, names, steps, curves, dist_k, drop_real, drop_pred, err_sgd, err_gd, rho, pr, mis_steps,
             mis_real, mis_pred, orig_real, orig_pred):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    shown = _panel_order(names, dist_k)
    cols = 4
    rows = int(math.ceil(len(shown) / cols))
    style = {"train_sgd": ("C0", "-", "real train (SGD)"), "train_gd": ("C2", ":", "real train (full-batch GD)"),
             "held_out_sgd": ("C1", "--", "real held-out (SGD)"), "predicted": ("k", "-", "Gaussian prediction")}
    for metric, fname in (("loss", "loss_curves.png"), ("reward_accuracy", "accuracy_curves.png")):
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True)
        for ax in axes.flat[len(shown):]:
            ax.axis("off")
        for ax, k in zip(axes.flat, shown):
            for src, arr in curves[metric].items():
                c, ls, label = style[src]
                ax.plot(steps, arr[k], color=c, ls=ls, lw=1.8 if src == "predicted" else 1.2, label=label,
                        alpha=0.6 if src == "predicted" else 1.0)
            ax.set_title(f"{_short_name(names[k])}\nΔ={dist_k[k]:.3f}", fontsize=8)
            ax.tick_params(labelsize=7)
        axes.flat[0].legend(fontsize=6)
        fig.supxlabel("step")
        fig.supylabel("DPO loss (nats)" if metric == "loss" else "reward accuracy")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files[metric] = fname

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].scatter(dist_k, drop_real, label="real (SGD)", s=18)
    axes[0].scatter(dist_k, drop_pred, label="Gaussian prediction", s=18, marker="x", color="k")
    axes[0].set_xlabel("distinguishability ‖μ⁺ − μ⁻‖")
    axes[0].set_ylabel("early loss drop (nats)")
    axes[0].set_title(f"Spearman ρ = {rho:.3f}", fontsize=9)
    axes[0].legend(fontsize=7)
    order = np.argsort(err_sgd)[-30:]  # the 30 largest errors when there are more behaviours
    if len(err_sgd) > 30:
        axes[1].set_title(f"30 largest of {len(err_sgd)} behaviours", fontsize=9)
    axes[1].barh(np.arange(len(order)), err_sgd[order], color="C0", label="SGD")
    axes[1].scatter(err_gd[order], np.arange(len(order)), color="C2", s=10, label="full-batch GD", zorder=3)
    axes[1].set_yticks(np.arange(len(order)))
    axes[1].set_yticklabels([_short_name(names[i]) for i in order], fontsize=6 if len(order) > 15 else 7)
    axes[1].set_xlabel("max_t |L_real − L_pred| (nats)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "distinguishability.png", dpi=110)
    plt.close(fig)
    files["distinguishability"] = "distinguishability.png"

    if pr:
        gapm, pairs, real_diff = pr
        gap = gapm[pairs[:, 0], pairs[:, 1]]
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        agree = np.sign(gap) == np.sign(real_diff)
        ax.scatter(gap[agree], real_diff[agree], s=14, label="sign agrees")
        ax.scatter(gap[~agree], real_diff[~agree], s=14, color="C3", label="sign disagrees")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvline(0, color="0.6", lw=0.8)
        ax.set_xlabel("priority gap (Gaussian fit)")
        ax.set_ylabel("loss drop i − j, real pair (nats)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "priority.png", dpi=110)
        plt.close(fig)
        files["priority"] = "priority.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for k in shown:
        line, = axes[0].plot(mis_steps, mis_real[k], lw=1)
        axes[0].plot(mis_steps, mis_pred[k], lw=1, ls="--", color=line.get_color())
        axes[1].plot(mis_steps, orig_real[k], lw=1, color=line.get_color())
        axes[1].plot(mis_steps, orig_pred[k], lw=1, ls="--", color=line.get_color())
    axes[0].set_ylabel("flipped-label DPO loss (nats)")
    axes[1].set_ylabel("policy accuracy, original labels")
    axes[1].axhline(0.5, color="0.5", lw=0.8)
    for ax in axes:
        ax.set_xlabel("misalignment step")
    axes[0].set_title("solid: real (SGD), dashed: Gaussian prediction", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "misalignment.png", dpi=110)
    plt.close(fig)
    files["misalignment"] = "misalignment.png"
    return files


# --------------------------------------------------------------- markdown
def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _fmt_g(v):
    return "–" if v is None or not math.isfinite(v) else f"{v:.2g}"


def _markdown(summary, config, figures, prefix="") -> str:
    c = config
    pr = summary["priority"]
    mis = summary["misalignment"]
    ttl = summary["time_to_learn"]
    lines = [
        "# Last-layer DPO on real embeddings vs the Gaussian prediction", "",
        f"Model `{summary['model']}` ({summary['backend']}), K = {summary['num_behaviors']} behaviours, "
        f"d = {summary['d']}; per behaviour n_train = {summary['n_train']}, n_eval = {summary['n_eval']} "
        f"(class-stratified {1 - c.held_out:.0%}/{c.held_out:.0%} split, subsampled to a common size; "
        f"{summary['dropped_total']} rows dropped). Head: {summary['head']}. "
        f"DPO `{c.loss}`, β = {c.beta}, SGD lr = {c.lr}, batch {c.batch_size} ({c.batches} batches), {c.steps} steps; "
        f"t_early = {c.early_steps}; pair runs: {c.pair_sampling} sampling; soft labels "
        f"{'on' if c.soft_labels else 'off'}; seed {c.seed}. Wall time {summary['wall_seconds']:.1f} s.", "",
        "## Headline", "",
        f"- **Held-out** Gaussian prediction error, median over behaviours of max_t |L_held-out(t) − L_pred(t)| "
        f"(the fit and the run on the training split, the loss on the held-out split): "
        f"**{_fmt(summary['heldout_prediction_error'], 4)} nats** (standard error of one held-out loss: "
        f"{_fmt(summary['heldout_loss_se'], 4)} nats). In-sample (training loss; the fit has its exact mean and "
        f"covariance, so only higher moments can differ): {_fmt(summary['insample_prediction_error'], 4)} nats "
        f"(max {_fmt(summary['max_prediction_error'], 4)}); full-batch GD {_fmt(summary['median_prediction_error_gd'], 4)} "
        f"nats; relative to the predicted loss drop {_fmt(summary['median_relative_prediction_error'])}. Reward "
        f"accuracy, max_t |acc_real − acc_pred|: {_fmt(summary['median_accuracy_prediction_error'])} (SGD, t ≥ t_early), "
        f"{_fmt(summary['median_accuracy_prediction_error_gd'])} (full-batch GD, t ≥ 1).",
        f"- Time to learn (first step with training loss < {_fmt(ttl['level'], 4)} nats; never → {ttl['censored_at']}): "
        f"Spearman ρ(predicted, real) = **{_fmt(ttl['spearman_predicted_vs_real'])}** "
        f"(isotropic-covariance control {_fmt(ttl['spearman_isotropic_vs_real'])}, −distinguishability alone "
        f"{_fmt(ttl['spearman_minus_distinguishability_vs_real'])}); median |t_pred − t_real| "
        f"{_fmt(ttl['median_abs_error_steps'], 1)} steps (isotropic {_fmt(ttl['median_abs_error_steps_isotropic'], 1)}); "
        f"reached by {ttl['reached_real']} real / {ttl['reached_predicted']} predicted of {summary['num_behaviors']}. "
        f"Held-out error of the isotropic control: {_fmt(ttl['heldout_prediction_error_isotropic'], 4)} nats.",
        f"- Spearman ρ(distinguishability, early loss drop) across behaviours: {_fmt(summary['spearman_rho'])} "
        f"(p = {_fmt_g(summary['spearman_p'])}; on the prediction {_fmt(summary['spearman_rho_predicted'])}) — "
        f"nearly implied by C1's first-order term, so not evidence for the Gaussian model by itself.",
    ]
    if pr:
        lines.append(f"- Priority on {pr['pairs']} real pairs (loss drop over {pr['steps']} steps; minibatches from "
                     f"{'the union of the two training splits, natural counts' if pr['pair_sampling'] == 'union' else 'equal counts'}): "
                     f"the sign of the paper's priority gap (means only) picks the behaviour learned first in "
                     f"**{pr['agreement_gap_vs_real']:.0%}** of pairs, the covariance-aware priority score "
                     f"(`dynamics.priority_score`, τ = {_fmt(float(pr['horizon']), 2)}) in "
                     f"**{pr['agreement_score_vs_real']:.0%}**, the population prediction of the pair in "
                     f"{pr['agreement_population_vs_real']:.0%}.")
    lines.append(f"- Misalignment (flipped labels from the aligned head, {mis['steps']} steps): median loss "
                 f"{_fmt(mis['median_loss_real'])} real vs {_fmt(mis['median_loss_predicted'])} predicted; "
                 f"Spearman ρ(distinguishability, early misalignment drop) = "
                 f"{_fmt(mis['spearman_rho_distinguishability_vs_early_drop'])}.")
    if summary["soft_labels"]:
        smoothing = [b["label_smoothing_mean"] for b in summary["behaviors"]]
        lines.append(f"- Soft labels: pair i trained on c_i ℓ(h_i) + (1 − c_i) ℓ(−h_i) with its label confidence c_i "
                     f"(per-pair cDPO, ε_i = 1 − c_i); the prediction uses each behaviour's mean ε_k as a flip rate "
                     f"(median ε_k {float(np.median(smoothing)):.3f}, range {min(smoothing):.3f}–"
                     f"{max(smoothing):.3f}); metrics on the hard labels.")
    if summary["diverged"]:
        lines.append("- **WARNING**: a run diverged (NaN/inf); lower lr or β.")
    lines += ["", "## Per behaviour", "",
              "| behaviour | Δ | concentration | early drop real | early drop pred | held-out error (nats) | "
              "in-sample error | GD error | time to learn real / pred | held-out acc | misalign loss real / pred | "
              "steps to acc < 1/2 real / pred |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in sorted(summary["behaviors"], key=lambda r: -r["distinguishability"]):
        lines.append(
            f"| {b['behavior']} | {b['distinguishability']:.3f} | {b['concentration']:.3f} | "
            f"{b['early_drop_real']:.4f} | {b['early_drop_predicted']:.4f} | {b['prediction_error_held_out']:.4f} | "
            f"{b['prediction_error']:.4f} | {b['prediction_error_gd']:.4f} | "
            f"{_fmt(b['time_to_learn_real'], 0)} / {_fmt(b['time_to_learn_predicted'], 0)} | "
            f"{b['final_held_out_accuracy']:.3f} | "
            f"{b['misalign_loss_real']:.3f} / {b['misalign_loss_predicted']:.3f} | "
            f"{_fmt(b['misalign_steps_below_half_real'], 0)} / {_fmt(b['misalign_steps_below_half_predicted'], 0)} |")
    if pr:
        for what, key in (("gap", "priority_agreement_gap"), ("score", "priority_agreement_score")):
            lines += ["", f"## Priority by |{what}| (claim C4{'' if what == 'gap' else ', covariance-aware priority score'})",
                      "", f"| abs({what}) | pairs | {what} sign agrees with real |", "|---|---|---|"]
            for b in summary[key]:
                hi = "∞" if b["hi"] is None else f"{b['hi']}"
                lines.append(f"| [{b['lo']}, {hi}) | {b['pairs']} | {b['agree']} ({_fmt(b['agreement'], 2)}) |")
    lines += ["", "## Figures", ""]
    captions = {"loss": "DPO loss per behaviour: real (SGD train, full-batch GD train, held-out) vs the Gaussian "
                        "prediction", "reward_accuracy": "reward accuracy, same layout",
                "distinguishability": "early loss drop against distinguishability; prediction error per behaviour",
                "priority": "priority gap against the real difference in loss drop of each pair",
                "misalignment": "flipped-label training from the aligned head: loss and original-label accuracy"}
    for key, fname in figures.items():
        lines.append(f"![{captions.get(key, key)}]({prefix}{fname})")
        lines.append(f"*{captions.get(key, key)}.*")
        lines.append("")
    lines += ["Definitions: early loss drop = L(0) − L(t_early) on the SGD training curve; prediction error = "
              "max over recorded steps of |L(t) − L_pred(t)|, L_pred from `population_trajectory` on the "
              "Gaussian fit of the training split, L the SGD run's held-out loss (headline) or training loss "
              "(in-sample); time to learn = first recorded step with the SGD training loss below the level. "
              "Files: `summary.json`, `behaviors.csv`, `curves.csv`, `priority.csv`.", "",
              "Data: Anthropic persona statements (Perez et al. 2022, CC-BY-4.0); setting: Im & Li (ICML 2024).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------ report hook
def real_report_section(out_dir: Path, full: bool, *, config: RealConfig | None = None, log=None) -> str:
    """Run embed → properties → real on the persona data and return a markdown section.

    Embeds the default subset (:data:`DEFAULT_BEHAVIORS`, 12 behaviours, all
    statements; ``full=True`` → every behaviour in the data folder) with the
    packaged all-MiniLM-L6-v2 (cached, see ``dpo-sims embed``), writes
    ``properties.csv``, ``priority_gap.csv`` and the ``dpo-sims real`` outputs
    into ``out_dir/real/``, and returns a section for ``report.md`` (links are
    relative to ``out_dir``). Used by ``dpo-sims reproduce --real``.
    ``config`` overrides the :class:`RealConfig` defaults (tests use a short run). ``log``: a callable
    for one-line stage messages (``real: embedding …``, ``real: … training``; ``None`` = silent);
    ``dpo-sims reproduce --real`` passes its stderr logger (the section takes minutes).

    Raises:
      FileNotFoundError: the persona folder is missing (set ``$DPO_DYNAMICS_PERSONA``).
      sims.embed.MissingExtraError: (an ImportError) the ``[embed]`` extra is not installed.
    """
    from . import embed as embed_mod
    from . import persona as persona_io
    import dynamics as dd

    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    out = Path(out_dir) / "real"
    out.mkdir(parents=True, exist_ok=True)
    data_dir = persona_io.default_data_dir()
    say(f"real: reading the persona statements in {data_dir} ({'every behaviour' if full else 'default subset'})")
    data = persona_io.load_persona(data_dir, None if full else DEFAULT_BEHAVIORS)
    stats: dict = {}
    say(f"real: embedding {len(data.questions)} statements of {len(data.files)} behaviours with "
        "all-MiniLM-L6-v2 (cached ones are read back)")
    emb = embed_mod.embed_persona(data, "minilm", stats=stats)
    say(f"real: embedded in {time.perf_counter() - t0:.0f} s; per-behaviour properties (properties.csv)")
    props = dd.behavior_properties(emb.x, emb.s, emb.behavior, num_behaviors=emb.num_behaviors, names=emb.names)
    embed_mod._write_csv(out / "properties.csv", embed_mod.PROPERTIES_HEADER, embed_mod.properties_rows(props))
    embed_mod._write_csv(out / "priority_gap.csv", ["behavior"] + list(props.names),
                         [[n] + [f"{v:.6g}" for v in props.priority_gap[k]] for k, n in enumerate(props.names)])
    summary = run_real(emb, out, config or RealConfig(), progress=log)
    wall = time.perf_counter() - t0
    rate = stats["embedded"] / stats["seconds"] if stats.get("embedded") and stats["seconds"] > 0 else None
    pr = summary["priority"]
    lines = [
        "## Real embeddings (persona statements, all-MiniLM-L6-v2)", "",
        f"{'All' if full else 'Default subset of'} {emb.num_behaviors} behaviours, {emb.n} statements "
        f"(skipped files: {len(data.skipped)}); embedded {stats.get('embedded', 0)} "
        f"({stats.get('cached', 0)} from the cache)"
        + (f" at {rate:.0f} statements/s" if rate else "") + f"; wall time {wall:.0f} s.", "",
        f"- held-out Gaussian prediction error (median): **{_fmt(summary['heldout_prediction_error'], 4)} nats** "
        f"(in-sample {_fmt(summary['median_prediction_error'], 4)}, full-batch GD "
        f"{_fmt(summary['median_prediction_error_gd'], 4)})",
        f"- time to learn, Spearman ρ(predicted, real): "
        f"**{_fmt(summary['time_to_learn']['spearman_predicted_vs_real'])}** (isotropic control "
        f"{_fmt(summary['time_to_learn']['spearman_isotropic_vs_real'])})",
        f"- Spearman ρ(distinguishability, early loss drop): {_fmt(summary['spearman_rho'])}",
    ]
    if pr:
        lines.append(f"- priority gap sign picks the behaviour learned first in {pr['agreement_gap_vs_real']:.0%} "
                     f"of {pr['pairs']} pairs (covariance-aware priority score: {pr['agreement_score_vs_real']:.0%})")
    lines.append(f"- misalignment: Spearman ρ(distinguishability, early drop) = "
                 f"{_fmt(summary['misalignment']['spearman_rho_distinguishability_vs_early_drop'])}")
    lines += ["", "Details: [real/real.md](real/real.md), per-behaviour properties: "
                  "[real/properties.csv](real/properties.csv).", ""]
    for key in ("loss", "distinguishability"):
        if key in summary["figures"]:
            lines.append(f"![{key}](real/{summary['figures'][key]})")
    lines.append("")
    lines.append("Data: Anthropic persona statements (Perez et al. 2022, CC-BY-4.0).")
    lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------- CLI
def real_fields():
    """``dpo-sims real``'s options as :class:`sims.sweep.schema.Field` records (JAX-free).

    One schema makes the argparse flags (``--NAME`` for ``NAME``, range-checked: a bad
    value is a usage error, exit 2) and their ``--help`` through
    :func:`sims.sweep.schema.add_arguments`; defaults are :class:`RealConfig`'s
    (``batch_size`` 0 = full batch, ``shrinkage`` "none").
    """
    from .sweep.schema import LOSS_NAMES, Field

    d = RealConfig()
    return (
        Field("beta", "float", d.beta, "base", "β of the loss (dimensionless; for sigmoid the curves depend on β and "
              "--lr only through lr·β²)", low=0.0, low_open=True),
        Field("lr", "float", d.lr, "base", "SGD learning rate η on the head W (per step)", low=0.0, low_open=True),
        Field("batch_size", "int", d.batch_size or 0, "base", "minibatch size in preference pairs; 0 = full batch "
              "(gradient descent)", low=0),
        Field("steps", "int", d.steps, "base", "optimizer steps of the alignment runs, ≥ --early-steps", low=1),
        Field("held_out", "float", d.held_out, "base", "held-out fraction of each behaviour's statements; 0.1 = a "
              "90/10 split", low=0.0, low_open=True, high=1.0, high_open=True),
        Field("early_steps", "int", d.early_steps, "base", "t_early in steps, ≤ min(--steps, --misalign-steps): the "
              "early loss drop L(0) − L(t_early) in nats (C1) and the step at which priority is judged (C4)", low=1),
        Field("loss", "str", d.loss, "base", "preference loss (TRL loss_type): sigmoid (DPO), cdpo, robust, hinge or "
              "ipo", choices=LOSS_NAMES),
        Field("max_pairs", "int", d.max_pairs, "base", "at most this many behaviour pairs (a seeded random subset of "
              "the K(K−1)/2) trained together on one head for priority (C4)", low=1),
        Field("misalign_steps", "int", d.misalign_steps, "base", "optimizer steps of the flipped-label run "
              "(misalignment, C5) from each behaviour's aligned head, ≥ --early-steps", low=1),
        Field("head", "str", d.head, "base", "initial and reference head: reference = the model's Yes/No output rows "
              "(only in causal-LM embedding files), zeros = the zero head, auto = reference when the file has the "
              "rows, else zeros", choices=("auto", "zeros", "reference")),
        Field("shrinkage", "str", "none", "base", "covariance shrinkage of the Gaussian fit: none (sample covariance "
              "S), ledoit-wolf (Ledoit–Wolf α per class), or a float α in [0, 1]: (1 − α) S + α (tr S/d) I"),
        Field("batches", "str", d.batches, "base", "SGD minibatch order: epoch (per-epoch reshuffle) or iid (a fresh "
              "random batch each step, as in Im & Li's code)", choices=("epoch", "iid")),
        Field("pair_sampling", "str", d.pair_sampling, "base", "rows of the pair runs (priority, C4): union = "
              "minibatches from the union of the two behaviours' whole training splits, natural counts (as Im & Li); "
              "equal = the common size each", choices=PAIR_SAMPLING),
        Field("soft_labels", "bool", d.soft_labels, "base", "train on per-pair soft labels c·ℓ(h) + (1 − c)·ℓ(−h) "
              "from the label confidence c ∈ [1/2, 1] (emb.npz confidence, else the persona files' "
              "label_confidence); the prediction uses each behaviour's mean ε = 1 − c as a flip rate"),
        Field("seed", "int", d.seed, "base", "integer seed of the split, the subsampling, the pair choice and the SGD "
              "batch order"),
    )


def register(sub) -> None:
    """Add the ``real`` sub-command; its options come from :func:`real_fields` (one schema for flags and help)."""
    from .sweep.schema import add_arguments

    p = sub.add_parser("real", help="last-layer DPO on real embeddings vs the Gaussian prediction",
                       description="Per behaviour of an emb.npz: a class-stratified train/held-out split "
                       "(--held-out, 90/10 by default), SGD on the real embeddings (vmapped over behaviours) beside "
                       "the population prediction (population_trajectory) of the Gaussian fit of the training "
                       "split. Reports the held-out prediction error in nats (headline; in-sample beside it), time to "
                       "learn real vs predicted (a covariance test, with an isotropic control), Spearman ρ between "
                       "distinguishability and the early loss drop (C1), priority on behaviour pairs (C4: the gap "
                       "and the covariance-aware priority score) and misalignment (C5); writes "
                       "real.md, summary.json, behaviors.csv, curves.csv, priority.csv and PNG figures to --out. "
                       "Persona data: Perez et al. 2022, CC-BY-4.0.")
    p.add_argument("embeddings", help="emb.npz written by `dpo-sims embed` (embeddings, ±1 labels, behaviour index)")
    p.add_argument("--out", required=True, help="output folder, created if missing (required)")
    add_arguments(p, real_fields())
    p.add_argument("--learn-level", type=float, default=None,
                   help="loss level (nats) of the time-to-learn test (default: half the median predicted loss drop "
                   "below the start)")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from .embed import EmbeddingSet, _shrinkage_arg

    shrink = _shrinkage_arg(args.shrinkage)
    config = RealConfig(beta=args.beta, lr=args.lr, batch_size=args.batch_size or None, steps=args.steps,
                        held_out=args.held_out, seed=args.seed, early_steps=args.early_steps, loss=args.loss,
                        max_pairs=args.max_pairs, misalign_steps=args.misalign_steps, head=args.head,
                        shrinkage=None if shrink == "none" else shrink, batches=args.batches,
                        learn_level=args.learn_level, pair_sampling=args.pair_sampling,
                        soft_labels=args.soft_labels).validate()
    emb = EmbeddingSet.load(args.embeddings)
    summary = run_real(emb, args.out, config)
    print(f"heldout_prediction_error={_fmt(summary['heldout_prediction_error'], 4)} nats "
          f"(in-sample {_fmt(summary['insample_prediction_error'], 4)}) time_to_learn_rho="
          f"{_fmt(summary['time_to_learn']['spearman_predicted_vs_real'])} spearman_rho={_fmt(summary['spearman_rho'])} "
          f"wall={summary['wall_seconds']:.1f}s "
          f"→ {Path(args.out) / 'real.md'}")
    return 1 if summary["diverged"] else 0
