"""The model of one configuration and the compiled program of one chunk.

:func:`build_distribution` turns a configuration's values into its distribution and head
(traceable); :func:`_chunk_impl` runs a chunk's configurations × seeds through
:func:`dynamics.trajectories`. Seeds: :func:`seed_key`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import dynamics as dd
from dynamics import transforms as tf
from dynamics._train import progress_ticks

from .families import build_family
from .plan import GroupSpec
from .schema import dynamic_fields


# --------------------------------------------------------------------------- model build
def seed_key(seed: int, s):
    """PRNG key of seed index ``s`` (int or array): ``fold_in(key(seed), s)``, the same for every configuration."""
    root = jax.random.key(seed)
    s = jnp.asarray(s)
    if s.ndim == 0:
        return jax.random.fold_in(root, s)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(s.reshape(-1)).reshape(s.shape)


def build_distribution(fields: dict, *, d: int | None = None, file_dist: dd.GaussianPreference | None = None):
    """The distribution and head of one configuration (pure; traceable under ``jax.vmap``).

    Args:
      fields: dynamic values (scalars, or ``(K,)`` for ``distinguishability``,
        ``sigma``, ``p``, ``weight``): ``distinguishability`` Δ_k, ``sigma`` σ_k,
        ``p`` p_k, ``weight`` ω_k, ``angle`` (degrees), ``kappa`` κ,
        ``flip_labels`` (bool), ``aligned_head_norm`` (≥ 0), ``init_offset``.
        Missing keys take their defaults (``weight``: uniform, or the file's).
      d: embedding dimension (static; generated distributions).
      file_dist: a fixed distribution (``distribution = "file"``); then the
        generated-distribution fields are ignored.

    Construction (docs/sweeps.md):

    1. generated: preference directions ``b_k = Δ_k · row k of L`` padded to
       ``d``, where ``L`` is the Cholesky factor of the K×K matrix with 1 on the
       diagonal and cos(angle) elsewhere (behaviour 0 lies along e₁, behaviour
       1 in the e₁–e₂ plane, …); ``μ_k^± = ±b_k/2``, ``Σ_k^± = σ_k² I``.
       For K = 1 this is exactly ``GaussianPreference.single(Δ, d, σ, p)``.
    2. separation (docs/theory.md §4.5): ``μ^± → (μ⁺+μ⁻)/2 ± κ (μ⁺−μ⁻)/2``.
    3. head: ``v = m̄/‖m̄‖`` (m̄ of step 2's distribution; ``v = 0`` when
       ``m̄ = 0``), ``u = aligned_head_norm · v``, ``W_ref = [u/2; −u/2]`` (V = 2,
       rows a, b) and ``W_0 = W_ref + init_offset · [v/2; −v/2]``, so
       ``δ_0 = init_offset · v``; the zero head when both are 0.
    4. ``flip_labels``: every label flipped, ``s → −s`` (chosen ↔ rejected):
       ``mu_pos``/``mu_neg`` and ``cov_pos``/``cov_neg`` swap and ``p → 1 − p``
       (:func:`dynamics.transforms.flip_labels`, the same transform as C5's
       ``theory.c5_flip_labels``).

    Steps 1, 2 and 4 are :mod:`dynamics.transforms` (``preference_directions``,
    ``scale_separation``, ``flip_labels``); ``GaussianPreference.from_angles``
    builds the same basis (``angles_deg=angle``).

    Returns:
      ``(dist, head)``: :class:`dynamics.GaussianPreference` (K, d) and
      :class:`dynamics.Head` (2, d).
    """
    f = {k: jnp.asarray(v) for k, v in fields.items() if k in dynamic_fields()}
    if file_dist is None:
        dist_ = jnp.atleast_1d(f["distinguishability"]).astype(jnp.result_type(float))
        k = dist_.shape[0]
        if d is None:
            raise ValueError("d is required for a generated distribution")
        cosines = tf.angle_cosines(f["angle"].astype(dist_.dtype), k, unit="degrees")
        b = tf.preference_directions(dist_, cosines, d)
        sigma = jnp.broadcast_to(f["sigma"].astype(dist_.dtype), (k,))
        p = jnp.broadcast_to(f["p"].astype(dist_.dtype), (k,))
        weight = jnp.broadcast_to(f["weight"].astype(dist_.dtype), (k,)) if "weight" in f \
            else jnp.full((k,), 1.0 / k, dist_.dtype)
        dist = dd.GaussianPreference.create(b / 2, -b / 2, dd.isotropic_cov(sigma, d, k), p_pos=p, weight=weight)
    else:
        dist = file_dist
        if "weight" in f:
            dist = dist.replace(weight=jnp.broadcast_to(f["weight"].astype(dist.weight.dtype), dist.weight.shape))
    dtype = dist.mu_pos.dtype
    dist = tf.scale_separation(dist, f.get("kappa", jnp.asarray(1.0)).astype(dtype))
    mbar = dist.mean
    norm = jnp.linalg.norm(mbar)
    hn = f.get("aligned_head_norm", jnp.asarray(0.0)).astype(dtype)
    v = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0) * mbar
    u = hn * v
    off = f.get("init_offset", jnp.asarray(0.0)).astype(dtype) * v
    w = jnp.stack([u / 2, -u / 2])
    head = dd.Head.create(w, w + jnp.stack([off / 2, -off / 2]))
    dist = tf.flip_labels(dist, f.get("flip_labels", jnp.asarray(False)).astype(bool))
    return dist, head


#: the host listener of the running chunk's step reports (set by run_sweep while it runs a chunk)
_TICK_LISTENER: list = [None]


def _tick(step) -> None:
    """Host end of the chunk program's step reports (``jax.debug.callback``): to the listener, if any."""
    listener = _TICK_LISTENER[0]
    if listener is not None:
        listener(int(step))


def _chunk_impl(params, keys, file_dist, spec: GroupSpec, progress_every: int = 0):
    """The chunk program (:func:`_chunk_body`); with ``progress_every > 0`` (static) its training
    loops report every ``progress_every``-th step to :func:`_tick` (``dynamics._train.progress_ticks``)."""
    if progress_every:
        with progress_ticks(progress_every, _tick):
            return _chunk_body(params, keys, file_dist, spec)
    return _chunk_body(params, keys, file_dist, spec)


def _chunk_body(params, keys, file_dist, spec: GroupSpec):
    """All configurations of a chunk (leading axis of ``params``) × all seeds (``keys``).

    The distributions and heads are built per configuration (``jax.vmap`` of
    :func:`build_distribution` and the family), then each layer runs through the engine entry point
    :func:`dynamics.trajectories` with ``implementation="auto"``: the factored common-random-number
    engine wherever it applies (Gaussian, Laplace and Student-t draws; every population law), else
    ``jax.vmap`` of the core (one warning line says why). The seeds run one after another
    (``jax.lax.map`` over ``keys``); every configuration of a seed uses its key, as the core called
    per configuration would.
    """
    opt = None if spec.optimizer == "sgd" else spec.optimizer
    batch = spec.batch_size or None
    smoothed = (not spec.vocab) and dd.losses.uses_label_smoothing(spec.loss)

    def build(p):
        gaussian, head = build_distribution(p, d=spec.d, file_dist=file_dist)
        dist = build_family(spec.family, gaussian, p)
        # Δ_k, m_kᵀm̄ and the priority gap of the law's moments (the moment-matched Gaussian)
        moments = dist.gaussian_equivalent() if hasattr(dist, "gaussian_equivalent") else gaussian
        out = {
            "behavior_distinguishability": moments.distinguishability,
            "behavior_projection": moments.behavior_mean @ moments.mean,
            "priority_gap": moments.priority_gap,
        }
        return dist, head, out

    dists, heads, out = jax.vmap(build)(params)
    if spec.vocab:
        return _vocab_body(params, keys, dists, heads, out, spec, opt, batch)
    # ε only means something for cdpo / robust; with a loss axis the other groups get 0
    common = dict(
        beta=params["beta"], lr=params["lr"], label_smoothing=params["label_smoothing"] if smoothed else jnp.zeros_like(params["label_smoothing"]),
        steps=spec.steps, loss=spec.loss, optimizer=opt, record_every=spec.record_every,
        head=None if spec.zero_head else heads,
        label_noise=params["label_noise"] if spec.label_noise else None,
        loss_weight=params["loss_weight"] if spec.loss_weight else None,
        # generated laws are isotropic (σ_k² I); a file's covariances are traced here, so taken as full
        cov_kind="isotropic" if file_dist is None else "full", implementation="auto", return_delta=spec.record_head)
    if spec.mode in ("population", "both"):
        if not (hasattr(dists, "components") or hasattr(dists, "gaussian_equivalent")):
            raise ValueError(f"family {spec.family!r} gives a distribution without components() or "
                             "gaussian_equivalent(), so the analytic layer cannot run; set mode = \"empirical\" "
                             "or add gaussian_equivalent() (docs/custom-distributions.md)")
        pop = dd.trajectories(dists, layer="population", method=spec.method, **common)
        out["population"] = pop.metrics
        out["population_diverged"] = pop.diverged
        if spec.record_head:
            out["population_delta"] = pop.delta
    if spec.mode in ("empirical", "both"):
        # seeds one after another (lax.map): each runs the engine at full GEMM speed, where a vmap over
        # seeds would turn its GEMMs into slower batched products
        emp = jax.lax.map(lambda key: dd.trajectories(dists, key, layer="empirical", n=spec.n, n_eval=spec.n_eval,
                                                      batch_size=batch, **common), keys)
        seeds_second = lambda tree: jax.tree_util.tree_map(lambda v: jnp.swapaxes(v, 0, 1), tree)  # (C, S, …)
        out["train"], out["eval"] = seeds_second(emp.train), seeds_second(emp.eval)
        out["diverged"] = seeds_second(emp.diverged)
        out["cum_batch_mean_norm"] = seeds_second(emp.cum_batch_mean_norm)
        if spec.record_head:
            out["delta"] = seeds_second(emp.delta)
    return out



#: stored names of the vocabulary metrics (TRL's ``logps/chosen`` … → valid variable names; the
#: margin engine's names where it has the same quantity: ``rewards_margin``, ``reward_accuracy``)
VOCAB_NAMES = {"logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected", "logits/chosen": "logits_chosen",
               "logits/rejected": "logits_rejected", "rewards/chosen": "rewards_chosen",
               "rewards/rejected": "rewards_rejected", "rewards/margins": "rewards_margin",
               "rewards/accuracies": "reward_accuracy", "entropy": "entropy", "kl": "kl", "probs": "probs",
               "loss": "loss", "displacement": "displacement"}


def vocab_metrics(traj) -> dict:
    """A (stacked) :class:`dynamics.VocabTrajectory` as stored variables: ``loss`` (the optimised
    mixture objective, ``loss_total``), ``grad_norm`` (‖∇_W L‖_F), and per metric ``m`` its
    behaviour-weighted mean ``NAME`` (``traj.mean(m)``) and per-behaviour values ``behavior_NAME``
    (``probs``: a trailing token axis); NAME from :data:`VOCAB_NAMES`."""
    out = {"loss": traj.loss_total, "grad_norm": traj.grad_norm}
    for m, v in traj.metrics.items():
        name = VOCAB_NAMES.get(m, m.replace("/", "_"))
        out["behavior_" + name] = v
        if m != "loss":
            out[name] = traj.mean(m)
    return out


def _vocab_head(spec: GroupSpec, heads):
    """The head of a vocabulary group: the zero head (concrete, so the population layer reads its
    ranks), else the sweep's heads (rows 0, 1, ``(C, 2, d)``) padded with zero rows to ``(C, V, d)``."""
    v = spec.vocab_size
    if spec.zero_head:
        d = heads.w_init.shape[-1]
        w = np.zeros((v, d), dtype=jnp.result_type(float))
        return dd.Head(w, w, 0, 1, spec.token_pairs)
    pad = lambda w: jnp.concatenate([w, jnp.zeros(w.shape[:1] + (v - 2,) + w.shape[2:], w.dtype)], axis=1)
    return dd.Head(pad(heads.w_ref), pad(heads.w_init), 0, 1, spec.token_pairs)


def _vocab_body(params, keys, dists, heads, out, spec: GroupSpec, opt, batch):
    """A vocabulary group (:attr:`GroupSpec.vocab`): both layers through :func:`dynamics.trajectories`
    (which runs :func:`dynamics.vocab_population_trajectory` / :func:`dynamics.vocab_empirical_trajectory`
    under ``jax.vmap``); the stored metrics are :func:`vocab_metrics`. Diverged: a non-finite objective."""
    names = spec.loss.split("+")
    takes_ls = any("label_smoothing" in dd.get_objective(n).hparams for n in names)
    common = dict(beta=params["beta"], lr=params["lr"],
                  label_smoothing=params["label_smoothing"] if takes_ls else jnp.zeros_like(params["label_smoothing"]),
                  steps=spec.steps, loss=spec.objective, optimizer=opt, record_every=spec.record_every,
                  head=_vocab_head(spec, heads), implementation="auto", model="vocabulary",
                  loss_weights=spec.loss_weights,
                  **dict(spec.hparams))
    if spec.label_noise or spec.loss_weight:
        raise ValueError("label_noise and loss_weight are margin-engine interventions; the vocabulary layers "
                         f"(loss {spec.loss!r}, vocab_size {spec.vocab_size}) do not define them — leave them at 0 and 1")
    bad = lambda v: ~jnp.all(jnp.isfinite(v), axis=-1)
    if spec.mode in ("population", "both"):
        if spec.method != "gd":
            raise ValueError(f"method = {spec.method!r}: the vocabulary population layer runs discrete steps only; "
                             "set method = \"gd\"")
        pop = dd.trajectories(dists, layer="population", **common)
        out["population"] = vocab_metrics(pop)
        out["population_diverged"] = bad(pop.loss_total)
    if spec.mode in ("empirical", "both"):
        train, held = jax.lax.map(lambda key: dd.trajectories(dists, key, layer="empirical", n=spec.n,
                                                               n_eval=spec.n_eval, batch_size=batch, **common), keys)
        seeds_second = lambda tree: jax.tree_util.tree_map(lambda v: jnp.swapaxes(v, 0, 1), tree)  # (C, S, …)
        out["train"], out["eval"] = seeds_second(vocab_metrics(train)), seeds_second(vocab_metrics(held))
        out["diverged"] = seeds_second(bad(train.loss_total))
    return out
