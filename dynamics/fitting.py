"""Gaussian fit of labelled embeddings and the per-behaviour properties of data.

Given prompt embeddings ``x (n, d)``, preference labels ``s (n,) ∈ {±1}`` and
behaviour indices ``behavior (n,)``, :func:`fit_gaussian` returns the
:class:`~dynamics.GaussianPreference` whose class-conditional means and
covariances are the sample moments of each (behaviour, class) cell — the
docs/theory.md §2.4 ``.npz`` format that real embeddings are turned into, and the
input of the analytic layer (docs/theory.md §3).

:func:`behavior_properties` reports, per behaviour, the counts, the class
balance and the authors' properties (distinguishability, concentration,
trace, priority gap; docs/theory.md §2.3). They are read off the unshrunk fit through
the :class:`~dynamics.GaussianPreference` properties, so the numbers of
``dpo-sims properties`` and of a fitted distribution are the same by
construction.

Moments are computed in float64 NumPy (this is data preparation, not traced).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_choice
from .distributions import GaussianPreference

__all__ = ["fit_gaussian", "behavior_properties", "BehaviorProperties", "ledoit_wolf_shrinkage"]


def ledoit_wolf_shrinkage(x) -> float:
    """Ledoit–Wolf (2004) optimal shrinkage intensity ``α ∈ [0, 1]`` of the sample
    covariance of ``x (n, d)`` towards ``(tr S / d) I``.

    The estimate of Ledoit & Wolf, "A well-conditioned estimator for
    large-dimensional covariance matrices" (J. Multivar. Anal. 2004), in the
    form scikit-learn's ``ledoit_wolf_shrinkage`` computes (data centred at
    the sample mean)::

        S = XᵀX/n,  μ = tr S / d,  δ² = ‖S − μI‖_F² / d,
        β² = min(δ², (1/(n² d)) Σ_i ‖x_i x_iᵀ − S‖_F²),  α = β² / δ².

    Returns 0 for ``n < 2`` or when ``S`` is already a multiple of ``I``.
    Raises ValueError for a non-2D or non-finite ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x has shape {x.shape}; expected (n, d)")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or inf; pass finite embeddings")
    n, d = x.shape
    if n < 2:
        return 0.0
    xc = x - x.mean(axis=0)
    x2 = xc**2
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta = (np.sum(s**2) - 2.0 * mu * np.trace(s) + d * mu**2) / d  # ‖S − μI‖_F² / d
    # (1/n) Σ_i ‖x_i x_iᵀ‖_F² = (1/n) Σ_i ‖x_i‖⁴ ; Σ_i ‖x_i x_iᵀ − S‖_F² = Σ‖x_i‖⁴ − n‖S‖_F²
    beta = (np.sum(x2.sum(axis=1) ** 2) / n - np.sum(s**2)) / (d * n)
    beta = min(beta, delta)
    return 0.0 if delta <= 0 or beta <= 0 else float(beta / delta)


def _check_data(x, s, behavior, num_behaviors):
    x = np.asarray(x)
    s = np.asarray(s)
    behavior = np.asarray(behavior)
    if x.ndim != 2:
        raise ValueError(f"x has shape {x.shape}; expected (n, d) embeddings")
    n = x.shape[0]
    if s.shape != (n,) or behavior.shape != (n,):
        raise ValueError(f"x (n, d) = {x.shape} needs s (n,) and behavior (n,); got s {s.shape}, behavior {behavior.shape}")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0].tolist()
        raise ValueError(f"x contains NaN or inf (first at index {bad}); pass finite embeddings")
    if not np.all(np.abs(s) == 1):
        bad = np.unique(s[np.abs(s) != 1])[:5]
        raise ValueError(f"s holds {bad.tolist()}; labels must be +1 (chosen = 'Yes') or -1 (chosen = 'No')")
    if not np.issubdtype(behavior.dtype, np.integer):
        raise ValueError(f"behavior has dtype {behavior.dtype}; pass integer behaviour indices")
    k = int(behavior.max()) + 1 if num_behaviors is None else int(num_behaviors)
    if n and (behavior.min() < 0 or behavior.max() >= k):
        raise ValueError(f"behavior indices span [{behavior.min()}, {behavior.max()}]; they must lie in [0, K={k})")
    return np.asarray(x, np.float64), s.astype(np.int64), behavior.astype(np.int64), k


def _cells(x, s, behavior, k, names, min_per_class):
    """Per (behaviour, class) rows, checking each cell has enough samples."""
    cells = {}
    for kk in range(k):
        for sign in (1, -1):
            rows = x[(behavior == kk) & (s == sign)]
            if rows.shape[0] < min_per_class:
                cls = "s=+1 ('Yes' chosen)" if sign > 0 else "s=-1 ('No' chosen)"
                raise ValueError(
                    f"behaviour {kk} ({names[kk]!r}) has {rows.shape[0]} sample(s) with {cls}; the fit needs at "
                    f"least {min_per_class} per class — add statements of that class or drop the behaviour")
            cells[kk, sign] = rows
    return cells


