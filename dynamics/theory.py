"""The theorems: claims C1–C5 (docs/theory.md §4) as analytic predictions and bounds.

One place for the theory the package validates. Every function is a pure JAX
function of a :class:`~dynamics.GaussianPreference` (or of scalars), so it can
be ``jax.vmap``-ed over stacked distributions and hyper-parameters
(``loss`` is the only static argument). Derivations, with the hypotheses of
each claim, are in ``docs/theory.md`` §4; ``sims/validate.py`` checks every
function here against population and empirical runs (``dpo-sims validate``).

Conventions (docs/theory.md §1): ``δ = (W_a − W_b) − (W_ref,a − W_ref,b)`` is the
reduced head, ``z = s x`` the signed embedding with mean ``m̄`` and covariance
``C``; plain GD with learning rate ``η`` on ``W`` moves ``δ`` by
``−2η ∇L(δ)``; gradient-flow time is ``τ = η t`` (``t`` in steps). Losses are in
nats (``hinge`` / ``ipo`` in their own units).

=====  =================================================================  =====================
claim  what is predicted / bounded                                        functions
=====  =================================================================  =====================
C1     first step ``δ_1 = 2η(−ℓ'(0)) m̄`` (DPO: ``η β m̄``), its weight       :func:`c1_first_step`,
       change and loss; the finite-N deviation bands of ``δ̂_1``            :func:`c1_bands`
C2     ``‖W_t − W_0‖ ≤ √2 η sup|ℓ'| Σ_steps mean‖x‖``                      :func:`c2_weight_change_bound`
C3     ``acc(u) ≥ 1 − Σ_c π_c exp(−(uᵀm_c)²/(2uᵀS_c u))``                   :func:`c3_accuracy_bound`
C4     ``dL_k/dτ|₀ = −2 ℓ'(0)² m_kᵀ m̄`` (DPO: ``−(β²/2) m_kᵀ m̄``)           :func:`c4_initial_loss_rates`
C5     misalignment by flipped-label DPO from an aligned head              :func:`c5_misalignment`
=====  =================================================================  =====================
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ._checks import check_choice, check_in_range, check_int, check_positive, is_concrete
from . import transforms
from .distributions import GaussianPreference
from .head import Head
from .losses import LOSSES, check_label_smoothing, get_loss, loss_fn, loss_grad_fn
from .population import gaussian_accuracy, population_trajectory

__all__ = [
    "initial_loss_slope",
    "loss_lipschitz",
    "loss_curvature_bound",
    "FirstStep",
    "c1_first_step",
    "C1Bands",
    "c1_bands",
    "z_is_gaussian",
    "c2_weight_change_bound",
    "c3_accuracy_bound",
    "c3_first_step_bound",
    "c3_isotropic_bound",
    "c4_initial_loss_rates",
    "c4_first_step_loss_change",
    "c5_scale_separation",
    "c5_flip_labels",
    "c5_aligned_head",
    "Misalignment",
    "c5_misalignment",
    "first_step_where",
    "first_step_below",
]


def _dtype(*xs):
    return jnp.result_type(*xs, float)


def _check_loss_args(loss, beta, label_smoothing):
    """Like ``losses.validate_loss`` but β and ε may be arrays (the functions here broadcast)."""
    check_choice("loss", loss, LOSSES)
    check_positive("beta", beta)
    check_label_smoothing(loss, label_smoothing)


# --------------------------------------------------------------------- losses
def initial_loss_slope(loss: str, beta, label_smoothing=0.0):
    """``−ℓ'(0)``: the per-pair gradient weight at the reference head (δ = 0).

    ``sigmoid``: β/2; ``cdpo``: β(1 − 2ε)/2; ``robust``: β/(2(1 − 2ε));
    ``hinge``: β; ``ipo``: 1/β (docs/theory.md §4.1). Positive for every loss in
    ``dynamics.LOSSES`` with valid ε, so the first step moves δ along ``+m̄``.

    Args:
      loss: a name in ``dynamics.LOSSES`` (static).
      beta: β > 0, any shape. label_smoothing: ε ∈ [0, 1/2) (``cdpo`` / ``robust``).

    Returns:
      Array of the broadcast shape of ``beta`` and ``label_smoothing`` (nats per unit margin).

    Raises:
      ValueError: unknown loss, β ≤ 0, ε outside [0, 1/2) (or ε ≠ 0 for a loss
        without label smoothing).
    """
    _check_loss_args(loss, beta, label_smoothing)
    beta = jnp.asarray(beta, _dtype(beta))
    return -loss_grad_fn(loss, jnp.zeros_like(beta), beta, label_smoothing)


def loss_lipschitz(loss: str, beta, label_smoothing=0.0):
    """``sup_h |ℓ'(h)|``, the Lipschitz constant of the loss in the margin (C2).

    ``sigmoid`` and ``hinge``: β; ``cdpo``: β(1 − ε); ``robust``:
    β(1 − ε)/(1 − 2ε); ``ipo``: +inf (quadratic, no linear-growth bound).
    Source: docs/theory.md §4.2 (stated for DPO, ``|ℓ'| ≤ β``).

    Returns an array of the broadcast shape of ``beta`` and ``label_smoothing``.

    Raises:
      ValueError: unknown loss, β ≤ 0, ε outside [0, 1/2).
    """
    _check_loss_args(loss, beta, label_smoothing)
    beta, label_smoothing = jnp.broadcast_arrays(jnp.asarray(beta, _dtype(beta, label_smoothing)), jnp.asarray(label_smoothing, _dtype(beta, label_smoothing)))
    return jnp.broadcast_to(get_loss(loss).lipschitz(beta, label_smoothing), beta.shape)


def loss_curvature_bound(loss: str, beta, label_smoothing=0.0):
    """``sup_h ℓ''(h)``: β²/4 for the sigmoid family, 2 for ``ipo``, +inf for ``hinge``.

    Used for the second-order side of the C1 / C4 first-step sandwich
    (docs/theory.md §4.1). Raises ValueError like :func:`loss_lipschitz`.
    """
    _check_loss_args(loss, beta, label_smoothing)
    beta, label_smoothing = jnp.broadcast_arrays(jnp.asarray(beta, _dtype(beta, label_smoothing)), jnp.asarray(label_smoothing, _dtype(beta, label_smoothing)))
    return jnp.broadcast_to(get_loss(loss).curvature(beta, label_smoothing), beta.shape)


def _second_moment(dist: GaussianPreference):
    """``E[z zᵀ] = C + m̄ m̄ᵀ``, shape ``(d, d)``."""
    m = dist.mean
    return dist.z_covariance() + jnp.outer(m, m)


# ------------------------------------------------------------------------ C1
@struct.dataclass
class FirstStep:
    """C1 prediction for the first population GD step from ``W_0 = W_ref`` (δ_0 = 0).

    Attributes:
      delta: ``(d,)`` δ_1 = 2η(−ℓ'(0)) m̄ (exact; DPO: η β m̄).
      weight_change: scalar ‖W_1 − W_0‖_F = ‖δ_1‖/√2 (DPO: η β ‖m̄‖/√2).
      loss_first_order: scalar ``ℓ(0) − 2η ℓ'(0)² ‖m̄‖²`` (DPO:
        ``log 2 − η β² ‖m̄‖²/2``), the first-order loss after the step (nats);
        a lower bound on ``L(δ_1)`` since every loss in LOSSES is convex.
      loss_upper: scalar ``loss_first_order + ½ sup ℓ'' · δ_1ᵀ E[zzᵀ] δ_1``,
        an upper bound on ``L(δ_1)`` (exact for ``ipo``; +inf for ``hinge``).
    """

    delta: jax.Array
    weight_change: jax.Array
    loss_first_order: jax.Array
    loss_upper: jax.Array


def c1_first_step(dist: GaussianPreference, *, beta, lr, loss: str = "sigmoid", label_smoothing=0.0) -> FirstStep:
    """C1: the first population GD step is ``δ_1 = 2η(−ℓ'(0)) m̄`` — exactly.

    At δ = 0 every margin is 0, so ``∇L(0) = ℓ'(0) m̄`` for ANY distribution
    of ``z`` with a mean (no Gaussian hypothesis). For DPO ``ℓ'(0) = −β/2``:
    ``δ_1 = η β m̄`` and ``‖W_1 − W_0‖_F = η β ‖m̄‖/√2``; for one balanced
    behaviour ``= η β ‖μ⁺ − μ⁻‖/(2√2)``, independent of the covariance.

    Args:
      dist: distribution (vmappable). beta: β > 0. lr: η > 0 on ``W``.
      loss: name in ``dynamics.LOSSES`` (static). label_smoothing: ε for ``cdpo`` / ``robust``.

    Returns:
      :class:`FirstStep` (shapes: delta ``(d,)``, the rest scalars).

    Raises:
      ValueError: bad loss, β, η or ε (concrete values only).

    Source: docs/theory.md §4.1.
    """
    _check_loss_args(loss, beta, label_smoothing)
    check_positive("lr", lr)
    dtype = dist.mu_pos.dtype
    beta, lr, label_smoothing = (jnp.asarray(v, dtype) for v in (beta, lr, label_smoothing))
    g = initial_loss_slope(loss, beta, label_smoothing)  # −ℓ'(0) > 0
    m = dist.mean
    delta = 2.0 * lr * g * m
    first = loss_fn(loss, jnp.zeros((), dtype), beta, label_smoothing) - 2.0 * lr * g**2 * jnp.dot(m, m)
    quad = jnp.einsum("i,ij,j->", delta, _second_moment(dist), delta)
    curv = loss_curvature_bound(loss, beta, label_smoothing)
    upper = first + 0.5 * jnp.where(quad > 0, curv * quad, 0.0)
    return FirstStep(delta=delta, weight_change=jnp.linalg.norm(delta) / jnp.sqrt(2.0),
                     loss_first_order=first, loss_upper=upper)


@struct.dataclass
class C1Bands:
    """Finite-N radii for ``‖z̄_N − m̄‖`` (multiply by ``η β`` for ``‖δ̂_1 − δ_1‖``, DPO).

    Attributes:
      chebyshev: scalar ``√(tr C / (N α))`` — holds w.p. ≥ 1 − α for ANY
        finite-variance distribution of z.
      gaussian: scalar ``√(tr C/N) + √(2‖C‖_op log(1/α)/N)`` — holds w.p.
        ≥ 1 − α when z is Gaussian (see :func:`z_is_gaussian`).
      trace: ``tr C``; op_norm: ``‖C‖_op`` (C = Cov(z) of the mixture).
    """

    chebyshev: jax.Array
    gaussian: jax.Array
    trace: jax.Array
    op_norm: jax.Array


def c1_bands(dist: GaussianPreference, *, n, alpha) -> C1Bands:
    """C1 finite-sample bands for the first empirical step ``δ̂_1 = η β z̄_N``.

    ``P(‖z̄_N − m̄‖ ≥ chebyshev) ≤ α`` (Chebyshev/Markov on ``‖z̄_N − m̄‖²``,
    whose mean is ``tr C/N``) and, for Gaussian z,
    ``P(‖z̄_N − m̄‖ ≥ gaussian) ≤ α`` (Gaussian concentration of the
    1-Lipschitz norm around its mean, which is at most ``√(tr C/N)``).

    Args:
      dist: distribution (vmappable). n: sample size N ≥ 1 (scalar, may be traced).
      alpha: miss probability α ∈ (0, 1).

    Returns:
      :class:`C1Bands` of scalars (units of z; nats-free).

    Raises:
      ValueError: n < 1 or α outside (0, 1) (concrete values only).

    Source: docs/theory.md §4.1 (finite N).
    """
    if is_concrete((n, alpha)):
        if np.any(np.asarray(n) < 1):
            raise ValueError(f"n must be >= 1, got {n}; pass the sample size N")
        check_positive("alpha", alpha)
        check_in_range("alpha", alpha, 0.0, 1.0, hi_open=True)
    dtype = dist.mu_pos.dtype
    n, alpha = jnp.asarray(n, dtype), jnp.asarray(alpha, dtype)
    cov = dist.z_covariance()
    tr = jnp.trace(cov)
    op = jnp.linalg.eigvalsh(cov)[-1]
    cheb = jnp.sqrt(tr / (n * alpha))
    gauss = jnp.sqrt(tr / n) + jnp.sqrt(2.0 * jnp.maximum(op, 0.0) * jnp.log(1.0 / alpha) / n)
    return C1Bands(chebyshev=cheb, gaussian=gauss, trace=tr, op_norm=op)


def z_is_gaussian(dist: GaussianPreference, atol=1e-6):
    """True when ``z = s x`` is Gaussian: all components of positive weight share
    mean and covariance (one component, or symmetric behaviours ``μ⁻ = −μ⁺``,
    ``Σ⁻ = Σ⁺`` that all coincide). Scalar bool, vmappable.

    The Gaussian band of :func:`c1_bands` is guaranteed only then (docs/theory.md §2
    and §4.1).
    """
    c = dist.components()
    ref = jnp.argmax(c.weight)
    active = c.weight > 0
    dm = jnp.max(jnp.abs(c.mean - c.mean[ref]), axis=-1)
    ds = jnp.max(jnp.abs(c.cov - c.cov[ref]), axis=(-2, -1))
    scale = 1.0 + jnp.max(jnp.abs(c.cov[ref]))
    return jnp.all(~active | ((dm <= atol * scale) & (ds <= atol * scale)))


# ------------------------------------------------------------------------ C2
def c2_weight_change_bound(cum_batch_mean_norm, *, beta, lr, loss: str = "sigmoid", label_smoothing=0.0):
    """C2: ``‖W_t − W_0‖_op = ‖W_t − W_0‖_F ≤ √2 η sup|ℓ'| Σ_{s<t} mean_{i∈B_s} ‖x_i‖``.

    Holds for every dataset and every step of plain GD / minibatch SGD on the
    head (no distributional hypothesis); DPO has ``sup|ℓ'| = β``, so with full
    batches the bound is ``√2 η β t (1/N) Σ_i ‖x_i‖``. Not valid for momentum or
    Adam; infinite for ``ipo``.

    Args:
      cum_batch_mean_norm: ``(...,)`` Σ over the steps so far of the
        minibatch mean ‖x‖ (``EmpiricalTrajectory.cum_batch_mean_norm``).
      beta: β > 0. lr: η > 0. loss, label_smoothing: the objective.

    Returns:
      Bound on ``‖W_t − W_0‖_F``, same shape as ``cum_batch_mean_norm``.

    Raises:
      ValueError: bad loss, β, η or ε (concrete values only).

    Source: docs/theory.md §4.2.
    """
    check_positive("lr", lr)
    lip = loss_lipschitz(loss, beta, label_smoothing)
    return jnp.sqrt(2.0) * lr * lip * jnp.asarray(cum_batch_mean_norm)


# ------------------------------------------------------------------------ C3
def c3_accuracy_bound(dist: GaussianPreference, u):
    """C3: ``P(s uᵀx > 0) ≥ 1 − Σ_c π_c exp(−t_c²/2)``, ``t_c = uᵀm_c / √(uᵀS_c u)``.

    Valid for Gaussian components. The claim's hypothesis is ``uᵀm_c > 0`` for
    every component; a component with ``t_c ≤ 0`` contributes ``π_c`` (the
    trivial bound ``Φ(t_c) ≥ 0``), so the returned bound is valid for every
    ``u`` and equals the claim's formula when the hypothesis holds. With
    ``uᵀS_c u = 0`` and ``uᵀm_c > 0`` the component is always right (term 0).

    Args:
      dist: distribution (vmappable). u: ``(d,)`` the head difference
        (δ for reward accuracy, ``W_a − W_b`` for policy accuracy).

    Returns:
      ``(bound, per_behavior (K,), hypothesis_holds)``: the overall lower
      bound, the per-behaviour bounds (conditioned on k) and a bool scalar.

    Source: docs/theory.md §4.3.
    """
    c = dist.components()
    u = jnp.asarray(u, dist.mu_pos.dtype)
    num = c.mean @ u
    var = jnp.einsum("i,cij,j->c", u, c.cov, u)
    pos = num > 0
    safe_var = jnp.where(var > 0, var, 1.0)
    tail = jnp.where(var > 0, jnp.exp(-0.5 * num**2 / safe_var), 0.0)
    term = jnp.where(pos, tail, 1.0)
    k = dist.num_behaviors
    per = 1.0 - jax.ops.segment_sum(c.weight * term, c.behavior, k) / dist.weight
    holds = jnp.all(pos | (c.weight <= 0))
    return 1.0 - jnp.sum(c.weight * term), per, holds


def c3_first_step_bound(dist: GaussianPreference):
    """C3 at the first step (``δ_1 ∝ m̄``): ``(bound, per_behavior (K,), hypothesis_holds)``.

    Source: docs/theory.md §4.3.
    """
    return c3_accuracy_bound(dist, dist.mean)


def c3_isotropic_bound(distinguishability, sigma):
    """C3 for one balanced symmetric behaviour with ``Σ = σ² I``: ``1 − exp(−Δ²/(8σ²))``.

    Distinguishability Δ = ‖μ⁺ − μ⁻‖ against concentration σ². Arrays
    broadcast. Raises ValueError for σ ≤ 0 or Δ < 0 (concrete values).
    Source: docs/theory.md §4.3.
    """
    check_positive("sigma", sigma)
    check_positive("distinguishability", distinguishability, allow_zero=True)
    dist_ = jnp.asarray(distinguishability, _dtype(distinguishability, sigma))
    return 1.0 - jnp.exp(-(dist_**2) / (8.0 * jnp.asarray(sigma, dist_.dtype) ** 2))


# ------------------------------------------------------------------------ C4
def c4_initial_loss_rates(dist: GaussianPreference, *, beta, loss: str = "sigmoid", label_smoothing=0.0):
    """C4: per-behaviour loss rates at δ = 0 under gradient flow ``dδ/dτ = −2∇L``.

    ``dL_k/dτ = ∇L_k(0)ᵀ (−2∇L(0)) = −2 ℓ'(0)² m_kᵀ m̄`` (DPO:
    ``−(β²/2) m_kᵀ m̄``), with ``m_k`` the mean of z given behaviour k. Holds for
    any distribution with means (no Gaussian hypothesis). A behaviour with
    ``m_kᵀ m̄ < 0`` first gets worse. For two balanced, equally weighted
    behaviours ``rate_1 − rate_2 ∝ −gap_12``: the sign of the priority gap
    says which one is learned first.

    Args:
      dist: distribution (vmappable). beta: β > 0. loss, label_smoothing: the objective.

    Returns:
      ``(K,)`` rates in nats per unit τ = η·steps (negative = loss falls).

    Source: docs/theory.md §4.4.
    """
    g = initial_loss_slope(loss, beta, label_smoothing)
    return -2.0 * g**2 * (dist.behavior_mean @ dist.mean)


def c4_first_step_loss_change(dist: GaussianPreference, *, beta, lr, loss: str = "sigmoid", label_smoothing=0.0):
    """C4 over one GD step: bounds on ``L_k(δ_1) − L_k(0)`` per behaviour.

    By convexity of ℓ, ``L_k(δ_1) − L_k(0) ≥ ∇L_k(0)ᵀδ_1 = η · rate_k``; by
    ``ℓ'' ≤ sup ℓ''``, it is ``≤ η · rate_k + ½ sup ℓ'' · δ_1ᵀ E[zzᵀ|k] δ_1``.

    Returns:
      ``(lower (K,), upper (K,))`` in nats (upper is +inf for ``hinge``).

    Source: docs/theory.md §4.4.
    """
    step = c1_first_step(dist, beta=beta, lr=lr, loss=loss, label_smoothing=label_smoothing)
    lower = lr * c4_initial_loss_rates(dist, beta=beta, loss=loss, label_smoothing=label_smoothing)
    c = dist.components()
    k = dist.num_behaviors
    # E[(δᵀz)² | k] = Σ_{c∈k} π_c/ω_k ((δᵀm_c)² + δᵀS_cδ)
    quad_c = (c.mean @ step.delta) ** 2 + jnp.einsum("i,cij,j->c", step.delta, c.cov, step.delta)
    quad = jax.ops.segment_sum(c.weight * quad_c, c.behavior, k) / dist.weight
    curv = loss_curvature_bound(loss, beta, label_smoothing)
    upper = lower + 0.5 * jnp.where(quad > 0, curv * quad, 0.0)
    return lower, upper


# ------------------------------------------------------------------------ C5
def c5_scale_separation(dist: GaussianPreference, kappa) -> GaussianPreference:
    """``μ_k^± → (μ_k⁺ + μ_k⁻)/2 ± κ (μ_k⁺ − μ_k⁻)/2``: distinguishability × κ, same midpoints
    and covariances (docs/theory.md §4.5: the model of an aligned model's embeddings).

    Args: dist (vmappable); kappa: scalar κ > 0 (the claim uses κ ≥ 1).
    Raises ValueError for κ ≤ 0 (concrete values).
    """
    return transforms.scale_separation(dist, kappa)


def c5_flip_labels(dist: GaussianPreference) -> GaussianPreference:
    """Preference labels flipped (``s → −s``, chosen ↔ rejected): the misalignment data.

    ``x | s' = +1`` is the old ``x | s = −1``, so ``μ^±`` and ``Σ^±`` swap and
    ``p_k → 1 − p_k``; ``m̄ → −m̄``. For any head, accuracy on the flipped
    labels is ``1 −`` accuracy on the original ones (no ties: Gaussian).
    Source: docs/theory.md §4.5.
    """
    return transforms.flip_labels(dist)


def c5_aligned_head(dist: GaussianPreference, *, beta, lr, steps: int, loss: str = "sigmoid",
                    label_smoothing=0.0, vocab_size: int = 2) -> Head:
    """Head aligned by ``steps`` of population GD from ``W = 0``, used as reference AND start.

    Returns ``Head.create(w_ref=W_A, w_init=W_A)`` with ``W_A`` the full
    ``(vocab_size, d)`` head after alignment (rows a = 0, b = 1), so a DPO run
    from it has ``δ_0 = 0`` and ``u_ref = δ_A``. ``steps`` is static.
    Source: docs/theory.md §4.5.
    """
    check_int("vocab_size", vocab_size, minimum=2)
    traj = population_trajectory(dist, beta=beta, lr=lr, steps=steps, loss=loss, label_smoothing=label_smoothing,
                                 record_every=steps if steps > 0 else 1)
    base = Head.zeros(dist.dim, vocab_size=vocab_size, dtype=dist.mu_pos.dtype)
    w_a = base.with_delta(traj.delta[-1])
    return Head.create(w_ref=w_a, w_init=w_a)


@struct.dataclass
class Misalignment:
    """C5 population prediction of misalignment (flipped-label DPO from an aligned head).

    Attributes:
      head: the aligned :class:`Head` (reference and start).
      loss: ``(T,)`` misalignment (flipped-label) DPO loss at steps ``0..steps`` (nats).
      flipped_accuracy: ``(T,)`` policy accuracy on the flipped labels.
      original_accuracy: ``(T,)`` policy accuracy on the original labels
        (``1 − flipped_accuracy``: no ties under Gaussian embeddings).
      steps_until_flip: float scalar, first step with ``original_accuracy < 1/2``
        (NaN when it never happens within ``steps``; :func:`first_step_below`).
      aligned_accuracy: scalar, the aligned head's policy accuracy on the
        original labels (``original_accuracy[0]``).
    """

    head: Head
    loss: jax.Array
    flipped_accuracy: jax.Array
    original_accuracy: jax.Array
    steps_until_flip: jax.Array
    aligned_accuracy: jax.Array


def first_step_where(condition, step=None):
    """First recorded step where ``condition`` holds; **NaN when it never does**.

    The one "first step" convention of the package (C5's steps until flip, the
    sims' time-to-threshold tables): the step number of the first ``True`` along
    the last axis, as a float, and NaN (not a sentinel step) where no record
    satisfies the condition, so ``nanmean``/plots skip it and no valid step is
    mistaken for "never".

    Args:
      condition: ``(..., T)`` bool, one per recorded step.
      step: ``(T,)`` the recorded step numbers (default ``0..T−1``). Vmappable.

    Returns:
      ``(...)`` float array (the default float dtype): a step number or NaN.

    Raises:
      ValueError: ``step`` does not have shape ``(T,)``.

    Source: docs/theory.md §4.5.
    """
    cond = jnp.asarray(condition).astype(bool)
    t = cond.shape[-1]
    step = jnp.arange(t) if step is None else jnp.asarray(step)
    if step.shape != (t,):
        raise ValueError(f"step has shape {step.shape}; pass one step number per record, shape ({t},)")
    dtype = jnp.result_type(float)
    hit = jnp.any(cond, axis=-1)
    return jnp.where(hit, step.astype(dtype)[jnp.argmax(cond, axis=-1)], jnp.asarray(jnp.nan, dtype))


def first_step_below(curve, threshold=0.5, step=None):
    """First recorded step where ``curve < threshold``; NaN when never (:func:`first_step_where`).

    Args:
      curve: ``(..., T)`` values at recorded steps; threshold: scalar (or
        broadcastable to ``curve``); step: ``(T,)`` their step numbers
        (default ``0..T−1``). Vmappable.

    Returns:
      ``(...)`` float array (a step number, or NaN).

    Source: docs/theory.md §4.5 (steps until the policy's accuracy falls below 1/2).
    """
    return first_step_where(jnp.asarray(curve) < threshold, step)


def c5_misalignment(dist: GaussianPreference, kappa, *, beta, lr, steps: int, align_steps: int,
                    align_lr=None, align_beta=None, loss: str = "sigmoid", label_smoothing=0.0) -> Misalignment:
    """C5: population misalignment of a head aligned on κ-separated embeddings.

    1. ``dist_κ = c5_scale_separation(dist, κ)``;
    2. ``W_A`` from ``align_steps`` population GD steps (lr ``align_lr``,
       default ``lr``) on ``dist_κ`` (:func:`c5_aligned_head`);
    3. DPO with flipped labels on ``dist_κ`` with ``W_A`` as reference and start,
       ``steps`` population GD steps of lr η.

    By C1 the first misalignment step is ``η β κ``-proportional (``m̄`` scales
    with κ for balanced behaviours), so the misalignment loss falls faster and
    the policy flips sooner for larger κ (docs/theory.md §4.5).

    Args:
      dist: base distribution (vmappable). kappa: κ > 0 (vmappable).
      beta, lr: β and η of the misalignment run. steps, align_steps: static ints.
      align_lr: η of the alignment run (default ``lr``). loss, label_smoothing: objective of both runs.

    Returns:
      :class:`Misalignment`.

    Raises:
      ValueError: bad κ, β, η, loss, ε or step counts (concrete values).
    """
    align_lr = lr if align_lr is None else align_lr
    align_beta = beta if align_beta is None else align_beta
    scaled = c5_scale_separation(dist, kappa)
    head = c5_aligned_head(scaled, beta=align_beta, lr=align_lr, steps=align_steps, loss=loss, label_smoothing=label_smoothing)
    traj = population_trajectory(c5_flip_labels(scaled), beta=beta, lr=lr, steps=steps, loss=loss,
                                 label_smoothing=label_smoothing, head=head)
    flipped = traj.metrics["policy_accuracy"]
    original = 1.0 - flipped
    return Misalignment(head=head, loss=traj.metrics["loss"], flipped_accuracy=flipped,
                        original_accuracy=original,
                        steps_until_flip=first_step_below(original, 0.5, traj.step),
                        aligned_accuracy=gaussian_accuracy(scaled, head.u_ref)[0])
