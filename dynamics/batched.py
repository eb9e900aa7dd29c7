"""Many configurations at GEMM speed: batched empirical and population engines.

A sweep trains thousands of last-layer heads that differ only in their
parameters (distribution, β, η, ε). :func:`dynamics.empirical_trajectory`
under ``jax.vmap`` gives each configuration its own ``(n, d)`` data array, so
a step reads ``C·n·d`` numbers to do ``4·C·n·d`` FLOPs: memory bound.

This module keeps the data in factored form. Configuration ``c`` draws its
pairs as in :meth:`GaussianPreference.sample`::

    behaviour  k_i  ~ Categorical(ω_c)      (Gumbel noise G_i shared)
    label      s_i  = +1 if U_i < p_c[k_i]   (uniform U_i shared)
    embedding  x_i  = μ_c[j_i] + R_c[j_i] ε_i  (ε_i ~ N(0, I_d) shared)

with component ``j_i = (k_i, s_i)`` and ``R`` the symmetric square root of
the component covariance. With **common random numbers** (``draws="common"``)
every configuration uses the same PRNG key, hence the same ``G, U, ε``, and
the reward margin ``h_ic = s_ic δ_cᵀ x_ic`` of all configurations is::

    h = M[c, j_ic] + s_ic · σ_c[j_ic] · (ε Δᵀ)_ic      (isotropic Σ = σ² I)

one ``(n × d)·(d × C)`` GEMM, and the gradient ``E_n[ℓ'(h) s x]`` is the
transposed GEMM plus ``O(C·n·K)`` per-component sums: ``4 n d`` FLOPs per
configuration-step at GEMM speed. Diagonal covariances fold the root into
``Δ`` (``δ ⊙ r``, O(d) per configuration-step; one GEMM per distinct root),
full ones pay ``d²`` per configuration-step for ``R δ`` (never ``d³``: roots
are computed once).

Because the draws are derived exactly as :func:`empirical_trajectory` derives
them, ``draws="common"`` with key ``k`` reproduces
``empirical_trajectory(dist_c, k)`` for every configuration ``c`` (the
sweep's own seed convention, ``sims.sweep.seed_key``, already gives every
configuration of a seed the same key), and ``draws="independent"`` with
per-configuration keys ``k_c`` reproduces ``empirical_trajectory(dist_c, k_c)``
(a batched matrix-vector product per step, memory bound). Common random
numbers make differences between configurations far less noisy than
independent draws; docs/performance.md explains when to use which.

:func:`batched_population_trajectory` is the analytic (N → ∞) counterpart of
:func:`dynamics.population_trajectory` over a configuration axis; isotropic and
diagonal covariances cost ``O(K d)`` per configuration-step instead of
``O(K d²)``.

This is the ``implementation="factored"`` behind :func:`dynamics.trajectories`
(``dynamics/engine.py``), which also reaches it from traced code (``dpo-sims sweep``). Label
noise, per-behaviour loss weights, elliptical (Laplace / Student-t) draws, gradient flow and
general component sets (mixtures) are supported; the per-pair and per-component maths is
:mod:`dynamics.reduced`'s, shared with the core.

Configurations are processed in chunks (``chunk_size``), so working memory is
set by the chunk, not by ``C``; only the inputs (means, roots) and the recorded
outputs grow with ``C``.
Source: docs/theory.md §1–§3; the construction is derived in docs/performance.md.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import divergence, reduced
from ._checks import (check_choice, check_finite, check_in_range, check_int, check_positive, is_concrete,
                      traced_check_hparams)
from ._train import (check_batch_size, check_schedule, epoch_orders, epoch_orders_fit, make_optimizer, minibatch_index,
                     run_recorded)
from .distributions import GaussianPreference, _psd_sqrt
from .gaussian_integrals import normal_cdf
from .head import Head
from .losses import expected_loss_terms, loss_fn, loss_grad_fn, uses_label_smoothing, validate_loss

__all__ = [
    "COV_KINDS",
    "DRAWS",
    "BATCHED_METRICS",
    "POPULATION_METRICS",
    "PreferenceBatch",
    "BatchedEmpiricalTrajectory",
    "BatchedPopulationTrajectory",
    "batched_empirical_trajectory",
    "batched_population_trajectory",
    "config_keys",
    "sample_batch",
    "auto_chunk_size",
    "empirical_flops_per_config_step",
]

COV_KINDS = ("isotropic", "diagonal", "full")
DRAWS = ("common", "independent")
#: per-split metrics of the batched empirical engine (same names and meaning as dynamics.METRICS)
BATCHED_METRICS = (
    "loss", "reward_accuracy", "policy_accuracy", "rewards_chosen", "rewards_rejected",
    "rewards_margin", "logps_chosen", "logps_rejected", "weight_change",
    "behavior_loss", "behavior_reward_accuracy", "behavior_policy_accuracy",
)
#: metrics of the batched population engine (as dynamics.population_metrics)
POPULATION_METRICS = (
    "loss", "reward_accuracy", "policy_accuracy", "rewards_margin", "weight_change", "grad_norm",
    "behavior_loss", "behavior_reward_accuracy", "behavior_policy_accuracy",
)
_CHUNK_BUDGET = 256 << 20  # bytes of working memory one automatic chunk may use
_MAX_AUTO_CHUNK = 4096


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
        delta, sigma, p = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (distinguishability, sigma, p)))
        delta, sigma, p = (np.atleast_1d(v) for v in (delta, sigma, p))
        check_positive("distinguishability", delta, allow_zero=True)
        check_positive("sigma", sigma)
        mu = np.zeros((delta.shape[0], 1, d), dtype=jnp.result_type(float))  # float32 unless x64
        mu[:, 0, 0] = delta / 2
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


# --------------------------------------------------------------------------- results
@struct.dataclass
class BatchedEmpiricalTrajectory:
    """Result of :func:`batched_empirical_trajectory` (NumPy arrays).

    Attributes:
      step: ``(T,)`` recorded steps ``0, r, …, steps``.
      train, eval: dicts of metrics per configuration: ``(C, T)`` for
        ``loss`` (nats), ``reward_accuracy``, ``policy_accuracy``,
        ``rewards_chosen``, ``rewards_rejected``, ``rewards_margin`` (nats),
        ``logps_chosen``, ``logps_rejected`` (nats), ``weight_change``
        (‖W_t − W_0‖_F); ``(C, T, K)`` for ``behavior_loss``,
        ``behavior_reward_accuracy``, ``behavior_policy_accuracy`` (NaN when a
        behaviour is absent). Same definitions as :class:`EmpiricalTrajectory`.
      delta: ``(C, T, d)`` δ_t at the recorded steps, or ``None`` when
        ``return_delta=False``.
      delta_final: ``(C, d)`` δ after the last step.
      diverged: ``(C,)`` bool (:mod:`dynamics.divergence`, as the core).
      cum_batch_mean_norm: ``(C, T)`` Σ over steps so far of the minibatch mean ‖x‖ (as the core).
    """

    step: np.ndarray
    train: dict
    eval: dict
    delta: np.ndarray | None
    delta_final: np.ndarray
    diverged: np.ndarray
    cum_batch_mean_norm: np.ndarray | None = None


@struct.dataclass
class BatchedPopulationTrajectory:
    """Result of :func:`batched_population_trajectory` (NumPy arrays).

    Attributes:
      step: ``(T,)``. metrics: ``(C, T)`` ``loss``, ``reward_accuracy``,
        ``policy_accuracy``, ``rewards_margin``, ``weight_change``,
        ``grad_norm``; ``(C, T, K)`` ``behavior_*`` (as
        :class:`PopulationTrajectory`). delta: ``(C, T, d)`` or ``None``.
      delta_final: ``(C, d)``. diverged: ``(C,)`` bool.
    """

    step: np.ndarray
    metrics: dict
    delta: np.ndarray | None
    delta_final: np.ndarray
    diverged: np.ndarray


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


def _select(table, comp):
    """Per-pair lookup: ``table (C, J)``, ``comp (C, N)`` → ``(C, N)``, ``out[c, n] = table[c, comp[c, n]]``."""
    j = table.shape[1]
    if j == 1:
        return jnp.broadcast_to(table, comp.shape).astype(table.dtype)
    if j == 2:
        return jnp.where(comp == 0, table[:, :1], table[:, 1:2])
    return jnp.take_along_axis(table, comp.astype(jnp.int32), axis=1)


def _pick(values, comp):
    """Per-pair component choice: ``values (C, J, N)`` → ``(C, N)``, ``out[c, n] = values[c, comp[c, n], n]``."""
    j = values.shape[1]
    if j == 1:
        return values[:, 0]
    if j == 2:
        return jnp.where(comp == 0, values[:, 0], values[:, 1])
    return jnp.take_along_axis(values, comp.astype(jnp.int32)[:, None, :], axis=1)[:, 0]


def _select_q(table, comp):
    """``table (C, Q, J)`` per component → ``(C, Q, N)`` with ``out[c, q, n] = table[c, q, comp[c, n]]``."""
    j = table.shape[2]
    if j == 1:
        return jnp.broadcast_to(table, table.shape[:2] + comp.shape[1:])
    if j == 2:
        return jnp.where(comp[:, None, :] == 0, table[:, :, :1], table[:, :, 1:2])
    idx = jnp.broadcast_to(comp.astype(jnp.int32)[:, None, :], table.shape[:2] + comp.shape[1:])
    return jnp.take_along_axis(table, idx, axis=2)


def _pick_q(values, comp):
    """``values (C, Q, J, N)`` → ``(C, Q, N)`` with ``out[c, q, n] = values[c, q, comp[c, n], n]``."""
    j = values.shape[2]
    if j == 1:
        return values[:, :, 0]
    if j == 2:
        return jnp.where(comp[:, None, :] == 0, values[:, :, 0], values[:, :, 1])
    idx = jnp.broadcast_to(comp.astype(jnp.int32)[:, None, None, :], values.shape[:2] + (1,) + comp.shape[1:])
    return jnp.take_along_axis(values, idx, axis=2)[:, :, 0]


def _segment_sums(values, comp, num):
    """Per-configuration sums of ``values (C, N)`` over ``comp (C, N)`` ∈ [0, num) → ``(C, num)``."""
    if num == 1:
        return jnp.sum(values, axis=1, keepdims=True)
    if num == 2:
        s0 = jnp.sum(jnp.where(comp == 0, values, 0.0), axis=1)
        return jnp.stack([s0, jnp.sum(values, axis=1) - s0], axis=1)
    return jnp.einsum("cn,cnj->cj", values, jax.nn.one_hot(comp.astype(jnp.int32), num, dtype=values.dtype))


def _segment_mean(values, seg, num):
    """Mean of ``values (C, N)`` per segment ``seg (C, N)`` ∈ [0, num) → ``(C, num)``; NaN where
    a segment is empty (as ``dynamics._train.segment_mean`` per configuration)."""
    onehot = jax.nn.one_hot(seg, num, dtype=values.dtype)
    tot = jnp.einsum("cn,cnj->cj", values, onehot)
    cnt = jnp.sum(onehot, axis=1)
    return jnp.where(cnt > 0, tot / jnp.where(cnt > 0, cnt, 1.0), jnp.nan)


def _apply_root(root, vec, cov_kind, shared):
    """Noise directions ``R_j v`` for every component: ``vec (C, Q, d)`` → ``(C, Q, J, d)``.

    Isotropic: J = 1 and the scale σ is applied per sample instead. Shared roots: J = 1.
    """
    if cov_kind == "isotropic":
        return vec[:, :, None, :]
    r = root[:, :1] if shared else root
    if cov_kind == "diagonal":
        return r[:, None, :, :] * vec[:, :, None, :]
    return jnp.einsum("cjde,cqe->cqjd", r, vec)


def _apply_root_t(root, g, cov_kind, shared):
    """Adjoint of :func:`_apply_root` summed over components: ``g (C, J, d)`` → ``(C, d)``."""
    if cov_kind == "isotropic":
        return g[:, 0]
    r = root[:, :1] if shared else root
    if cov_kind == "diagonal":
        return jnp.sum(r * g, axis=1)
    return jnp.einsum("cjde,cje->cd", r, g)


def _draws(cfg, key, n, draws, dtype, mixing=None):
    """Behaviour, label and ε draws exactly as ``GaussianPreference.sample`` makes them.

    common: one key for all configurations → ε ``(n, d)``; independent:
    ``key (C,)`` → ε ``(C, n, d)``. With ``mixing`` ("laplace" / "student_t") the draws are
    those of :meth:`EllipticalPreference.sample` (Gaussian draws from the key's first half, the
    mixing variable W from its second) and the per-pair noise scale ``√W`` is returned too.
    Returns ``(eps, comp (C, n), s (C, n), beh (C, n), scale (C, n) or None)``.
    """
    d = cfg["mu_pos"].shape[-1]
    c = cfg["mu_pos"].shape[0]

    def labels(weight, p, kb, ks):
        behavior = jax.random.categorical(kb, jnp.log(weight), shape=(n,))
        pos = jax.random.uniform(ks, (n,), dtype=p.dtype) < p[behavior]
        return behavior.astype(jnp.int32), pos

    def mix(kw, nu):
        from types import SimpleNamespace

        from .families import EllipticalPreference

        stub = SimpleNamespace(base=SimpleNamespace(mu_pos=jnp.zeros((), dtype)), family=mixing, nu=nu)
        return jnp.sqrt(EllipticalPreference.mixing(stub, kw, n))  # the family's own draw of W

    nu = cfg.get("nu", jnp.full((c,), jnp.inf, dtype))
    scale = None
    if draws == "common":
        if mixing is not None:
            key, kw = jax.random.split(key)
            scale = jax.vmap(mix, in_axes=(None, 0))(kw, nu)
        kb, ks, kx = jax.random.split(key, 3)
        beh, pos = jax.vmap(labels, in_axes=(0, 0, None, None))(cfg["weight"], cfg["p_pos"], kb, ks)
        eps = jax.random.normal(kx, (n, d), dtype=dtype)
    else:
        if mixing is not None:
            kk = jax.vmap(jax.random.split)(key)
            key = kk[:, 0]
            scale = jax.vmap(mix)(kk[:, 1], nu)
        kk = jax.vmap(lambda k: jax.random.split(k, 3))(key)
        beh, pos = jax.vmap(labels)(cfg["weight"], cfg["p_pos"], kk[:, 0], kk[:, 1])
        eps = jax.vmap(lambda k: jax.random.normal(k, (n, d), dtype=dtype))(kk[:, 2])
    comp = 2 * beh + jnp.where(pos, 0, 1).astype(jnp.int32)
    s = jnp.where(pos, 1.0, -1.0).astype(dtype)
    return eps, comp, s, beh, scale


def _proj(eps, vec):
    """``vec (C, Q, d)`` · ε → ``(C, Q, N)``: a GEMM for shared ε ``(N, d)``, batched for ``(C, N, d)``."""
    if eps.ndim == 2:
        c, q, d = vec.shape
        return (vec.reshape(c * q, d) @ eps.T).reshape(c, q, eps.shape[0])
    return jnp.einsum("cqd,cnd->cqn", vec, eps)


def _proj_t(eps, weights):
    """Adjoint of :func:`_proj`: ``weights (C, Q, N)`` → ``(C, Q, d)``."""
    if eps.ndim == 2:
        c, q, m = weights.shape
        return (weights.reshape(c * q, m) @ eps).reshape(c, q, eps.shape[1])
    return jnp.einsum("cqn,cnd->cqd", weights, eps)


def _num_roots(cov_kind, shared, num_components):
    return 1 if cov_kind == "isotropic" or shared else num_components


def sample_batch(batch: PreferenceBatch, key, n: int, *, draws: str = "common"):
    """Materialise the pairs the engines train on: ``x (C, n, d)``, ``s (C, n)``, ``behavior (C, n)``.

    With ``draws="common"`` every configuration uses ``key`` (so configuration c's
    sample is ``batch.dist(c).sample(key, n)`` up to rounding of the covariance
    root); with ``draws="independent"`` configuration c uses ``config_keys(key, c)``
    (or ``key[c]`` for ``(C,)`` keys). The engines call this with the training
    key ``jax.random.split(key, 3)[0]`` and never build ``x``: memory C·n·d here.

    Raises:
      ValueError: bad ``draws``, ``n`` or key shape.
    """
    batch = batch.validate()
    check_choice("draws", draws, DRAWS)
    n = check_int("n", n)
    c, k, d = batch.mu_pos.shape
    key = _typed_key(key)
    if draws == "independent" and key.ndim == 0:
        key = config_keys(key, np.arange(c))
    if (draws == "common") != (key.ndim == 0) or (key.ndim and key.shape != (c,)):
        raise ValueError(f"draws={draws!r} takes {'one key' if draws == 'common' else f'one key or ({c},) keys'}, "
                         f"got keys of shape {key.shape}")
    cfg = {name: jnp.asarray(getattr(batch, name)) for name in ("mu_pos", "mu_neg", "root_pos", "root_neg",
                                                                "p_pos", "weight")}
    dtype = cfg["mu_pos"].dtype
    eps, comp, s, beh, _ = _draws(cfg, key, n, draws, dtype)
    mu_x, _, root, _ = _components(cfg, batch.cov_kind)
    means = jnp.take_along_axis(mu_x, comp[:, :, None], axis=1)  # (C, n, d)
    e = jnp.broadcast_to(eps, (c, n, d))
    if batch.cov_kind == "isotropic":
        noise = jnp.take_along_axis(root, comp, axis=1)[:, :, None] * e
    elif batch.cov_kind == "diagonal":
        noise = jnp.take_along_axis(root, comp[:, :, None], axis=1) * e
    else:
        r = jnp.take_along_axis(root, comp[:, :, None, None], axis=1)  # (C, n, d, d)
        noise = jnp.einsum("cnij,cnj->cni", r, e)
    return means + noise, s, beh


def empirical_flops_per_config_step(n: int, d: int, batch_size: int | None = None) -> int:
    """GEMM FLOPs of one training step of one configuration: ``4·B·d`` (forward ``B×d`` and
    backward ``d×B`` products; ``B = n`` for full batch). The figure the benchmark's GFLOP/s use."""
    return 4 * (batch_size or n) * d


