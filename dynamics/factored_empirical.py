"""The factored empirical engine: C configurations' finite-sample training at GEMM speed.

Configuration ``c`` draws its pairs as :meth:`GaussianPreference.sample` does
(``x_i = μ_c[j_i] + R_c[j_i] z_i`` with standard-normal ``z_i``); with common random numbers
every configuration shares ``z``, so the margins of all configurations are one
``(n × d)·(d × C)`` GEMM per step (the construction: :mod:`dynamics.batched`'s overview and
docs/performance.md). The per-pair maths is :mod:`dynamics.reduced`'s, shared with the core.
Source: docs/theory.md §1–§3.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import chunking, divergence, reduced
from ._checks import check_choice, check_int, check_positive, traced_check_hparams
from ._factored_driver import (_CHUNK_BUDGET, _MAX_AUTO_CHUNK, _common_inputs, _compiled, _head_arrays,
                               _interventions, _per_config, _run_chunks)
from .empirical import METRICS
from ._train import check_batch_size, epoch_orders, epoch_orders_fit, make_optimizer, minibatch_index, run_recorded
from .batch import DRAWS, PreferenceBatch, _components, _typed_key, config_keys
from .head import Head

__all__ = ["BATCHED_METRICS", "BatchedEmpiricalTrajectory", "batched_empirical_trajectory", "sample_batch",
           "auto_chunk_size", "empirical_flops_per_config_step"]

#: per-split metrics of the batched empirical engine (same names and meaning as dynamics.METRICS)
BATCHED_METRICS = METRICS  # the core's metric names: one list for both implementations


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



# --------------------------------------------------------------------------- helpers
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
    Returns ``(z, comp (C, n), s (C, n), beh (C, n), scale (C, n) or None)``.
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
        z = jax.random.normal(kx, (n, d), dtype=dtype)
    else:
        if mixing is not None:
            kk = jax.vmap(jax.random.split)(key)
            key = kk[:, 0]
            scale = jax.vmap(mix)(kk[:, 1], nu)
        kk = jax.vmap(lambda k: jax.random.split(k, 3))(key)
        beh, pos = jax.vmap(labels)(cfg["weight"], cfg["p_pos"], kk[:, 0], kk[:, 1])
        z = jax.vmap(lambda k: jax.random.normal(k, (n, d), dtype=dtype))(kk[:, 2])
    comp = 2 * beh + jnp.where(pos, 0, 1).astype(jnp.int32)
    s = jnp.where(pos, 1.0, -1.0).astype(dtype)
    return z, comp, s, beh, scale


def _proj(z, vec):
    """``vec (C, Q, d)`` · ε → ``(C, Q, N)``: a GEMM for shared ε ``(N, d)``, batched for ``(C, N, d)``."""
    if z.ndim == 2:
        c, q, d = vec.shape
        return (vec.reshape(c * q, d) @ z.T).reshape(c, q, z.shape[0])
    return jnp.einsum("cqd,cnd->cqn", vec, z)


def _proj_t(z, weights):
    """Adjoint of :func:`_proj`: ``weights (C, Q, N)`` → ``(C, Q, d)``."""
    if z.ndim == 2:
        c, q, m = weights.shape
        return (weights.reshape(c * q, m) @ z).reshape(c, q, z.shape[1])
    return jnp.einsum("cqn,cnd->cqd", weights, z)


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
    z, comp, s, beh, _ = _draws(cfg, key, n, draws, dtype)
    mu_x, _, root, _ = _components(cfg, batch.cov_kind)
    means = jnp.take_along_axis(mu_x, comp[:, :, None], axis=1)  # (C, n, d)
    e = jnp.broadcast_to(z, (c, n, d))
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
    distribution (:func:`dynamics.chunking.empirical_bytes_per_config`, with the two records of
    steps 0 and T). Capped at 4096 and at ``num_configs`` (:func:`dynamics.chunking.configs_per_chunk`).
    """
    per = chunking.empirical_bytes_per_config(n=n, n_eval=n_eval, d=d, num_behaviors=num_behaviors,
                                              vocab_size=vocab_size, num_roots=num_roots, itemsize=itemsize,
                                              independent=independent)
    return chunking.configs_per_chunk(num_configs, per, budget=budget, cap=_MAX_AUTO_CHUNK)


