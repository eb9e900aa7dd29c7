"""The analytic layer: population (N → ∞) dynamics of last-layer DPO.

For Gaussian components ``z | c ~ N(m_c, S_c)`` the margin ``a_c = δᵀz`` is
``N(δᵀm_c, δᵀS_cδ)`` and Stein's lemma gives (docs/theory.md §3.1)::

    L(δ)  = Σ_c π_c E[ℓ(a_c)]
    ∇L(δ) = Σ_c π_c ( m_c E[ℓ'(a_c)] + S_c δ E[ℓ''(a_c)] )

Population GD on the head ``W`` with learning rate η is
``δ_{t+1} = δ_t − 2η ∇L(δ_t)``; any sign-equivariant optax optimizer
(momentum, Adam) acts on the same reduced variable. Gradient flow (time
``τ = η t``) is integrated with RK4.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from . import divergence
from ._checks import check_choice, check_int, one_line_check_errors, traced_check_hparams
from ._train import check_schedule, run_recorded
from .distributions import Components, GaussianPreference
from .gaussian_integrals import normal_cdf
from .head import Head
from .losses import expected_loss_terms, validate_loss
from . import reduced

__all__ = [
    "PopulationTrajectory",
    "population_trajectory",
    "population_loss",
    "population_gradient",
    "population_metrics",
    "gaussian_accuracy",
    "training_components",
    "check_interventions",
]


def check_interventions(k: int, label_noise=None, loss_weight=None):
    """Validate per-behaviour label-noise rates and loss weights (shape ``(K,)``)."""
    from ._checks import check_finite

    for name, value in (("label_noise", label_noise), ("loss_weight", loss_weight)):
        if value is None:
            continue
        if jnp.shape(value) != (k,):
            raise ValueError(f"{name} has shape {jnp.shape(value)}; expected one value per behaviour, (K,) = ({k},)")
        check_finite(name, value)
    if label_noise is not None:
        from ._checks import check_in_range

        check_in_range("label_noise", label_noise, 0.0, 0.5)
    if loss_weight is not None:
        from ._checks import check_positive

        check_positive("loss_weight", loss_weight, allow_zero=True)


@struct.dataclass
class PopulationTrajectory:
    """Result of :func:`population_trajectory` (a pytree; vmapped calls stack it).

    Attributes:
      step: ``(T,)`` int, the recorded steps ``0, r, 2r, …, steps``.
      metrics: dict of ``(T,)`` arrays (``loss`` in nats, ``reward_accuracy``,
        ``policy_accuracy``, ``rewards_margin`` = E[β h] in nats,
        ``weight_change`` = ‖W_t − W_0‖_F, ``grad_norm`` = ‖∇_δ L‖) and
        ``(T, K)`` arrays (``behavior_loss``, ``behavior_reward_accuracy``,
        ``behavior_policy_accuracy``).
      delta: ``(T, d)`` the reduced head δ_t at the recorded steps.
      diverged: bool, True when the trajectory produced NaN or inf or its loss rose far above its
        start (:mod:`dynamics.divergence`); metrics of a NaN head stay NaN.
    """

    step: jax.Array
    metrics: dict
    delta: jax.Array
    diverged: jax.Array


def as_default_float(tree):
    """Cast a pytree's floating leaves to the active default float (float32, or float64 under x64)."""
    dtype = jnp.result_type(float)
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a
    return jax.tree_util.tree_map(cast, tree)


_prob_positive = reduced.prob_positive  # shared with the factored engine (dynamics.reduced)
_safe_sqrt = reduced.safe_sqrt


def _margin_moments(comps, delta):
    mu = comps.mean @ delta
    var = jnp.einsum("i,cij,j->c", delta, comps.cov, delta)
    return mu, _safe_sqrt(var)


def _per_behavior(comps, values, k):
    """Component values → per-behaviour conditional means ``(K,)``."""
    return reduced.per_behavior(comps.weight, values, comps.behavior, k)


