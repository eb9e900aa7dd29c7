"""Preference losses ℓ(h) of the implicit reward margin h: one :class:`Loss` record per loss.

``h = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)`` (chosen minus
rejected, in nats). Names follow TRL's ``DPOTrainer(loss_type=...)``
(docs/theory.md §1.3):

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
expectations reuse the sigmoid quadrature (docs/theory.md §3.3).

Everything the package knows about a loss is its :class:`Loss` record in
:data:`REGISTRY`; :data:`LOSSES`, :func:`loss_fn`, :func:`loss_grad_fn`,
:func:`expected_loss_terms`, :func:`validate_loss`, :func:`uses_label_smoothing`
and the bounds in :mod:`dynamics.theory` all read it. A new loss is one record
(:func:`_register`, in this module) plus its tests (docs/guide.md, "Adding a loss").
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_choice, check_in_range, check_positive, check_scalar, is_concrete
from .gaussian_integrals import normal_cdf, normal_pdf, sigmoid_family_expectations

__all__ = ["Loss", "REGISTRY", "LOSSES", "get_loss", "uses_label_smoothing", "check_eps",
           "loss_fn", "loss_grad_fn", "expected_loss_terms", "validate_loss"]


@dataclasses.dataclass(frozen=True)
class Loss:
    """One preference loss ℓ(h) and everything the theory needs about it.

    Attributes:
      name: the ``loss`` string (static argument everywhere).
      value: ``(h, beta, eps) → ℓ(h)`` elementwise (nats; hinge/ipo: their own units).
      grad: ``(h, beta, eps) → ℓ'(h)``.
      expectations: ``(mu, sigma, beta, eps) → (E[ℓ(a)], E[ℓ'(a)], E[ℓ''(a)])`` for
        ``a ~ N(mu, sigma²)``; arguments are broadcast arrays of one float dtype.
      smoothed: whether the loss takes the label smoothing ε ∈ [0, 1/2) (else ε must be 0).
      lipschitz: ``(beta, eps) → sup_h |ℓ'(h)|`` (C2; +inf when unbounded).
      curvature: ``(beta, eps) → sup_h ℓ''(h)`` (C1 / C4 sandwich; +inf when unbounded).
      trl_loss_type: the name of ``trl.DPOConfig(loss_type=...)``.
      source: reference paper.
    """

    name: str
    value: Callable
    grad: Callable
    expectations: Callable
    smoothed: bool
    lipschitz: Callable
    curvature: Callable
    trl_loss_type: str
    source: str


#: every loss by name, in the order of :data:`LOSSES`
REGISTRY: dict[str, Loss] = {}
#: the loss names (TRL ``loss_type``), derived from :data:`REGISTRY`
LOSSES: tuple[str, ...] = ()


def _register(loss: Loss) -> Loss:
    """Add ``loss`` to :data:`REGISTRY` (and its name to :data:`LOSSES`); returns it.

    Call it in this module only: ``dynamics.LOSSES`` and the CLI choices are read at import.

    Raises:
      ValueError: a loss of that name is already registered.
    """
    global LOSSES
    if loss.name in REGISTRY:
        raise ValueError(f"loss {loss.name!r} is already registered; pick a new name")
    REGISTRY[loss.name] = loss
    LOSSES = tuple(REGISTRY)
    return loss


def get_loss(loss: str) -> Loss:
    """The :class:`Loss` record of ``loss``. Raises ``ValueError`` for an unknown name."""
    check_choice("loss", loss, REGISTRY)
    return REGISTRY[loss]


def uses_label_smoothing(loss: str) -> bool:
    """Whether ``loss`` takes the label smoothing ε (``cdpo``, ``robust``); ε must be 0 otherwise."""
    return get_loss(loss).smoothed


def check_eps(loss: str, eps) -> None:
    """ε ∈ [0, 1/2) for a smoothed loss, ε = 0 for any other (arrays allowed; tracers skipped).

    Raises:
      ValueError: naming ``eps``, its value and the fix.
    """
    if uses_label_smoothing(loss):
        check_in_range("eps", eps, 0.0, 0.5, hi_open=True)
    elif is_concrete(eps) and np.any(np.asarray(eps) != 0.0):
        smoothed = " and ".join(repr(n) for n, r in REGISTRY.items() if r.smoothed)
        raise ValueError(f"eps={np.asarray(eps).tolist()} has no effect with loss={loss!r}; it is the label "
                         f"smoothing of {smoothed} — pass eps=0 or choose one of those losses")


def validate_loss(loss: str, beta=None, eps=0.0) -> str:
    """Check a loss name, scalar β > 0 and scalar ε (:func:`check_eps`); returns ``loss``.

    Raises:
      ValueError: naming the field and the fix.
    """
    check_choice("loss", loss, LOSSES)
    if beta is not None:
        check_scalar("beta", beta)
        check_positive("beta", beta)
    check_scalar("eps", eps)
    check_eps(loss, eps)
    return loss


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
    return get_loss(loss).value(h, beta, eps)


def loss_grad_fn(loss: str, h, beta, eps=0.0):
    """Derivative ℓ'(h) (the per-pair weight of ``s x`` in the gradient); arguments as :func:`loss_fn`."""
    return get_loss(loss).grad(h, beta, eps)


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
      Three arrays of the broadcast shape. Source: docs/theory.md §3.1–3.3.
    """
    rec = get_loss(loss)
    mu, sigma, beta = jnp.broadcast_arrays(*map(jnp.asarray, (mu, sigma, beta)))
    dtype = jnp.result_type(mu, sigma, beta, float)
    return rec.expectations(mu.astype(dtype), sigma.astype(dtype), beta.astype(dtype), eps)


# The records' callables are module-level functions (bound with ``functools.partial``), so they run
# — and can be tested, and mutation-tested — at call time, not only when the registry is built.

# ------------------------------------------------------------------ the sigmoid family
# ℓ(h) = softplus(−βh) + c(ε)·βh; c = 0 (sigmoid), ε (cdpo), −ε/(1 − 2ε) (robust)
def _coef_sigmoid(eps):
    return 0.0


def _coef_cdpo(eps):
    return eps


def _coef_robust(eps):
    return -eps / (1.0 - 2.0 * eps)


def _family_value(coef, h, beta, eps):
    return jax.nn.softplus(-beta * h) + coef(eps) * beta * h


def _family_grad(coef, h, beta, eps):
    return -beta * jax.nn.sigmoid(-beta * h) + coef(eps) * beta


def _family_expectations(coef, mu, sigma, beta, eps):
    e_sp, e_sg, e_ss = sigmoid_family_expectations(mu, sigma, beta)
    c = coef(eps)
    return e_sp + c * beta * mu, -beta * e_sg + c * beta, beta**2 * e_ss


def _family_curvature(beta, eps):
    return beta**2 / 4.0


def _lipschitz_beta(beta, eps):
    return beta


def _lipschitz_cdpo(beta, eps):
    return beta * (1.0 - eps)


def _lipschitz_robust(beta, eps):
    return beta * (1.0 - eps) / (1.0 - 2.0 * eps)


def _unbounded(beta, eps):
    return jnp.full_like(beta, jnp.inf)


for _name, _coef, _lip, _trl, _src in (
        ("sigmoid", _coef_sigmoid, _lipschitz_beta, "sigmoid", "DPO, Rafailov et al. 2023"),
        ("cdpo", _coef_cdpo, _lipschitz_cdpo, "sigmoid", "conservative DPO (TRL label_smoothing), Mitchell 2023"),
        ("robust", _coef_robust, _lipschitz_robust, "robust", "robust DPO, Chowdhury et al. 2024")):
    _register(Loss(name=_name, value=partial(_family_value, _coef), grad=partial(_family_grad, _coef),
                   expectations=partial(_family_expectations, _coef), smoothed=_name != "sigmoid",
                   lipschitz=_lip, curvature=_family_curvature, trl_loss_type=_trl, source=_src))
del _name, _coef, _lip, _trl, _src


# ------------------------------------------------------------------------------ hinge
def _hinge_value(h, beta, eps):
    return jax.nn.relu(1.0 - beta * h)


def _hinge_grad(h, beta, eps):
    h = jnp.asarray(h)
    return -beta * (beta * h < 1.0).astype(jnp.result_type(h, float))


def _hinge_expectations(mu, sigma, beta, eps):
    pos = sigma > 0  # σ = 0: point values (double `where` keeps autodiff finite)
    sig = jnp.where(pos, sigma, 1.0)
    c = 1.0 / beta
    z = (c - mu) / sig
    e_l = beta * ((c - mu) * normal_cdf(z) + sig * normal_pdf(z))
    below = (mu < c).astype(mu.dtype)
    return (jnp.where(pos, e_l, jax.nn.relu(1.0 - beta * mu)),
            jnp.where(pos, -beta * normal_cdf(z), -beta * below),
            jnp.where(pos, beta * normal_pdf(z) / sig, 0.0))


_register(Loss(name="hinge", value=_hinge_value, grad=_hinge_grad, expectations=_hinge_expectations,
               smoothed=False, lipschitz=_lipschitz_beta, curvature=_unbounded, trl_loss_type="hinge",
               source="SLiC, Zhao et al. 2023"))


# -------------------------------------------------------------------------------- ipo
def _ipo_value(h, beta, eps):
    return (h - 1.0 / (2.0 * beta)) ** 2


def _ipo_grad(h, beta, eps):
    return 2.0 * (h - 1.0 / (2.0 * beta))


def _ipo_expectations(mu, sigma, beta, eps):
    c = 1.0 / (2.0 * beta)
    return (mu - c) ** 2 + sigma**2, 2.0 * (mu - c), jnp.full_like(mu, 2.0)


def _ipo_curvature(beta, eps):
    return jnp.full_like(beta, 2.0)


_register(Loss(name="ipo", value=_ipo_value, grad=_ipo_grad, expectations=_ipo_expectations, smoothed=False,
               lipschitz=_unbounded, curvature=_ipo_curvature, trl_loss_type="ipo", source="IPO, Azar et al. 2023"))
