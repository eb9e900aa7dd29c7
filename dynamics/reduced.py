"""Per-pair and per-component maths of the reduced head, shared by every engine.

Every implementation (the single-configuration core, its ``jax.vmap`` and the
factored common-random-number engine) trains the reduced head
``δ = (W_a − W_b) − (W_ref,a − W_ref,b)`` and reports the same metrics; they
differ only in how they compute the projections ``x·v`` of the pairs
(per-configuration data, or one GEMM over shared noise). This module holds
the rest once (docs/theory.md §1, §3):

* :func:`split_metrics` — TRL's per-split metrics from the per-pair margins
  and log-probabilities of one configuration;
* :func:`head_logps` / :func:`zero_head_logps` — the answer tokens' log-probs
  of the head ``W_0 + (e_a − e_b) Δᵀ``;
* :func:`pair_grad_weight` — ``ℓ'(h)``, the weight of ``s x`` in the gradient;
* :func:`reduced_update` — one optax step on δ (``δ − δ_0 = 2Δ``);
* :func:`weight_change` — ``‖W_t − W_0‖_F = ‖δ_t − δ_0‖ / √2``;
* :func:`prob_positive`, :func:`safe_sqrt`, :func:`per_behavior` — the
  population layer's Gaussian margin helpers;
* :func:`stein_gradient` — the population gradient of Gaussian components (Stein's lemma);
* :func:`population_step` — one population step (optax on δ, or RK4 gradient flow), the
  step of both :func:`dynamics.population_trajectory` and the factored population engine.

All functions are pure, act on one configuration and are ``jax.vmap``-able.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _train
from ._train import segment_mean
from .gaussian_integrals import normal_cdf
from .losses import expected_loss_terms, loss_fn, loss_grad_fn

__all__ = ["choose", "split_metrics", "head_logps", "zero_head_logps", "pair_grad_weight", "reduced_update",
           "weight_change", "prob_positive", "safe_sqrt", "per_behavior", "stein_gradient", "gradient_flow",
           "population_step"]


def choose(s, lp_a, lp_b):
    """Chosen and rejected values from the tokens' ``lp_a, lp_b (n,)`` and labels ``s (n,)`` (+1: a is chosen)."""
    pos = s > 0
    return jnp.where(pos, lp_a, lp_b), jnp.where(pos, lp_b, lp_a)


def split_metrics(h, logp_c, logp_r, ref_c, ref_r, policy_margin, beh, *, k, beta, loss, label_smoothing):
    """TRL's metrics of one split of one configuration.

    Args:
      h: ``(n,)`` implicit reward margins ``s δᵀx`` (nats before β).
      logp_c, logp_r: ``(n,)`` policy log-probs of the chosen / rejected answer (nats).
      ref_c, ref_r: ``(n,)`` (or scalars) reference log-probs of the same answers.
      policy_margin: ``(n,)`` ``s (W_a − W_b)ᵀx``; its sign is the policy's preference.
      beh: ``(n,)`` behaviour index in ``[0, k)``. k: K (static).
      beta, loss, label_smoothing: the objective (``dynamics.LOSSES``).

    Returns:
      dict of scalars (``loss``, ``reward_accuracy``, ``policy_accuracy``,
      ``rewards_chosen``, ``rewards_rejected``, ``rewards_margin``, ``logps_chosen``,
      ``logps_rejected``) and ``(k,)`` per-behaviour means (NaN for an absent behaviour).
    """
    ell = loss_fn(loss, h, beta, label_smoothing)
    nan_or = lambda v: jnp.where(jnp.isnan(v), jnp.nan, (v > 0).astype(h.dtype))  # NaN head: NaN, not 0
    racc = nan_or(h)
    pacc = nan_or(policy_margin)
    return {
        "loss": jnp.mean(ell),
        "reward_accuracy": jnp.mean(racc),
        "policy_accuracy": jnp.mean(pacc),
        "rewards_chosen": beta * jnp.mean(logp_c - ref_c),
        "rewards_rejected": beta * jnp.mean(logp_r - ref_r),
        "rewards_margin": beta * jnp.mean(h),
        "logps_chosen": jnp.mean(logp_c),
        "logps_rejected": jnp.mean(logp_r),
        "behavior_loss": segment_mean(ell, beh, k),
        "behavior_reward_accuracy": segment_mean(racc, beh, k),
        "behavior_policy_accuracy": segment_mean(pacc, beh, k),
    }