def training_components(dist, label_noise=None, loss_weight=None) -> Components:
    """Components of the training objective: label noise and per-behaviour loss weights applied.

    With flip rate ``ρ_k`` each clean component ``(π_c, m_c, S_c)`` of behaviour
    ``k`` splits into ``(π_c(1 − ρ_k), m_c, S_c)`` and ``(π_c ρ_k, −m_c, S_c)``
    (a flipped label turns ``z = s x`` into ``−z``); a loss weight ``λ_k`` multiplies
    the behaviour's components' weights. Returns ``2C`` components when
    ``label_noise`` is given, else ``C``. Source: docs/theory.md §5.

    Args:
      dist: any distribution with ``components()``.
      label_noise: ``(K,)`` flip rates in [0, 1/2] or None.
      loss_weight: ``(K,)`` non-negative weights λ_k or None (all 1).
    """
    comps = dist.components()
    w = comps.weight
    if loss_weight is not None:
        w = w * jnp.asarray(loss_weight, w.dtype)[comps.behavior]
    if label_noise is None:
        return comps._replace(weight=w)
    rho = jnp.asarray(label_noise, w.dtype)[comps.behavior]
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)
    return Components(cat(w * (1 - rho), w * rho), cat(comps.mean, -comps.mean), cat(comps.cov, comps.cov),
                      cat(comps.behavior, comps.behavior), cat(comps.sign, -comps.sign))


def gaussian_accuracy(dist: GaussianPreference, u):
    """Exact ``P(s uᵀx > 0)`` overall and per behaviour: ``(scalar, (K,))``.

    ``= Σ_c π_c Φ(uᵀm_c / √(uᵀS_c u))`` (docs/theory.md §3.1). With ``u = δ`` it is the
    reward accuracy; with ``u = W_a − W_b`` the policy accuracy. Works for any
    distribution with ``components()`` (exact for Gaussian mixtures).
    """
    comps = dist.components()
    mu, sigma = _margin_moments(comps, u)
    pc = _prob_positive(mu, sigma)
    return jnp.sum(comps.weight * pc), _per_behavior(comps, pc, dist.num_behaviors)


def population_loss(dist: GaussianPreference, delta, *, beta, loss="sigmoid", label_smoothing=0.0,
                    label_noise=None, loss_weight=None):
    """Population training objective ``L(δ) = E[λ_k ℓ(s̃ δᵀx)]`` in nats; ``delta (d,)`` → scalar.

    ``s̃`` is the (possibly noisy) training label; see :func:`training_components`.
    """
    comps = training_components(dist, label_noise, loss_weight)
    mu, sigma = _margin_moments(comps, delta)
    e_l, _, _ = expected_loss_terms(loss, mu, sigma, beta, label_smoothing)
    return jnp.sum(comps.weight * e_l)


def population_gradient(dist: GaussianPreference, delta, *, beta, loss="sigmoid", label_smoothing=0.0,
                        label_noise=None, loss_weight=None):
    """Stein-form population gradient ``∇_δ L(δ)``, shape ``(d,)`` (docs/theory.md §3.1)."""
    comps = training_components(dist, label_noise, loss_weight)
    mu, sigma = _margin_moments(comps, delta)
    s_delta = jnp.einsum("cij,j->ci", comps.cov, delta)
    return reduced.stein_gradient(loss, mu, sigma, comps.weight, comps.mean, s_delta, beta, label_smoothing)


def population_metrics(dist: GaussianPreference, delta, *, beta, loss="sigmoid", label_smoothing=0.0,
                       u_ref=None, delta_init=None, label_noise=None, loss_weight=None):
    """Exact population metrics at one head ``δ (d,)`` (dict; see PopulationTrajectory).

    Metrics are on the clean labels with unit loss weights (what the model
    learned); ``grad_norm`` is of the training objective (noise and weights applied).
    """
    comps = dist.components()
    k = dist.num_behaviors
    u_ref = jnp.zeros_like(delta) if u_ref is None else u_ref
    delta_init = jnp.zeros_like(delta) if delta_init is None else delta_init
    mu, sigma = _margin_moments(comps, delta)
    e_l, _, _ = expected_loss_terms(loss, mu, sigma, beta, label_smoothing)
    racc_c = _prob_positive(mu, sigma)
    pmu, psig = _margin_moments(comps, delta + u_ref)
    pacc_c = _prob_positive(pmu, psig)
    per = lambda v: _per_behavior(comps, v, k)
    grad = population_gradient(dist, delta, beta=beta, loss=loss, label_smoothing=label_smoothing, label_noise=label_noise,
                               loss_weight=loss_weight)
    return {
        "loss": jnp.sum(comps.weight * e_l),
        "reward_accuracy": jnp.sum(comps.weight * racc_c),
        "policy_accuracy": jnp.sum(comps.weight * pacc_c),
        "rewards_margin": beta * jnp.sum(comps.weight * mu),
        "weight_change": reduced.weight_change(delta, delta_init),
        "grad_norm": _safe_sqrt(jnp.sum(grad**2)),
        "behavior_loss": per(e_l),
        "behavior_reward_accuracy": per(racc_c),
        "behavior_policy_accuracy": per(pacc_c),
    }


