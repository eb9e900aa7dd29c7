"""The factored population engine: C configurations' analytic (N → ∞) trajectories at once.

The per-component Stein gradient and the optimizer / gradient-flow step are
:mod:`dynamics.reduced`'s, shared with :func:`dynamics.population_trajectory`; here the margin
variance ``δᵀSδ`` costs ``O(d)`` per component for isotropic and diagonal covariances.
Source: docs/theory.md §3.1, §5.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import chunking, divergence, reduced
from ._checks import check_choice, check_int, traced_check_hparams
from ._factored_driver import _CHUNK_BUDGET, _common_inputs, _compiled, _head_arrays, _interventions, _run_chunks
from ._train import run_recorded
from .batch import COV_KINDS, PreferenceBatch, _batch_cfg, _components
from .head import Head
from .losses import expected_loss_terms

__all__ = ["POPULATION_METRICS", "POP_COV_KINDS", "BatchedPopulationTrajectory", "batched_population_trajectory",
           "population_components"]

#: metrics of the batched population engine (as dynamics.population_metrics)
POPULATION_METRICS = (
    "loss", "reward_accuracy", "policy_accuracy", "rewards_margin", "weight_change", "grad_norm",
    "behavior_loss", "behavior_reward_accuracy", "behavior_policy_accuracy",
)


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



# --------------------------------------------------------------------------- population kernel
POP_COV_KINDS = COV_KINDS + ("cov",)


def _population_one(m_z, root, pi, beh, beta, lr, label_smoothing, d0, u_ref, noise, lam, *, k, steps, record_every, loss,
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
        w_clean = pi_t if rho is None else pi_t * (1 - rho)
        g = reduced.stein_gradient(loss, mu, sig, w_clean, m_z, s_delta, beta, label_smoothing)
        if rho is not None:  # the mirrored components (flipped labels): mean −m, same covariance
            g = g + reduced.stein_gradient(loss, -mu, sig, pi_t * rho, -m_z, s_delta, beta, label_smoothing)
        return g

    step_fn, state0 = reduced.population_step(grad, method=method, optimizer=optimizer, lr=lr, d0=d0,
                                              substeps=substeps)

    def record(carry):
        _, delta, _ = carry
        mu, sig, _ = moments(delta)
        el, _, _ = expected_loss_terms(loss, mu, sig, beta, label_smoothing)
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
    lr, label_smoothing ``(C,)``, d0, u_ref ``(C, d)`` and, with the flags, ``label_noise``, ``loss_weight`` ``(C, K)``.
    """
    del shared
    beta, lr, label_smoothing = traced_check_hparams(cfg["beta"], cfg["lr"], cfg["label_smoothing"], loss=loss, optimizer=optimizer)
    one = partial(_population_one, k=k, steps=steps, record_every=record_every, loss=loss, optimizer=optimizer,
                  cov_kind=cov_kind, method=method, substeps=substeps)
    noise = cfg["label_noise"] if label_noise else None
    lam = cfg["loss_weight"] if loss_weight else None
    metrics, deltas, final = jax.vmap(one, in_axes=(0,) * 9 + (None if noise is None else 0,
                                                               None if lam is None else 0))(
        cfg["m_z"], cfg["root"], cfg["pi"], cfg["beh"], beta, lr, label_smoothing, cfg["d0"], cfg["u_ref"], noise, lam)
    bad = (divergence.loss_diverged(metrics["loss"], axis=1) | ~jnp.all(jnp.isfinite(deltas), axis=(1, 2))
           | ~jnp.all(jnp.isfinite(final), axis=1))
    out = {"metrics": metrics, "delta_final": final, "diverged": bad}
    if return_delta:
        out["delta"] = deltas
    return out


def population_components(batch: PreferenceBatch, dtype=None) -> dict:
    """The factored population kernel's inputs of a batch: ``m_z (C, 2K, d)``, ``root``, ``pi (C, 2K)``,
    ``beh (C, 2K)`` (components interleaved as :meth:`GaussianPreference.components`)."""
    cfg = _batch_cfg(batch, dtype or np.dtype(jnp.result_type(float)))
    _, m_z, root, pi = _components(cfg, batch.cov_kind)
    c, k = batch.num_configs, batch.num_behaviors
    beh = np.broadcast_to(np.repeat(np.arange(k, dtype=np.int32), 2), (c, 2 * k))
    return {"m_z": np.asarray(m_z), "root": np.asarray(root), "pi": np.asarray(pi), "beh": beh}


def batched_population_trajectory(batch: PreferenceBatch, *, beta, lr=None, steps: int, loss: str = "sigmoid",
                                  label_smoothing=0.0, optimizer=None, record_every: int = 1, head: Head | None = None,
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
      batch: :class:`PreferenceBatch`. beta, lr, label_smoothing: scalars or ``(C,)``.
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
    batch, steps, record_every, dtype, cfg = _common_inputs(batch, beta, lr, label_smoothing, steps, record_every, loss,
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
    cfg = {name: v for name, v in cfg.items() if name in ("beta", "lr", "label_smoothing", "label_noise", "loss_weight")}
    cfg.update({name: np.asarray(v, dtype if name != "beh" else np.int32) for name, v in components.items()})
    cfg["u_ref"], cfg["d0"] = heads["u_ref"], heads["d0"]
    j = cfg["pi"].shape[1]
    if chunk_size is None:
        per = chunking.population_bytes_per_config(d=d, num_components=j, num_behaviors=k,
                                                   records=steps // record_every + 1,
                                                   full_cov=cov_kind in ("full", "cov"), itemsize=dtype.itemsize)
        chunk_size = chunking.configs_per_chunk(c, per, budget=_CHUNK_BUDGET, cap=chunking.MAX_POPULATION_CHUNK)
    chunk_size = check_int("chunk_size", chunk_size)
    statics = (("k", k), ("steps", steps), ("record_every", record_every), ("loss", loss), ("optimizer", optimizer),
               ("cov_kind", cov_kind), ("return_delta", bool(return_delta)), ("method", method),
               ("substeps", substeps), ("label_noise", flags[0]), ("loss_weight", flags[1]))
    fn = _compiled(_population_kernel, statics, executor)
    out = _run_chunks(fn, cfg, {}, c, min(chunk_size, c), getattr(executor, "chunk_multiple", 1))
    return BatchedPopulationTrajectory(step=np.arange(0, steps + 1, record_every), metrics=out["metrics"],
                                       delta=out.get("delta"), delta_final=out["delta_final"],
                                       diverged=out["diverged"])