def head_logps(z0, half, a: int, b: int):
    """Log-probs of tokens a and b under ``W_0 + (e_a − e_b) Δᵀ``: ``z0 (n, V)`` = ``x W_0ᵀ``, ``half (n,)`` = ``Δᵀx``.

    Returns ``(lp_a (n,), lp_b (n,))`` in nats (full softmax over V).
    """
    lp = jax.nn.log_softmax(z0.at[:, a].add(half).at[:, b].add(-half), axis=-1)
    return lp[:, a], lp[:, b]


def zero_head_logps(x_delta, vocab: int):
    """:func:`head_logps` for ``W_0 = W_ref = 0``: logits ``(δᵀx/2, −δᵀx/2, 0, …)``, without the ``(n, V)`` array.

    Returns ``(lp_a, lp_b, ref)`` with ``ref = −log V`` the reference log-prob of every token.
    """
    lse = jnp.logaddexp(x_delta / 2.0, -x_delta / 2.0)
    if vocab > 2:
        lse = jnp.logaddexp(lse, jnp.log(vocab - 2.0).astype(x_delta.dtype))
    return x_delta / 2.0 - lse, -x_delta / 2.0 - lse, -jnp.log(jnp.asarray(vocab, x_delta.dtype))


def pair_grad_weight(loss: str, h, beta, label_smoothing):
    """``ℓ'(h)``: the per-pair weight of ``s x`` in the gradient of the mean loss (shape of ``h``)."""
    if loss == "sigmoid":  # without the zero linear term of the general form
        return -beta * jax.nn.sigmoid(-beta * h)
    return loss_grad_fn(loss, h, beta, label_smoothing)


def reduced_update(opt, grad, state, delta, d0):
    """One optax step on the reduced head: ``(δ_new, state)``.

    The optimizer acts on ``Δ = (δ − δ_0)/2`` (the row offset of ``W``), whose gradient is
    ``grad = ∇_δ L``; ``δ_new = δ + 2·update`` (docs/theory.md §1).
    """
    updates, state = opt.update(grad, state, (delta - d0) / 2.0)
    return delta + 2.0 * updates, state


