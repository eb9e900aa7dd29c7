"""Preference distributions: K behaviours, each a pair of class-conditional laws.

``x | (k, s=+1) ~ N(μ_k⁺, Σ_k⁺)`` and ``x | (k, s=−1) ~ N(μ_k⁻, Σ_k⁻)``; behaviour
``k`` has weight ``ω_k`` (Σω = 1) and probability ``p_k`` that its preferred
answer is ``a`` ("Yes", ``s = +1``). docs/theory.md §2.1.

The analytic layer works with ``z = s x``, a mixture over the ``2K``
components ``c = (k, s)`` (:meth:`GaussianPreference.components`).
"""
from __future__ import annotations

import os
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ._checks import (check_finite, check_in_range, check_int, check_numeric, check_positive, is_concrete,
                      traced_require)

__all__ = [
    "GaussianPreference",
    "Components",
    "isotropic_cov",
    "diagonal_cov",
    "priority_gap",
]

_NPZ_KEYS = ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos", "weight")


def _float(x, name: str | None = None):
    """``x`` as the default float dtype; with ``name``, refuse strings / objects / complex first (named)."""
    if name is not None:
        check_numeric(name, x)
    return jnp.asarray(x, dtype=jnp.result_type(float))


def isotropic_cov(sigma, d: int, k: int | None = None):
    """``σ² I_d`` covariance, shape ``(d, d)``, or ``(K, d, d)`` when ``k`` is given.

    ``sigma`` may be a scalar or, with ``k``, shape ``(K,)`` (one σ per behaviour).
    """
    sigma = _float(sigma)
    eye = jnp.eye(d, dtype=sigma.dtype)
    if k is None:
        return sigma**2 * eye
    return jnp.broadcast_to(sigma, (k,))[:, None, None] ** 2 * eye


def diagonal_cov(variances):
    """Diagonal covariance from variances ``(..., d)`` → ``(..., d, d)``."""
    v = _float(variances)
    return v[..., :, None] * jnp.eye(v.shape[-1], dtype=v.dtype)


def priority_gap(b):
    """Priority-gap matrix of preference directions ``b (K, d)`` → ``(K, K)``.

    ``gap_ij = (b_i − b_j)ᵀ b̄ / (‖b̄‖ · max(‖b_i‖, ‖b_j‖))`` with
    ``b̄ = (b_i + b_j)/2`` (docs/theory.md §2.3, the authors' definition). Positive
    ``gap_ij`` predicts behaviour ``i`` is learned before ``j`` (claim C4).
    Diagonal entries are 0.
    """
    b = _float(b)
    bi, bj = b[:, None, :], b[None, :, :]
    bbar = (bi + bj) / 2.0
    num = jnp.sum((bi - bj) * bbar, axis=-1)
    nb = jnp.linalg.norm(b, axis=-1)
    den = jnp.linalg.norm(bbar, axis=-1) * jnp.maximum(nb[:, None], nb[None, :])
    gap = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return gap * (1.0 - jnp.eye(b.shape[0], dtype=gap.dtype))


def _names(names, k: int) -> tuple:
    """Behaviour names as a K-tuple of str (default ``behavior_i``); one string names K = 1."""
    if names is None:
        return tuple(f"behavior_{i}" for i in range(k))
    if isinstance(names, (str, bytes)) or np.ndim(names) == 0:
        one = names.item() if isinstance(names, np.ndarray) else names
        one = one.decode() if isinstance(one, bytes) else str(one)
        if k != 1:
            raise ValueError(f"names is one name ({one!r}) but K = {k}; pass a list of {k} names")
        return (one,)
    return tuple(str(n) for n in np.asarray(names, dtype=object).reshape(-1)) if np.ndim(names) > 1 else \
        tuple(str(n) for n in names)


class Components(NamedTuple):
    """The ``2K`` Gaussian components of ``z = s x`` (component ``2k`` is ``s=+1``).

    weight ``(2K,)`` = π_c; mean ``(2K, d)`` = m_c = s μ_k^s; cov ``(2K, d, d)``;
    behavior ``(2K,)`` int; sign ``(2K,)`` ∈ {+1, −1}.
    """

    weight: jax.Array
    mean: jax.Array
    cov: jax.Array
    behavior: jax.Array
    sign: jax.Array


