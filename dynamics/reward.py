"""A ground-truth reward: Bradley–Terry oracle labels for DPO and exact KL-regularised RLHF (docs/theory.md §11).

* **Oracle.** A true linear reward ``r*(x, y) = θ*_yᵀ x`` (``Θ* (V, d)``). The label of a pair
  ``(x, y_w, y_l)`` is kept with probability ``σ(r*(x, y_w) − r*(x, y_l))`` and swapped otherwise;
  the paper's deterministic labels are the limit ``‖Θ*‖ → ∞``.
* **Population oracle DPO** (margin-only losses of :data:`dynamics.losses.LOSSES`):
  ``E[σ(t) ℓ(h) + σ(−t) ℓ(−h)]`` with the policy margin ``h = δ_kᵀ z`` and the true gap
  ``t = η_kᵀ z`` (``η_k = θ*_{a_k} − θ*_{b_k}``), jointly Gaussian per component: a 2-D
  Gauss–Hermite cubature (:func:`dynamics.vocab_population.cubature_rule`) on the eigenbasis of the
  2×2 covariance of ``(h, t)``; gradient by Stein's lemma.
* **RLHF policy stage** ``J(W) = E_x[Σ_y π_W(y|x) r(x, y) − β KL(π_W ‖ π_ref)]`` for a linear reward
  ``r = Θ x``: ``J(W) = β E[log Z*(x)/Z_ref(x)] − β E KL(π_W ‖ π_{W*})`` with ``W* = W_ref + Θ/β``,
  so the value and its Stein gradient are the package's cubature on the image of ``(W x, W* x)``.
* **Empirical**: oracle-labelled DPO (full-batch, :func:`dynamics._train.make_optimizer`) and
  REINFORCE / RLOO with sampled responses, explicit PRNG keys.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._checks import check_finite, check_int, check_positive, check_scalar
from ._train import check_schedule, make_optimizer, run_recorded
from .head import Head
from . import reduced
from .vocab_population import _component_cubature, _image_nodes, _rule

__all__ = ["oracle_labels", "oracle_population_loss", "oracle_population_gradient", "oracle_population_trajectory",
           "oracle_empirical_trajectory", "OracleTrajectory", "rlhf_optimum", "rlhf_objective", "rlhf_gradient",
           "rlhf_population_trajectory", "reinforce_gradient", "reinforce_trajectory", "policy_metrics", "ORACLE_ORDER"]

#: Gauss–Hermite points per dimension of the 2-D (h, t) rule of the oracle loss (accuracy: docs/theory.md §11)
ORACLE_ORDER = 64


# ------------------------------------------------------------------------------------------ checks
def _dist(dist):
    from .population import as_default_float

    if hasattr(dist, "validate"):
        dist = dist.validate()
    if not hasattr(dist, "components") and hasattr(dist, "gaussian_equivalent"):
        dist = dist.gaussian_equivalent()
    return as_default_float(dist)


def _matrix(name, value, shape, dtype):
    check_finite(name, value)
    value = jnp.asarray(value, dtype)
    if value.shape != tuple(shape):
        raise ValueError(f"{name} has shape {value.shape}; expected (V, d) = {tuple(shape)}, the policy head's shape")
    return value


def _beta(beta):
    check_scalar("beta", beta)
    check_positive("beta", beta)
    return float(beta)


def _head(head, dist):
    if not isinstance(head, Head) or head.w_ref is None:
        raise ValueError("head must be a dynamics.Head with a reference; pass Head.zeros(d, vocab_size=V) "
                         "or Head.create(w_ref, w_init)")
    if head.dim != dist.dim:
        raise ValueError(f"head has d = {head.dim} but the distribution has d = {dist.dim}; they must match")
    return head


def _loss(loss_type, beta, label_smoothing):
    from .losses import validate_loss

    validate_loss(loss_type, beta, label_smoothing)
    return loss_type


# ------------------------------------------------------------------------------------------ oracle
def oracle_labels(key, theta_star, x, chosen, rejected):
    """Bradley–Terry labels: keep ``(chosen, rejected)`` with probability ``σ(r*(x, y_w) − r*(x, y_l))``, else swap.

    Args:
      key: PRNG key. theta_star: ``(V, d)`` true reward head ``Θ*`` (reward in nats of preference odds).
      x: ``(n, d)`` prompts. chosen, rejected: ``(n,)`` int tokens of the pair as presented.

    Returns:
      ``(chosen, rejected, kept)``: the oracle's tokens ``(n,)`` and the boolean ``kept (n,)``.

    Raises:
      ValueError: ``theta_star`` / ``x`` not ``(V, d)`` / ``(n, d)`` with the same ``d``, or not finite.
    """
    check_finite("theta_star", theta_star)
    check_finite("x", x)
    theta_star, x = jnp.asarray(theta_star), jnp.asarray(x)
    if theta_star.ndim != 2 or x.ndim != 2 or theta_star.shape[1] != x.shape[1]:
        raise ValueError(f"theta_star has shape {theta_star.shape} and x {x.shape}; expected (V, d) and (n, d)")
    gap = jnp.einsum("nd,nd->n", theta_star[chosen] - theta_star[rejected], x)
    kept = jax.random.uniform(key, gap.shape, dtype=x.dtype) < jax.nn.sigmoid(gap)
    return jnp.where(kept, chosen, rejected), jnp.where(kept, rejected, chosen), kept


def _oracle_terms(loss_type, w, w_ref, theta, comps, pairs, beta, label_smoothing, xi, wt):
    """Per component ``E[σ(t)ℓ(h) + σ(−t)ℓ(−h)] (J,)`` and its gradient ``(J, V, d)`` (docs/theory.md §11.1)."""
    from .losses import loss_fn

    v = w.shape[0]
    dw = w - w_ref
    ab = pairs[comps.behavior]
    delta = dw[ab[:, 0]] - dw[ab[:, 1]]  # (J, d)
    eta = theta[ab[:, 0]] - theta[ab[:, 1]]  # (J, d)

    def f(ht):
        h, t = ht[0], ht[1]
        return (jax.nn.sigmoid(t) * loss_fn(loss_type, h, beta, label_smoothing)
                + jax.nn.sigmoid(-t) * loss_fn(loss_type, -h, beta, label_smoothing))

    def one(dl, et, m, s):
        b = jax.lax.stop_gradient(jnp.stack([dl, et]))  # (2, d)
        mean = b @ m
        c = b @ s @ b.T
        lam, q = jnp.linalg.eigh((c + c.T) / 2.0)
        lam = jnp.where(lam > 1e-12 * jnp.maximum(lam[-1], 1e-300), lam, 0.0)
        nodes = mean + xi @ (q * jnp.sqrt(lam)).T  # (n, 2)
        val = wt @ jax.vmap(f)(nodes)
        g1 = wt @ jax.vmap(jax.grad(f))(nodes)  # (2,)
        hess = jnp.einsum("n,nij->ij", wt, jax.vmap(jax.hessian(f))(nodes))
        # Stein: ∇_δ E f(δᵀz, ηᵀz) = m E f_h + S (δ E f_hh + η E f_ht)
        gd = m * g1[0] + s @ (dl * hess[0, 0] + et * hess[0, 1])
        return val, gd

    vals, gd = jax.vmap(one)(delta, eta, comps.mean, comps.cov)
    rows = jax.nn.one_hot(ab[:, 0], v, dtype=w.dtype) - jax.nn.one_hot(ab[:, 1], v, dtype=w.dtype)
    return vals, jnp.einsum("cv,ci->cvi", rows, gd)


@partial(jax.jit, static_argnames=("loss_type", "pairs", "order"))
def _oracle_jit(dist, w, w_ref, theta, beta, label_smoothing, *, loss_type, pairs, order):
    comps = dist.components()
    xi, wt = _rule(2, order, w.dtype)
    vals, grads = _oracle_terms(loss_type, w, w_ref, theta, comps, jnp.asarray(pairs, jnp.int32), beta,
                                label_smoothing, xi, wt)
    total = jnp.sum(comps.weight * vals)
    per_k = reduced.per_behavior(comps.weight, vals, comps.behavior, dist.num_behaviors)
    return total, per_k, jnp.einsum("c,cvi->vi", comps.weight, grads)


def _oracle_prepare(dist, w, head, theta_star, loss_type, beta, label_smoothing, cubature_order):
    dist = _dist(dist)
    head = _head(head, dist)
    beta = _beta(beta)
    _loss(loss_type, beta, label_smoothing)
    dtype = dist.components().mean.dtype
    shape = head.w_init.shape
    w = head.w_init.astype(dtype) if w is None else _matrix("w", w, shape, dtype)
    theta = _matrix("theta_star", theta_star, shape, dtype)
    order = ORACLE_ORDER if cubature_order is None else check_int("cubature_order", cubature_order)
    pairs = tuple(map(tuple, np.asarray(head.token_pairs(dist.num_behaviors)).tolist()))
    return dist, head, w, theta, beta, dict(loss_type=loss_type, pairs=pairs, order=order)


def oracle_population_loss(dist, w, *, head, theta_star, loss_type="sigmoid", beta=1.0, label_smoothing=0.0,
                           cubature_order=None):
    """Population DPO loss under Bradley–Terry oracle labels: ``(L_total (), per-behaviour (K,))`` (nats).

    ``L = Σ_c π_c E_c[σ(t) ℓ(h) + σ(−t) ℓ(−h)]``, ``h = δ_kᵀ z`` the policy's reward margin
    (``δ_k = (W − W_ref)_{a_k} − (W − W_ref)_{b_k}``), ``t = η_kᵀ z`` the true reward gap
    (``η_k = θ*_{a_k} − θ*_{b_k}``), ``z = s x`` per component (docs/theory.md §11.1). A 2-D
    tensor Gauss–Hermite rule of ``cubature_order`` (default :data:`ORACLE_ORDER`) points per
    dimension; accuracy vs Monte Carlo in docs/theory.md §11.1.

    Args:
      dist: a Gaussian preference distribution (``components()``). w: ``(V, d)`` head (``None``: ``head.w_init``).
      head: :class:`dynamics.Head` with ``w_ref`` and the token pairs. theta_star: ``(V, d)`` true reward ``Θ*``.
      loss_type: a margin-only loss of :data:`dynamics.losses.LOSSES` (``sigmoid``, ``hinge``, ``ipo``, ...).
      beta: β > 0. label_smoothing: ε for ``cdpo`` / ``robust``.

    Raises:
      ValueError: unknown ``loss_type``, β ≤ 0, ``w`` / ``theta_star`` not of the head's shape ``(V, d)``,
      a head without reference or of another ``d``.
    """
    dist, head, w, theta, beta, st = _oracle_prepare(dist, w, head, theta_star, loss_type, beta, label_smoothing,
                                                     cubature_order)
    total, per_k, _ = _oracle_jit(dist, w, head.w_ref.astype(w.dtype), theta, beta, label_smoothing, **st)
    return total, per_k


def oracle_population_gradient(dist, w, *, head, theta_star, loss_type="sigmoid", beta=1.0, label_smoothing=0.0,
                               cubature_order=None):
    """``∇_W`` of :func:`oracle_population_loss`, shape ``(V, d)`` (Stein's lemma, docs/theory.md §11.1).

    Same arguments and errors as :func:`oracle_population_loss`.
    """
    dist, head, w, theta, beta, st = _oracle_prepare(dist, w, head, theta_star, loss_type, beta, label_smoothing,
                                                     cubature_order)
    return _oracle_jit(dist, w, head.w_ref.astype(w.dtype), theta, beta, label_smoothing, **st)[2]


class OracleTrajectory(NamedTuple):
    """Recorded training: ``step (R,)``, heads ``w (R, V, d)``, ``loss (R,)`` (population: exact oracle loss;
    empirical: the training-set mean loss on the oracle's labels)."""
    step: jax.Array
    w: jax.Array
    loss: jax.Array


def _schedule(steps, record_every, lr, optimizer):
    """``(steps, record_every)`` checked as every layer checks them (``steps`` a multiple of ``record_every``)."""
    steps, record_every = check_schedule(steps, record_every, lr, optimizer)
    if not isinstance(optimizer, optax.GradientTransformation):
        check_positive("lr", lr)
    return steps, record_every


def _lr(lr, dtype):
    """The step size as a traced scalar (0 where an optax transformation carries its own)."""
    return jnp.asarray(0.0 if lr is None else lr, dtype)


def _oracle_pop_loss_grad(w, data, static):
    dist, w_ref, theta, beta, label_smoothing = data
    total, _, grad = _oracle_jit(dist, w, w_ref, theta, beta, label_smoothing, **static)
    return total, grad


def _oracle_emp_loss_grad(w, data, static):
    from .losses import loss_fn

    x, ch, rj, w_ref, beta, label_smoothing = data

    def mean_loss(w):
        dw = (w - w_ref) @ x.T  # (V, n)
        h = jnp.take_along_axis(dw, ch[None], 0)[0] - jnp.take_along_axis(dw, rj[None], 0)[0]
        return jnp.mean(loss_fn(static["loss_type"], h, beta, label_smoothing))

    return jax.value_and_grad(mean_loss)(w)


def _rlhf_loss_grad(w, data, static):
    dist, w_ref, theta, beta = data
    value, _, grad = _rlhf_jit(dist, w, w_ref, theta, beta, **static)
    return -value, -grad


_LOSS_GRAD = {"oracle_population": _oracle_pop_loss_grad, "oracle_empirical": _oracle_emp_loss_grad,
              "rlhf_population": _rlhf_loss_grad}


@partial(jax.jit, static_argnames=("kind", "static", "optimizer", "steps", "record_every"))
def _trajectory(data, w0, lr, *, kind, static, optimizer, steps, record_every):
    """Deterministic training of ``w`` on ``_LOSS_GRAD[kind]`` (one compile per shape and static record)."""
    loss_grad = lambda w: _LOSS_GRAD[kind](w, data, dict(static))
    opt = make_optimizer(optimizer, lr)

    def step_fn(carry):
        w, state = carry
        upd, state = opt.update(loss_grad(w)[1], state, w)
        return optax.apply_updates(w, upd), state

    def record(carry):
        return carry[0], loss_grad(carry[0])[0]

    _, (ws, losses) = run_recorded(step_fn, record, (w0, opt.init(w0)), steps, record_every)
    return ws, losses


def _recorded(ws, losses, steps, record_every):
    return OracleTrajectory(jnp.arange(0, steps + 1, record_every), ws, losses)


def oracle_population_trajectory(dist, *, head, theta_star, loss_type="sigmoid", beta=1.0, label_smoothing=0.0,
                                 lr=0.1, steps=100, optimizer=None, record_every=1, cubature_order=None):
    """Population (N → ∞) training of the head on oracle labels: an :class:`OracleTrajectory` (docs/theory.md §11.1).

    ``optimizer``: as :func:`dynamics._train.make_optimizer` (``None``/"sgd", "momentum", "adam"), step ``lr``.
    Errors as :func:`oracle_population_loss`, plus ``steps < 0`` / ``record_every < 1``.
    """
    dist, head, w0, theta, beta, st = _oracle_prepare(dist, None, head, theta_star, loss_type, beta,
                                                      label_smoothing, cubature_order)
    steps, record_every = _schedule(steps, record_every, lr, optimizer)
    data = (dist, head.w_ref.astype(w0.dtype), theta, beta, jnp.asarray(label_smoothing, w0.dtype))
    out = _trajectory(data, w0, _lr(lr, w0.dtype), kind="oracle_population", static=tuple(sorted(st.items())),
                      optimizer=optimizer, steps=steps, record_every=record_every)
    return _recorded(*out, steps, record_every)


def oracle_empirical_trajectory(dist, key, *, head, theta_star, n, loss_type="sigmoid", beta=1.0,
                                label_smoothing=0.0, lr=0.1, steps=100, optimizer=None, record_every=1):
    """Empirical (N = ``n``) full-batch training on ``n`` pairs whose labels the oracle draws (docs/theory.md §11.1).

    ``key`` splits into the pair sample (:func:`dynamics.vocab.sample_pairs`) and the oracle's label
    draw (:func:`oracle_labels`); the per-pair loss is ``ℓ(h)`` of the margin-only ``loss_type`` on
    the oracle-labelled margin. Returns an :class:`OracleTrajectory` (``loss``: training mean).
    Errors as :func:`oracle_population_trajectory`, plus ``n < 1``.
    """
    from .vocab import sample_pairs

    dist, head, w0, theta, beta, _ = _oracle_prepare(dist, None, head, theta_star, loss_type, beta,
                                                     label_smoothing, None)
    n = check_int("n", n)
    steps, record_every = _schedule(steps, record_every, lr, optimizer)
    k_pairs, k_labels = jax.random.split(key)
    x, s, behavior = sample_pairs(dist, k_pairs, n)
    ab = head.token_pairs(dist.num_behaviors)[behavior]
    pos = s > 0
    ch, rj, _ = oracle_labels(k_labels, theta, x, jnp.where(pos, ab[:, 0], ab[:, 1]), jnp.where(pos, ab[:, 1], ab[:, 0]))
    data = (x, ch, rj, head.w_ref.astype(w0.dtype), beta, jnp.asarray(label_smoothing, w0.dtype))
    out = _trajectory(data, w0, _lr(lr, w0.dtype), kind="oracle_empirical", static=(("loss_type", loss_type),),
                      optimizer=optimizer, steps=steps, record_every=record_every)
    return _recorded(*out, steps, record_every)


# -------------------------------------------------------------------------------------------- RLHF
def rlhf_optimum(w_ref, reward, beta):
    """``W* = W_ref + Θ/β`` (``(V, d)``): the maximiser of ``J`` for the linear reward ``r = Θ x`` (docs/theory.md §11.2).

    Raises:
      ValueError: β ≤ 0, ``reward`` not of ``w_ref``'s shape.
    """
    beta = _beta(beta)
    w_ref = jnp.asarray(w_ref)
    return w_ref + _matrix("reward", reward, w_ref.shape, w_ref.dtype) / beta


def _kl_rows(u, v):
    """``KL(softmax(u[:v]) ‖ softmax(u[v:]))`` of one node ``u (2V,)``."""
    lp, lq = jax.nn.log_softmax(u[:v]), jax.nn.log_softmax(u[v:])
    return jnp.sum(jnp.exp(lp) * (lp - lq))


def _lse_rows(u, v):
    return jax.scipy.special.logsumexp(u[:v]) - jax.scipy.special.logsumexp(u[v:])


@partial(jax.jit, static_argnames=("r", "r_ref", "order"))
def _rlhf_jit(dist, w, w_ref, theta, beta, *, r, r_ref, order):
    comps = dist.components()
    mean_x = comps.sign[:, None] * comps.mean
    v = w.shape[0]
    w_star = w_ref + theta / beta
    xi, wt = _rule(r, order, w.dtype)
    xr, wr = _rule(r_ref, order, w.dtype)
    g = lambda u, _c, _r: -beta * _kl_rows(u, v)
    z = jnp.zeros((), jnp.int32)
    kl_star, grads = jax.vmap(lambda mx, cv: _component_cubature(g, w, w_star, mx, cv, z, z, xi, wt))(mean_x, comps.cov)
    # β E[log Z*(x) − log Z_ref(x)] (no W): the image of (W* x, W_ref x)
    log_z = jax.vmap(lambda mx, cv: wr @ jax.vmap(lambda u: _lse_rows(u, v))(_image_nodes(w_star, w_ref, mx, cv, xr)))(
        mean_x, comps.cov)
    vals = beta * log_z + kl_star
    return (jnp.sum(comps.weight * vals), reduced.per_behavior(comps.weight, vals, comps.behavior, dist.num_behaviors),
            jnp.einsum("c,cvi->vi", comps.weight, grads))


def _rlhf_prepare(dist, w, w_ref, reward, beta, cubature_order):
    dist = _dist(dist)
    beta = _beta(beta)
    check_finite("w_ref", w_ref)
    dtype = dist.components().mean.dtype
    w_ref = jnp.asarray(w_ref, dtype)
    if w_ref.ndim != 2 or w_ref.shape[1] != dist.dim or w_ref.shape[0] < 2:
        raise ValueError(f"w_ref has shape {w_ref.shape}; expected (V, d) with V >= 2 and d = {dist.dim}")
    w = w_ref if w is None else _matrix("w", w, w_ref.shape, dtype)
    theta = _matrix("reward", reward, w_ref.shape, dtype)
    r = max(1, min(2 * (w_ref.shape[0] - 1), dist.dim))  # rank of the centred image of (W x, W2 x)
    order = None if cubature_order is None else check_int("cubature_order", cubature_order)
    return dist, w, w_ref, theta, beta, dict(r=r, r_ref=r, order=order)


def rlhf_objective(dist, w, *, w_ref, reward, beta, cubature_order=None):
    """Exact KL-regularised RLHF objective ``J(W)``: ``(J (), per-behaviour (K,))`` (reward units; docs/theory.md §11.2).

    ``J(W) = E_x[Σ_y π_W(y|x) r(x, y) − β KL(π_W(·|x) ‖ π_ref(·|x))]`` with ``π_W = softmax(W x)``,
    ``π_ref = softmax(W_ref x)``, ``r(x, y) = Θ_y x``; prompts ``x`` from the mixture of the
    distribution's components (``x ~ N(s m_c, S_c)``). Evaluated as
    ``β E[log Z*/Z_ref] − β E KL(π_W ‖ π_{W*})`` by the tensor Gauss–Hermite rule
    (:func:`dynamics.vocab_population.cubature_rule`) on the rank-``min(2(V − 1), d)`` image.

    Args:
      w: ``(V, d)`` policy head (``None``: ``w_ref``). w_ref: ``(V, d)`` reference. reward: ``(V, d)`` ``Θ``.
      beta: KL coefficient β > 0. cubature_order: points per dimension (default: the package's table).

    Raises:
      ValueError: β ≤ 0, ``reward`` / ``w`` not of ``w_ref``'s shape, ``w_ref`` not ``(V, d)``.
    """
    dist, w, w_ref, theta, beta, st = _rlhf_prepare(dist, w, w_ref, reward, beta, cubature_order)
    total, per_k, _ = _rlhf_jit(dist, w, w_ref, theta, beta, **st)
    return total, per_k


def rlhf_gradient(dist, w, *, w_ref, reward, beta, cubature_order=None):
    """``∇_W J`` (ascent direction), shape ``(V, d)``: Stein's lemma on the image of ``(W x, W* x)`` (§11.2).

    Same arguments and errors as :func:`rlhf_objective`.
    """
    dist, w, w_ref, theta, beta, st = _rlhf_prepare(dist, w, w_ref, reward, beta, cubature_order)
    return _rlhf_jit(dist, w, w_ref, theta, beta, **st)[2]


def rlhf_population_trajectory(dist, *, w_ref, reward, beta, w_init=None, lr=0.1, steps=100, optimizer=None,
                               record_every=1, cubature_order=None):
    """Population gradient ascent on ``J`` from ``w_init`` (default ``w_ref``): an :class:`OracleTrajectory`
    whose ``loss`` is ``−J`` (docs/theory.md §11.2). Errors as :func:`rlhf_objective`."""
    dist, w0, w_ref, theta, beta, st = _rlhf_prepare(dist, w_init, w_ref, reward, beta, cubature_order)
    steps, record_every = _schedule(steps, record_every, lr, optimizer)
    out = _trajectory((dist, w_ref, theta, beta), w0, _lr(lr, w0.dtype), kind="rlhf_population",
                      static=tuple(sorted(st.items())), optimizer=optimizer, steps=steps, record_every=record_every)
    return _recorded(*out, steps, record_every)


def _reinforce(dist, key, w, w_ref, theta, beta, n, k):
    """``(mean KL-penalised score, gradient estimate (V, d))`` from fresh prompts and responses."""
    kx, ky = jax.random.split(key)
    x = dist.sample(kx, n)[0]
    logits = x @ w.T  # (n, V)
    y = jax.random.categorical(ky, logits[:, None, :], axis=-1, shape=(n, k))  # (n, k)
    lp = jax.nn.log_softmax(logits)
    lpr = jax.nn.log_softmax(x @ w_ref.T)
    take = lambda a: jnp.take_along_axis(a, y, 1)
    score = take(x @ theta.T) - beta * (take(lp) - take(lpr))  # KL-penalised reward (TRL's "rewards" - β·kl)
    adv = score - (jnp.sum(score, 1, keepdims=True) - score) / (k - 1) if k > 1 else score
    grad_logp = jax.nn.one_hot(y, w.shape[0], dtype=w.dtype) - jnp.exp(lp)[:, None, :]  # (n, k, V)
    return jnp.mean(score), jnp.einsum("nk,nkv,nd->vd", adv, grad_logp, x) / (n * k)


@partial(jax.jit, static_argnames=("n", "k"))
def _reinforce_jit(dist, key, w, w_ref, theta, beta, *, n, k):
    return _reinforce(dist, key, w, w_ref, theta, beta, n, k)[1]


def reinforce_gradient(dist, key, w, *, w_ref, reward, beta, n, rloo_k=1):
    """Monte Carlo estimate of ``∇_W J`` from ``n`` prompts and ``rloo_k`` sampled responses each, ``(V, d)`` (§11.2).

    ``∇J = E_x E_{y∼π_W}[(r(x, y) − β log(π_W/π_ref)(y|x)) ∇_W log π_W(y|x)]`` (REINFORCE,
    ``rloo_k = 1``); with ``rloo_k ≥ 2`` each response's score is centred by the mean of the other
    ``rloo_k − 1`` (RLOO, unbiased). ``key`` draws the prompts (``dist.sample``)
    and the responses.

    Raises:
      ValueError: β ≤ 0, shapes as :func:`rlhf_objective`, ``n < 1`` or ``rloo_k < 1``.
    """
    dist, w, w_ref, theta, beta, _ = _rlhf_prepare(dist, w, w_ref, reward, beta, None)
    n = check_int("n", n)
    k = check_int("rloo_k", rloo_k)
    return _reinforce_jit(dist, key, w, w_ref, theta, beta, n=n, k=k)


def reinforce_trajectory(dist, key, *, w_ref, reward, beta, n, rloo_k=1, w_init=None, lr=0.1, steps=100,
                         optimizer=None, record_every=1):
    """Online REINFORCE / RLOO ascent of ``J``: each step draws ``n`` fresh prompts and ``rloo_k`` responses
    each (``key`` split per step) and applies :func:`reinforce_gradient`'s estimate (docs/theory.md §11.2).

    Returns an :class:`OracleTrajectory` whose ``loss`` at each recorded step is minus the sample mean
    of the KL-penalised score ``r − β log(π_W/π_ref)`` at the recorded head, from ``n`` prompts of a
    stream of its own (a noisy estimate of ``−J``). In expectation over keys it follows
    :func:`rlhf_population_trajectory` up to ``O(lr² / (n·rloo_k))``. Errors as
    :func:`reinforce_gradient`, plus ``steps`` not a multiple of ``record_every``.
    """
    dist, w0, w_ref, theta, beta, _ = _rlhf_prepare(dist, w_init, w_ref, reward, beta, None)
    n = check_int("n", n)
    k = check_int("rloo_k", rloo_k)
    steps, record_every = _schedule(steps, record_every, lr, optimizer)
    out = _reinforce_run(dist, key, w0, w_ref, theta, beta, _lr(lr, w0.dtype), n=n, k=k, optimizer=optimizer,
                         steps=steps, record_every=record_every)
    return _recorded(*out, steps, record_every)


@partial(jax.jit, static_argnames=("n", "k", "optimizer", "steps", "record_every"))
def _reinforce_run(dist, key, w0, w_ref, theta, beta, lr, *, n, k, optimizer, steps, record_every):
    opt = make_optimizer(optimizer, lr)
    k_step, k_rec = jax.random.split(key)

    def step_fn(carry):
        t, w, state = carry
        g = _reinforce(dist, jax.random.fold_in(k_step, t), w, w_ref, theta, beta, n, k)[1]
        upd, state = opt.update(-g, state, w)
        return t + 1, optax.apply_updates(w, upd), state

    def record(carry):
        t, w, _ = carry
        return w, -_reinforce(dist, jax.random.fold_in(k_rec, t), w, w_ref, theta, beta, n, k)[0]

    _, (ws, losses) = run_recorded(step_fn, record, (jnp.int32(0), w0, opt.init(w0)), steps, record_every)
    return ws, losses


# ------------------------------------------------------------------------------------------ metrics
@partial(jax.jit, static_argnames=("r", "order"))
def _metrics_jit(dist, w, w_ref, theta, beta, *, r, order):
    comps = dist.components()
    mean_x = comps.sign[:, None] * comps.mean
    v = w.shape[0]
    w_star = w_ref + theta / beta
    xi, wt = _rule(r, order, w.dtype)

    def value(a, mx, cv):  # E Σ_y π_a(y|x) r*(x, y): exact under the centring (Σ π = 1, r̄ linear)
        u = _image_nodes(a, theta, mx, cv, xi)
        return wt @ jnp.sum(jax.nn.softmax(u[:, :v], -1) * u[:, v:], -1)

    def kl(mx, cv):
        return wt @ jax.vmap(lambda u: _kl_rows(u, v))(_image_nodes(w, w_ref, mx, cv, xi))

    val = jax.vmap(lambda mx, cv: value(w, mx, cv))(mean_x, comps.cov)
    val_star = jax.vmap(lambda mx, cv: value(w_star, mx, cv))(mean_x, comps.cov)
    kls = jax.vmap(kl)(mean_x, comps.cov)
    per = lambda a: reduced.per_behavior(comps.weight, a, comps.behavior, dist.num_behaviors)
    tot = lambda a: jnp.sum(comps.weight * a)
    return {"reward": tot(val), "reward_gap": tot(val_star - val), "kl": tot(kls),
            "reward_per_behavior": per(val), "reward_gap_per_behavior": per(val_star - val),
            "kl_per_behavior": per(kls)}


def policy_metrics(dist, w, *, w_ref, reward, beta, cubature_order=None):
    """True-reward metrics of the policy ``softmax(W x)`` (docs/theory.md §11.3): a dict of arrays.

    ``reward``: ``E_x E_{y∼π_W} r*(x, y)`` (reward units); ``reward_gap``: the optimal KL-regularised
    policy's (``W* = W_ref + Θ*/β``) value minus it; ``kl``: ``E_x KL(π_W ‖ π_ref)`` (nats, exact up to
    the cubature); each also ``*_per_behavior (K,)``. Prompts and rule as :func:`rlhf_objective`.

    Raises:
      ValueError: as :func:`rlhf_objective`.
    """
    dist, w, w_ref, theta, beta, st = _rlhf_prepare(dist, w, w_ref, reward, beta, cubature_order)
    return _metrics_jit(dist, w, w_ref, theta, beta, r=st["r_ref"], order=st["order"])