def auto_chunk_size(num_configs: int, *, n: int, n_eval: int, d: int, num_behaviors: int = 1,
                    vocab_size: int = 2, num_roots: int = 1, itemsize: int = 4, independent: bool = False,
                    budget: int = _CHUNK_BUDGET) -> int:
    """Configurations per chunk so that one chunk's working memory stays under ``budget`` bytes.

    Per configuration the kernel holds about ``(n + n_eval)·(12 + 2·J·(1 + 2V))``
    numbers (step and record temporaries, the fixed head projections; J
    covariance roots per step, V vocabulary rows), ``(n + n_eval)·d`` more for
    independent draws (each configuration's own ε), and ``2K(d + d²)`` for the
    distribution. Capped at 4096 and at ``num_configs``.
    """
    per_pair = 12 + 2 * num_roots * (1 + 2 * vocab_size) + (d if independent else 0)
    per = itemsize * ((n + n_eval) * per_pair + 2 * num_behaviors * (d + d * d) + 4 * d)
    return int(max(1, min(num_configs, _MAX_AUTO_CHUNK, budget // max(per, 1))))


# --------------------------------------------------------------------------- empirical kernel
def _empirical_kernel(cfg, shared, *, n, n_eval, steps, record_every, batch_size, loss, optimizer, draws,
                      cov_kind, shared_root, head_kind, nonzero_scale, a, b, return_delta, label_noise=False,
                      loss_weight=False, mixing=None):
    """All configurations of one chunk (leading axis of every ``cfg`` leaf and of every output).

    ``cfg``: mu_pos, mu_neg, root_pos, root_neg, p_pos, weight, beta, lr, eps,
    d0 (C, d), w0, w_ref (C, V, d), ``key`` (C,) key data for independent
    draws, and when the flags are set ``label_noise`` (C, K) flip rates, ``loss_weight``
    (C, K) and ``nu`` (C,) (student_t mixing); ``shared``: ``key`` (key data) for common draws.
    ``head_kind``: "zero" (W_0 = W_ref = 0), "ref" (W_0 = W_ref) or "general". ``nonzero_scale``:
    every isotropic σ is > 0 (always true for other kinds, whose per-pair scale is the label ±1).
    ``mixing``: None (Gaussian) or an elliptical family ("laplace", "student_t"), whose draw
    ``x = μ + √W R ε`` is factored like the Gaussian one with a per-pair scale ``√W``.

    Only the projections ``x·v`` are computed here (one GEMM over the shared ε); the margins'
    metrics, the per-pair gradient weight, the optimizer step and the weight change are
    :mod:`dynamics.reduced`'s, as in the core.
    """
    from .empirical import flip_labels

    dtype = cfg["mu_pos"].dtype
    c, k, d = cfg["mu_pos"].shape
    j2 = 2 * k
    shared_flag = shared_root and cov_kind != "isotropic"
    mu_x, m_z, root, _ = _components(cfg, cov_kind)
    beta, lr, eps_ = traced_check_hparams(cfg["beta"], cfg["lr"], cfg["eps"], loss=loss, optimizer=optimizer)
    d0, w0, w_ref = cfg["d0"], cfg["w0"], cfg["w_ref"]
    vocab = w0.shape[1]
    sgn = jnp.tile(jnp.array([1.0, -1.0], dtype), k)  # label s of each component
    # s·σ of each component (isotropic: σ multiplies ε·δ per pair; otherwise it sits in R δ)
    sgn_scale = sgn * root if cov_kind == "isotropic" else jnp.broadcast_to(sgn, (c, j2))
    scale_tab = root if cov_kind == "isotropic" else jnp.ones((c, j2), dtype)
    if draws == "common":
        top = jax.random.wrap_key_data(shared["key"])
        keys = jax.random.split(top, 3)
    else:
        top = jax.random.wrap_key_data(cfg["key"])
        keys = jax.vmap(lambda kk: jax.random.split(kk, 3), out_axes=1)(top)
    key_train, key_eval, key_batch = keys[0], keys[1], keys[2]

    def xproj(sp, vecs):
        """``x·v`` for every pair of a split and every vector ``vecs (C, Q, d)`` → ``(C, Q, N)``."""
        q = vecs.shape[1]
        comp = sp["comp"]
        means = _select_q(jnp.einsum("cjd,cqd->cqj", mu_x, vecs), comp)  # (C, Q, N)
        noise = _apply_root(root, vecs, cov_kind, shared_flag)  # (C, Q, J, d)
        nj = noise.shape[2]
        amp = _proj(sp["eps"], noise.reshape(c, q * nj, d)).reshape(c, q, nj, -1)  # (C, Q, J, N)
        scale = _select(scale_tab, comp)
        if "scale" in sp:
            scale = scale * sp["scale"]
        return means + scale[:, None, :] * _pick_q(amp, comp)

    def norms(sp):
        """``‖x_i‖ (C, N)`` from ``‖μ_j‖² + 2t μ_jᵀR_jε + t²‖R_jε‖²`` (t: the pair's σ·√W)."""
        e, comp = sp["eps"], sp["comp"]
        t = _select(scale_tab, comp) * (sp["scale"] if "scale" in sp else 1.0)
        mm = _select(jnp.sum(mu_x**2, axis=-1), comp)
        if cov_kind == "isotropic":
            rmu = mu_x
        elif cov_kind == "diagonal":
            rmu = root * mu_x
        else:
            rmu = jnp.einsum("cjde,cje->cjd", root, mu_x)
        cross = _pick(_proj(e, rmu), comp)
        if cov_kind == "isotropic":
            quad = jnp.broadcast_to(jnp.sum(e**2, axis=-1), comp.shape)
        elif cov_kind == "diagonal":
            quad = _pick(_proj(e**2, root**2), comp)
        elif e.ndim == 2:
            quad = _pick(jnp.einsum("cjde,nd,ne->cjn", root @ root, e, e), comp)
        else:
            quad = _pick(jnp.einsum("cjde,cnd,cne->cjn", root @ root, e, e), comp)
        return jnp.sqrt(jnp.maximum(mm + 2.0 * t * cross + t**2 * quad, 0.0))

    def data(kk, m, train):
        e, comp, s, beh, scale = _draws(cfg, kk, m, draws, dtype, mixing)
        sp = {"eps": e, "comp": comp.astype(jnp.int8) if j2 <= 127 else comp}
        if scale is not None:
            sp["scale"] = scale
        if train:
            sp["norm"] = norms(sp)
            if label_noise:  # the core's draw: flip_labels(fold_in(key, 1), s, behavior, rate)
                fk = jax.random.fold_in(top, 1)
                s_fit = jax.vmap(flip_labels, in_axes=(None if draws == "common" else 0, 0, 0, 0))(
                    fk, s, beh, cfg["label_noise"])
                sp["flip"] = (s_fit * s).astype(dtype)
            if loss_weight:
                sp["lam"] = jnp.take_along_axis(cfg["loss_weight"].astype(dtype), beh, axis=1)
        # projections that stay fixed during training: the logits of W_0 and W_ref, (C, N, V)
        if head_kind == "general":
            fixed = jnp.swapaxes(xproj(sp, jnp.concatenate([w0, w_ref], axis=1)), 1, 2)
            sp["z0"], sp["zref"] = fixed[..., :vocab], fixed[..., vocab:]
        elif head_kind == "ref":
            sp["z0"] = sp["zref"] = jnp.swapaxes(xproj(sp, w_ref), 1, 2)
        return sp

    splits = {"train": data(key_train, n, True), "eval": data(key_eval, n_eval, False)}
    tr = splits["train"]
    per_pair = [name for name in ("comp", "scale", "norm", "flip", "lam") if name in tr]

    if batch_size is not None and draws == "common":
        table = epoch_orders(key_batch, n, batch_size, steps, d)
    elif batch_size is not None:
        fits = epoch_orders_fit(n, batch_size, steps, d, copies=key_batch.shape[0])
        table = jax.vmap(lambda kk: epoch_orders(kk, n, batch_size, steps, d))(key_batch) if fits else None

    def take(t):
        """The step-t minibatch: ε and the per-pair arrays (same indices as the core's)."""
        if batch_size is None:
            return {"eps": tr["eps"], **{name: tr[name] for name in per_pair}}
        if draws == "common":
            idx = minibatch_index(t, key_batch, table, n, batch_size)
            return {"eps": tr["eps"][idx], **{name: tr[name][:, idx] for name in per_pair}}
        idx = jax.vmap(lambda kk, tab: minibatch_index(t, kk, tab, n, batch_size),
                       in_axes=(0, None if table is None else 0))(key_batch, table)
        return {"eps": jnp.take_along_axis(tr["eps"], idx[:, :, None], axis=1),
                **{name: jnp.take_along_axis(tr[name], idx, axis=1) for name in per_pair}}

    def update(g, state, delta, lr_c, d0_c):
        return reduced.reduced_update(make_optimizer(optimizer, lr_c), g, state, delta, d0_c)

    def step_fn(carry):
        t, delta, state, cum = carry
        bt = take(t)
        e, comp = bt["eps"], bt["comp"]
        bsz = comp.shape[1]
        noise = _apply_root(root, delta[:, None, :], cov_kind, shared_flag)[:, 0]  # (C, J, d)
        amp = _pick(_proj(e, noise), comp)  # (C, B): (R_j δ)·ε of each pair's component
        sa = _select(sgn_scale, comp)  # s·σ of each pair
        if "scale" in bt:
            sa = sa * bt["scale"]
        h = _select(jnp.sum(m_z * delta[:, None, :], axis=-1), comp) + sa * amp  # (no tiny batched dots)
        if label_noise:  # trained on s̃ = f·s: margin f·h, gradient weight f·ℓ'(f·h)
            h = bt["flip"] * h
        w = reduced.pair_grad_weight(loss, h, beta[:, None], eps_[:, None])
        if label_noise:
            w = w * bt["flip"]
        if loss_weight:
            w = w * bt["lam"]
        r = w * sa
        nj = noise.shape[1]
        back = r[:, None, :] if nj == 1 else jax.nn.one_hot(comp, nj, dtype=r.dtype).transpose(0, 2, 1) * r[:, None, :]
        g_noise = _apply_root_t(root, _proj_t(e, back), cov_kind, shared_flag)
        # Σ_{pairs of component j} ℓ'; s·σ is constant within a component, so when no σ is 0 (and no
        # per-pair mixing scale) these sums come from r = ℓ'·s·σ, which the GEMM reads anyway
        sums = (_segment_sums(r, comp, j2) / sgn_scale if nonzero_scale and "scale" not in bt
                else _segment_sums(w, comp, j2))
        g = (jnp.sum(sums[:, :, None] * m_z, axis=1) + g_noise) / bsz
        delta, state = jax.vmap(update)(g, state, delta, lr, d0)
        return t + 1, delta, state, cum + jnp.mean(bt["norm"], axis=1)

    def metrics(sp, delta):
        comp = sp["comp"]
        x_delta = xproj(sp, delta[:, None])[:, 0]  # (C, N)
        s = _select(jnp.broadcast_to(sgn, (c, j2)), comp)
        beh = comp.astype(jnp.int32) // 2
        h = s * x_delta
        if head_kind == "zero":  # W_0 = W_ref = 0: logits (Δ·x, −Δ·x, 0, …), reference log-probs −log V
            policy = h
            lp_a, lp_b, ref = reduced.zero_head_logps(x_delta, vocab)
            rc = rr = jnp.broadcast_to(ref, x_delta.shape)
        else:
            z0, zref = sp["z0"], sp["zref"]  # (C, N, V)
            x_uref = zref[..., a] - zref[..., b]
            x_d0 = jnp.zeros_like(x_delta) if head_kind == "ref" else z0[..., a] - z0[..., b] - x_uref
            policy = s * (x_delta + x_uref)
            half = (x_delta - x_d0) / 2.0  # x·Δ with δ − δ_0 = 2Δ
            lp_a, lp_b = jax.vmap(lambda z, hf: reduced.head_logps(z, hf, a, b))(z0, half)
            lpr = jax.nn.log_softmax(zref, axis=-1)
            rc, rr = reduced.choose(s, lpr[..., a], lpr[..., b])
        lc, lrj = reduced.choose(s, lp_a, lp_b)
        out = jax.vmap(partial(reduced.split_metrics, k=k, loss=loss))(h, lc, lrj, rc, rr, policy, beh,
                                                                        beta=beta, eps=eps_)
        out["weight_change"] = jax.vmap(reduced.weight_change)(delta, d0)
        return out

    def record(carry):
        _, delta, _, cum = carry
        out = {name: metrics(sp, delta) for name, sp in splits.items()}
        return (out, cum, delta) if return_delta else (out, cum, None)

    state0 = jax.vmap(lambda z, lr_c: make_optimizer(optimizer, lr_c).init(z))(jnp.zeros_like(d0), lr)
    carry0 = (jnp.int32(0), d0, state0, jnp.zeros((c,), dtype))
    final, (recs, cum, deltas) = run_recorded(step_fn, record, carry0, steps, record_every)
    to_c = lambda v: jnp.moveaxis(v, 0, 1)  # (T, C, ...) → (C, T, ...)
    train = {m: to_c(v) for m, v in recs["train"].items()}
    bad = divergence.loss_diverged(train["loss"], axis=1) | ~jnp.all(jnp.isfinite(final[1]), axis=1)
    out = {"train": train, "eval": {m: to_c(v) for m, v in recs["eval"].items()}, "delta_final": final[1],
           "cum_batch_mean_norm": to_c(cum)}
    if return_delta:
        out["delta"] = to_c(deltas)
        bad = bad | ~jnp.all(jnp.isfinite(out["delta"]), axis=(1, 2))
    out["diverged"] = bad
    return out


# --------------------------------------------------------------------------- population kernel
POP_COV_KINDS = COV_KINDS + ("cov",)


def _population_one(m_z, root, pi, beh, beta, lr, eps, d0, u_ref, noise, lam, *, k, steps, record_every, loss,
                    optimizer, cov_kind, method, substeps):
    """Population trajectory of ONE configuration from its components (vmapped over a chunk).

    Components ``j``: z-means ``m_z (J, d)``, weights ``pi (J,)``, behaviours ``beh (J,)`` and the
    covariance as ``root`` by ``cov_kind``: "isotropic" σ ``(J,)``, "diagonal" r ``(J, d)``, "full"
    symmetric root ``R (J, d, d)`` or "cov" the covariance ``S (J, d, d)`` itself. Label noise ``ρ_k``
    mixes each component with its mirror ``−m`` (weight ρ); loss weights ``λ_k`` scale the training
    weights (docs/theory.md §5). The margin variance ``δᵀSδ`` costs O(d) for the first two kinds.
    """
    def moments(delta):
        mu = m_z @ delta
        if cov_kind == "isotropic":
            var, s_delta = root**2 * jnp.sum(delta**2), (root**2)[:, None] * delta[None, :]
        elif cov_kind == "diagonal":
            rd = root * delta[None, :]
            var, s_delta = jnp.sum(rd**2, axis=-1), root * rd
        elif cov_kind == "full":
            rd = root @ delta
            var, s_delta = jnp.sum(rd**2, axis=-1), jnp.einsum("jde,je->jd", root, rd)
        else:
            s_delta = root @ delta
            var = jnp.sum(s_delta * delta[None, :], axis=-1)
        return mu, reduced.safe_sqrt(var), s_delta

    pi_t = pi if lam is None else pi * lam[beh]
    rho = None if noise is None else noise[beh]

    def grad(delta):
        mu, sig, s_delta = moments(delta)
        _, e1, e2 = expected_loss_terms(loss, mu, sig, beta, eps)
        w_clean = pi_t if rho is None else pi_t * (1 - rho)
        g = (w_clean * e1) @ m_z + (w_clean * e2) @ s_delta
        if rho is not None:  # the mirrored components (flipped labels): mean −m, same covariance
            _, f1, f2 = expected_loss_terms(loss, -mu, sig, beta, eps)
            g = g - (pi_t * rho * f1) @ m_z + (pi_t * rho * f2) @ s_delta
        return g

    if method == "flow":
        dt = lr / substeps

        def step_fn(carry):
            t, delta, state = carry
            return t + 1, reduced.gradient_flow(grad, delta, dt, substeps), state

        state0 = ()
    else:
        opt = make_optimizer(optimizer, lr)

        def step_fn(carry):
            t, delta, state = carry
            delta, state = reduced.reduced_update(opt, grad(delta), state, delta, d0)
            return t + 1, delta, state

        state0 = opt.init(jnp.zeros_like(d0))

    def record(carry):
        _, delta, _ = carry
        mu, sig, _ = moments(delta)
        el, _, _ = expected_loss_terms(loss, mu, sig, beta, eps)
        racc = reduced.prob_positive(mu, sig)
        pmu, psig, _ = moments(delta + u_ref)
        pacc = reduced.prob_positive(pmu, psig)
        per = lambda v: reduced.per_behavior(pi, v, beh, k)
        out = {
            "loss": jnp.sum(pi * el),
            "reward_accuracy": jnp.sum(pi * racc),
            "policy_accuracy": jnp.sum(pi * pacc),
            "rewards_margin": beta * jnp.sum(pi * mu),
            "weight_change": reduced.weight_change(delta, d0),
            "grad_norm": reduced.safe_sqrt(jnp.sum(grad(delta) ** 2)),
            "behavior_loss": per(el),
            "behavior_reward_accuracy": per(racc),
            "behavior_policy_accuracy": per(pacc),
        }
        return out, delta

    final, (metrics, deltas) = run_recorded(step_fn, record, (jnp.int32(0), d0, state0), steps, record_every)
    return metrics, deltas, final[1]


def _population_kernel(cfg, shared, *, k, steps, record_every, loss, optimizer, cov_kind, return_delta,
                       method="gd", substeps=4, label_noise=False, loss_weight=False):
    """Population trajectories of all configurations of a chunk (see :func:`batched_population_trajectory`).

    ``cfg``: ``m_z (C, J, d)``, ``root`` (by ``cov_kind``), ``pi (C, J)``, ``beh (C, J)`` int, beta,
    lr, eps ``(C,)``, d0, u_ref ``(C, d)`` and, with the flags, ``label_noise``, ``loss_weight`` ``(C, K)``.
    """
    del shared
    beta, lr, eps = traced_check_hparams(cfg["beta"], cfg["lr"], cfg["eps"], loss=loss, optimizer=optimizer)
    one = partial(_population_one, k=k, steps=steps, record_every=record_every, loss=loss, optimizer=optimizer,
                  cov_kind=cov_kind, method=method, substeps=substeps)
    noise = cfg["label_noise"] if label_noise else None
    lam = cfg["loss_weight"] if loss_weight else None
    metrics, deltas, final = jax.vmap(one, in_axes=(0,) * 9 + (None if noise is None else 0,
                                                               None if lam is None else 0))(
        cfg["m_z"], cfg["root"], cfg["pi"], cfg["beh"], beta, lr, eps, cfg["d0"], cfg["u_ref"], noise, lam)
    bad = (divergence.loss_diverged(metrics["loss"], axis=1) | ~jnp.all(jnp.isfinite(deltas), axis=(1, 2))
           | ~jnp.all(jnp.isfinite(final), axis=1))
    out = {"metrics": metrics, "delta_final": final, "diverged": bad}
    if return_delta:
        out["delta"] = deltas
    return out


# --------------------------------------------------------------------------- driver
_COMPILED: dict = {}


def _compiled(kernel, statics: tuple, executor):
    """One compiled chunk function per (kernel, static arguments, executor)."""
    cache_key = (kernel.__name__, statics, executor)
    fn = _COMPILED.get(cache_key)
    if fn is None:
        body = partial(kernel, **dict(statics))
        fn = jax.jit(body) if executor is None else executor(body)
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        _COMPILED[cache_key] = fn
    return fn


def _per_config(name, value, c, dtype, *, positive=True):
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        arr = np.full((c,), arr, dtype=dtype)
    if arr.shape != (c,):
        raise ValueError(f"{name} has shape {arr.shape}; pass a scalar or one value per configuration, shape ({c},)")
    if positive:
        check_positive(name, arr)
    else:
        check_finite(name, arr)
    return arr


def _check_eps(loss, eps):
    """ε is the label smoothing of cdpo/robust, in [0, 1/2); any other loss takes ε = 0 (as the core)."""
    if uses_label_smoothing(loss):
        check_in_range("eps", eps, 0.0, 0.5, hi_open=True)
    elif np.any(eps != 0):
        raise ValueError(f"eps={float(np.max(np.abs(eps)))} has no effect with loss={loss!r}; it is the label "
                         "smoothing of 'cdpo' and 'robust' — pass eps=0 or choose one of those losses")


def _head_arrays(head, c, d, dtype):
    """``(arrays, a, b, head_kind)``: u_ref, d0 ``(C, d)``, w0, w_ref ``(C, V, d)`` (views) and
    "zero" (W_0 = W_ref = 0), "ref" (W_0 = W_ref) or "general"."""
    head = Head.zeros(d, dtype=dtype) if head is None else head
    if not isinstance(head, Head):
        raise ValueError(f"head must be a dynamics.Head (optionally with a leading (C,) axis), got {type(head).__name__}")
    if head.dim != d:
        raise ValueError(f"head has d = {head.dim} but the batch has d = {d}; they must match")
    w_ref, w0 = np.asarray(head.w_ref, dtype), np.asarray(head.w_init, dtype)
    if w_ref.ndim == 2:
        w_ref, w0 = np.broadcast_to(w_ref, (c,) + w_ref.shape), np.broadcast_to(w0, (c,) + w0.shape)
    if w_ref.ndim != 3 or w_ref.shape[0] != c:
        raise ValueError(f"head.w_ref has shape {head.w_ref.shape}; expected (V, d) or (C, V, d) with C = {c}")
    check_finite("head.w_ref", w_ref)
    check_finite("head.w_init", w0)
    u_ref = w_ref[:, head.a] - w_ref[:, head.b]
    d0 = w0[:, head.a] - w0[:, head.b] - u_ref
    kind = "zero" if not (np.any(w_ref) or np.any(w0)) else "ref" if np.array_equal(w0, w_ref) else "general"
    return {"u_ref": u_ref, "d0": d0, "w0": w0, "w_ref": w_ref}, head.a, head.b, kind


def _run_chunks(fn, cfg: dict, shared: dict, c: int, chunk: int, multiple: int = 1):
    """Run ``fn`` over chunks of at most ``chunk`` configurations; NumPy outputs.

    The chunks are balanced (``ceil(C / n_chunks)`` each, rounded up to ``multiple``) and the
    last one is padded by repeating its last configuration, so every chunk has one shape and
    the program compiles once.
    """
    n_chunks = -(-c // max(1, chunk))
    chunk = -(-c // n_chunks)
    chunk = int(-(-chunk // multiple) * multiple)
    out = None
    for lo in range(0, c, chunk):
        idx = np.minimum(np.arange(lo, lo + chunk), c - 1)
        part = jax.tree_util.tree_map(lambda v: v[idx], cfg)
        res = jax.device_get(fn(part, shared))
        take = min(chunk, c - lo)
        if out is None:
            out = jax.tree_util.tree_map(lambda v: np.empty((c,) + v.shape[1:], v.dtype), res)
        jax.tree_util.tree_map(lambda dst, src: dst.__setitem__(slice(lo, lo + take), src[:take]), out, res)
    return out


def _batch_cfg(batch: PreferenceBatch, dtype):
    return {name: np.asarray(getattr(batch, name), dtype) for name in
            ("mu_pos", "mu_neg", "root_pos", "root_neg", "p_pos", "weight")}


def _common_inputs(batch, beta, lr, eps, steps, record_every, loss, optimizer):
    """Checks and per-configuration arrays shared by both batched engines.

    Returns ``(batch, steps, record_every, dtype, cfg)``: the validated batch and schedule, the
    active default float dtype (as the core engines use) and the distribution arrays with
    ``beta``, ``lr``, ``eps`` of shape ``(C,)``. Raises ValueError for a bad argument (named).
    """
    if not isinstance(batch, PreferenceBatch):
        raise ValueError(f"batch must be a PreferenceBatch, got {type(batch).__name__}; "
                         "build one with PreferenceBatch.from_dists(dists)")
    batch = batch.validate()
    validate_loss(loss, None, 0.0)
    steps, record_every = check_schedule(steps, record_every, None if lr is None else 1.0, optimizer)  # lr: below
    c = batch.mu_pos.shape[0]
    dtype = np.dtype(jnp.result_type(float))
    cfg = _batch_cfg(batch, dtype)
    cfg["beta"] = _per_config("beta", beta, c, dtype)
    cfg["lr"] = _per_config("lr", 0.0 if lr is None else lr, c, dtype,
                            positive=lr is not None and not hasattr(optimizer, "update"))
    cfg["eps"] = _per_config("eps", eps, c, dtype, positive=False)
    _check_eps(loss, cfg["eps"])
    return batch, steps, record_every, dtype, cfg


def _interventions(cfg, c, k, dtype, label_noise, loss_weight):
    """``label_noise`` / ``loss_weight``: None, ``(K,)`` or ``(C, K)`` → ``(C, K)`` entries of ``cfg``;
    returns the two flags. Raises ValueError naming the field (shape, range)."""
    flags = []
    for name, value in (("label_noise", label_noise), ("loss_weight", loss_weight)):
        if value is None:
            flags.append(False)
            continue
        arr = np.asarray(value, dtype)
        if arr.shape == (k,):
            arr = np.broadcast_to(arr, (c, k))
        if arr.shape != (c, k):
            raise ValueError(f"{name} has shape {arr.shape}; expected one value per behaviour, (K,) = ({k},), "
                             f"or per configuration and behaviour, (C, K) = ({c}, {k})")
        if name == "label_noise":
            check_in_range(name, arr, 0.0, 0.5)
        else:
            check_positive(name, arr, allow_zero=True)
        cfg[name] = arr
        flags.append(True)
    return tuple(flags)


def batched_empirical_trajectory(batch: PreferenceBatch, key, *, n: int, beta, lr=None, steps: int,
                                 loss: str = "sigmoid", eps=0.0, batch_size: int | None = None, optimizer=None,
                                 n_eval: int = 2048, record_every: int = 1, head: Head | None = None,
                                 draws: str = "common", chunk_size: int | None = None,
                                 return_delta: bool = True, executor=None, label_noise=None, loss_weight=None,
                                 mixing: str | None = None, nu=None) -> BatchedEmpiricalTrajectory:
    """Train C last-layer heads on C preference distributions at once (empirical layer).

    Args:
      batch: the C configurations' distributions (:class:`PreferenceBatch`).
      key: PRNG key. ``draws="common"``: one key, used by every configuration
        (common random numbers; configuration c's result equals
        ``empirical_trajectory(batch.dist(c), key, ...)``). ``draws="independent"``:
        one key (configuration c then uses ``config_keys(key, c)``) or ``(C,)``
        keys (configuration c uses ``key[c]``), and c's result equals
        ``empirical_trajectory(batch.dist(c), that key, ...)``.
      n, n_eval: training and held-out pairs per configuration (static).
      beta, lr, eps: scalars or ``(C,)`` arrays (β > 0; lr > 0 unless
        ``optimizer`` is an optax transformation; ε for cdpo/robust).
      steps, record_every, loss, batch_size, optimizer: as in
        :func:`empirical_trajectory` (static; one compile per combination).
      head: ``None`` (zero head), a :class:`Head` shared by all
        configurations, or one with ``(C, V, d)`` weights.
      draws: "common" (shared draws, GEMM per step) or "independent".
      chunk_size: configurations per compiled chunk (default
        :func:`auto_chunk_size`, ≤ 4096); working memory scales with it, not C.
      return_delta: keep δ at every recorded step (``(C, T, d)``).
      executor: ``None`` (``jax.jit`` on the default device) or a callable
        turning the chunk function into a runner, e.g.
        ``sims.distributed.sharded_executor(mesh)`` to split the configuration
        axis over devices; its ``chunk_multiple`` attribute rounds the chunk.
      label_noise: ``None``, ``(K,)`` or ``(C, K)`` flip rates of the training labels in [0, 1/2]
        (drawn as the core draws them, ``flip_labels(fold_in(key, 1), …)``).
      loss_weight: ``None``, ``(K,)`` or ``(C, K)`` per-behaviour loss weights λ_k ≥ 0.
      mixing: ``None`` (Gaussian) or "laplace" / "student_t": the pairs of
        ``EllipticalPreference.create(batch.dist(c), mixing, nu[c])`` (``x = μ + √W R ε``).
      nu: student_t degrees of freedom, scalar or ``(C,)``, > 2.

    Returns:
      :class:`BatchedEmpiricalTrajectory` (NumPy), ``T = steps // record_every + 1``.
      The training loop costs ``4·B·d`` GEMM FLOPs per configuration-step
      (:func:`empirical_flops_per_config_step`) with common draws.

    Raises:
      ValueError: bad argument (named, with the fix), e.g. ``(C,)`` keys with
        ``draws="common"``.

    Source: docs/theory.md §1–§3; the construction is in docs/performance.md.
    """
    check_choice("draws", draws, DRAWS)
    n = check_int("n", n)
    n_eval = check_int("n_eval", n_eval)
    batch, steps, record_every, dtype, cfg = _common_inputs(batch, beta, lr, eps, steps, record_every, loss,
                                                            optimizer)
    batch_size = check_batch_size(batch_size, n)
    c, k, d = batch.mu_pos.shape
    heads, a, b, head_kind = _head_arrays(head, c, d, dtype)
    vocab = heads["w0"].shape[1]
    empty = np.zeros((c, vocab, 0), dtype)  # only the vocabulary size is needed
    cfg.update(d0=heads["d0"], w0=heads["w0"] if head_kind == "general" else empty,
               w_ref=heads["w_ref"] if head_kind != "zero" else empty)
    flags = _interventions(cfg, c, k, dtype, label_noise, loss_weight)
    if mixing is not None:
        from .families import ELLIPTICAL_FAMILIES

        check_choice("mixing", mixing, ELLIPTICAL_FAMILIES)
        if mixing == "student_t":
            cfg["nu"] = _per_config("nu", np.inf if nu is None else nu, c, dtype)
            check_positive("nu - 2", cfg["nu"] - 2.0)
    key = _typed_key(key)
    shared = {}
    if draws == "common":
        if key.ndim != 0:
            raise ValueError(f"draws='common' takes one key, got keys of shape {key.shape}; pass one key or "
                             "draws='independent'")
        shared["key"] = np.asarray(jax.random.key_data(key))
    else:
        if key.ndim == 0:
            key = config_keys(key, np.arange(c))
        if key.shape != (c,):
            raise ValueError(f"draws='independent' takes one key or (C,) = ({c},) keys, got shape {key.shape}")
        cfg["key"] = np.asarray(jax.random.key_data(key))
    shared_root = batch.shared_root()
    nroots = _num_roots(batch.cov_kind, shared_root, 2 * k)
    if chunk_size is None:
        chunk_size = auto_chunk_size(c, n=n, n_eval=n_eval, d=d, num_behaviors=k, vocab_size=vocab,
                                     num_roots=nroots, itemsize=dtype.itemsize, independent=draws == "independent")
    chunk_size = check_int("chunk_size", chunk_size)
    statics = (("n", n), ("n_eval", n_eval), ("steps", steps), ("record_every", record_every),
               ("batch_size", batch_size), ("loss", loss), ("optimizer", optimizer), ("draws", draws),
               ("cov_kind", batch.cov_kind), ("shared_root", shared_root), ("head_kind", head_kind),
               ("nonzero_scale", batch.cov_kind != "isotropic" or bool(np.all(cfg["root_pos"] > 0)
                                                                       and np.all(cfg["root_neg"] > 0))),
               ("a", a), ("b", b),
               ("return_delta", bool(return_delta)), ("label_noise", flags[0]), ("loss_weight", flags[1]),
               ("mixing", mixing))
    fn = _compiled(_empirical_kernel, statics, executor)
    out = _run_chunks(fn, cfg, shared, c, min(chunk_size, c), getattr(executor, "chunk_multiple", 1))
    return BatchedEmpiricalTrajectory(step=np.arange(0, steps + 1, record_every), train=out["train"],
                                      eval=out["eval"], delta=out.get("delta"), delta_final=out["delta_final"],
                                      diverged=out["diverged"], cum_batch_mean_norm=out["cum_batch_mean_norm"])


def population_components(batch: PreferenceBatch, dtype=None) -> dict:
    """The factored population kernel's inputs of a batch: ``m_z (C, 2K, d)``, ``root``, ``pi (C, 2K)``,
    ``beh (C, 2K)`` (components interleaved as :meth:`GaussianPreference.components`)."""
    cfg = _batch_cfg(batch, dtype or np.dtype(jnp.result_type(float)))
    _, m_z, root, pi = _components(cfg, batch.cov_kind)
    c, k = batch.num_configs, batch.num_behaviors
    beh = np.broadcast_to(np.repeat(np.arange(k, dtype=np.int32), 2), (c, 2 * k))
    return {"m_z": np.asarray(m_z), "root": np.asarray(root), "pi": np.asarray(pi), "beh": beh}


def batched_population_trajectory(batch: PreferenceBatch, *, beta, lr=None, steps: int, loss: str = "sigmoid",
                                  eps=0.0, optimizer=None, record_every: int = 1, head: Head | None = None,
                                  chunk_size: int | None = None, return_delta: bool = True,
                                  executor=None, method: str = "gd", substeps: int = 4, label_noise=None,
                                  loss_weight=None, components: dict | None = None,
                                  cov_kind: str | None = None) -> BatchedPopulationTrajectory:
    """Population (N → ∞) trajectories of C configurations at once.

    Configuration c's result equals ``population_trajectory(batch.dist(c), beta=beta[c],
    lr=lr[c], ...)``. Isotropic and diagonal covariances cost
    ``O(K d)`` per configuration-step (the margin variance ``σ²‖δ‖²`` or
    ``‖r ⊙ δ‖²``), full ones ``O(K d²)``; each step also evaluates the
    accurate Gaussian integrals of ``expected_loss_terms`` for 2K components.

    Args:
      batch: :class:`PreferenceBatch`. beta, lr, eps: scalars or ``(C,)``.
      steps, record_every, loss, optimizer, head, chunk_size, return_delta,
      executor: as in :func:`batched_empirical_trajectory`.
      method, substeps: "gd" or "flow" (RK4, ``substeps`` per step; plain GD only), as the core.
      label_noise, loss_weight: ``None``, ``(K,)`` or ``(C, K)`` (docs/theory.md §5).
      components, cov_kind: instead of the batch's own 2K components, any components
        (a dict as :func:`population_components` returns, ``root`` given by ``cov_kind`` ∈
        ``("isotropic", "diagonal", "full", "cov")``; "cov" = the covariances themselves), e.g.
        a mixture's; ``batch`` then only sets C, K and d.

    Returns:
      :class:`BatchedPopulationTrajectory` (NumPy).

    Raises:
      ValueError: bad argument (named). Source: docs/theory.md §3.
    """
    batch, steps, record_every, dtype, cfg = _common_inputs(batch, beta, lr, eps, steps, record_every, loss,
                                                            optimizer)
    check_choice("method", method, ("gd", "flow"))
    if method == "flow" and optimizer is not None:
        raise ValueError("method='flow' is plain gradient flow; pass optimizer=None")
    substeps = check_int("substeps", substeps)
    c, k, d = batch.mu_pos.shape
    heads, _, _, _ = _head_arrays(head, c, d, dtype)
    flags = _interventions(cfg, c, k, dtype, label_noise, loss_weight)
    if components is None:
        components, cov_kind = population_components(batch, dtype), batch.cov_kind
    check_choice("cov_kind", cov_kind, POP_COV_KINDS)
    cfg = {name: v for name, v in cfg.items() if name in ("beta", "lr", "eps", "label_noise", "loss_weight")}
    cfg.update({name: np.asarray(v, dtype if name != "beh" else np.int32) for name, v in components.items()})
    cfg["u_ref"], cfg["d0"] = heads["u_ref"], heads["d0"]
    j = cfg["pi"].shape[1]
    if chunk_size is None:
        per = dtype.itemsize * (j * (d + (d * d if cov_kind in ("full", "cov") else d)) * 4 + 1344 * j * 8
                                + (steps // record_every + 1) * (d + 6 + 3 * k))
        chunk_size = int(max(1, min(c, 16384, _CHUNK_BUDGET // per)))
    chunk_size = check_int("chunk_size", chunk_size)
    statics = (("k", k), ("steps", steps), ("record_every", record_every), ("loss", loss), ("optimizer", optimizer),
               ("cov_kind", cov_kind), ("return_delta", bool(return_delta)), ("method", method),
               ("substeps", substeps), ("label_noise", flags[0]), ("loss_weight", flags[1]))
    fn = _compiled(_population_kernel, statics, executor)
    out = _run_chunks(fn, cfg, {}, c, min(chunk_size, c), getattr(executor, "chunk_multiple", 1))
    return BatchedPopulationTrajectory(step=np.arange(0, steps + 1, record_every), metrics=out["metrics"],
                                       delta=out.get("delta"), delta_final=out["delta_final"],
                                       diverged=out["diverged"])
