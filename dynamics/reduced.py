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
  population layer's Gaussian margin helpers.

All functions are pure, act on one configuration and are ``jax.vmap``-able.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._train import segment_mean
from .gaussian_integrals import normal_cdf
from .losses import loss_fn, loss_grad_fn

__all__ = ["choose", "split_metrics", "head_logps", "zero_head_logps", "pair_grad_weight", "reduced_update",
           "weight_change", "prob_positive", "safe_sqrt", "per_behavior"]


def choose(s, lp_a, lp_b):
    """Chosen and rejected values from the tokens' ``lp_a, lp_b (n,)`` and labels ``s (n,)`` (+1: a is chosen)."""
    pos = s > 0
    return jnp.where(pos, lp_a, lp_b), jnp.where(pos, lp_b, lp_a)


def split_metrics(h, logp_c, logp_r, ref_c, ref_r, policy_margin, beh, *, k, beta, loss, eps):
    """TRL's metrics of one split of one configuration.

    Args:
      h: ``(n,)`` implicit reward margins ``s δᵀx`` (nats before β).
      logp_c, logp_r: ``(n,)`` policy log-probs of the chosen / rejected answer (nats).
      ref_c, ref_r: ``(n,)`` (or scalars) reference log-probs of the same answers.
      policy_margin: ``(n,)`` ``s (W_a − W_b)ᵀx``; its sign is the policy's preference.
      beh: ``(n,)`` behaviour index in ``[0, k)``. k: K (static).
      beta, loss, eps: the objective (``dynamics.LOSSES``).

    Returns:
      dict of scalars (``loss``, ``reward_accuracy``, ``policy_accuracy``,
      ``rewards_chosen``, ``rewards_rejected``, ``rewards_margin``, ``logps_chosen``,
      ``logps_rejected``) and ``(k,)`` per-behaviour means (NaN for an absent behaviour).
    """
    ell = loss_fn(loss, h, beta, eps)
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


def pair_grad_weight(loss: str, h, beta, eps):
    """``ℓ'(h)``: the per-pair weight of ``s x`` in the gradient of the mean loss (shape of ``h``)."""
    if loss == "sigmoid":  # without the zero linear term of the general form
        return -beta * jax.nn.sigmoid(-beta * h)
    return loss_grad_fn(loss, h, beta, eps)


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
