"""Preference losses ℓ(h) of the implicit reward margin h, and their Gaussian expectations.

``h = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)`` (chosen minus
rejected, in nats). Names follow TRL's ``DPOTrainer(loss_type=...)``
(THEORY.md §1):

=========  ==========================================================  =================
name       ℓ(h)                                                        source
=========  ==========================================================  =================
sigmoid    −log σ(β h)                                                 DPO (Rafailov et al. 2023)
cdpo       −(1−ε) log σ(β h) − ε log σ(−β h)                           conservative DPO
robust     [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1−2ε)                Chowdhury et al. 2024
hinge      max(0, 1 − β h)                                             SLiC (Zhao et al. 2023)
ipo        (h − 1/(2β))²                                               IPO (Azar et al. 2023)
=========  ==========================================================  =================

With ``g(x) = softplus(−x) = −log σ(x)`` and ``g(−x) = g(x) + x``, ``cdpo`` and
``robust`` are ``g(βh) + c·βh`` with ``c = ε`` and ``c = −ε/(1−2ε)``; their
expectations reuse the sigmoid quadrature (docs/theory.md §1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._checks import check_choice, check_in_range, check_positive, check_scalar, is_concrete
from .gaussian_integrals import normal_cdf, normal_pdf, sigmoid_family_expectations

__all__ = ["LOSSES", "loss_fn", "loss_grad_fn", "expected_loss_terms", "validate_loss"]

LOSSES = ("sigmoid", "cdpo", "robust", "hinge", "ipo")


def validate_loss(loss: str, beta=None, eps=0.0) -> str:
    """Check a loss name, β and ε; raise ``ValueError`` naming the field and the fix."""
    check_choice("loss", loss, LOSSES)
    if beta is not None:
        check_scalar("beta", beta)
        check_positive("beta", beta)
    check_scalar("eps", eps)
    if loss in ("cdpo", "robust"):
        check_in_range("eps", eps, 0.0, 0.5, hi_open=True)
    elif is_concrete(eps) and float(eps) != 0.0:
        raise ValueError(f"eps={float(eps)} has no effect with loss={loss!r}; it is the label smoothing of "
                         "'cdpo' and 'robust' — pass eps=0 or choose one of those losses")
    return loss


def _linear_coef(loss: str, eps):
    if loss == "cdpo":
        return eps
    if loss == "robust":
        return -eps / (1.0 - 2.0 * eps)
    return 0.0


def loss_fn(loss: str, h, beta, eps=0.0):
    """Pointwise loss ℓ(h) in nats (hinge/ipo: their own units).

    Args:
      loss: one of ``LOSSES``.
      h: reward margin(s) (chosen minus rejected log-ratio), any shape.
      beta: β > 0, broadcastable with ``h``.
      eps: label-smoothing ε ∈ [0, 1/2) for ``cdpo`` / ``robust``.

    Raises:
      ValueError: unknown loss name.
    """
    check_choice("loss", loss, LOSSES)
    if loss == "hinge":
        return jax.nn.relu(1.0 - beta * h)
    if loss == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    return jax.nn.softplus(-beta * h) + _linear_coef(loss, eps) * beta * h


def loss_grad_fn(loss: str, h, beta, eps=0.0):
    """Derivative ℓ'(h) (the per-pair weight of ``s x`` in the gradient)."""
    check_choice("loss", loss, LOSSES)
    if loss == "hinge":
        h = jnp.asarray(h)
        return -beta * (beta * h < 1.0).astype(jnp.result_type(h, float))
    if loss == "ipo":
        return 2.0 * (h - 1.0 / (2.0 * beta))
    return -beta * jax.nn.sigmoid(-beta * h) + _linear_coef(loss, eps) * beta


def expected_loss_terms(loss: str, mu, sigma, beta, eps=0.0):
    """``(E[ℓ(a)], E[ℓ'(a)], E[ℓ''(a)])`` for ``a ~ N(mu, sigma²)``.

    Closed forms for ``hinge`` (ℓ'' is a point mass β·δ(a − 1/β), so
    ``E[ℓ''] = β φ(z)/σ`` with ``z = (1/β − μ)/σ``) and ``ipo``; the
    sigmoid family uses :func:`sigmoid_family_expectations` (error ≤ 1e-9 in
    float64 for β·σ up to 200, tested against ``scipy.integrate.quad``).

    Args:
      loss: one of ``LOSSES``.
      mu, sigma: mean and standard deviation of ``a`` (broadcastable, σ ≥ 0).
      beta: β > 0. eps: ε for ``cdpo`` / ``robust``.

    Returns:
      Three arrays of the broadcast shape. Source: THEORY.md §3.
    """
    check_choice("loss", loss, LOSSES)
    mu, sigma, beta = jnp.broadcast_arrays(*map(jnp.asarray, (mu, sigma, beta)))
    dtype = jnp.result_type(mu, sigma, beta, float)
    mu, sigma, beta = mu.astype(dtype), sigma.astype(dtype), beta.astype(dtype)
    if loss == "ipo":
        c = 1.0 / (2.0 * beta)
        return (mu - c) ** 2 + sigma**2, 2.0 * (mu - c), jnp.full_like(mu, 2.0)
    if loss == "hinge":
        pos = sigma > 0  # σ = 0: point values (double `where` keeps autodiff finite)
        sig = jnp.where(pos, sigma, 1.0)
        c = 1.0 / beta
        z = (c - mu) / sig
        e_l = beta * ((c - mu) * normal_cdf(z) + sig * normal_pdf(z))
        below = (mu < c).astype(dtype)
        return (jnp.where(pos, e_l, jax.nn.relu(1.0 - beta * mu)),
                jnp.where(pos, -beta * normal_cdf(z), -beta * below),
                jnp.where(pos, beta * normal_pdf(z) / sig, 0.0))
    e_sp, e_sg, e_ss = sigmoid_family_expectations(mu, sigma, beta)
    c = _linear_coef(loss, eps)
    return e_sp + c * beta * mu, -beta * e_sg + c * beta, beta**2 * e_ss