def safe_sqrt(x):
    """``√max(x, 0)`` with a finite (zero) gradient at 0, so ``jax.grad`` works at δ = 0; NaN stays NaN."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), jnp.where(jnp.isnan(x), x, 0.0))


def weight_change(delta, d0):
    """``‖W_t − W_0‖_F = ‖δ_t − δ_0‖ / √2`` for ``delta, d0 (d,)`` → scalar."""
    return safe_sqrt(jnp.sum((delta - d0) ** 2, axis=-1)) / jnp.sqrt(2.0)


def prob_positive(mu, sigma):
    """``P(N(mu, sigma²) > 0)`` with the point-mass limit at ``sigma = 0``; NaN stays NaN (a diverged head)."""
    safe = jnp.where(sigma > 0, sigma, 1.0)
    p = jnp.where(sigma > 0, normal_cdf(mu / safe), (mu > 0).astype(mu.dtype))
    return jnp.where(jnp.isnan(mu) | jnp.isnan(sigma), jnp.nan, p)


def per_behavior(weight, values, behavior, k: int):
    """Component values ``(J,)`` → per-behaviour conditional means ``(k,)`` with weights ``weight (J,)``."""
    tot = jax.ops.segment_sum(weight, behavior, k)
    return jax.ops.segment_sum(weight * values, behavior, k) / tot


def gradient_flow(grad, delta, dt, substeps: int):
    """``substeps`` classical RK4 steps of the gradient flow ``dδ/dτ = −2∇L(δ)`` (docs/theory.md §5.7).

    Args:
      grad: ``δ ↦ ∇_δ L`` (population gradient), same shape in and out.
      delta: reduced head δ, any shape. dt: RK4 step size in τ (``lr / substeps``).

    Returns:
      δ after ``substeps`` steps, the shape of ``delta``. The factor 2 is the head convention
      ``W = [δ/2; −δ/2]``, whose flow in W is ``dδ/dτ = −2∇_δ L``.
    """
    f = lambda dl: -2.0 * grad(dl)

    def rk4(_, dl):
        k1 = f(dl)
        k2 = f(dl + 0.5 * dt * k1)
        k3 = f(dl + 0.5 * dt * k2)
        k4 = f(dl + dt * k3)
        return dl + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)

    return jax.lax.fori_loop(0, substeps, rk4, delta)


def stein_gradient(loss: str, mu, sigma, weight, means, s_delta, beta, label_smoothing):
    """Population gradient ``Σ_j w_j (m_j E[ℓ'(a_j)] + S_j δ E[ℓ''(a_j)])`` → ``(d,)`` (docs/theory.md §3.1).

    Stein's lemma for Gaussian components ``z | j ~ N(m_j, S_j)`` with margin
    ``a_j = δᵀz ~ N(mu_j, sigma_j²)``.

    Args:
      loss: name in ``dynamics.LOSSES`` (static). beta: β > 0. label_smoothing: ε (cdpo / robust).
      mu, sigma: ``(J,)`` margin means ``m_jᵀδ`` and standard deviations ``√(δᵀS_jδ)``.
      weight: ``(J,)`` component weights π_j (label noise and loss weights already applied).
      means: ``(J, d)`` component means m_j. s_delta: ``(J, d)`` the products ``S_j δ``.
    """
    _, e1, e2 = expected_loss_terms(loss, mu, sigma, beta, label_smoothing)
    return (weight * e1) @ means + (weight * e2) @ s_delta


def population_step(grad, *, method: str, optimizer, lr, d0, substeps: int = 4):
    """The population step on the reduced head: ``(step_fn, state0)``.

    ``step_fn`` maps the carry ``(t, δ, state)`` to ``(t + 1, δ', state')``: with
    ``method="gd"`` one optax step of ``optimizer`` (:func:`dynamics._train.make_optimizer`,
    learning rate ``lr``) through :func:`reduced_update` (``δ_0 = d0``); with ``method="flow"``
    ``substeps`` RK4 steps of :func:`gradient_flow` covering ``τ = lr`` (state ``()``).

    Args:
      grad: ``δ ↦ ∇_δ L`` (e.g. built from :func:`stein_gradient`), ``(d,)`` in and out.
      method: "gd" or "flow" (static). optimizer: as :func:`dynamics._train.make_optimizer`.
      lr: η (scalar). d0: ``(d,)`` δ_0. substeps: RK4 steps per step (static).

    Source: docs/theory.md §3.1 (GD), §5.6 (optimizers), §5.7 (gradient flow).
    """
    if method == "flow":
        dt = lr / substeps

        def flow_step(carry):
            t, delta, state = carry
            return t + 1, gradient_flow(grad, delta, dt, substeps), state

        return flow_step, ()
    opt = _train.make_optimizer(optimizer, lr)  # looked up at call time (tests patch dynamics._train)

    def gd_step(carry):
        t, delta, state = carry
        delta, state = reduced_update(opt, grad(delta), state, delta, d0)
        return t + 1, delta, state

    return gd_step, opt.init(jnp.zeros_like(d0))
