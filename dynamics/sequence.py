"""Responses of ``L ≥ 1`` positions: sequence log-probs, squeezing and CHES (docs/theory.md §9).

The model (docs/theory.md §9.1): a pair of behaviour ``k`` with label ``s`` draws its prompt part
``x ~ N(μ_c, S_c)`` from :class:`dynamics.GaussianPreference` (component ``c = (k, s)``, ``x``-space
mean ``μ_c``), and the chosen and rejected continuations have ``L`` positions each with contexts

    x^±_t = √ρ · x + (1 − √ρ) · μ_c + √(1 − ρ) · R_c ξ^±_t,      ξ^±_t ~ N(0, I_d) iid,  R_c R_cᵀ = S_c,

so every context is ``N(μ_c, S_c)`` and any two distinct contexts of a pair have covariance ``ρ S_c``
(``ρ ∈ [0, 1]``: the shared prompt part). Behaviour ``k`` answers with two token sequences
``a_k, b_k ∈ [0, V)^L`` (``s = +1``: chosen ``a_k``, rejected ``b_k``; ``s = −1`` the reverse), and the
sequence log-prob is ``log π_W(y|x) = Σ_t log softmax(W x_t)[y_t]``. ``L = 1, ρ = 1`` is
:mod:`dynamics.vocab`'s model exactly (same key → same pairs, same trajectory).

* :class:`SequencePreference` — the distribution pytree (a ``GaussianPreference``, ``ρ``, ``L``, tokens).
* :func:`sequence_empirical_trajectory` — the empirical layer (a :class:`dynamics.vocab.VocabTrajectory`).
* :func:`sequence_population_trajectory` — the population layer: Gauss–Hermite cubature (exact to
  docs/theory.md §7.4's error) at ``ρ = 1``, a fixed randomised quasi-Monte-Carlo rule below it
  (error stated in docs/theory.md §9.4).
* :func:`sequence_pair_metrics` — per-pair metrics: every :func:`dynamics.vocab.per_pair_metrics` key at
  the sequence level, squeezing (``squeeze/argmax_prob``, ``squeeze/argmax_change``) and ``ches``.
* :func:`sequence_logp_change_decomposition` — Ren & Sutherland's one-step decomposition, per context.
"""
from __future__ import annotations

import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ._checks import check_choice, check_in_range, check_int, check_scalar, is_concrete
from ._train import check_batch_size, check_schedule, make_optimizer, run_recorded
from .distributions import GaussianPreference, _psd_sqrt
from .head import Head
from .vocab_population import StaticProblem
from .vocab import (VocabTrajectory, _check_head, _fit, _objective, _split_hparams, _static_loss_type, _traced_beta,
                    _traced_lr, _validate_objective, _vocab_results, per_pair_metrics)

__all__ = ["SequencePreference", "SEQUENCE_METRICS", "sequence_pair_metrics", "sequence_empirical_trajectory",
           "sequence_population_trajectory", "sequence_logp_change_decomposition", "expected_ches",
           "qmc_normal_rule"]

#: metric keys beyond :data:`dynamics.vocab.PAIR_METRICS` (and ``loss``, ``displacement``)
SEQUENCE_METRICS = ("squeeze/argmax_prob", "squeeze/argmax_change", "ches")


