"""Covariance-aware priority: which behaviour's loss falls faster when several share one head.

The paper's priority gap (``dynamics.priority_gap``) is the first-order term of each
behaviour's loss along the population gradient flow at δ = 0: it depends on the means
only. The covariance enters at second order. This module gives

* :func:`loss_series` — the exact first and second τ-derivatives of every behaviour's
  population loss ``L_k(δ(τ))`` at τ = 0 along ``dδ/dτ = −2∇L(δ)``, δ(0) = 0;
* :func:`predicted_loss_drop` — the [1/1] Padé resummation of that two-term series at a
  horizon τ: ``D_k(τ) = −r_k τ / (1 + τ |a_k| / (2|r_k|))``;
* :func:`priority_score` — the normalised pairwise difference
  ``(D_i − D_j) / (|D_i| + |D_j|) ∈ [−1, 1]``, the covariance-aware counterpart of
  ``gap_ij``: positive when behaviour i's loss is predicted to fall more.

Derivation: docs/theory.md §4.4 ("Covariance-aware priority score"). Every function is
pure and vmappable over stacked distributions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._checks import is_concrete
from .distributions import GaussianPreference
from .losses import loss_fn
from .theory import _check_loss_args

__all__ = ["loss_series", "predicted_loss_drop", "priority_score"]


def _loss_derivatives_at_zero(loss: str, beta, label_smoothing, dtype):
    """``(ℓ'(0), ℓ''(0))`` by autodiff of ``loss_fn`` (hinge: ``ℓ''(0) = 0``, its kink is at 1/β)."""
    f = lambda h: loss_fn(loss, h, beta, label_smoothing)
    zero = jnp.zeros((), dtype)
    return jax.grad(f)(zero), jax.grad(jax.grad(f))(zero)


def _behavior_second_moments(dist):
    """``M_k = E[z zᵀ | k] = Σ_{c∈k} (π_c/ω_k)(S_c + m_c m_cᵀ)``, shape ``(K, d, d)``."""
    c = dist.components()
    m_c = c.cov + jnp.einsum("ci,cj->cij", c.mean, c.mean)
    tot = jax.ops.segment_sum(c.weight, c.behavior, dist.num_behaviors)
    return jax.ops.segment_sum(c.weight[:, None, None] * m_c, c.behavior, dist.num_behaviors) / tot[:, None, None]


def loss_series(dist: GaussianPreference, *, beta, loss: str = "sigmoid", label_smoothing=0.0):
    """First two τ-derivatives of each behaviour's population loss along the gradient flow at δ = 0.

    Along ``dδ/dτ = −2∇L(δ)`` (population GD with step η in time ``τ = η t``) from
    ``δ(0) = 0``, with ``m_k = E[z|k]``, ``m̄ = Σ_k ω_k m_k``, ``M_k = E[zzᵀ|k]``,
    ``M = E[zzᵀ]``::

        r_k = dL_k/dτ   = −2 ℓ'(0)² m_kᵀ m̄                         (C4; DPO: −(β²/2) m_kᵀm̄)
        a_k = d²L_k/dτ² = 4 ℓ'(0)² ℓ''(0) (m̄ᵀ M_k m̄ + m_kᵀ M m̄)    (DPO: (β⁴/4)(…))

    The first term of ``a_k`` is the curvature of ``L_k`` along the initial direction
    (it grows with the covariance of behaviour k along m̄); the second is the turn of the
    flow direction (the Hessian of the total loss, ``ℓ''(0) M``, acts on the velocity).
    Exact for any distribution with second moments (no Gaussian hypothesis): at δ = 0
    every margin is 0, so only ``ℓ'(0)`` and ``ℓ''(0)`` enter.

    Args:
      dist: distribution with ``components()`` (vmappable), K behaviours in dimension d.
      beta: β > 0. loss: name in ``dynamics.LOSSES`` (static). label_smoothing: ε for cdpo/robust.

    Returns:
      ``(rate (K,), curvature (K,))`` in nats per unit τ and nats per unit τ².

    Raises:
      ValueError: unknown loss, β ≤ 0 or ε out of range (concrete values).

    Source: docs/theory.md §4.4 (covariance-aware priority score).
    """
    _check_loss_args(loss, beta, label_smoothing)
    dtype = dist.components().mean.dtype
    l1, l2 = _loss_derivatives_at_zero(loss, jnp.asarray(beta, dtype), jnp.asarray(label_smoothing, dtype), dtype)
    m_k, m_bar = dist.behavior_mean, dist.mean
    mk2 = _behavior_second_moments(dist)
    m2 = jnp.einsum("k,kij->ij", dist.weight, mk2)
    rate = -2.0 * l1**2 * (m_k @ m_bar)
    curv = 4.0 * l1**2 * l2 * (jnp.einsum("i,kij,j->k", m_bar, mk2, m_bar) + m_k @ (m2 @ m_bar))
    return rate, curv


def predicted_loss_drop(dist: GaussianPreference, *, beta, horizon, loss: str = "sigmoid", label_smoothing=0.0):
    """Covariance-aware prediction of ``L_k(0) − L_k(δ(τ))`` at ``τ = horizon``, shape ``(K,)``.

    ``D_k(τ) = −r_k τ / (1 + τ |a_k| / (2|r_k|))`` with ``(r_k, a_k)`` from
    :func:`loss_series`. For a behaviour whose loss falls (``r_k < 0``) and decelerates
    (``a_k ≥ 0``) this is the [1/1] Padé approximant of the series ``−r_k τ − a_k τ²/2``:
    it matches the series to second order in τ and saturates at ``2 r_k²/a_k`` instead of
    turning negative as the truncated series does at ``τ > 2|r_k|/a_k``. In every case it
    has the sign of ``−r_k`` and matches to first order. ``D_k = 0`` when ``r_k = 0``.

    Args:
      dist, beta, loss, label_smoothing: as :func:`loss_series`.
      horizon: τ = η × steps ≥ 0 of the prediction (e.g. 0.2 × 20 = 4).

    Returns:
      ``(K,)`` predicted loss drops in nats (positive = the loss falls).

    Raises:
      ValueError: as :func:`loss_series`; ``horizon`` < 0 (concrete).

    Source: docs/theory.md §4.4 (covariance-aware priority score).
    """
    if is_concrete(horizon) and float(horizon) < 0:
        raise ValueError(f"horizon must be >= 0 (τ = lr × steps), got {float(horizon)}")
    rate, curv = loss_series(dist, beta=beta, loss=loss, label_smoothing=label_smoothing)
    tau = jnp.asarray(horizon, rate.dtype)
    absr = jnp.abs(rate)
    safe = jnp.where(absr > 0, absr, 1.0)
    denom = 1.0 + tau * jnp.abs(curv) / (2.0 * safe)
    return jnp.where(absr > 0, -rate * tau / denom, 0.0)


def priority_score(dist: GaussianPreference, *, beta, horizon, loss: str = "sigmoid", label_smoothing=0.0):
    """Covariance-aware priority score between behaviours, ``(K, K)`` antisymmetric in [−1, 1].

    ``score_ij = (D_i − D_j) / (|D_i| + |D_j|)`` with ``D`` from
    :func:`predicted_loss_drop` (0 when both are 0). ``score_ij > 0`` predicts that
    behaviour i's loss falls more than j's over the horizon. It plays the role of the
    paper's ``gap_ij`` (``dist.priority_gap``, means only) but uses each behaviour's
    covariance through ``M_k``.

    Args:
      dist, beta, horizon, loss, label_smoothing: as :func:`predicted_loss_drop`.

    Returns:
      ``(K, K)`` array; pairs are compared by sign, agreement is tabulated by ``|score|``.

    Raises:
      ValueError: as :func:`predicted_loss_drop`.

    Source: docs/theory.md §4.4 (covariance-aware priority score).
    """
    drop = predicted_loss_drop(dist, beta=beta, horizon=horizon, loss=loss, label_smoothing=label_smoothing)
    diff = drop[:, None] - drop[None, :]
    tot = jnp.abs(drop)[:, None] + jnp.abs(drop)[None, :]
    return jnp.where(tot > 0, diff / jnp.where(tot > 0, tot, 1.0), 0.0)
