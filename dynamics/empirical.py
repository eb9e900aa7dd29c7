"""The empirical layer: finite-sample last-layer DPO by GD, minibatch SGD or optax.

Two paths compute the same trajectory (docs/theory.md §1.4):

* ``path="reduced"`` (fast): only ``δ ∈ R^d`` is trained; for SGD, momentum and
  Adam without weight decay the head stays ``W_t = W_0 + (e_a − e_b) Δ_tᵀ`` with
  ``δ_t − δ_0 = 2Δ_t``, so a step costs ``O(B d)``. Log-probabilities over the
  full vocabulary are reconstructed exactly at record time.
* ``path="full"`` (reference): the whole ``V×d`` head with a full
  log-softmax and autodiff, as a DPO trainer would run it.

Metric names follow TRL's DPOTrainer (``rewards/accuracies`` →
``reward_accuracy``, ``rewards/chosen`` → ``rewards_chosen`` …).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from . import divergence
from ._checks import (check_choice, check_finite, check_in_range, check_int, check_key, is_concrete, one_line_check_errors,
                      traced_check_hparams)
from ._train import (check_batch_size, check_schedule, epoch_orders, make_optimizer, minibatch_index, run_recorded,
                     segment_mean)
from .distributions import GaussianPreference
from .head import Head
from .losses import loss_fn, loss_grad_fn, validate_loss
from .population import as_default_float, check_interventions
from . import reduced

__all__ = ["EmpiricalTrajectory", "empirical_trajectory", "trajectory_on_data", "noisy_labels", "check_sample", "check_pair_values",
           "METRICS"]

METRICS = (
    "loss", "reward_accuracy", "policy_accuracy", "rewards_chosen", "rewards_rejected",
    "rewards_margin", "logps_chosen", "logps_rejected", "weight_change",
    "behavior_loss", "behavior_reward_accuracy", "behavior_policy_accuracy",
)


@struct.dataclass
class EmpiricalTrajectory:
    """Result of :func:`empirical_trajectory` (a pytree; vmapped calls stack it).

    Attributes:
      step: ``(T,)`` recorded steps ``0, r, …, steps``.
      train, eval: dicts of metrics on the training sample and on held-out
        pairs: ``(T,)`` arrays ``loss`` (nats), ``reward_accuracy`` (TRL
        rewards/accuracies: β h > 0), ``policy_accuracy`` (π(y_w|x) > π(y_l|x)),
        ``rewards_chosen``, ``rewards_rejected``, ``rewards_margin`` (β × log-ratio,
        nats), ``logps_chosen``, ``logps_rejected`` (nats, full softmax over V),
        ``weight_change`` (‖W_t − W_0‖_F); ``(T, K)`` arrays ``behavior_loss``,
        ``behavior_reward_accuracy``, ``behavior_policy_accuracy`` (NaN for a
        behaviour absent from the sample).
      delta: ``(T, d)`` reduced head δ_t.
      weights: ``(V, d)`` final head W_T.
      cum_batch_mean_norm: ``(T,)`` Σ over steps so far of the minibatch mean
        ‖x‖ (the C2 bound is ``√2 η β`` times it for plain GD/SGD).
      diverged: bool, NaN or inf anywhere in the trajectory, or a training loss far above its
        start (:mod:`dynamics.divergence`); accuracies of a NaN head are NaN, not 0.
    """

    step: jax.Array
    train: dict
    eval: dict
    delta: jax.Array
    weights: jax.Array
    cum_batch_mean_norm: jax.Array
    diverged: jax.Array


def empirical_trajectory(dist: GaussianPreference, key, *, n: int, beta, lr=None, steps: int,
                         loss: str = "sigmoid", label_smoothing=0.0, batch_size: int | None = None, optimizer=None,
                         n_eval: int = 2048, record_every: int = 1, head: Head | None = None,
                         path: str = "reduced", label_noise=None, loss_weight=None) -> EmpiricalTrajectory:
    """Sample ``n`` training and ``n_eval`` held-out pairs from ``dist`` and train the head.

    Args:
      dist: preference distribution (vmappable pytree).
      key: PRNG key; split into training sample, held-out sample and batch order.
      n: training pairs (static, ≥ 1). n_eval: held-out pairs (static, ≥ 1).
      beta: β > 0. lr: learning rate on ``W`` (> 0; unused when ``optimizer`` is an
        optax transformation).
      steps: optimizer steps (static). record_every: cadence (static, divides steps).
      loss, label_smoothing: objective (``dynamics.LOSSES``) and its ε.
      batch_size: ``None`` or ``0`` (as in sweep configs) = full-batch GD; else minibatch SGD
        with per-epoch reshuffling and the last partial batch dropped (``1 ≤ B ≤ n``, static).
      optimizer: ``None``/"sgd", "momentum", "adam", or an optax
        ``GradientTransformation`` (static).
      head: reference and initial head (default zeros, V = 2).
      path: "reduced" (fast) or "full" (the ``V×d`` reference path).
      label_noise: ``(K,)`` flip rate of the *training* labels per behaviour, in
        [0, 1/2] (held-out labels stay clean; metrics use the clean labels).
      loss_weight: ``(K,)`` per-behaviour loss weights λ_k ≥ 0 (re-weighting).

    ``dist`` may be any distribution pytree with ``sample(key, n) -> (x, s,
    behavior)`` and ``num_behaviors`` (docs/custom-distributions.md).

    Returns:
      :class:`EmpiricalTrajectory`, ``T = steps // record_every + 1``.

    Raises:
      ValueError: invalid argument (named, with the fix), e.g. ``key=0`` (a seed, not a key: pass
        ``jax.random.key(0)``).

    Source: docs/theory.md §1.4 and §3.4.
    """
    n = check_int("n", n)
    n_eval = check_int("n_eval", n_eval)
    key = check_key("key", key)
    # everything that can be checked without data, before sampling and compiling
    if isinstance(head, Head):  # before sampling
        head.check_margin_only("empirical_trajectory")
    validate_loss(loss, beta, label_smoothing)
    check_choice("path", path, ("reduced", "full"))
    check_schedule(steps, record_every, lr, optimizer)
    check_batch_size(batch_size, n)
    if hasattr(dist, "validate"):
        dist = dist.validate()
    dist = as_default_float(dist)
    k = dist.num_behaviors
    check_interventions(k, label_noise, loss_weight)
    key_train, key_eval, key_batch = jax.random.split(key, 3)
    dim = getattr(dist, "dim", None)  # the values are checked by trajectory_on_data
    train = check_sample(dist.sample(key_train, n), n, "sample(key, n)", dim=dim)
    held_out = check_sample(dist.sample(key_eval, n_eval), n_eval, "sample(key, n_eval)", dim=dim)
    noisy_s = None
    if label_noise is not None:
        noisy_s = noisy_labels(jax.random.fold_in(key, 1), train[1], train[2], label_noise)
    return trajectory_on_data(train, held_out, key_batch, num_behaviors=k, beta=beta,
                              lr=lr, steps=steps, loss=loss, label_smoothing=label_smoothing, batch_size=batch_size,
                              optimizer=optimizer, record_every=record_every, head=head, path=path,
                              train_labels=noisy_s, loss_weight=loss_weight)


def noisy_labels(key, s, behavior, rate):
    """Random label noise: flip each label ``s (n,)`` with probability ``rate[behavior] (K,)`` → ``(n,)``.

    ``key``: a PRNG key; ``behavior (n,)`` int behaviour indices. The deterministic
    misalignment flip of every label is :func:`dynamics.transforms.flip_labels`.
    Source: docs/theory.md §5.1 (label noise).
    """
    flip = jax.random.uniform(key, s.shape) < jnp.asarray(rate)[behavior]
    return jnp.where(flip, -s, s)


def check_sample(out, n: int, what: str, *, dim: int | None = None, num_behaviors: int | None = None,
                 values: bool = False):
    """Check a distribution's ``sample`` output: ``x (n, d)`` float, ``s (n,)``, ``behavior (n,)`` int.

    Args:
      out: what ``sample(key, n)`` returned. n: the number of pairs asked for.
      what: how to name the call in messages.
      dim: the distribution's ``d`` (checks ``x.shape[1]``). num_behaviors: K.
      values: also check the values (:func:`check_pair_values`; concrete arrays only).

    Returns:
      ``(x, s, behavior)``.

    Raises:
      ValueError: naming the returned shape, dtype or value and the one expected.
    """
    if not (isinstance(out, tuple) and len(out) == 3):
        raise ValueError(f"{what} must return a tuple (x, s, behavior); got {type(out).__name__}")
    x, s, beh = out
    want_d = "d" if dim is None else dim
    if jnp.ndim(x) != 2 or x.shape[0] != n or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{what} returned x of shape {jnp.shape(x)}; expected (n, d) = ({n}, {want_d})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what} returned x of dtype {x.dtype}; expected a float dtype")
    if jnp.shape(s) != (n,) or jnp.shape(beh) != (n,):
        raise ValueError(f"{what} returned s {jnp.shape(s)} and behavior {jnp.shape(beh)}; expected ({n},) each")
    if not jnp.issubdtype(beh.dtype, jnp.integer):
        raise ValueError(f"{what} returned behavior of dtype {beh.dtype}; expected an integer dtype")
    if values:
        check_pair_values(what, x, s, beh, num_behaviors)
    return x, s, beh


def check_pair_values(name: str, x, s, behavior, num_behaviors: int | None = None) -> None:
    """Check the values of preference pairs (concrete arrays only; skipped under tracing).

    Args:
      name: how to name the data in messages. x: ``(n, d)`` embeddings, finite.
      s: ``(n,)`` labels in {+1, −1}. behavior: ``(n,)`` indices in ``[0, num_behaviors)``.

    Raises:
      ValueError: non-finite x, a label other than ±1, or a behaviour index out of range (named).
    """
    check_finite(f"{name}: x", x)
    if is_concrete(s) and not bool(jnp.all(jnp.abs(s) == 1)):
        bad = sorted({float(v) for v in jnp.unique(jnp.asarray(s))} - {1.0, -1.0})[:4]
        raise ValueError(f"{name}: labels s with values {bad}; expected +1 (chosen = a) or -1 (chosen = b)")
    if num_behaviors is not None and is_concrete(behavior) and jnp.size(behavior) \
            and not bool(jnp.all((behavior >= 0) & (behavior < num_behaviors))):
        raise ValueError(f"{name}: behavior indices in [{int(jnp.min(behavior))}, {int(jnp.max(behavior))}]; "
                         f"expected integers in [0, K) = [0, {num_behaviors})")


def trajectory_on_data(train, held_out, key, *, num_behaviors: int, beta, lr=None, steps: int,
                       loss: str = "sigmoid", label_smoothing=0.0, batch_size: int | None = None, optimizer=None,
                       record_every: int = 1, head: Head | None = None,
                       path: str = "reduced", train_labels=None, loss_weight=None,
                       batches: str = "epoch", label_confidence=None, batch_index=None) -> EmpiricalTrajectory:
    """Train the head on given data (e.g. real embeddings) and record metrics.

    Args:
      train, held_out: tuples ``(x (n, d), s (n,) ∈ {±1}, behavior (n,) int in [0, K))``.
      key: PRNG key for the minibatch order.
      num_behaviors: K (static).
      train_labels: optional ``(n,)`` labels to *train* on (e.g. noisy ones);
        metrics still use ``train[1]``. Default: ``train[1]``.
      loss_weight: optional ``(K,)`` per-behaviour loss weights.
      batches: minibatch order: "epoch" (per-epoch reshuffle, the default) or "iid"
        (a fresh random batch of distinct pairs each step,
        ``jax.random.choice(fold_in(key, t), n, (batch_size,), replace=False)``, as in
        Im & Li's code).
      label_confidence: optional ``(n,)`` soft labels ``c ∈ [1/2, 1]``: pair i is trained on
        ``c_i ℓ(h_i) + (1 − c_i) ℓ(−h_i)`` (for ``sigmoid``, TRL's cdpo loss with a per-pair
        ``label_smoothing = 1 − c_i``); metrics stay on the hard labels. In expectation it is a
        label flip with rate ``1 − c`` (docs/theory.md §5).
      batch_index: optional ``(steps, B)`` int rows in ``[0, n)`` of each step's minibatch (the
        caller's own order, e.g. ``sims.real.union_batch_index``); overrides ``batches``, and
        ``batch_size`` must be ``None`` or ``B``.
      Other arguments as in :func:`empirical_trajectory`.

    Raises:
      ValueError: shapes that disagree, labels not in {±1}, NaN in x, behaviour indices outside
        [0, num_behaviors), bad hyper-parameters.
    """
    validate_loss(loss, beta, label_smoothing)
    check_choice("path", path, ("reduced", "full"))
    check_choice("batches", batches, ("epoch", "iid"))
    steps, record_every = check_schedule(steps, record_every, lr, optimizer)
    num_behaviors = check_int("num_behaviors", num_behaviors)
    x, s, beh = train
    xe, se, behe = held_out
    for split, (xx, ss, bb) in (("train", train), ("held_out", held_out)):
        if xx.ndim != 2 or ss.shape != (xx.shape[0],) or bb.shape != (xx.shape[0],):
            raise ValueError(f"{split}: expected x (n, d), s (n,), behavior (n,); got {xx.shape}, {ss.shape}, {bb.shape}")
        check_pair_values(split, xx, ss, bb, num_behaviors)
    if xe.shape[1] != x.shape[1]:
        raise ValueError(f"held_out has d = {xe.shape[1]} but train has d = {x.shape[1]}; they must match")
    d = x.shape[1]
    head = Head.zeros(d, dtype=jnp.asarray(x).dtype) if head is None else head
    if isinstance(head, Head):
        head.check_margin_only("empirical_trajectory")
    if head.dim != d:
        raise ValueError(f"head has d = {head.dim} but the data have d = {d}; they must match")
    n = x.shape[0]
    batch_size = check_batch_size(batch_size, n)
    lr = 0.0 if lr is None else lr
    s_fit = s if train_labels is None else train_labels
    if jnp.shape(s_fit) != jnp.shape(s):
        raise ValueError(f"train_labels has shape {jnp.shape(s_fit)}; expected {jnp.shape(s)}")
    lam = jnp.ones((num_behaviors,)) if loss_weight is None else jnp.asarray(loss_weight)
    c_fit = None
    if label_confidence is not None:
        c_fit = jnp.asarray(label_confidence)
        if c_fit.shape != (n,):
            raise ValueError(f"label_confidence has shape {c_fit.shape}; expected one confidence per training pair, "
                             f"(n,) = ({n},)")
        check_in_range("label_confidence", c_fit, 0.5, 1.0)
    if batch_index is not None:
        batch_index = jnp.asarray(batch_index)
        if batch_index.ndim != 2 or batch_index.shape[0] != steps or not jnp.issubdtype(batch_index.dtype, jnp.integer):
            raise ValueError(f"batch_index has shape {batch_index.shape} and dtype {batch_index.dtype}; expected "
                             f"integers of shape (steps, B) = ({steps}, B)")
        if batch_size is not None and batch_size != batch_index.shape[1]:
            raise ValueError(f"batch_size={batch_size} but batch_index has B = {batch_index.shape[1]}; pass "
                             "batch_size=None or B")
        if is_concrete(batch_index) and batch_index.size and not bool(jnp.all((batch_index >= 0) & (batch_index < n))):
            raise ValueError(f"batch_index holds rows outside [0, n) = [0, {n}); index the training pairs")
        batch_size = int(batch_index.shape[1])
    key = check_key("key", key)
    with one_line_check_errors():  # a traced bad β/η/ε (the caller's vmap runs here): one ValueError line
        return _train(x, s, beh, xe, se, behe, key, beta, lr, label_smoothing, head, s_fit, lam,
                      num_behaviors=num_behaviors, loss=loss, optimizer=optimizer, steps=steps,
                      record_every=record_every, batch_size=batch_size, path=path, batches=batches,
                      c_fit=c_fit, index=batch_index)


_split_metrics = reduced.split_metrics  # shared with the factored engine (dynamics.reduced)
_choose = reduced.choose


@partial(jax.jit, static_argnames=("num_behaviors", "loss", "optimizer", "steps", "record_every",
                                   "batch_size", "path", "batches"))
def _train(x, s, beh, xe, se, behe, key, beta, lr, label_smoothing, head, s_fit, lam, *, num_behaviors, loss, optimizer,
           steps, record_every, batch_size, path, batches="epoch", c_fit=None, index=None):
    dtype = jnp.result_type(x.dtype, float)
    x, s, xe, se, s_fit = (v.astype(dtype) for v in (x, s, xe, se, s_fit))
    lam_i = jnp.asarray(lam, dtype)[beh]  # per-pair loss weight
    soft = c_fit is not None  # per-pair soft labels: c ℓ(h) + (1 − c) ℓ(−h)
    c_i = c_fit.astype(dtype) if soft else jnp.ones_like(lam_i)
    beta, lr, label_smoothing = (jnp.asarray(v, dtype) for v in (beta, lr, label_smoothing))
    beta, lr, label_smoothing = traced_check_hparams(beta, lr, label_smoothing, loss=loss, optimizer=optimizer)
    w_ref, w0 = head.w_ref.astype(dtype), head.w_init.astype(dtype)
    a, b = head.a, head.b
    u_ref = w_ref[a] - w_ref[b]
    d0 = w0[a] - w0[b] - u_ref
    n = x.shape[0]
    opt = make_optimizer(optimizer, lr)
    norms = jnp.linalg.norm(x, axis=1)
    mk = partial(_split_metrics, k=num_behaviors, beta=beta, loss=loss, label_smoothing=label_smoothing)

    def ref_logps(xx, ss):
        lp = jax.nn.log_softmax(xx @ w_ref.T, axis=-1)
        return _choose(ss, lp[:, a], lp[:, b])

    data = {
        "train": (x, s, beh, x @ w0.T, ref_logps(x, s)),
        "eval": (xe, se, behe, xe @ w0.T, ref_logps(xe, se)),
    }

    table = None if batch_size is None or batches == "iid" or index is not None else \
        epoch_orders(key, n, batch_size, steps, x.shape[1])

    def take(t, *arrays):
        """The step-t minibatch of each array (per-epoch reshuffle, last partial batch dropped; or iid)."""
        if batch_size is None:
            return arrays
        if index is not None:
            idx = index[t]
        elif batches == "iid":
            idx = jax.random.choice(jax.random.fold_in(key, t), n, (batch_size,), replace=False)
        else:
            idx = minibatch_index(t, key, table, n, batch_size)
        return tuple(v[idx] for v in arrays)

    if path == "reduced":
        def step_fn(carry):
            t, delta, state, cum = carry
            xb, sb, nb, lb, cb = take(t, x, s_fit, norms, lam_i, c_i)
            h = sb * (xb @ delta)
            gl = loss_grad_fn(loss, h, beta, label_smoothing)
            if soft:  # d/dh [c ℓ(h) + (1 − c) ℓ(−h)]
                gl = cb * gl - (1 - cb) * loss_grad_fn(loss, -h, beta, label_smoothing)
            g = jnp.mean((lb * gl * sb)[:, None] * xb, axis=0)
            delta, state = reduced.reduced_update(opt, g, state, delta, d0)
            return t + 1, delta, state, cum + jnp.mean(nb)

        def record(carry):
            t, delta, _, cum = carry
            out = {}
            for split, (xx, ss, bb, z0, (rc, rr)) in data.items():
                proj = xx @ ((delta - d0) / 2.0)
                lp = jax.nn.log_softmax(z0.at[:, a].add(proj).at[:, b].add(-proj), axis=-1)
                lc, lr_ = _choose(ss, lp[:, a], lp[:, b])
                h = ss * (xx @ delta)
                out[split] = mk(h, lc, lr_, rc, rr, ss * (xx @ (delta + u_ref)), bb)
                out[split]["weight_change"] = reduced.weight_change(delta, d0)
            return t, out, delta, cum, delta

        carry0 = (jnp.int32(0), d0, opt.init(jnp.zeros_like(d0)), jnp.zeros((), dtype))
        final, (step, metrics, deltas, cum, _) = run_recorded(step_fn, record, carry0, steps, record_every)
        weights = head.replace(w_ref=w_ref, w_init=w0).with_delta(final[1])
    else:
        def dpo_loss(w, xb, sb, rc, rr, lb, cb):
            lp = jax.nn.log_softmax(xb @ w.T, axis=-1)
            lc, lr_ = _choose(sb, lp[:, a], lp[:, b])
            hh = (lc - rc) - (lr_ - rr)
            ell = loss_fn(loss, hh, beta, label_smoothing)
            if soft:  # the other label of the pair swaps chosen and rejected: h → −h
                ell = cb * ell + (1 - cb) * loss_fn(loss, -hh, beta, label_smoothing)
            return jnp.mean(lb * ell)

        x_ref_c, x_ref_r = ref_logps(x, s_fit)

        def step_fn(carry):
            t, w, state, cum = carry
            xb, sb, nb, rc, rr, lb, cb = take(t, x, s_fit, norms, x_ref_c, x_ref_r, lam_i, c_i)
            g = jax.grad(dpo_loss)(w, xb, sb, rc, rr, lb, cb)
            updates, state = opt.update(g, state, w)
            return t + 1, w + updates, state, cum + jnp.mean(nb)

        def record(carry):
            t, w, _, cum = carry
            out = {}
            for split, (xx, ss, bb, _, (rc, rr)) in data.items():
                lp = jax.nn.log_softmax(xx @ w.T, axis=-1)
                lc, lr_ = _choose(ss, lp[:, a], lp[:, b])
                out[split] = mk((lc - rc) - (lr_ - rr), lc, lr_, rc, rr, lc - lr_, bb)
                out[split]["weight_change"] = jnp.linalg.norm(w - w0)
            delta = (w[a] - w[b]) - u_ref
            return t, out, delta, cum, delta

        carry0 = (jnp.int32(0), w0, opt.init(w0), jnp.zeros((), dtype))
        final, (step, metrics, deltas, cum, _) = run_recorded(step_fn, record, carry0, steps, record_every)
        weights = final[1]

    diverged = divergence.diverged(metrics["train"]["loss"], deltas)
    return EmpiricalTrajectory(step=step, train=metrics["train"], eval=metrics["eval"], delta=deltas,
                               weights=weights, cum_batch_mean_norm=cum, diverged=diverged)