# ---------------------------------------------------------------------------------------------- distribution
@struct.dataclass
class SequencePreference:
    """Preference pairs whose responses have ``L`` positions (a pytree; docs/theory.md §9.1).

    Attributes:
      base: the :class:`dynamics.GaussianPreference` of the prompt part ``x`` (K behaviours, dimension d).
      rho: scalar ``ρ ∈ [0, 1]``, the covariance fraction shared by all ``2L`` contexts of a pair
        (``ρ = 1``: every position sees ``x``).
      length: ``L ≥ 1`` positions per response (static).
      tokens: static ``(K, 2, L)`` tuple of token sequences ``(a_k, b_k)``, or ``None``: position-wise the
        head's ``(a_k, b_k)`` pair (:meth:`sequence_tokens`).

    Build with :meth:`create`.
    """

    base: GaussianPreference
    rho: jax.Array
    length: int = struct.field(pytree_node=False, default=1)
    tokens: tuple | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, base, *, length: int = 1, rho=1.0, tokens=None):
        """Validated constructor.

        Args:
          base: a ``GaussianPreference`` (K, d). length: L ≥ 1. rho: ρ in [0, 1].
          tokens: ``(K, 2, L)`` int token sequences (chosen/rejected of ``s = +1``) or ``None``.

        Raises:
          ValueError: base not a ``GaussianPreference``, L < 1, ρ outside [0, 1], tokens of the wrong
            shape, negative, or with ``a_k == b_k`` at every position.
        """
        if not isinstance(base, GaussianPreference):
            raise ValueError(f"base must be a dynamics.GaussianPreference, got {type(base).__name__}; build it with "
                             "GaussianPreference.create")
        length = check_int("length", length)
        check_scalar("rho", rho)
        check_in_range("rho", rho, 0.0, 1.0)
        k = base.num_behaviors
        if tokens is not None:
            arr = np.asarray(tokens)
            if arr.shape != (k, 2, length) or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"tokens has shape {arr.shape} ({arr.dtype}); expected integer (K, 2, L) = "
                                 f"({k}, 2, {length}): one chosen/rejected token sequence per behaviour")
            if np.any(arr < 0):
                raise ValueError("tokens holds negative token indices; pass indices in [0, V)")
            same = np.all(arr[:, 0] == arr[:, 1], axis=-1)
            if np.any(same):
                raise ValueError(f"tokens[{int(np.argmax(same))}]: the two sequences are identical; chosen and "
                                 "rejected must differ at one position at least")
            tokens = tuple(tuple(tuple(int(t) for t in seq) for seq in beh) for beh in arr)
        return cls(base, jnp.asarray(rho, jnp.result_type(float)), length, tokens)

    @property
    def num_behaviors(self) -> int:
        return self.base.num_behaviors

    @property
    def dim(self) -> int:
        return self.base.dim

    def validate(self):
        """Validate the base distribution (and ρ when concrete); return ``self``."""
        base = self.base.validate()
        if is_concrete(self.rho):
            check_in_range("rho", self.rho, 0.0, 1.0)
        return self.replace(base=base)

    def sequence_tokens(self, head: Head):
        """``(K, 2, L)`` int32 token sequences; ``tokens=None`` repeats ``head.token_pairs(K)`` over L.

        Raises:
          ValueError: a token outside the head's ``[0, V)``, or a wrong number of head pairs.
        """
        v = head.vocab_size
        if self.tokens is None:
            pairs = head.token_pairs(self.num_behaviors)  # (K, 2)
            return jnp.repeat(pairs[:, :, None], self.length, axis=2)
        arr = np.asarray(self.tokens)
        if np.any(arr >= v):
            raise ValueError(f"tokens holds token {int(arr.max())} outside the head's vocabulary [0, V={v}); pass "
                             "indices in range or a larger head")
        return jnp.asarray(arr, jnp.int32)

    def sample(self, key, n: int):
        """``n`` pairs: ``(x_chosen (n, L, d), x_rejected (n, L, d), s (n,), behavior (n,))``.

        ``(x, s, behavior) = base.sample(key, n)`` (so ``L = 1, ρ = 1`` returns ``base``'s pairs with
        ``x_chosen = x_rejected = x``); the own noise ``ξ^±_t`` uses ``jax.random.fold_in(key, 1)``.
        """
        x, s, beh = self.base.sample(key, n)
        k, d = self.base.mu_pos.shape
        comp = 2 * beh + jnp.where(s > 0, 0, 1)
        means = jnp.stack([self.base.mu_pos, self.base.mu_neg], axis=1).reshape(2 * k, d)[comp]
        roots = _psd_sqrt(jnp.stack([self.base.cov_pos, self.base.cov_neg], axis=1).reshape(2 * k, d, d))
        xi = jax.random.normal(jax.random.fold_in(key, 1), (n, 2, self.length, d), x.dtype)
        own = jnp.einsum("nptj,nij->npti", xi, roots[comp])
        sr = jnp.sqrt(self.rho).astype(x.dtype)
        ctx = sr * x[:, None, None, :] + (1.0 - sr) * means[:, None, None, :] + jnp.sqrt(1.0 - self.rho) * own
        return ctx[:, 0], ctx[:, 1], s, beh


def expected_ches(dist: SequencePreference):
    """Closed-form ``E[CHES]`` per behaviour ``(K,)``: ``−L (1 − ρ) tr S_c`` averaged over the labels.

    ``CHES = ⟨H⁺, H⁻⟩ − ‖H⁺‖²`` with ``H^± = Σ_t x^±_t`` (Razin et al. 2025 on the contexts); under
    docs/theory.md §9.1 the means cancel and ``E CHES = L²ρ tr S − (L²ρ + L(1 − ρ)) tr S``.
    """
    from .reduced import per_behavior

    comps = dist.base.components()
    tr = jnp.trace(comps.cov, axis1=-2, axis2=-1)
    vals = -dist.length * (1.0 - dist.rho) * tr
    return per_behavior(comps.weight, vals, comps.behavior, dist.num_behaviors)


