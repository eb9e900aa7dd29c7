"""Distribution transforms, defined once: label flip, κ separation, preference directions from angles.

Every place that builds or changes a :class:`~dynamics.GaussianPreference` this way calls these
(``GaussianPreference.from_angles``, :mod:`dynamics.theory` C5, ``sims/sweep/build.py``'s
``build_distribution``, ``sims/real.py``), so the population layer, the empirical layer and the
sweep see the same law. All functions are pure JAX and traceable (``jax.vmap`` over stacked
distributions or parameters); the checks run on concrete values only.

Label noise (a flip of *some* labels) is not a distribution transform here: the population layer
mixes ``z`` and ``−z`` (``population.training_components``) and the empirical layer flips sampled
labels (``empirical.noisy_labels``) — one definition per layer, docs/theory.md §5.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ._checks import check_positive, is_concrete

__all__ = ["flip_labels", "scale_separation", "angle_cosines", "preference_directions", "check_angles",
           "cholesky_psd"]

#: units accepted by :func:`angle_cosines` and the largest angle between two directions in each
ANGLE_UNITS = {"degrees": 180.0, "radians": math.pi}


def flip_labels(dist, flip=True):
    """Every preference label flipped (``s → −s``, chosen ↔ rejected): ``z → −z``.

    ``x | s' = +1`` is the old ``x | s = −1``, so ``μ^±`` and ``Σ^±`` swap and
    ``p_k → 1 − p_k``; ``m̄ → −m̄``, and a head's accuracy on the flipped labels is
    ``1 −`` its accuracy on the original ones (no ties: Gaussian). Source: docs/theory.md §4.5
    (C5, the misalignment data).

    Args:
      dist: :class:`~dynamics.GaussianPreference` (K, d), vmappable.
      flip: bool, or a traced bool scalar (then the result is selected with ``jnp.where``).

    Returns:
      A distribution of the same shapes.
    """
    if isinstance(flip, (bool, np.bool_)):
        if not flip:
            return dist
        return dist.replace(mu_pos=dist.mu_neg, mu_neg=dist.mu_pos, cov_pos=dist.cov_neg,
                            cov_neg=dist.cov_pos, p_pos=1.0 - dist.p_pos)
    f = jnp.asarray(flip, bool)
    sel = lambda a, b: jnp.where(f, b, a)
    return dist.replace(mu_pos=sel(dist.mu_pos, dist.mu_neg), mu_neg=sel(dist.mu_neg, dist.mu_pos),
                        cov_pos=sel(dist.cov_pos, dist.cov_neg), cov_neg=sel(dist.cov_neg, dist.cov_pos),
                        p_pos=sel(dist.p_pos, 1.0 - dist.p_pos))


def scale_separation(dist, kappa):
    """``μ_k^± → (μ_k⁺ + μ_k⁻)/2 ± κ (μ_k⁺ − μ_k⁻)/2``: distinguishability × κ, same midpoints,
    covariances, p and weights (docs/theory.md §4.5: the C5 model of an aligned model's embeddings).

    Args:
      dist: :class:`~dynamics.GaussianPreference`, vmappable. kappa: scalar κ > 0 (may be traced).

    Raises:
      ValueError: κ ≤ 0 (concrete values).
    """
    check_positive("kappa", kappa)
    kappa = jnp.asarray(kappa, dist.mu_pos.dtype)
    mid = (dist.mu_pos + dist.mu_neg) / 2.0
    half = (dist.mu_pos - dist.mu_neg) / 2.0
    return dist.replace(mu_pos=mid + kappa * half, mu_neg=mid - kappa * half)


def check_angles(name: str, angles, unit: str) -> None:
    """An angle between two directions lies in ``[0, 180]`` degrees (``[0, π]`` radians).

    A value outside is almost always the other unit (``angles=90`` meant as degrees where radians are
    expected). Concrete values only; diagonal entries of a ``(K, K)`` matrix are ignored.

    Raises:
      ValueError: naming ``name``, the unit and the fix.
    """
    if unit not in ANGLE_UNITS:
        raise ValueError(f"unit must be one of {list(ANGLE_UNITS)}, got {unit!r}")
    if not is_concrete(angles):
        return
    a = np.asarray(angles, dtype=float)
    if a.ndim == 2 and a.shape[0] == a.shape[1]:
        a = a[~np.eye(a.shape[0], dtype=bool)]
    hi = ANGLE_UNITS[unit]
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf; pass finite angles in {unit}")
    if np.any((a < 0) | (a > hi * (1 + 1e-12))):
        bad = float(a[(a < 0) | (a > hi * (1 + 1e-12))][0])
        if unit == "radians":
            fix = f"it is in radians — pass math.radians({bad:g}) (or angles_deg={bad:g})"
        else:
            fix = "it is in degrees — pass math.degrees(...) of a radian value"
        raise ValueError(f"{name}={bad:g} is outside [0, {'π' if unit == 'radians' else '180'}]; {fix}")


def angle_cosines(angles, k: int, *, unit: str):
    """The ``(K, K)`` cosine (Gram) matrix of K unit directions with the given pairwise angles.

    ``cos θ`` is computed as ``sin(90° − θ)``: exactly 0 at 90° and ±1 at 0°/180° in float32, so
    "orthogonal" behaviours are exactly orthogonal (a 1e-8 leak is amplified by Adam's
    per-coordinate scaling). The diagonal is 1.

    Args:
      angles: scalar (every pair) or ``(K, K)`` symmetric, in ``unit``; may be traced.
      k: number of directions K (static).
      unit: ``"degrees"`` or ``"radians"`` (keyword: the unit is always explicit).

    Returns:
      ``(K, K)`` array of the dtype of ``angles`` (float).

    Raises:
      ValueError: an angle outside ``[0, 180°]`` (:func:`check_angles`) or a bad shape.
    """
    check_angles("angles", angles, unit)
    ang = jnp.asarray(angles)
    ang = ang.astype(jnp.result_type(ang, float))
    if ang.ndim == 0:
        ang = jnp.full((k, k), ang)
    if ang.shape != (k, k):
        raise ValueError(f"angles has shape {ang.shape}; expected a scalar or (K, K) = ({k}, {k})")
    right = jnp.asarray(90.0 if unit == "degrees" else math.pi / 2, ang.dtype)
    rad = jnp.deg2rad(right - ang) if unit == "degrees" else right - ang
    cos = jnp.sin(rad)
    return jnp.where(jnp.eye(k, dtype=bool), jnp.ones((), ang.dtype), cos)


def cholesky_psd(g):
    """Lower Cholesky factor ``L`` (``L Lᵀ = g``) of a small PSD ``(K, K)`` matrix, clipping negative
    pivots to 0 (so it also works when ``g`` is singular); traceable (an unrolled K² loop)."""
    k = g.shape[0]
    lower = jnp.zeros_like(g)
    for j in range(k):
        diag = g[j, j] - jnp.sum(lower[j, :j] ** 2)
        ljj = jnp.sqrt(jnp.maximum(diag, 0.0))
        lower = lower.at[j, j].set(ljj)
        for i in range(j + 1, k):
            val = (g[i, j] - jnp.sum(lower[i, :j] * lower[j, :j])) / jnp.where(ljj > 0, ljj, 1.0)
            lower = lower.at[i, j].set(jnp.where(ljj > 0, val, 0.0))
    return lower


def preference_directions(distinguishability, cosines, d: int):
    """Preference directions ``b_k = Δ_k · row k of L`` padded to ``d``, with ``L Lᵀ = cosines``.

    Behaviour 0 lies along e₁, behaviour 1 in the e₁–e₂ plane, … (the lower-triangular Cholesky
    basis), so ``‖b_k‖ = Δ_k``, ``cos∠(b_i, b_j) = cosines[i, j]``, and K = 1 gives ``Δ e₁``
    (``GaussianPreference.single``). The basis matters beyond the Gram matrix: Adam is not
    rotation-invariant (docs/sweeps.md).

    Args:
      distinguishability: ``(K,)`` Δ_k ≥ 0 (may be traced).
      cosines: ``(K, K)`` PSD cosine matrix (:func:`angle_cosines`).
      d: embedding dimension ≥ K (static).

    Returns:
      ``(K, d)`` array ``b`` (``μ_k^± = ±b_k/2`` for balanced behaviours).

    Raises:
      ValueError: ``d < K`` or shapes that disagree.
    """
    dist_ = jnp.atleast_1d(jnp.asarray(distinguishability))
    dist_ = dist_.astype(jnp.result_type(dist_, float))
    k = dist_.shape[0]
    if d < k:
        raise ValueError(f"d={d} is smaller than K={k} behaviours; pass d >= {k}")
    cosines = jnp.asarray(cosines, dist_.dtype)
    if cosines.shape != (k, k):
        raise ValueError(f"cosines has shape {cosines.shape}; expected (K, K) = ({k}, {k})")
    rows = cholesky_psd(cosines) if k > 1 else jnp.ones((1, 1), dist_.dtype)
    dirs = jnp.zeros((k, d), dist_.dtype).at[:, :k].set(rows)
    return dist_[:, None] * dirs