def fit_gaussian(x, s, behavior, *, num_behaviors: int | None = None, names=None, shrinkage=None,
                 weight: str = "count") -> GaussianPreference:
    """Fit a :class:`~dynamics.GaussianPreference` to labelled embeddings.

    ``μ_k^±`` is the mean and ``Σ_k^±`` the unbiased sample covariance
    (divisor ``n − 1``, as ``np.cov``) of the rows of behaviour ``k`` with label
    ``±1``; ``p_k`` is the fraction of label +1 in behaviour ``k``.

    Args:
      x: ``(n, d)`` embeddings. s: ``(n,)`` labels ±1 (+1: chosen = "Yes").
      behavior: ``(n,)`` int behaviour index in ``[0, K)``.
      num_behaviors: K (default ``max(behavior) + 1``).
      names: ``K`` behaviour names (default ``behavior_k``).
      shrinkage: ``None`` (plain sample covariance), ``"ledoit-wolf"``
        (per cell, :func:`ledoit_wolf_shrinkage`), or a float ``α ∈ [0, 1]``.
        With α the covariance is ``(1 − α) S + α (tr S / d) I`` — use it when
        the per-class count is close to or below ``d`` (``S`` is then singular
        or badly conditioned).
      weight: ``"count"`` (``ω_k = n_k / n``, the data's own mixture) or
        ``"uniform"`` (``ω_k = 1/K``).

    Returns:
      the fitted distribution (float32 unless x64 is enabled); ``names`` set.

    Raises:
      ValueError: shapes that disagree, non-finite ``x``, labels not ±1,
        behaviour indices out of range, a (behaviour, class) cell with fewer
        than 2 samples, a bad ``shrinkage`` or ``weight``.

    Memory: ``2 K d²`` floats (e.g. 0.15 GB for K = 125, d = 384 in float32).
    Source: docs/theory.md §2.3 (properties) and §2.4 (interchange format).
    """
    x, s, behavior, k = _check_data(x, s, behavior, num_behaviors)
    names = tuple(f"behavior_{i}" for i in range(k)) if names is None else tuple(str(v) for v in names)
    if len(names) != k:
        raise ValueError(f"names has {len(names)} entries; expected K = {k}")
    check_choice("weight", weight, ("count", "uniform"))
    if isinstance(shrinkage, str):
        check_choice("shrinkage", shrinkage, ("none", "ledoit-wolf"))
        shrinkage = None if shrinkage == "none" else shrinkage
    elif shrinkage is not None:
        alpha = float(shrinkage)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"shrinkage must be None, 'ledoit-wolf' or a float in [0, 1], got {shrinkage!r}")
    d = x.shape[1]
    cells = _cells(x, s, behavior, k, names, min_per_class=2)
    mu = np.zeros((2, k, d))
    cov = np.zeros((2, k, d, d))
    for (kk, sign), rows in cells.items():
        i = 0 if sign > 0 else 1
        mu[i, kk] = rows.mean(axis=0)
        c = np.cov(rows, rowvar=False, ddof=1).reshape(d, d)
        if shrinkage is not None:
            alpha = ledoit_wolf_shrinkage(rows) if shrinkage == "ledoit-wolf" else float(shrinkage)
            c = (1.0 - alpha) * c + alpha * (np.trace(c) / d) * np.eye(d)
        cov[i, kk] = (c + c.T) / 2.0
    counts = np.bincount(behavior, minlength=k).astype(np.float64)
    p_pos = np.array([np.mean(s[behavior == kk] > 0) for kk in range(k)])
    w = counts / counts.sum() if weight == "count" else np.full(k, 1.0 / k)
    return GaussianPreference.create(mu[0], mu[1], cov[0], cov[1], p_pos=p_pos, weight=w, names=names)


class BehaviorProperties(NamedTuple):
    """Per-behaviour properties of labelled embeddings (docs/theory.md §2.3).

    Attributes:
      names: ``K`` behaviour names.
      n, n_pos, n_neg: ``(K,)`` int counts (all, label +1, label −1).
      p_pos: ``(K,)`` class balance, the fraction with label +1 ("Yes" chosen).
      distinguishability: ``(K,)`` ``‖μ_k⁺ − μ_k⁻‖``.
      concentration: ``(K,)`` ``max(‖Σ_k⁺‖_op, ‖Σ_k⁻‖_op)``.
      trace: ``(K,)`` ``max(tr Σ_k⁺, tr Σ_k⁻)``.
      priority_gap: ``(K, K)`` the authors' priority gap of ``b_k = μ_k⁺ − μ_k⁻``.
    All float arrays are NumPy float64 copies of the fitted distribution's properties.
    """

    names: tuple
    n: np.ndarray
    n_pos: np.ndarray
    n_neg: np.ndarray
    p_pos: np.ndarray
    distinguishability: np.ndarray
    concentration: np.ndarray
    trace: np.ndarray
    priority_gap: np.ndarray


def behavior_properties(x, s, behavior, *, num_behaviors: int | None = None, names=None) -> BehaviorProperties:
    """Counts, class balance and the authors' properties of each behaviour.

    The moments are those of :func:`fit_gaussian` without shrinkage (unbiased
    sample covariances); the properties are the
    :class:`~dynamics.GaussianPreference` ones of that fit.

    Args/Raises: as in :func:`fit_gaussian`.
    Returns: :class:`BehaviorProperties`.
    Source: docs/theory.md §2.
    """
    dist = fit_gaussian(x, s, behavior, num_behaviors=num_behaviors, names=names)
    _, s_, b_, k = _check_data(np.zeros((len(s), 1)), s, behavior, num_behaviors)
    n_pos = np.bincount(b_[s_ > 0], minlength=k)
    n_neg = np.bincount(b_[s_ < 0], minlength=k)
    f64 = lambda v: np.asarray(v, dtype=np.float64)
    return BehaviorProperties(
        names=dist.names, n=n_pos + n_neg, n_pos=n_pos, n_neg=n_neg, p_pos=f64(dist.p_pos),
        distinguishability=f64(dist.distinguishability), concentration=f64(dist.concentration),
        trace=f64(dist.trace), priority_gap=f64(dist.priority_gap))
