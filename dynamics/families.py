"""Non-Gaussian preference families and the custom-distribution protocol.

Protocol (docs/custom-distributions.md): a distribution is a pytree with

* ``sample(key, n) -> (x (n, d) float, s (n,) ±1, behavior (n,) int)`` — all the
  empirical layer needs;
* ``num_behaviors`` and ``dim`` (static ints);
* for the analytic layer, either ``components() -> Components`` (an exact
  finite Gaussian mixture of ``z = s x``) or ``gaussian_equivalent() ->
  GaussianPreference`` (its moment-matched Gaussian: the population layer then
  predicts the dynamics the Gaussian-equivalence way, and the gap to the
  empirical dynamics is the Gaussian-equivalence error).

Shipped families (docs/theory.md §5.4):

* :class:`EllipticalPreference` — multivariate Laplace or Student-t (ν > 2) with
  the same means and covariances as a Gaussian ``base``: ``x = μ + √W · R ε`` with a
  mixing variable ``W ≥ 0``, ``E[W] = 1`` (Laplace: ``W ~ Exp(1)``; Student-t:
  ``W = (ν − 2)/χ²_ν``), so ``Cov(x) = Σ`` exactly.
* :class:`GaussianMixturePreference` — each class a mixture of M Gaussians; its
  ``components()`` are exact (2·K·M components), and ``gaussian_equivalent()``
  gives the moment-matched Gaussian.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ._checks import check_choice, check_finite, check_in_range, check_positive, is_concrete
from .distributions import Components, GaussianPreference, _psd_sqrt

__all__ = ["EllipticalPreference", "GaussianMixturePreference", "ELLIPTICAL_FAMILIES"]

ELLIPTICAL_FAMILIES = ("laplace", "student_t")


@struct.dataclass
class EllipticalPreference:
    """Laplace / Student-t preference distribution with a Gaussian's first two moments.

    Attributes:
      base: the :class:`GaussianPreference` giving means, covariances, p, weights.
      nu: degrees of freedom ν > 2 (Student-t only; a leaf, vmappable).
      family: "laplace" or "student_t" (static).
    """

    base: GaussianPreference
    nu: jax.Array = struct.field(default_factory=lambda: jnp.asarray(np.inf))
    family: str = struct.field(pytree_node=False, default="laplace")

    @classmethod
    def create(cls, base: GaussianPreference, family: str = "laplace", nu=np.inf):
        """Validated constructor. Raises ValueError for an unknown family or ν ≤ 2."""
        check_choice("family", family, ELLIPTICAL_FAMILIES)
        if family == "student_t":
            if is_concrete(nu) and not np.all(np.asarray(nu) > 2):
                raise ValueError(f"nu must be > 2 for a Student-t with finite covariance, got {nu}; pass nu > 2")
        return cls(base.validate(), jnp.asarray(nu, dtype=base.mu_pos.dtype), family)

    def validate(self):
        check_choice("family", self.family, ELLIPTICAL_FAMILIES)
        if self.family == "student_t" and is_concrete(self.nu) and not np.all(np.asarray(self.nu) > 2):
            raise ValueError(f"nu must be > 2, got {np.asarray(self.nu)}; pass nu > 2")
        self.base.validate()
        return self

    @property
    def num_behaviors(self) -> int:
        return self.base.num_behaviors

    @property
    def dim(self) -> int:
        return self.base.dim

    def gaussian_equivalent(self) -> GaussianPreference:
        """The moment-matched Gaussian (same means and covariances): ``base``."""
        return self.base

    def mixing(self, key, n: int):
        """Mixing variable ``W (n,)`` with ``E[W] = 1``."""
        dtype = self.base.mu_pos.dtype
        if self.family == "laplace":
            return jax.random.exponential(key, (n,), dtype=dtype)
        chi2 = 2.0 * jax.random.gamma(key, self.nu / 2.0, (n,), dtype=dtype)
        return (self.nu - 2.0) / chi2

    def sample(self, key, n: int):
        """``x (n, d)``, ``s (n,)``, ``behavior (n,)`` (see :meth:`GaussianPreference.sample`)."""
        kg, kw = jax.random.split(key)
        x, s, beh = self.base.sample(kg, n)
        center = jnp.where((s > 0)[:, None], self.base.mu_pos[beh], self.base.mu_neg[beh])
        w = self.mixing(kw, n)
        return center + jnp.sqrt(w)[:, None] * (x - center), s, beh


@struct.dataclass
class GaussianMixturePreference:
    """Each class of each behaviour is a mixture of M Gaussians.

    Attributes:
      mu_pos, mu_neg: ``(K, M, d)`` sub-component means.
      cov_pos, cov_neg: ``(K, M, d, d)`` sub-component covariances.
      mix_pos, mix_neg: ``(K, M)`` mixture weights (rows sum to 1).
      p_pos: ``(K,)``; weight: ``(K,)`` as in :class:`GaussianPreference`.
    """

    mu_pos: jax.Array
    mu_neg: jax.Array
    cov_pos: jax.Array
    cov_neg: jax.Array
    mix_pos: jax.Array
    mix_neg: jax.Array
    p_pos: jax.Array
    weight: jax.Array

    @classmethod
    def create(cls, mu_pos, mu_neg, cov_pos, cov_neg, mix_pos=None, mix_neg=None, p_pos=0.5, weight=None):
        """Validated constructor (shapes above; ``mix`` defaults to uniform)."""
        f = lambda v: jnp.asarray(v, dtype=jnp.result_type(float))
        mu_pos, mu_neg, cov_pos, cov_neg = map(f, (mu_pos, mu_neg, cov_pos, cov_neg))
        if mu_pos.ndim != 3 or mu_neg.shape != mu_pos.shape:
            raise ValueError(f"mu_pos {mu_pos.shape} and mu_neg {mu_neg.shape} must both be (K, M, d)")
        k, m, d = mu_pos.shape
        for name, c in (("cov_pos", cov_pos), ("cov_neg", cov_neg)):
            if c.shape != (k, m, d, d):
                raise ValueError(f"{name} has shape {c.shape}; expected (K, M, d, d) = ({k}, {m}, {d}, {d})")
        mix_pos = jnp.full((k, m), 1.0 / m) if mix_pos is None else f(mix_pos)
        mix_neg = jnp.full((k, m), 1.0 / m) if mix_neg is None else f(mix_neg)
        p = jnp.broadcast_to(f(p_pos), (k,))
        w = jnp.full((k,), 1.0 / k) if weight is None else f(weight)
        return cls(mu_pos, mu_neg, cov_pos, cov_neg, mix_pos, mix_neg, p, w).validate()

    @classmethod
    def from_gaussian(cls, base: GaussianPreference, spread):
        """Split every class of a Gaussian in two modes along its preference direction, keeping its moments.

        For behaviour ``k`` with preference direction ``v_k = (μ_k⁺ − μ_k⁻)/‖μ_k⁺ − μ_k⁻‖``
        (``e₁`` when ``Δ_k = 0``), each class ``N(μ, Σ)`` becomes the equal-weight mixture
        ``½ N(μ + a v_k, Σ − a² v_k v_kᵀ) + ½ N(μ − a v_k, Σ − a² v_k v_kᵀ)`` with
        ``a² = spread² / (v_kᵀ Σ⁻¹ v_k)``. Its mean and covariance are those of ``base`` exactly,
        so :meth:`gaussian_equivalent` returns ``base``'s moments, while :meth:`components` is the
        exact bimodal law: ``spread = 0`` is ``base`` itself, ``spread → 1`` two point-like modes
        along ``v_k`` (the sub-covariance loses its variance along ``v_k``). Needs ``Σ`` positive
        definite along ``v_k``. Traceable (vmappable over ``base`` and ``spread``).

        Args:
          base: a :class:`GaussianPreference` ``(K, d)``.
          spread: scalar in ``[0, 1)``: the share of the variance along ``v_k`` moved into the
            separation of the two modes (``a² vᵀΣ⁻¹v``).

        Returns:
          :class:`GaussianMixturePreference` with ``M = 2`` (shapes ``(K, 2, d)``, ``(K, 2, d, d)``).

        Raises:
          ValueError: a concrete ``spread`` outside ``[0, 1)``.

        Source: docs/custom-distributions.md (shipped families); moment matching as in docs/theory.md §5.4.
        """
        if is_concrete(spread):
            check_in_range("spread", spread, 0.0, 1.0)
            if np.any(np.asarray(spread) >= 1.0):
                raise ValueError(f"spread must be < 1 (spread = 1 leaves no variance along the split), got {spread}; "
                                 "pass a value in [0, 1)")
        dtype = base.mu_pos.dtype
        spread = jnp.asarray(spread, dtype)
        diff = base.mu_pos - base.mu_neg
        norm = jnp.linalg.norm(diff, axis=-1, keepdims=True)
        e1 = jnp.zeros_like(diff).at[..., 0].set(1.0)
        v = jnp.where(norm > 0, diff / jnp.where(norm > 0, norm, 1.0), e1)  # (K, d)

        def split(mu, cov):
            quad = jnp.einsum("kd,kd->k", v, jnp.linalg.solve(cov, v[..., None])[..., 0])
            a = spread * jax.lax.rsqrt(jnp.where(quad > 0, quad, jnp.inf))  # (K,)
            shift = a[:, None] * v
            sub_mu = jnp.stack([mu + shift, mu - shift], axis=1)  # (K, 2, d)
            sub_cov = cov - (a**2)[:, None, None] * v[:, :, None] * v[:, None, :]
            return sub_mu, jnp.stack([sub_cov, sub_cov], axis=1)

        mp, cp = split(base.mu_pos, base.cov_pos)
        mn, cn = split(base.mu_neg, base.cov_neg)
        half = jnp.full(base.p_pos.shape + (2,), 0.5, dtype)
        return cls(mp, mn, cp, cn, half, half, base.p_pos, base.weight)

    def validate(self):
        if not is_concrete(self):
            return self
        for name in ("mix_pos", "mix_neg"):
            v = np.asarray(getattr(self, name))
            check_positive(name, v, allow_zero=True)
            if np.any(np.abs(v.sum(-1) - 1) > 1e-5):
                raise ValueError(f"{name} rows must sum to 1 (got {v.sum(-1)}); divide each row by its sum")
        check_in_range("p_pos", self.p_pos, 0.0, 1.0)
        check_finite("weight", self.weight)
        # the covariances and weights get GaussianPreference's checks through the equivalent
        self.gaussian_equivalent().validate()
        return self

    @property
    def num_behaviors(self) -> int:
        return self.mu_pos.shape[-3]

    @property
    def dim(self) -> int:
        return self.mu_pos.shape[-1]

    def components(self) -> Components:
        """Exact components of ``z = s x``: ``2·K·M`` Gaussians."""
        k, m, d = self.mu_pos.shape
        wp = (self.weight * self.p_pos)[:, None] * self.mix_pos
        wn = (self.weight * (1 - self.p_pos))[:, None] * self.mix_neg
        weight = jnp.concatenate([wp.reshape(-1), wn.reshape(-1)])
        mean = jnp.concatenate([self.mu_pos.reshape(-1, d), -self.mu_neg.reshape(-1, d)])
        cov = jnp.concatenate([self.cov_pos.reshape(-1, d, d), self.cov_neg.reshape(-1, d, d)])
        beh = jnp.tile(jnp.repeat(jnp.arange(k), m), 2)
        sign = jnp.concatenate([jnp.ones(k * m), -jnp.ones(k * m)]).astype(mean.dtype)
        return Components(weight, mean, cov, beh, sign)

    def gaussian_equivalent(self) -> GaussianPreference:
        """Moment-matched Gaussian: per class mean ``Σ w m`` and covariance ``Σ w (S + m mᵀ) − μ μᵀ``."""
        def moments(mu, cov, mix):
            mean = jnp.einsum("km,kmd->kd", mix, mu)
            second = jnp.einsum("km,kmij->kij", mix, cov + mu[..., :, None] * mu[..., None, :])
            return mean, second - mean[..., :, None] * mean[..., None, :]

        mp, cp = moments(self.mu_pos, self.cov_pos, self.mix_pos)
        mn, cn = moments(self.mu_neg, self.cov_neg, self.mix_neg)
        return GaussianPreference(mp, mn, cp, cn, self.p_pos, self.weight,
                                  tuple(f"behavior_{i}" for i in range(self.num_behaviors)))

    def sample(self, key, n: int):
        """``x (n, d)``, ``s (n,)``, ``behavior (n,)`` int32."""
        k, m, d = self.mu_pos.shape
        kb, ks, km, kx = jax.random.split(key, 4)
        beh = jax.random.categorical(kb, jnp.log(self.weight), shape=(n,))
        pos = jax.random.uniform(ks, (n,), dtype=self.p_pos.dtype) < self.p_pos[beh]
        mix = jnp.where(pos[:, None], self.mix_pos[beh], self.mix_neg[beh])
        sub = jax.random.categorical(km, jnp.log(mix), axis=-1)
        means = jnp.stack([self.mu_pos, self.mu_neg], axis=1)  # (K, 2, M, d)
        roots = _psd_sqrt(jnp.stack([self.cov_pos, self.cov_neg], axis=1))
        cls_idx = jnp.where(pos, 0, 1)
        z = jax.random.normal(kx, (n, d), dtype=self.mu_pos.dtype)
        x = means[beh, cls_idx, sub] + jnp.einsum("nij,nj->ni", roots[beh, cls_idx, sub], z)
        s = jnp.where(pos, 1.0, -1.0).astype(self.mu_pos.dtype)
        return x, s, beh.astype(jnp.int32)