def population_trajectory(dist: GaussianPreference, *, beta, lr=None, steps: int, loss: str = "sigmoid",
                          label_smoothing=0.0, optimizer=None, record_every: int = 1, head: Head | None = None,
                          method: str = "gd", substeps: int = 4, label_noise=None,
                          loss_weight=None) -> PopulationTrajectory:
    """Population (N → ∞) training trajectory of the last-layer head.

    Args:
      dist: the preference distribution (K behaviours, dimension d).
      beta: DPO β > 0 (scalar; vmappable).
      lr: learning rate η > 0 on ``W`` (vmappable).
      steps: number of steps (static). record_every: record cadence (static;
        must divide ``steps``).
      loss: one of ``dynamics.LOSSES``. label_smoothing: ε for ``cdpo`` / ``robust``.
      optimizer: ``None`` (GD), "sgd", "momentum", "adam", or an
        ``optax.GradientTransformation`` (static) applied to the exact
        population gradient.
      head: reference/initial head; default ``Head.zeros(d)`` (δ_0 = 0, W_0 = W_ref).
      method: "gd" (discrete population GD) or "flow" (gradient flow
        ``dδ/dτ = −2∇L(δ)``, RK4 with ``substeps`` per step of size η, recorded
        at ``τ = η t``; plain GD only).

    Returns:
      :class:`PopulationTrajectory` with ``T = steps // record_every + 1``
      records; float32 by default, float64 under ``jax_enable_x64``.

    Raises:
      ValueError: bad β, lr, steps, loss, ε, method or distribution (named).

    Source: docs/theory.md §3.1.
    """
    validate_loss(loss, beta, label_smoothing)
    check_choice("method", method, ("gd", "flow"))
    if method == "flow" and optimizer is not None:
        raise ValueError("method='flow' is plain gradient flow; pass optimizer=None")
    check_int("substeps", substeps)
    steps, record_every = check_schedule(steps, record_every, lr, optimizer)
    if hasattr(dist, "validate"):
        dist = dist.validate()
    if not hasattr(dist, "components") and hasattr(dist, "gaussian_equivalent"):
        dist = dist.gaussian_equivalent()
    dist = as_default_float(dist)
    check_interventions(dist.num_behaviors, label_noise, loss_weight)
    head = Head.zeros(dist.dim) if head is None else head.check_margin_only("population_trajectory")
    if head.dim != dist.dim:
        raise ValueError(f"head has d = {head.dim} but the distribution has d = {dist.dim}; they must match")
    lr = 0.0 if lr is None else lr
    with one_line_check_errors():  # a traced bad β/η/ε (the caller's vmap runs here): one ValueError line
        return _population(dist, head, beta, lr, label_smoothing, label_noise, loss_weight, loss=loss,
                           optimizer=optimizer, steps=steps, record_every=record_every, method=method,
                           substeps=substeps)


@partial(jax.jit, static_argnames=("loss", "optimizer", "steps", "record_every", "method", "substeps"))
def _population(dist, head, beta, lr, label_smoothing, label_noise, loss_weight, *, loss, optimizer, steps, record_every,
                method, substeps):
    dtype = dist.components().mean.dtype
    beta, lr, label_smoothing = (jnp.asarray(v, dtype) for v in (beta, lr, label_smoothing))
    beta, lr, label_smoothing = traced_check_hparams(beta, lr, label_smoothing, loss=loss, optimizer=optimizer)
    d0 = head.delta_init.astype(dtype)
    u_ref = head.u_ref.astype(dtype)
    grad = lambda delta: population_gradient(dist, delta, beta=beta, loss=loss, label_smoothing=label_smoothing,
                                             label_noise=label_noise, loss_weight=loss_weight)
    step_fn, state0 = reduced.population_step(grad, method=method, optimizer=optimizer, lr=lr, d0=d0,
                                              substeps=substeps)
    carry0 = (jnp.int32(0), d0, state0)

    def record(carry):
        delta = carry[1]
        m = population_metrics(dist, delta, beta=beta, loss=loss, label_smoothing=label_smoothing, u_ref=u_ref, delta_init=d0,
                               label_noise=label_noise, loss_weight=loss_weight)
        return carry[0], m, delta

    _, (step, metrics, deltas) = run_recorded(step_fn, record, carry0, steps, record_every)
    diverged = divergence.diverged(metrics["loss"], deltas)
    return PopulationTrajectory(step=step, metrics=metrics, delta=deltas, diverged=diverged)