# --------------------------------------------------------------------------- empirical kernel
def _empirical_kernel(cfg, shared, *, n, n_eval, steps, record_every, batch_size, loss, optimizer, draws,
                      cov_kind, shared_root, head_kind, nonzero_scale, a, b, return_delta, label_noise=False,
                      loss_weight=False, mixing=None):
    """All configurations of one chunk (leading axis of every ``cfg`` leaf and of every output).

    ``cfg``: mu_pos, mu_neg, root_pos, root_neg, p_pos, weight, beta, lr, label_smoothing,
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
    from .empirical import noisy_labels

    dtype = cfg["mu_pos"].dtype
    c, k, d = cfg["mu_pos"].shape
    j2 = 2 * k
    shared_flag = shared_root and cov_kind != "isotropic"
    mu_x, m_z, root, _ = _components(cfg, cov_kind)
    beta, lr, label_smoothing_ = traced_check_hparams(cfg["beta"], cfg["lr"], cfg["label_smoothing"], loss=loss, optimizer=optimizer)
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
        amp = _proj(sp["z"], noise.reshape(c, q * nj, d)).reshape(c, q, nj, -1)  # (C, Q, J, N)
        scale = _select(scale_tab, comp)
        if "scale" in sp:
            scale = scale * sp["scale"]
        return means + scale[:, None, :] * _pick_q(amp, comp)

    def norms(sp):
        """``‖x_i‖ (C, N)`` from ``‖μ_j‖² + 2t μ_jᵀR_jε + t²‖R_jε‖²`` (t: the pair's σ·√W)."""
        e, comp = sp["z"], sp["comp"]
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
        sp = {"z": e, "comp": comp.astype(jnp.int8) if j2 <= 127 else comp}
        if scale is not None:
            sp["scale"] = scale
        if train:
            sp["norm"] = norms(sp)
            if label_noise:  # the core's draw: noisy_labels(fold_in(key, 1), s, behavior, rate)
                fk = jax.random.fold_in(top, 1)
                s_fit = jax.vmap(noisy_labels, in_axes=(None if draws == "common" else 0, 0, 0, 0))(
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
            return {"z": tr["z"], **{name: tr[name] for name in per_pair}}
        if draws == "common":
            idx = minibatch_index(t, key_batch, table, n, batch_size)
            return {"z": tr["z"][idx], **{name: tr[name][:, idx] for name in per_pair}}
        idx = jax.vmap(lambda kk, tab: minibatch_index(t, kk, tab, n, batch_size),
                       in_axes=(0, None if table is None else 0))(key_batch, table)
        return {"z": jnp.take_along_axis(tr["z"], idx[:, :, None], axis=1),
                **{name: jnp.take_along_axis(tr[name], idx, axis=1) for name in per_pair}}

    def update(g, state, delta, lr_c, d0_c):
        return reduced.reduced_update(make_optimizer(optimizer, lr_c), g, state, delta, d0_c)

    def step_fn(carry):
        t, delta, state, cum = carry
        bt = take(t)
        e, comp = bt["z"], bt["comp"]
        bsz = comp.shape[1]
        noise = _apply_root(root, delta[:, None, :], cov_kind, shared_flag)[:, 0]  # (C, J, d)
        amp = _pick(_proj(e, noise), comp)  # (C, B): (R_j δ)·ε of each pair's component
        sa = _select(sgn_scale, comp)  # s·σ of each pair
        if "scale" in bt:
            sa = sa * bt["scale"]
        h = _select(jnp.sum(m_z * delta[:, None, :], axis=-1), comp) + sa * amp  # (no tiny batched dots)
        if label_noise:  # trained on s̃ = f·s: margin f·h, gradient weight f·ℓ'(f·h)
            h = bt["flip"] * h
        w = reduced.pair_grad_weight(loss, h, beta[:, None], label_smoothing_[:, None])
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
                                                                        beta=beta, label_smoothing=label_smoothing_)
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


def batched_empirical_trajectory(batch: PreferenceBatch, key, *, n: int, beta, lr=None, steps: int,
                                 loss: str = "sigmoid", label_smoothing=0.0, batch_size: int | None = None, optimizer=None,
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
      beta, lr, label_smoothing: scalars or ``(C,)`` arrays (β > 0; lr > 0 unless
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
        (drawn as the core draws them, ``noisy_labels(fold_in(key, 1), …)``).
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
    batch, steps, record_every, dtype, cfg = _common_inputs(batch, beta, lr, label_smoothing, steps, record_every, loss,
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