@struct.dataclass
class GaussianPreference:
    """K behaviours of Gaussian class-conditional prompt embeddings (a pytree).

    Attributes:
      mu_pos: ``(K, d)`` mean of ``x`` when the preferred answer is ``a`` (s = +1).
      mu_neg: ``(K, d)`` mean of ``x`` when the preferred answer is ``b`` (s = −1).
      cov_pos, cov_neg: ``(K, d, d)`` symmetric PSD covariances.
      p_pos: ``(K,)`` probability that behaviour k's preferred answer is ``a``.
      weight: ``(K,)`` behaviour weights ω_k, summing to 1.
      names: behaviour names (static, not a leaf).

    All array fields are leaves, so ``jax.vmap`` maps over stacked
    distributions (leading axis on every field). Build with :meth:`create`,
    :meth:`single` or :meth:`from_angles` (they validate); a distribution built
    directly is validated by the public dynamics entry points.
    Source: docs/theory.md §2.
    """

    mu_pos: jax.Array
    mu_neg: jax.Array
    cov_pos: jax.Array
    cov_neg: jax.Array
    p_pos: jax.Array
    weight: jax.Array
    names: tuple = struct.field(pytree_node=False, default=())

    # ------------------------------------------------------------------ build
    @classmethod
    def create(cls, mu_pos, mu_neg, cov_pos, cov_neg=None, p_pos=0.5, weight=None, names=None, *,
               cov_layout: str | None = None):
        """Validated constructor with broadcasting.

        ``mu_pos``/``mu_neg``: ``(K, d)`` (or ``(d,)`` for K = 1). Covariances may be
        a scalar variance, ``(d,)`` / ``(K, d)`` variances (diagonal) or full
        ``(d, d)`` / ``(K, d, d)``; ``cov_neg`` defaults to ``cov_pos``.
        ``p_pos`` scalar or ``(K,)``; ``weight`` defaults to uniform. ``names``: K strings
        (a single string, or a 0-d string array, names the one behaviour of K = 1).

        A 2-D covariance of shape ``(K, d)`` with ``K = d > 1`` could be per-behaviour
        variances or one shared ``(d, d)`` covariance: pass ``cov_layout="variances"`` or
        ``cov_layout="covariance"`` to say which (it is refused otherwise).

        Raises:
          ValueError: naming the field for a shape mismatch, an ambiguous ``(K, d)`` = ``(d, d)``
            covariance without ``cov_layout``, a negative variance, a covariance that
            is not symmetric PSD, ``p_pos`` outside [0, 1], weights that are
            negative or do not sum to 1, strings or complex numbers, or NaN/inf anywhere.
        """
        if cov_layout not in (None, "variances", "covariance"):
            raise ValueError(f"cov_layout={cov_layout!r}; pass 'variances' ((K, d) diagonals), 'covariance' "
                             "(one (d, d) matrix) or None")
        mu_pos, mu_neg = _float(mu_pos, "mu_pos"), _float(mu_neg, "mu_neg")
        if mu_pos.ndim == 1:
            mu_pos = mu_pos[None]
        if mu_neg.ndim == 1:
            mu_neg = mu_neg[None]
        if mu_pos.ndim != 2 or mu_pos.shape != mu_neg.shape:
            raise ValueError(
                f"mu_pos has shape {mu_pos.shape} and mu_neg {mu_neg.shape}; "
                "both must be (K, d) with the same K and d"
            )
        k, d = mu_pos.shape
        cov_pos = cls._broadcast_cov("cov_pos", cov_pos, k, d, cov_layout)
        cov_neg = cov_pos if cov_neg is None else cls._broadcast_cov("cov_neg", cov_neg, k, d, cov_layout)
        p = jnp.broadcast_to(_float(p_pos, "p_pos"), (k,)) if np.ndim(p_pos) == 0 else _float(p_pos, "p_pos")
        w = jnp.full((k,), 1.0 / k) if weight is None else _float(weight, "weight")
        names = _names(names, k)
        out = cls(mu_pos, mu_neg, cov_pos, cov_neg, _float(p), _float(w), names)
        return out.validate()

    @staticmethod
    def _broadcast_cov(name, cov, k, d, layout=None):
        c = _float(cov, name)
        if c.ndim <= 1 or (c.ndim == 2 and c.shape == (k, d) and (k != d or layout == "variances")):
            if is_concrete(c):  # variances: a negative one is named here, not as a NaN root later
                check_finite(name, c)
                check_positive(f"{name} (variances)", c, allow_zero=True)
            else:
                c = traced_require(c, [(c >= 0, f"{name}_variances")])
        if c.ndim == 0:
            return isotropic_cov(jnp.sqrt(c), d, k)
        if c.ndim == 1 and c.shape == (d,):
            return jnp.broadcast_to(diagonal_cov(c), (k, d, d))
        if c.ndim == 2 and c.shape == (k, d) == (d, d) and k > 1 and layout is None:
            raise ValueError(
                f"{name} has shape {c.shape}, which with K = d = {d} is either per-behaviour variances or one "
                f"shared (d, d) covariance; pass cov_layout='variances' or cov_layout='covariance'"
            )
        if c.ndim == 2 and c.shape == (k, d) and (k != d or layout == "variances"):
            return diagonal_cov(c)
        if c.ndim == 2 and c.shape == (d, d):
            return jnp.broadcast_to(c, (k, d, d))
        if c.ndim == 3 and c.shape == (k, d, d):
            return c
        raise ValueError(
            f"{name} has shape {c.shape}; expected a scalar variance, (d,)=({d},) or "
            f"(K, d)=({k}, {d}) variances, (d, d) or (K, d, d)=({k}, {d}, {d})"
        )

    @classmethod
    def single(cls, distinguishability=1.0, d: int = 2, sigma=1.0, p: float = 0.5, name="behavior_0"):
        """One behaviour: ``μ± = ±(Δ/2) e₁``, ``Σ± = σ² I_d``.

        Args:
          distinguishability: Δ = ‖μ⁺ − μ⁻‖ ≥ 0.
          d: embedding dimension ≥ 1. sigma: per-coordinate std σ > 0.
          p: probability that the preferred answer is ``a``.

        Any of ``distinguishability``, ``sigma``, ``p`` may be traced (``jax.vmap`` / ``jax.jit``): the
        checks then run in the compiled program.

        Raises:
          ValueError: Δ < 0, σ <= 0, p outside [0, 1], d < 1 (named; traced values too, see
            ``dynamics._checks.traced_require``).
        """
        check_int("d", d)
        check_positive("distinguishability", distinguishability, allow_zero=True)
        check_positive("sigma", sigma)
        dist_ = _float(distinguishability, "distinguishability")
        sigma = _float(sigma, "sigma")
        # traced (jit / vmap): the same checks in the compiled program
        dist_ = traced_require(dist_, [(dist_ >= 0, "distinguishability")])
        sigma = traced_require(sigma, [(sigma > 0, "sigma")])
        e1 = jnp.zeros((1, d), dtype=dist_.dtype).at[0, 0].set(1.0)
        return cls.create(dist_ / 2 * e1, -dist_ / 2 * e1, isotropic_cov(sigma, d, 1),
                          p_pos=p, names=[name])

    @classmethod
    def from_angles(cls, distinguishability, angles=None, *, d: int, sigma=1.0, p=0.5,
                    weight=None, names=None, angles_deg=None):
        """K behaviours with given distinguishabilities and angles between them.

        Preference directions ``b_k = μ_k⁺ − μ_k⁻`` have ``‖b_k‖ = Δ_k`` and
        ``cos∠(b_i, b_j) = cos(angles[i, j])``; ``μ_k± = ±b_k/2``, ``Σ = σ_k² I``.
        The basis is :func:`dynamics.transforms.preference_directions` (behaviour 0
        along e₁, behaviour 1 in the e₁–e₂ plane, …), the same as the sweep's
        ``build_distribution`` for its ``angle`` field (degrees).

        Args:
          distinguishability: ``(K,)`` Δ_k ≥ 0.
          angles: ``(K, K)`` in RADIANS, or a scalar used for every pair, each in
            [0, π]. Default (and with neither argument) π/2: orthogonal behaviours.
            The cosine matrix must be PSD.
          angles_deg: the same in DEGREES, in [0, 180] (pass one of the two).
          d: embedding dimension ≥ K. sigma: scalar or ``(K,)``.
          p, weight, names: as in :meth:`create`.

        Raises:
          ValueError: an angle outside [0, π] radians (e.g. ``angles=90``: degrees passed
            as radians — use ``angles_deg=90``) or [0, 180] degrees, both units given,
            a bad shape, a non-symmetric or non-PSD cosine matrix, ``d < K``.

        ``distinguishability``, ``angles`` / ``angles_deg``, ``sigma``, ``p`` and ``weight`` may be traced
        (``jax.vmap`` / ``jax.jit``, e.g. a sweep over the angle): the same checks then run in the
        compiled program (``dynamics._checks.traced_require``); shapes stay static.
        """
        from . import transforms

        dist_ = _float(distinguishability, "distinguishability").reshape(-1)
        k = dist_.shape[0]
        check_int("d", d, minimum=k)
        check_positive("distinguishability", dist_, allow_zero=True)
        check_positive("sigma", sigma)
        if angles is not None and angles_deg is not None:
            raise ValueError("pass angles (radians) or angles_deg (degrees), not both")
        if angles_deg is not None:
            transforms.check_angles("angles_deg", angles_deg, "degrees")
            value, unit, key = angles_deg, "degrees", "angles_deg"
        else:
            value, unit, key = (np.pi / 2 if angles is None else angles), "radians", "angles"
            transforms.check_angles("angles", value, "radians")
        ang = _float(value, key)
        if ang.ndim not in (0, 2) or (ang.ndim == 2 and ang.shape != (k, k)):
            raise ValueError(f"angles has shape {ang.shape}; expected a scalar or (K, K) = ({k}, {k})")
        if ang.ndim == 2 and is_concrete(ang) and not np.allclose(ang, ang.T):
            raise ValueError("angles must be a symmetric (K, K) matrix")
        sigma = _float(sigma, "sigma")
        # traced (jit / vmap): the same checks in the compiled program
        dist_ = traced_require(dist_, [(dist_ >= 0, "distinguishability")])
        sigma = traced_require(sigma, [(sigma > 0, "sigma")])
        off = ang if ang.ndim == 0 else ang[~np.eye(k, dtype=bool)]
        hi = np.pi if unit == "radians" else 180.0
        ang = traced_require(ang, [(off >= 0, key), (off <= hi * (1 + 1e-6), key)]
                             + ([(jnp.abs(ang - ang.T) <= 1e-6 * hi, "angles_symmetric")] if ang.ndim == 2 else []))
        cosm = transforms.angle_cosines(ang, k, unit=unit)
        if is_concrete(cosm):
            evals = np.linalg.eigvalsh(np.asarray(cosm, dtype=np.float64))
            if evals.min() < -1e-9:
                raise ValueError(
                    f"angles give a cosine matrix that is not PSD (min eigenvalue {evals.min():.3g}); "
                    "no set of directions has these angles — widen or narrow them"
                )
        elif k > 1:
            tol = 1e-9 if cosm.dtype == jnp.float64 else 1e-5
            cosm = traced_require(cosm, [(jnp.linalg.eigvalsh(cosm)[0] >= -tol * k, "angles_psd")])
        b = transforms.preference_directions(dist_, cosm, d)
        return cls.create(b / 2, -b / 2, isotropic_cov(sigma, d, k), p_pos=p, weight=weight, names=names)

    # ------------------------------------------------------------- validate
    @property
    def num_behaviors(self) -> int:
        return self.mu_pos.shape[-2]

    @property
    def dim(self) -> int:
        return self.mu_pos.shape[-1]

    def validate(self, atol: float = 1e-6):
        """Check shapes and values; return ``self`` (traced: a copy tied to in-graph checks — use it).

        Concrete values: every check below. Traced values (``jax.vmap`` / ``jax.jit``): the cheap ones run
        in the compiled program (:meth:`_traced_validate`; not PSD beyond the diagonal).

        Raises ``ValueError`` naming the field, its value and the fix.
        """
        k, d = self.mu_pos.shape[-2:]
        expected = {"mu_neg": (k, d), "cov_pos": (k, d, d), "cov_neg": (k, d, d), "p_pos": (k,), "weight": (k,)}
        for name, shape in expected.items():
            got = getattr(self, name).shape[-len(shape):] if getattr(self, name).ndim >= len(shape) else getattr(self, name).shape
            if tuple(got) != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}; expected (..., {', '.join(map(str, shape))}) to match mu_pos (K, d) = ({k}, {d})")
        if self.names and len(self.names) != k:
            raise ValueError(f"names has {len(self.names)} entries; expected K = {k}")
        if not is_concrete(self):
            return self._traced_validate(atol)
        for name in ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos", "weight"):
            check_finite(name, getattr(self, name))
        check_in_range("p_pos", self.p_pos, 0.0, 1.0)
        check_positive("weight", self.weight, allow_zero=True)
        wsum = np.asarray(self.weight).sum(axis=-1)
        if np.any(np.abs(wsum - 1.0) > 1e-5):
            raise ValueError(f"weight sums to {np.round(wsum, 6)}; behaviour weights must sum to 1 — divide by their sum")
        for name in ("cov_pos", "cov_neg"):
            c = np.asarray(getattr(self, name), dtype=np.float64)
            scale = max(1.0, float(np.abs(c).max()))
            asym = np.abs(c - np.swapaxes(c, -1, -2)).max()
            if asym > atol * scale:
                raise ValueError(f"{name} is not symmetric (max |Σ − Σᵀ| = {asym:.3g}); pass (Σ + Σᵀ)/2")
            lam = np.linalg.eigvalsh((c + np.swapaxes(c, -1, -2)) / 2).min()
            if lam < -atol * scale:
                raise ValueError(f"{name} is not positive semi-definite (min eigenvalue {lam:.3g}); pass a PSD covariance, e.g. A Aᵀ or clip negative eigenvalues")
        return self

    def _traced_validate(self, atol: float):
        """The checks of :meth:`validate` that are cheap in a compiled program, for traced fields: finite
        values, ``p_pos`` in [0, 1], weights >= 0 summing to 1 (within 1e-4), symmetric covariances with
        variances >= 0 on the diagonal. Not checked in-graph: PSD beyond the diagonal (an eigenvalue
        decomposition per behaviour in every program that builds a distribution). Returns the
        distribution tied to the checks."""
        checks = [(jnp.isfinite(getattr(self, name)), f"{name}_finite")
                  for name in ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos", "weight")]
        checks += [((self.p_pos >= 0) & (self.p_pos <= 1), "p_pos"),
                   ((self.weight >= 0) & (jnp.abs(jnp.sum(self.weight, axis=-1, keepdims=True) - 1) <= 1e-4), "weight")]
        for name in ("cov_pos", "cov_neg"):
            c = getattr(self, name)
            scale = jnp.maximum(1.0, jnp.max(jnp.abs(c)))
            checks += [(jnp.abs(c - jnp.swapaxes(c, -1, -2)) <= atol * scale, f"{name}_symmetric"),
                       (jnp.diagonal(c, axis1=-2, axis2=-1) >= -atol * scale, f"{name}_diagonal")]
        return traced_require(self, checks)

    # ----------------------------------------------------------- properties
    @property
    def preference_direction(self):
        """``b_k = μ_k⁺ − μ_k⁻``, shape ``(K, d)``."""
        return self.mu_pos - self.mu_neg

    @property
    def distinguishability(self):
        """``‖μ_k⁺ − μ_k⁻‖``, shape ``(K,)`` (docs/theory.md §2.3)."""
        return jnp.linalg.norm(self.preference_direction, axis=-1)

    @property
    def concentration(self):
        """``max(‖Σ_k⁺‖_op, ‖Σ_k⁻‖_op)``, shape ``(K,)``."""
        op = lambda c: jnp.linalg.eigvalsh(c)[..., -1]
        return jnp.maximum(op(self.cov_pos), op(self.cov_neg))

    @property
    def trace(self):
        """``max(tr Σ_k⁺, tr Σ_k⁻)``, shape ``(K,)``."""
        tr = lambda c: jnp.trace(c, axis1=-2, axis2=-1)
        return jnp.maximum(tr(self.cov_pos), tr(self.cov_neg))

    @property
    def priority_gap(self):
        """``(K, K)`` priority-gap matrix of the preference directions."""
        return priority_gap(self.preference_direction)

    @property
    def behavior_mean(self):
        """``m_k = p_k μ_k⁺ − (1 − p_k) μ_k⁻``, shape ``(K, d)`` (mean of z given k)."""
        p = self.p_pos[..., None]
        return p * self.mu_pos - (1 - p) * self.mu_neg

    @property
    def mean(self):
        """``m̄ = Σ_k ω_k m_k``, shape ``(d,)``: the mean of ``z = s x``."""
        return jnp.einsum("k,kd->d", self.weight, self.behavior_mean)

    def components(self) -> Components:
        """The 2K components of ``z = s x`` (interleaved: ``(k, +1), (k, −1)``)."""
        k, d = self.mu_pos.shape
        p = self.p_pos
        weight = jnp.stack([self.weight * p, self.weight * (1 - p)], axis=1).reshape(2 * k)
        mean = jnp.stack([self.mu_pos, -self.mu_neg], axis=1).reshape(2 * k, d)
        cov = jnp.stack([self.cov_pos, self.cov_neg], axis=1).reshape(2 * k, d, d)
        behavior = jnp.repeat(jnp.arange(k), 2)
        sign = jnp.tile(jnp.array([1.0, -1.0], dtype=mean.dtype), k)
        return Components(weight, mean, cov, behavior, sign)

    def z_covariance(self):
        """``Cov(z)`` of the mixture, shape ``(d, d)`` (used by the C1 bands)."""
        c = self.components()
        m = self.mean
        dm = c.mean - m
        return jnp.einsum("c,cij->ij", c.weight, c.cov) + jnp.einsum("c,ci,cj->ij", c.weight, dm, dm)

    # --------------------------------------------------------------- sample
    def sample(self, key, n: int):
        """Draw ``n`` preference pairs.

        Returns:
          ``x (n, d)`` embeddings, ``s (n,)`` labels in {+1, −1} (+1: chosen is
          ``a``), ``behavior (n,)`` int32 behaviour index.
        """
        k, d = self.mu_pos.shape
        kb, ks, kx = jax.random.split(key, 3)
        behavior = jax.random.categorical(kb, jnp.log(self.weight), shape=(n,))
        pos = jax.random.uniform(ks, (n,), dtype=self.p_pos.dtype) < self.p_pos[behavior]
        s = jnp.where(pos, 1.0, -1.0).astype(self.mu_pos.dtype)
        comp = 2 * behavior + jnp.where(pos, 0, 1)
        means = jnp.stack([self.mu_pos, self.mu_neg], axis=1).reshape(2 * k, d)
        roots = _psd_sqrt(jnp.stack([self.cov_pos, self.cov_neg], axis=1).reshape(2 * k, d, d))
        z = jax.random.normal(kx, (n, d), dtype=self.mu_pos.dtype)
        # x = μ_c + R_c ε ; computed per component then gathered (memory n·2K·d)
        xs = jnp.einsum("nj,cij->nci", z, roots)
        x = means[comp] + jnp.take_along_axis(xs, comp[:, None, None], axis=1)[:, 0]
        return x, s, behavior.astype(jnp.int32)

    # ------------------------------------------------------------------- io
    def save(self, path) -> None:
        """Write the docs/theory.md §2.4 ``.npz`` interchange file (no pickles)."""
        arrays = {key: np.asarray(getattr(self, key)) for key in _NPZ_KEYS}
        if self.names:
            arrays["names"] = np.asarray(self.names, dtype=str)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path):
        """Read a ``.npz`` file (docs/theory.md §2.4); never unpickles.

        Raises:
          ValueError: missing keys, object arrays, or invalid contents (named).
          FileNotFoundError: no such file.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such distribution file; write one with GaussianPreference.save(path)")
        if not os.path.isfile(path) or not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a .npz archive; write distribution files with GaussianPreference.save(path)")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in _NPZ_KEYS if k not in f.files]
                if missing:
                    raise ValueError(f"{path}: missing keys {missing}; a distribution file needs {list(_NPZ_KEYS)} (and optional 'names')")
                arrays = {k: f[k] for k in _NPZ_KEYS}
                names = [str(n) for n in f["names"]] if "names" in f.files else None
        except ValueError as e:
            if "allow_pickle" in str(e) or "Object arrays" in str(e):
                raise ValueError(f"{path}: contains object arrays (pickled data), which are refused; save plain numeric arrays and a unicode 'names' array") from None
            raise
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: unreadable .npz archive ({e}); write it with GaussianPreference.save(path)") from None
        return cls.create(arrays["mu_pos"], arrays["mu_neg"], arrays["cov_pos"], arrays["cov_neg"],
                          arrays["p_pos"], arrays["weight"], names)


def _psd_sqrt(cov):
    """Symmetric square root of PSD matrices ``(..., d, d)`` (works when singular)."""
    lam, vec = jnp.linalg.eigh(cov)
    return (vec * jnp.sqrt(jnp.clip(lam, 0.0))[..., None, :]) @ jnp.swapaxes(vec, -1, -2)