# ---------------------------------------------------------------------------------------------- metrics
def _seq_logps(logits, tokens):
    """``Σ_t log softmax(logits)[tokens]``: logits ``(..., L, V)``, tokens ``(..., L)`` → ``(...)``."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    tokens = jnp.broadcast_to(tokens, lp.shape[:-1]).astype(jnp.int32)
    return jnp.sum(jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0], axis=-1)


def sequence_pair_metrics(logits_c, logits_r, ref_c, ref_r, y_c, y_r, *, beta, logits0_r=None, x_c=None,
                          x_r=None) -> dict:
    """TRL's DPOTrainer metrics at the sequence level, plus squeezing and CHES, per pair.

    Args:
      logits_c, logits_r: ``(..., L, V)`` policy logits ``W x^±_t`` at the chosen / rejected contexts.
      ref_c, ref_r: the same for ``W_ref`` (or both ``None``: reference-free; then ``"kl"`` is NaN).
      y_c, y_r: int ``(..., L)`` chosen / rejected tokens. beta: β > 0.
      logits0_r: ``(..., L, V)`` logits of the step-0 head ``W_0`` at the rejected contexts (for
        ``"squeeze/argmax_change"``; ``None``: that key is omitted).
      x_c, x_r: ``(..., L, d)`` contexts (for ``"ches"``; ``None``: omitted).

    Returns:
      dict of ``(...)`` arrays: every :func:`dynamics.vocab.per_pair_metrics` key with the sequence
      log-probs ``Σ_t`` (``logps/*``, ``rewards/*`` in nats), ``logits/chosen``/``logits/rejected`` the
      mean logit over positions and vocabulary (TRL), ``entropy`` the mean over chosen positions of
      ``H(π(·|x⁺_t))``, ``kl`` the sum over chosen positions of ``KL(π(·|x⁺_t) ‖ π_ref(·|x⁺_t))``,
      ``probs`` ``(..., V)`` the mean over chosen positions; ``"squeeze/argmax_prob"`` the mean over
      rejected positions of ``max_v π(v|x⁻_t)`` and ``"squeeze/argmax_change"`` its change from ``W_0``
      (Ren & Sutherland's squeezing); ``"ches"`` ``⟨Σ_t x⁺_t, Σ_t x⁻_t⟩ − ‖Σ_t x⁺_t‖²`` (Razin et al.).

    Source: docs/theory.md §9.3; TRL ``DPOTrainer`` (names); Ren & Sutherland (ICLR 2025); Razin et al.
    (ICLR 2025) CHES.
    """
    mc = per_pair_metrics(logits_c, ref_c, y_c, y_c, beta=beta)  # per position (..., L)
    mr = per_pair_metrics(logits_r, ref_r, y_r, y_r, beta=beta)
    rw_c = jnp.sum(mc["rewards/chosen"], axis=-1)
    rw_r = jnp.sum(mr["rewards/chosen"], axis=-1)
    margin = rw_c - rw_r
    out = {
        "logps/chosen": jnp.sum(mc["logps/chosen"], axis=-1),
        "logps/rejected": jnp.sum(mr["logps/chosen"], axis=-1),
        "logits/chosen": jnp.mean(mc["logits/chosen"], axis=-1),
        "logits/rejected": jnp.mean(mr["logits/chosen"], axis=-1),
        "rewards/chosen": rw_c,
        "rewards/rejected": rw_r,
        "rewards/margins": margin,
        "rewards/accuracies": jnp.where(jnp.isnan(margin), jnp.nan, (margin > 0).astype(margin.dtype)),
        "entropy": jnp.mean(mc["entropy"], axis=-1),
        "kl": jnp.sum(mc["kl"], axis=-1),
        "probs": jnp.mean(mc["probs"], axis=-2),
    }
    peak = jnp.max(mr["probs"], axis=-1)  # (..., L)
    out["squeeze/argmax_prob"] = jnp.mean(peak, axis=-1)
    if logits0_r is not None:
        peak0 = jnp.max(jax.nn.softmax(jnp.asarray(logits0_r, peak.dtype), axis=-1), axis=-1)
        out["squeeze/argmax_change"] = jnp.mean(peak - peak0, axis=-1)
    if x_c is not None and x_r is not None:
        hc, hr = jnp.sum(x_c, axis=-2), jnp.sum(x_r, axis=-2)
        out["ches"] = jnp.sum(hc * hr, axis=-1) - jnp.sum(hc * hc, axis=-1)
    return out


def _pair_tokens_seq(table, beh, s):
    """Chosen / rejected sequences ``(n, L)`` from the ``(K, 2, L)`` table."""
    a, b = table[beh, 0], table[beh, 1]
    pos = (s > 0)[:, None]
    return jnp.where(pos, a, b), jnp.where(pos, b, a)


def _lengths_arg(length: int):
    return None if length == 1 else float(length)  # L = 1: the single-token objectives exactly


# ---------------------------------------------------------------------------------------------- empirical layer
def _check_dist(dist):
    if not isinstance(dist, SequencePreference):
        raise ValueError(f"dist must be a dynamics.sequence.SequencePreference, got {type(dist).__name__}; build "
                         "it with SequencePreference.create(base, length=L, rho=rho)")
    from .population import as_default_float

    return as_default_float(dist.validate() if is_concrete(dist) else dist)


@partial(jax.jit, static_argnums=(3, 4))
def _sample_splits(dist, key_train, key_eval, n: int, n_eval: int):
    """The training and held-out samples, compiled once per ``(dist structure, n, n_eval)``."""
    return dist.sample(key_train, n), dist.sample(key_eval, n_eval)


def sequence_empirical_trajectory(dist, key, *, head: Head, loss_type="sigmoid", beta=1.0, lr=0.1, steps: int = 100,
                                  n: int = 1024, n_eval: int = 2048, optimizer=None, batch_size: int | None = None,
                                  record_every: int = 1, loss_weights=None, **hparams):
    """Train the full ``V×d`` head on ``n`` sampled sequence pairs; metrics on them and on ``n_eval`` held out.

    The call shape and result are :func:`dynamics.vocab.vocab_empirical_trajectory`'s: the same key
    split (training, held-out, minibatch order), the objective :func:`dynamics.losses.objective_loss`
    on the sequence log-probs ``Σ_t log π(y_t|x_t)`` with ``lengths = L`` (TRL's per-token averages and
    token-mean NLL; ``L = 1``: none), ``jax.grad`` in ``W``, the optimizer of :mod:`dynamics._train`.

    Args:
      dist: a :class:`SequencePreference`. key: PRNG key. head: ``W_ref`` (or ``None``), ``W_0``, pairs.
      loss_type, beta, lr, steps, n, n_eval, optimizer, batch_size, record_every, loss_weights, hparams:
        as :func:`dynamics.vocab.vocab_empirical_trajectory`.

    Returns:
      ``(train, eval)`` :class:`dynamics.vocab.VocabTrajectory`; ``metrics`` holds every key of
      :func:`sequence_pair_metrics` ``(T, K)`` (``probs`` ``(T, K, V)``), ``loss`` and ``displacement``
      (the fraction of pairs whose chosen sequence log-prob is below its step-0 value).

    Raises:
      ValueError: ``dist`` not a ``SequencePreference``, a token outside ``[0, V)``, and every error of
        :func:`dynamics.vocab.vocab_empirical_trajectory`.

    Source: docs/theory.md §9.1–§9.3, §8 (objectives); TRL ``DPOTrainer``.
    """
    n = check_int("n", n)
    n_eval = check_int("n_eval", n_eval)
    loss_type = _static_loss_type(loss_type)
    _validate_objective(loss_type, beta, loss_weights, hparams, head is not None and head.w_ref is not None)
    steps, record_every = check_schedule(steps, record_every, lr, optimizer)
    batch_size = check_batch_size(batch_size, n)
    dist = _check_dist(dist)
    k = dist.num_behaviors
    _check_head(head, k, dist.dim)
    table = dist.sequence_tokens(head)
    key_train, key_eval, key_batch = jax.random.split(key, 3)
    train, held_out = _sample_splits(dist, key_train, key_eval, n, n_eval)
    traced, static = _split_hparams(hparams)
    lw = None if loss_weights is None else jnp.asarray(loss_weights, jnp.result_type(float))
    return _train(train, held_out, table, key_batch, head.w_ref, head.w_init, beta, 0.0 if lr is None else lr, lw,
                  traced, loss_type=loss_type, static_hparams=static, num_behaviors=k, optimizer=optimizer,
                  steps=steps, record_every=record_every, batch_size=batch_size, lengths=_lengths_arg(dist.length))


@partial(jax.jit, static_argnames=("loss_type", "static_hparams", "num_behaviors", "optimizer", "steps",
                                   "record_every", "batch_size", "lengths"))
def _train(train, held_out, table, key, w_ref, w0, beta, lr, loss_weights, hparams, *, loss_type, static_hparams,
           num_behaviors, optimizer, steps, record_every, batch_size, lengths):
    dtype = jnp.result_type(train[0].dtype, float)
    beta = _traced_beta(beta, dtype)
    lr = _traced_lr("lr", lr, dtype, optimizer)
    w0 = w0.astype(dtype)
    w_ref = None if w_ref is None else w_ref.astype(dtype)
    hp = dict(hparams, lengths=lengths) if lengths is not None else hparams

    def prep(split):
        xc, xr, s, beh = split
        xc, xr = xc.astype(dtype), xr.astype(dtype)
        yc, yr = _pair_tokens_seq(table, beh, s)
        if w_ref is None:
            rc = rr = lrc = lrr = None
        else:
            lrc, lrr = xc @ w_ref.T, xr @ w_ref.T
            rc, rr = _seq_logps(lrc, yc), _seq_logps(lrr, yr)
        c0 = _seq_logps(xc @ w0.T, yc)
        return dict(xc=xc, xr=xr, beh=beh, yc=yc, yr=yr, rc=rc, rr=rr, lrc=lrc, lrr=lrr, c0=c0, l0r=xr @ w0.T)

    data = {"train": prep(train), "eval": prep(held_out)}
    fields = ("xc", "xr", "yc", "yr", "rc", "rr")

    def pair_loss(w, xc, xr, yc, yr, rc, rr):
        c, r = _seq_logps(xc @ w.T, yc), _seq_logps(xr @ w.T, yr)
        return _objective(loss_type, static_hparams, c, r, rc, rr, beta, loss_weights, hp)

    def pair_metrics(w, dd):
        per = sequence_pair_metrics(dd["xc"] @ w.T, dd["xr"] @ w.T, dd["lrc"], dd["lrr"], dd["yc"], dd["yr"],
                                    beta=beta, logits0_r=dd["l0r"], x_c=dd["xc"], x_r=dd["xr"])
        tol = 1e-12 * (1.0 + jnp.abs(dd["c0"]))  # rounding at W = W_0 is not displacement
        per["displacement"] = (per["logps/chosen"] < dd["c0"] - tol).astype(dtype)
        return per

    step_idx, recs, ws, _ = _fit(w0, make_optimizer(optimizer, lr), data, fields, pair_loss, pair_metrics, key=key,
                                 num_behaviors=num_behaviors, steps=steps, record_every=record_every,
                                 batch_size=batch_size, dim=data["train"]["xc"].shape[-1])
    return _vocab_results(data, step_idx, recs, ws, num_behaviors, dtype)


# ---------------------------------------------------------------------------------------------- population layer
@functools.lru_cache(maxsize=None)
def qmc_normal_rule(dim: int, points: int, seed: int = 0):
    """A scrambled Sobol rule for ``E f(ξ)``, ``ξ ~ N(0, I_dim)``: nodes ``(points, dim)`` (NumPy float64).

    Owen-scrambled Sobol points (``scipy.stats.qmc.Sobol``, ``seed``) mapped by ``Φ⁻¹``; equal weights
    ``1/points``. Its error is estimated from independent scrambles (docs/theory.md §9.4).

    Raises:
      ValueError: ``dim < 1`` or ``points`` not a power of two ≥ 2.
    """
    from scipy.special import ndtri
    from scipy.stats import qmc

    dim = check_int("dim", dim)
    points = check_int("points", points, minimum=2)
    if points & (points - 1):
        raise ValueError(f"points = {points} is not a power of two; pass e.g. {1 << points.bit_length()} "
                         "(Sobol balance)")
    u = qmc.Sobol(dim, scramble=True, seed=seed).random(points)
    return ndtri(np.clip(u, 1e-16, 1 - 1e-16))


class _SeqProblem(StaticProblem):
    """Static description of a sequence population problem (hashable: a jit static argument)."""


def _seq_node_objective(prob, beta, hparams, v):
    """``g(u, y_c, y_r)`` on one cubature node ``u = (z, z_ref) (2V,)`` at ρ = 1 (every context is ``x``)."""
    from .losses import objective_loss

    hp = dict(hparams) if prob.lengths is None else dict(hparams, lengths=prob.lengths)

    def g(u, yc, yr):
        lp, lpr = jax.nn.log_softmax(u[:v]), jax.nn.log_softmax(u[v:])
        c, r = jnp.sum(lp[yc]), jnp.sum(lp[yr])
        return objective_loss(prob.loss_type, c[None], r[None], jnp.sum(lpr[yc])[None], jnp.sum(lpr[yr])[None],
                              beta=beta, loss_weights=prob.loss_weights, **hp)[0]

    return g


def _components_seq(dist, table):
    comps = dist.base.components()
    mean_x = comps.sign[:, None] * comps.mean
    ab = table[comps.behavior]  # (J, 2, L)
    pos = (comps.sign > 0)[:, None]
    return comps, mean_x, jnp.where(pos, ab[:, 0], ab[:, 1]), jnp.where(pos, ab[:, 1], ab[:, 0])


def _qmc_contexts(dist, mean_x, cov, xi):
    """Contexts ``(n, 2, L, d)`` of one component on the QMC nodes ``xi (n, 2L + 1, d)``."""
    root = _psd_sqrt(cov)
    e = xi @ root.T  # (n, 2L+1, d): R ξ
    length = dist.length
    shared = e[:, :1]
    own = e[:, 1:].reshape(e.shape[0], 2, length, -1)
    ctx = mean_x + jnp.sqrt(dist.rho) * shared[:, :, None] + jnp.sqrt(1.0 - dist.rho) * own
    return ctx


def _value_qmc(prob, dist, table, w, w_ref, beta, thp, xi):
    """``(L_total, per-component (J,))`` on the fixed QMC rule (differentiable in ``w``: common random numbers)."""
    comps, mean_x, yc, yr = _components_seq(dist, table)
    hp = dict(prob.static_hp, **thp)
    if prob.lengths is not None:
        hp["lengths"] = prob.lengths

    def one(mx, cv, c_tok, r_tok):
        ctx = _qmc_contexts(dist, mx, cv, xi)
        c = _seq_logps(ctx[:, 0] @ w.T, c_tok)
        r = _seq_logps(ctx[:, 1] @ w.T, r_tok)
        rc = _seq_logps(ctx[:, 0] @ w_ref.T, c_tok)
        rr = _seq_logps(ctx[:, 1] @ w_ref.T, r_tok)
        return _objective(prob.loss_type, (), c, r, rc, rr, beta, prob.loss_weights, hp).mean()

    vals = jax.vmap(one)(mean_x, comps.cov, yc, yr)
    return jnp.sum(comps.weight * vals), vals


def _margin_value_grad(prob, dist, table, w, w_ref, beta, thp):
    """Exact margin-only value ``(J,)`` and gradient ``(J, V, d)`` at ρ = 1 (docs/theory.md §9.2, §3.1).

    ``h = δ_cᵀ x``, ``δ_c = Σ_t (ΔW_{y⁺_t} − ΔW_{y⁻_t})``, ``x ~ N(μ_c, S_c)``: ``E ℓ(h)`` by the 1-D integrals of
    :func:`dynamics.losses.expected_loss_terms` and ``∇_W E ℓ(h) = ρ_c ⊗ (μ_c E ℓ' + S_c δ_c E ℓ'')`` with
    ``ρ_c = Σ_t (e_{y⁺_t} − e_{y⁻_t})`` (Stein's lemma).
    """
    from .losses import expected_loss_terms, uses_label_smoothing
    from .reduced import safe_sqrt

    comps, mean_x, yc, yr = _components_seq(dist, table)
    dw = w - w_ref
    delta = jnp.sum(dw[yc] - dw[yr], axis=1)  # (J, d)
    mu = jnp.einsum("ci,ci->c", delta, mean_x)
    sigma = safe_sqrt(jnp.einsum("ci,cij,cj->c", delta, comps.cov, delta))
    hp = dict(prob.static_hp, **thp)
    ls = hp.get("label_smoothing", 0.0) if uses_label_smoothing(prob.margin) else 0.0
    e_l, e_l1, e_l2 = expected_loss_terms(prob.margin, mu, sigma, beta, ls)
    g = mean_x * e_l1[:, None] + jnp.einsum("cij,cj->ci", comps.cov, delta) * e_l2[:, None]
    v = w.shape[0]
    rows = jnp.sum(jax.nn.one_hot(yc, v, dtype=w.dtype) - jax.nn.one_hot(yr, v, dtype=w.dtype), axis=1)  # (J, V)
    return comps, e_l, jnp.einsum("cv,ci->cvi", rows, g)


def _value_grad(prob, dist, table, w, w_ref, beta, thp, xi, wt):
    """``(L_total, ∇_W L_total, per-component values)`` by the method's rule."""
    if prob.method == "margin":
        comps, vals, grads = _margin_value_grad(prob, dist, table, w, w_ref, beta, thp)
        return jnp.sum(comps.weight * vals), jnp.einsum("c,cvi->vi", comps.weight, grads), vals
    if prob.method == "qmc":
        (total, vals), grad = jax.value_and_grad(_value_qmc, argnums=3, has_aux=True)(
            prob, dist, table, w, w_ref, beta, thp, xi)
        return total, grad, vals
    from .vocab_population import _component_cubature

    comps, mean_x, yc, yr = _components_seq(dist, table)
    g = _seq_node_objective(prob, beta, dict(prob.static_hp, **thp), w.shape[0])
    w2 = w_ref if prob.needs_reference else jnp.zeros_like(w_ref)
    vals, grads = jax.vmap(lambda mx, cv, c_tok, r_tok: _component_cubature(g, w, w2, mx, cv, c_tok, r_tok, xi, wt))(
        mean_x, comps.cov, yc, yr)
    return jnp.sum(comps.weight * vals), jnp.einsum("c,cvi->vi", comps.weight, grads), vals


def _image_nodes3(w, w_ref, w0, mean_x, cov, xi):
    """Logit nodes ``(n, 3V)`` of ``(W x, W_ref x, W_0 x)``, ``x ~ N(mean_x, cov)``, on the rule ``xi (n, r)``.

    :func:`dynamics.vocab_population._image_nodes` with three heads: the centred image ``[PW; PW_ref; PW_0] x``
    is ``N(m, C)``, ``C = QΛQᵀ`` (top ``r`` eigenpairs, not differentiated), nodes ``m + QΛ^{1/2}ξ`` plus each
    head's mean logit ``1ᵀW μ/V`` (so the mean logit integrates exactly).
    """
    from .vocab_population import _EIG_RTOL

    r = xi.shape[-1]
    heads = (w, w_ref, w0)
    b = jax.lax.stop_gradient(jnp.concatenate([h - jnp.mean(h, axis=0, keepdims=True) for h in heads], axis=0))
    c = b @ cov @ b.T
    lam, q = jnp.linalg.eigh((c + c.T) / 2.0)
    lam, q = lam[-r:], q[:, -r:]
    lam = jnp.where(lam > _EIG_RTOL * lam[-1], lam, 0.0)
    u = b @ mean_x + xi @ (q * jnp.sqrt(lam)).T
    shift = jnp.concatenate([jnp.full((h.shape[0],), jnp.mean(h @ mean_x)) for h in heads])
    return jax.lax.stop_gradient(u + shift)


def _metrics_pop(prob, dist, table, w, w_ref, w0, beta, thp, rule, mrule):
    from .vocab_population import _per_behavior_v

    comps, mean_x, yc, yr = _components_seq(dist, table)
    v = w.shape[0]
    total, grad, vals = _value_grad(prob, dist, table, w, w_ref, beta, thp, *rule)
    xi_m, wt_m = mrule
    ref_on = prob.has_reference

    def one(mx, cv, c_tok, r_tok):
        if prob.method == "qmc":
            ctx = _qmc_contexts(dist, mx, cv, xi_m)
            lc, lr = ctx[:, 0] @ w.T, ctx[:, 1] @ w.T
            rfc, rfr = (ctx[:, 0] @ w_ref.T, ctx[:, 1] @ w_ref.T) if ref_on else (None, None)
            l0c, l0r = ctx[:, 0] @ w0.T, ctx[:, 1] @ w0.T
        else:
            # ρ = 1: every context is x; one rule in the image of (W x, W_ref x, W_0 x)
            u = _image_nodes3(w, w_ref, w0, mx, cv, xi_m)
            rep = lambda a: jnp.repeat(a[:, None, :], dist.length, axis=1)
            lc = lr = rep(u[:, :v])
            rfc = rfr = rep(u[:, v:2 * v]) if ref_on else None
            l0c = l0r = rep(u[:, 2 * v:])
        n = lc.shape[0]
        per = sequence_pair_metrics(lc, lr, rfc, rfr, jnp.broadcast_to(c_tok, (n,) + c_tok.shape),
                                    jnp.broadcast_to(r_tok, (n,) + r_tok.shape), beta=beta, logits0_r=l0r)
        c0 = _seq_logps(l0c, jnp.broadcast_to(c_tok, (n,) + c_tok.shape))
        tol = 1e-12 * (1.0 + jnp.abs(c0))  # rounding when W = W_0 is not displacement
        per["displacement"] = (per["logps/chosen"] < c0 - tol).astype(w.dtype)
        return {key: jnp.tensordot(wt_m, val, axes=(0, 0)) for key, val in per.items()}

    per_c = jax.vmap(one)(mean_x, comps.cov, yc, yr)
    if prob.method != "qmc":
        # exact at ρ = 1: the margin h = δ_cᵀ x, δ_c = Σ_t (ΔW_{y⁺_t} − ΔW_{y⁻_t}), ΔW = W − W_ref, is linear in x
        from .reduced import prob_positive, safe_sqrt

        dw = w - w_ref
        delta = jnp.sum(dw[yc] - dw[yr], axis=1)  # (J, d)
        mu = jnp.einsum("ci,ci->c", delta, mean_x)
        sd = safe_sqrt(jnp.einsum("ci,cij,cj->c", delta, comps.cov, delta))
        per_c["rewards/accuracies"] = prob_positive(mu, sd)
        per_c["rewards/margins"] = beta * mu
    per_c["loss"] = vals
    per_c["ches"] = -dist.length * (1.0 - dist.rho) * jnp.trace(comps.cov, axis1=-2, axis2=-1)  # exact
    metrics = {key: _per_behavior_v(comps.weight, val, comps.behavior, dist.num_behaviors)
               for key, val in per_c.items()}
    return metrics, total, jnp.sqrt(jnp.sum(grad**2))


def sequence_population_trajectory(dist, *, head: Head, loss_type="sigmoid", beta=1.0, lr=0.1, steps=100,
                                   optimizer=None, record_every=1, loss_weights=None, method="auto",
                                   cubature_order=None, qmc_points: int = 8192, qmc_seed: int = 0, **hparams):
    """Population (N → ∞) training of the head ``W (V, d)`` on sequence pairs (docs/theory.md §9.4).

    Args:
      dist: a :class:`SequencePreference` (concrete ρ). head: :class:`dynamics.Head`.
      loss_type, beta, lr, steps, optimizer, record_every, loss_weights, hparams: as
        :func:`dynamics.vocab_population.vocab_population_trajectory` (per-pair objectives only).
      method: ``"margin"`` (``ρ = 1`` and a margin-only objective, ``objective_margin_loss`` not None: the
        margin is linear in ``x`` and the value and gradient are the exact 1-D integrals of docs/theory.md
        §3), ``"cubature"`` (``ρ = 1`` only: every context is ``x``, so the objective is a function of
        ``(W x, W_ref x)`` and the Gauss–Hermite rule of docs/theory.md §7.4 integrates it, gradient by
        Stein's lemma), ``"qmc"`` (any ρ: a fixed scrambled-Sobol rule of ``qmc_points`` nodes in the
        ``(2L + 1) d`` standard normals of §9.1, the same nodes at every step, gradient by autodiff of
        the rule), or ``"auto"`` (at ρ = 1 margin when it applies, else cubature; qmc below).
      cubature_order: Gauss–Hermite points per dimension (cubature). qmc_points, qmc_seed: the QMC rule
        (a power of two; the seed picks the scramble — compare seeds to estimate the error).

    Returns:
      :class:`dynamics.vocab.VocabTrajectory` with the keys of :func:`sequence_pair_metrics` (expectations
      per behaviour; ``ches`` in closed form, ``−L (1 − ρ) tr S_c``), ``loss`` and ``displacement``.

    Raises:
      ValueError: ``method="margin"``/``"cubature"`` at ρ < 1, ``"margin"`` for an objective that is not
        margin-only, a batch-level objective, a traced ρ, and the errors of
        :func:`dynamics.vocab_population.vocab_population_trajectory`.

    Source: docs/theory.md §9.4 (where exactness ends), §7.2–§7.4 (cubature and Stein gradient).
    """
    from .losses import get_objective, objective_margin_loss
    from .vocab_population import _objective_info, _ref_or_zeros, _rule, image_rank

    check_choice("method", method, ("auto", "margin", "cubature", "qmc"))
    steps, record_every = check_schedule(steps, record_every, lr, optimizer)
    dist = _check_dist(dist)
    if not is_concrete(dist.rho):
        raise ValueError("dist.rho is traced; the population layer picks its rule from ρ: pass a concrete ρ")
    rho = float(dist.rho)
    names = _objective_info(loss_type)
    loss_type = _static_loss_type(loss_type)
    k, d = dist.num_behaviors, dist.dim
    _check_head(head, k, d)
    v = head.vocab_size
    has_ref = head.w_ref is not None
    _validate_objective(loss_type, beta, loss_weights, hparams, has_ref)
    margin = objective_margin_loss(names[0], lengths=_lengths_arg(dist.length), **hparams) if len(names) == 1 else None
    if method == "auto":
        method = ("margin" if margin is not None else "cubature") if rho == 1.0 else "qmc"
    if method in ("margin", "cubature") and rho != 1.0:
        raise ValueError(f"method={method!r} needs rho = 1 (every context is x), got rho = {rho}; use method='qmc'")
    if method == "margin" and margin is None:
        raise ValueError(f"method='margin' needs a margin-only loss_type (e.g. 'sigmoid', 'ipo'), got {loss_type!r}; "
                         "use method='cubature'")
    table = dist.sequence_tokens(head)
    thp, static = _split_hparams(hparams)
    lw = None if loss_weights is None else tuple(float(x) for x in np.asarray(loss_weights).reshape(-1))
    needs_ref = any(get_objective(nm).needs_reference for nm in names)
    dtype = dist.base.mu_pos.dtype
    w_ref = _ref_or_zeros(head, dtype)
    w0 = head.w_init.astype(dtype)
    if method in ("margin", "cubature"):
        r_obj = image_rank(w_ref, d) if needs_ref else max(1, min(v - 1, d))
        rule = _rule(r_obj, cubature_order, dtype)
        cen = [np.asarray(h) - np.asarray(h).mean(0) for h in (w_ref, w0)]
        stacked = np.concatenate(cen, axis=0)
        rank = int(np.linalg.matrix_rank(stacked / max(np.abs(stacked).max(), 1e-300), tol=1e-10)) if np.any(stacked) else 0
        r_met = max(1, min(v - 1 + rank, d))
        mrule = _rule(r_met, cubature_order, dtype)
    else:
        qmc_points = check_int("qmc_points", qmc_points, minimum=2)
        xi = jnp.asarray(qmc_normal_rule((2 * dist.length + 1) * d, qmc_points, int(qmc_seed)), dtype)
        xi = xi.reshape(qmc_points, 2 * dist.length + 1, d)
        rule = (xi, None)
        mrule = (xi, jnp.full((qmc_points,), 1.0 / qmc_points, dtype))
    prob = _SeqProblem(loss_type=loss_type, loss_weights=lw, static_hp=static, needs_reference=needs_ref,
                       has_reference=has_ref, method=method, lengths=_lengths_arg(dist.length), margin=margin)
    out = _pop_trajectory(prob, dist, table, w_ref, w0, jnp.asarray(beta, dtype), jnp.asarray(0.0 if lr is None
                          else lr, dtype), thp, rule, mrule, optimizer=optimizer, steps=steps,
                          record_every=record_every)
    step, metrics, loss_total, grad_norm, ws = out
    comps = dist.base.components()
    return VocabTrajectory(steps=step, metrics=metrics, loss_total=loss_total, grad_norm=grad_norm,
                           weights=jax.ops.segment_sum(comps.weight, comps.behavior, k), w=ws)


@partial(jax.jit, static_argnums=(0,), static_argnames=("optimizer", "steps", "record_every"))
def _pop_trajectory(prob, dist, table, w_ref, w0, beta, lr, thp, rule, mrule, *, optimizer, steps, record_every):
    import optax

    opt = make_optimizer(optimizer, lr)

    def step_fn(carry):
        t, w, state = carry
        _, grad, _ = _value_grad(prob, dist, table, w, w_ref, beta, thp, *rule)
        updates, state = opt.update(grad, state, w)
        return t + 1, optax.apply_updates(w, updates), state

    def record(carry):
        t, w, _ = carry
        metrics, total, gnorm = _metrics_pop(prob, dist, table, w, w_ref, w0, beta, thp, rule, mrule)
        return t, metrics, total, gnorm, w

    _, recs = run_recorded(step_fn, record, (jnp.int32(0), w0, opt.init(w0)), steps, record_every)
    return recs


# ---------------------------------------------------------------------------------------------- Ren & Sutherland
def sequence_logp_change_decomposition(w, x_obs, y_obs, batch, *, w_ref=None, loss_type="sigmoid", beta=1.0, lr=0.1,
                                       loss_weights=None, **hparams) -> dict:
    """First-order change of the sequence log-probs ``log π(y_o|x_o)`` under one SGD step, per training context.

    The head's empirical NTK is ``x_oᵀx_u ⊗ I_V`` (docs/theory.md §7, :func:`dynamics.vocab.logp_change_decomposition`),
    and a sequence log-prob is a sum over its positions, so one step ``W ← W − η∇_W L`` changes
    ``Σ_t log π(y_{o,t}|x_{o,t})`` by ``Σ_t Σ_u −η (e_{y_{o,t}} − π(x_{o,t}))ᵀ (x_{o,t}ᵀ x_u) G_u + O(η²)``,
    the sum over the ``2LB`` training contexts ``u`` (chosen and rejected positions of every pair) with
    ``G_u = ∂L/∂z_u``. Ren & Sutherland (ICLR 2025) eq. (3)–(5).

    Args:
      w: ``(V, d)`` the current head. x_obs: ``(M, L_o, d)`` observed contexts; y_obs: int ``(M, L_o)`` tokens.
      batch: ``(x_chosen (B, L, d), x_rejected (B, L, d), y_chosen (B, L), y_rejected (B, L))``.
      w_ref: ``(V, d)`` reference (``None``: reference-free objectives). loss_type, beta, loss_weights,
        hparams: the objective (``lengths = L`` as the empirical layer). lr: η.

    Returns:
      dict: ``"terms"`` ``(M, 2, B)`` the change contributed by the chosen (``[:, 0]``) and rejected
      (``[:, 1]``) contexts of each training pair (nats); ``"first_order"`` ``(M,)`` their sum;
      ``"G"`` ``(2, B, L, V)``.

    Raises:
      ValueError: shapes that disagree, a bad objective.
    """
    xc, xr, yc, yr = (jnp.asarray(a) for a in batch)
    w = jnp.asarray(w)
    v, d = w.shape
    x_obs = jnp.asarray(x_obs, w.dtype)
    y_obs = jnp.asarray(y_obs)
    if x_obs.ndim != 3 or x_obs.shape[-1] != d or y_obs.shape != x_obs.shape[:2]:
        raise ValueError(f"x_obs {x_obs.shape} and y_obs {y_obs.shape} must be (M, L_o, d={d}) and (M, L_o)")
    if xc.ndim != 3 or xc.shape != xr.shape or xc.shape[-1] != d or yc.shape != xc.shape[:2] or yr.shape != yc.shape:
        raise ValueError(f"batch contexts {xc.shape}, {xr.shape} and tokens {yc.shape}, {yr.shape} must be "
                         f"(B, L, d={d}) twice and (B, L) twice")
    loss_type = _static_loss_type(loss_type)
    _validate_objective(loss_type, beta, loss_weights, hparams, w_ref is not None)
    lw = None if loss_weights is None else jnp.asarray(loss_weights, w.dtype)
    traced, static = _split_hparams(hparams)
    w_ref = None if w_ref is None else jnp.asarray(w_ref, w.dtype)
    return _seq_decomposition(w, w_ref, x_obs, y_obs, xc.astype(w.dtype), xr.astype(w.dtype), yc, yr, beta, lr, lw,
                              traced, loss_type=loss_type, static_hparams=static,
                              lengths=_lengths_arg(xc.shape[1]))


@partial(jax.jit, static_argnames=("loss_type", "static_hparams", "lengths"))
def _seq_decomposition(w, w_ref, x_obs, y_obs, xc, xr, yc, yr, beta, lr, loss_weights, hparams, *, loss_type,
                       static_hparams, lengths):
    hp = hparams if lengths is None else dict(hparams, lengths=lengths)
    if w_ref is None:
        rc = rr = None
    else:
        rc, rr = _seq_logps(xc @ w_ref.T, yc), _seq_logps(xr @ w_ref.T, yr)

    def mean_loss(z):  # z: (2, B, L, V), the logits at every training context
        return jnp.mean(_objective(loss_type, static_hparams, _seq_logps(z[0], yc), _seq_logps(z[1], yr), rc, rr,
                                   beta, loss_weights, hp))

    x_tr = jnp.stack([xc, xr])  # (2, B, L, d)
    g = jax.grad(mean_loss)(x_tr @ w.T)  # (2, B, L, V)
    a = jax.nn.one_hot(y_obs, w.shape[0], dtype=w.dtype) - jax.nn.softmax(x_obs @ w.T, axis=-1)  # (M, L_o, V)
    kern = jnp.einsum("mtd,pbld->mtpbl", x_obs, x_tr)  # x_oᵀ x_u
    terms = -lr * jnp.einsum("mtpbl,mtv,pblv->mpb", kern, a, g)
    return {"terms": terms, "first_order": jnp.sum(terms, axis=(1, 2)), "G": g}
