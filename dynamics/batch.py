"""The configuration batch of the factored engines: :class:`PreferenceBatch` (a pytree).

``C`` Gaussian preference distributions with compact covariance roots (σ, per-coordinate
std, or a symmetric root), their constructors and validation, the per-configuration PRNG key
convention (:func:`config_keys`) and the interleaved component tables both factored engines
read (docs/theory.md §2; the factored construction is in docs/performance.md). The engines
are :mod:`dynamics.factored_empirical` and :mod:`dynamics.factored_population`;
:mod:`dynamics.batched` re-exports all three modules.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ._checks import check_choice, check_finite, check_in_range, check_int, check_key, check_positive, is_concrete
from .distributions import GaussianPreference, _psd_sqrt

__all__ = ["COV_KINDS", "DRAWS", "PreferenceBatch", "config_keys"]

COV_KINDS = ("isotropic", "diagonal", "full")
DRAWS = ("common", "independent")


def _float(x):
    return jnp.asarray(x, dtype=jnp.result_type(float))


# --------------------------------------------------------------------------- the configuration batch
@struct.dataclass
class PreferenceBatch:
    """``C`` Gaussian preference distributions with compact covariance roots (a pytree).

    Attributes:
      mu_pos, mu_neg: ``(C, K, d)`` class means μ_k⁺, μ_k⁻ of configuration c.
      root_pos, root_neg: covariance square roots, by ``cov_kind``:
        ``"isotropic"`` ``(C, K)`` σ (Σ = σ² I); ``"diagonal"`` ``(C, K, d)``
        per-coordinate std r (Σ = diag r²); ``"full"`` ``(C, K, d, d)``
        symmetric PSD root R (Σ = R², the root ``GaussianPreference.sample`` uses).
      p_pos: ``(C, K)`` probability that behaviour k prefers answer ``a``.
      weight: ``(C, K)`` behaviour weights ω (rows sum to 1).
      cov_kind: static, one of ``COV_KINDS``.

    Build with :meth:`from_dists`, :meth:`isotropic`, :meth:`diagonal` or
    :meth:`single`; configuration ``c`` as a :class:`GaussianPreference` is
    :meth:`dist` ``(c)``. Memory: ``C·K·d`` floats for isotropic and diagonal
    covariances (a stacked ``GaussianPreference`` holds ``C·K·d²``).
    Source: docs/theory.md §2.
    """

    mu_pos: jax.Array
    mu_neg: jax.Array
    root_pos: jax.Array
    root_neg: jax.Array
    p_pos: jax.Array
    weight: jax.Array
    cov_kind: str = struct.field(pytree_node=False, default="full")

    # ------------------------------------------------------------------ build
    @classmethod
    def from_dists(cls, dists, cov_kind: str = "auto") -> "PreferenceBatch":
        """From a stacked :class:`GaussianPreference` (leading axis C) or a list of them.

        Args:
          dists: ``GaussianPreference`` whose fields carry a leading ``(C,)``
            axis (e.g. ``jax.vmap``-built or ``tree_map(jnp.stack, ...)``), a
            single one (C = 1), or a sequence of them with equal K and d.
          cov_kind: ``"auto"`` (isotropic when every covariance is σ² I,
            diagonal when all are diagonal, else full) or one of ``COV_KINDS``.

        Raises:
          ValueError: invalid distributions, unequal shapes, or a ``cov_kind``
            that does not describe the covariances (e.g. "isotropic" for a
            non-isotropic one).
        """
        if isinstance(dists, (list, tuple)):
            if not dists:
                raise ValueError("dists is an empty sequence; pass at least one GaussianPreference")
            shapes = {(g.num_behaviors, g.dim) for g in dists}
            if len(shapes) != 1:
                raise ValueError(f"dists have different (K, d): {sorted(shapes)}; batch only equal shapes")
            dists = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[g.validate() for g in dists])
        if not isinstance(dists, GaussianPreference):
            raise ValueError(f"dists must be a GaussianPreference or a list of them, got {type(dists).__name__}")
        if dists.mu_pos.ndim == 2:
            dists = jax.tree_util.tree_map(lambda a: a[None], dists)
        if dists.mu_pos.ndim != 3:
            raise ValueError(f"dists.mu_pos has shape {dists.mu_pos.shape}; expected (C, K, d)")
        dists.validate()
        cov_kind = check_choice("cov_kind", cov_kind, ("auto",) + COV_KINDS)
        covs = np.stack([np.asarray(dists.cov_pos), np.asarray(dists.cov_neg)])
        diag = np.diagonal(covs, axis1=-2, axis2=-1)
        is_diag = bool(np.all(covs == diag[..., :, None] * np.eye(covs.shape[-1])))
        is_iso = is_diag and bool(np.all(diag == diag[..., :1]))
        if cov_kind == "auto":
            cov_kind = "isotropic" if is_iso else "diagonal" if is_diag else "full"
        elif (cov_kind == "isotropic" and not is_iso) or (cov_kind == "diagonal" and not is_diag):
            raise ValueError(f"cov_kind={cov_kind!r} but the covariances are not {cov_kind}; "
                             "pass cov_kind='auto' or 'full'")
        if cov_kind == "isotropic":
            roots = [jnp.sqrt(jnp.clip(c[..., 0, 0], 0.0)) for c in (dists.cov_pos, dists.cov_neg)]
        elif cov_kind == "diagonal":
            roots = [jnp.sqrt(jnp.clip(jnp.diagonal(c, axis1=-2, axis2=-1), 0.0)) for c in (dists.cov_pos, dists.cov_neg)]
        else:
            roots = [_psd_sqrt(c) for c in (dists.cov_pos, dists.cov_neg)]
        return cls(dists.mu_pos, dists.mu_neg, roots[0], roots[1], dists.p_pos, dists.weight, cov_kind)

    @classmethod
    def _assemble(cls, mu_pos, mu_neg, root_pos, root_neg, p_pos, weight, cov_kind, root_tail):
        mu_pos, mu_neg = _float(mu_pos), _float(mu_neg)
        if mu_pos.ndim == 2:
            mu_pos, mu_neg = mu_pos[:, None, :], mu_neg[:, None, :]
        if mu_pos.ndim != 3 or mu_pos.shape != mu_neg.shape:
            raise ValueError(f"mu_pos has shape {mu_pos.shape} and mu_neg {mu_neg.shape}; both must be "
                             "(C, K, d) (or (C, d) for K = 1) with the same shape")
        c, k, d = mu_pos.shape
        tail = root_tail(d)

        def bcast(name, v, shape, one_d):
            """Broadcast to ``shape``; a 1-D value is (C,) when ``one_d == "config"``, else the last axis."""
            v = _float(v)
            if v.ndim == 1 and one_d == "config":
                v = v.reshape((v.shape[0],) + (1,) * (len(shape) - 1))
            try:
                return jnp.broadcast_to(v, shape)
            except ValueError:
                raise ValueError(f"{name} has shape {v.shape}; expected a scalar, "
                                 f"{'(C,) = (' + str(c) + ',)' if one_d == 'config' else 'a 1-D array'} or a shape "
                                 f"broadcastable to {shape}") from None

        one_d = "config" if not tail else "last"
        root_pos = bcast("root_pos", root_pos, (c, k) + tail, one_d)
        root_neg = root_pos if root_neg is None else bcast("root_neg", root_neg, (c, k) + tail, one_d)
        p = bcast("p_pos", p_pos, (c, k), "config")
        w = jnp.full((c, k), 1.0 / k) if weight is None else bcast("weight", weight, (c, k), "last")
        return cls(mu_pos, mu_neg, root_pos, root_neg, p, w, cov_kind).validate()

    @classmethod
    def isotropic(cls, mu_pos, mu_neg, sigma_pos, sigma_neg=None, p_pos=0.5, weight=None) -> "PreferenceBatch":
        """Isotropic covariances ``Σ_k^± = σ_k^±² I``.

        Args:
          mu_pos, mu_neg: ``(C, K, d)``, or ``(C, d)`` for one behaviour.
          sigma_pos, sigma_neg: std σ > 0: scalar, ``(C,)`` or ``(C, K)``
            (``sigma_neg`` defaults to ``sigma_pos``).
          p_pos: scalar, ``(C,)`` or ``(C, K)``. weight: ``None`` (uniform),
            ``(K,)`` or ``(C, K)``.

        Raises:
          ValueError: shapes that do not broadcast, σ ≤ 0, p outside [0, 1],
            weights that do not sum to 1 (each named).
        """
        return cls._assemble(mu_pos, mu_neg, sigma_pos, sigma_neg, p_pos, weight, "isotropic", lambda d: ())

    @classmethod
    def diagonal(cls, mu_pos, mu_neg, std_pos, std_neg=None, p_pos=0.5, weight=None) -> "PreferenceBatch":
        """Diagonal covariances ``Σ = diag(r²)``; ``std_*`` broadcastable to ``(C, K, d)``
        (scalar, ``(d,)``, ``(K, d)`` or ``(C, K, d)``). Other arguments as :meth:`isotropic`."""
        return cls._assemble(mu_pos, mu_neg, std_pos, std_neg, p_pos, weight, "diagonal", lambda d: (d,))

    @classmethod
    def single(cls, distinguishability, *, d: int, sigma=1.0, p=0.5) -> "PreferenceBatch":
        """C one-behaviour configurations ``μ± = ±(Δ_c/2) e₁``, ``Σ = σ_c² I``.

        The batched :meth:`GaussianPreference.single`. ``distinguishability``,
        ``sigma``, ``p``: scalars or ``(C,)`` (broadcast together).
        """
        check_int("d", d)
        dist_, sigma, p = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (distinguishability, sigma, p)))
        dist_, sigma, p = (np.atleast_1d(v) for v in (dist_, sigma, p))
        check_positive("distinguishability", dist_, allow_zero=True)
        check_positive("sigma", sigma)
        mu = np.zeros((dist_.shape[0], 1, d), dtype=jnp.result_type(float))  # float32 unless x64
        mu[:, 0, 0] = dist_ / 2
        return cls.isotropic(mu, -mu, sigma[:, None], None, p[:, None])

    # ------------------------------------------------------------- validate
    @property
    def num_configs(self) -> int:
        return self.mu_pos.shape[0]

    @property
    def num_behaviors(self) -> int:
        return self.mu_pos.shape[1]

    @property
    def dim(self) -> int:
        return self.mu_pos.shape[2]

    def validate(self) -> "PreferenceBatch":
        """Check shapes and values (skipped for traced values); return ``self``.

        Raises ``ValueError`` naming the field, its value and the fix.
        """
        check_choice("cov_kind", self.cov_kind, COV_KINDS)
        if self.mu_pos.ndim != 3:
            raise ValueError(f"mu_pos has shape {self.mu_pos.shape}; expected (C, K, d)")
        c, k, d = self.mu_pos.shape
        tail = {"isotropic": (), "diagonal": (d,), "full": (d, d)}[self.cov_kind]
        expected = {"mu_neg": (c, k, d), "root_pos": (c, k) + tail, "root_neg": (c, k) + tail,
                    "p_pos": (c, k), "weight": (c, k)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}; expected {shape} for "
                                 f"cov_kind={self.cov_kind!r} and mu_pos (C, K, d) = {(c, k, d)}")
        if not is_concrete(self):
            return self
        for name in ("mu_pos", "mu_neg", "root_pos", "root_neg", "p_pos", "weight"):
            check_finite(name, getattr(self, name))
        if self.cov_kind == "full":
            for name in ("root_pos", "root_neg"):
                r = np.asarray(getattr(self, name))
                if np.abs(r - np.swapaxes(r, -1, -2)).max(initial=0.0) > 1e-6 * max(1.0, np.abs(r).max(initial=0.0)):
                    raise ValueError(f"{name} is not symmetric; pass the symmetric square root of the covariance "
                                     "(PreferenceBatch.from_dists computes it)")
        else:
            check_positive("root_pos", self.root_pos, allow_zero=True)
            check_positive("root_neg", self.root_neg, allow_zero=True)
        check_in_range("p_pos", self.p_pos, 0.0, 1.0)
        check_positive("weight", self.weight, allow_zero=True)
        wsum = np.asarray(self.weight).sum(axis=-1)
        if np.any(np.abs(wsum - 1.0) > 1e-5):
            bad = int(np.argmax(np.abs(wsum - 1.0)))
            raise ValueError(f"weight of configuration {bad} sums to {wsum[bad]:.6g}; behaviour weights must "
                             "sum to 1 — divide by their sum")
        return self

    # ------------------------------------------------------------ conversion
    def take(self, index) -> "PreferenceBatch":
        """The configurations ``index`` (slice or integer array) as a new batch."""
        index = np.atleast_1d(np.arange(self.num_configs)[index])
        return jax.tree_util.tree_map(lambda a: a[index], self)

    def covariances(self):
        """``(cov_pos, cov_neg)``, each ``(C, K, d, d)`` (memory C·K·d²)."""
        d = self.dim

        def cov(r):
            if self.cov_kind == "isotropic":
                return r[..., None, None] ** 2 * jnp.eye(d, dtype=r.dtype)
            if self.cov_kind == "diagonal":
                return (r**2)[..., :, None] * jnp.eye(d, dtype=r.dtype)
            return r @ jnp.swapaxes(r, -1, -2)

        return cov(self.root_pos), cov(self.root_neg)

    def dist(self, index: int) -> GaussianPreference:
        """Configuration ``index`` as a :class:`GaussianPreference` (full covariances)."""
        cp, cn = (c[index] for c in self.covariances())
        return GaussianPreference.create(self.mu_pos[index], self.mu_neg[index], cp, cn,
                                         self.p_pos[index], self.weight[index])

    def stacked(self) -> GaussianPreference:
        """All configurations as one stacked :class:`GaussianPreference` (leading C axis; C·K·d² memory)."""
        cp, cn = self.covariances()
        return GaussianPreference(self.mu_pos, self.mu_neg, cp, cn, self.p_pos, self.weight,
                                  tuple(f"behavior_{i}" for i in range(self.num_behaviors)))

    def shared_root(self) -> bool:
        """True when, in every configuration, all 2K components share one covariance root
        (then diagonal and full covariances need one GEMM per step instead of 2K)."""
        if not is_concrete(self):
            return False
        r = np.concatenate([np.asarray(self.root_pos), np.asarray(self.root_neg)], axis=1)
        return bool(np.all(r == r[:, :1]))


# --------------------------------------------------------------------------- helpers
def config_keys(key, index):
    """Per-configuration PRNG keys ``fold_in(key, c)`` for global configuration indices ``index (C,)``.

    The independent-draws convention: configuration ``c`` of a batch run with
    ``draws="independent"`` and one ``key`` uses ``config_keys(key, c)``, so a
    batch cut into chunks, devices or processes gives the same result.
    """
    key = _typed_key(key)
    index = jnp.asarray(index, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index.reshape(-1)).reshape(index.shape)


def _typed_key(key):
    key = check_key("key", key)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(f"key must be a PRNG key (jax.random.key(seed)), got dtype {key.dtype} shape {key.shape}")


def _components(cfg, cov_kind):
    """Interleaved components j = 2k (s = +1), 2k + 1 (s = −1): x-means, z-means, roots, π."""
    mu_x = jnp.stack([cfg["mu_pos"], cfg["mu_neg"]], axis=2)
    c, k, _, d = mu_x.shape
    mu_x = mu_x.reshape(c, 2 * k, d)
    sgn = jnp.tile(jnp.array([1.0, -1.0], mu_x.dtype), k)
    root = jnp.stack([cfg["root_pos"], cfg["root_neg"]], axis=2)
    root = root.reshape((c, 2 * k) + root.shape[3:])
    p = cfg["p_pos"]
    pi = jnp.stack([cfg["weight"] * p, cfg["weight"] * (1 - p)], axis=2).reshape(c, 2 * k)
    return mu_x, sgn[None, :, None] * mu_x, root, pi


def _batch_cfg(batch: PreferenceBatch, dtype):
    return {name: np.asarray(getattr(batch, name), dtype) for name in
            ("mu_pos", "mu_neg", "root_pos", "root_neg", "p_pos", "weight")}

