"""Answer vocabularies: a full ``V×d`` head trained on log-probability objectives (empirical layer).

The model (docs/theory.md §7): ``π_W(y|x) = softmax(W x)_y`` over ``V ≥ 2`` answer tokens, a
frozen reference head ``W_ref``, and one token pair ``(a_k, b_k)`` per behaviour k
(:meth:`dynamics.Head.token_pairs`): for a pair of behaviour k with label ``s = +1`` the chosen
token is ``a_k`` and the rejected ``b_k``; for ``s = −1`` the reverse. Objectives are TRL's
``DPOConfig.loss_type`` list and the others of :func:`dynamics.losses.objective_loss`, which see the
four log-probabilities ``log π(y_w|x), log π(y_l|x), log π_ref(y_w|x), log π_ref(y_l|x)``
(docs/theory.md §8); ``loss_type="sft"`` is supervised fine-tuning, ``−log π(y_w|x)``.

This module holds what both layers share — :func:`pair_tokens`, :func:`per_pair_metrics` (TRL's
logged metrics of one pair), :class:`VocabTrajectory` — the empirical (finite-sample) layer
:func:`vocab_empirical_trajectory`, the two-stage :func:`sft_then_dpo`, and Ren & Sutherland's
one-step decomposition :func:`logp_change_decomposition`. The population layer is
:func:`dynamics.vocab_population.vocab_population_trajectory`.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_choice, check_finite, check_int, check_positive, check_scalar, is_concrete
from ._train import check_batch_size, check_schedule, epoch_orders, make_optimizer, minibatch_index
from .head import Head

__all__ = ["VocabTrajectory", "pair_tokens", "per_pair_metrics", "PAIR_METRICS", "vocab_empirical_trajectory",
           "sample_pairs", "sft_then_dpo", "logp_change_decomposition"]

#: the keys of :func:`per_pair_metrics` (TRL's DPOTrainer metric names, plus entropy, kl, probs)
PAIR_METRICS = ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "rewards/chosen",
                "rewards/rejected", "rewards/margins", "rewards/accuracies", "entropy", "kl", "probs")


# ---------------------------------------------------------------------------------------------- shared maths
def _head_pairs(head):
    return getattr(head, "pairs", None)


def pair_tokens(head: Head, behavior, s):
    """The chosen and rejected token of each pair.

    Args:
      head: the head; its ``pairs`` (one ``(a_k, b_k)`` per behaviour) or, when ``None``, ``(a, b)``.
      behavior: int array ``(...)`` of behaviour indices k (not range-checked here: the trajectory
        entry points check ``len(head.pairs) == K``).
      s: array ``(...)`` of labels ±1 (``+1``: chosen is ``a_k``).

    Returns:
      ``(chosen, rejected)``, int32 arrays of the shape of ``behavior`` (broadcast with ``s``).

    Source: docs/theory.md §7 (token pairs), §1.2 (label convention).
    """
    behavior = jnp.asarray(behavior)
    s = jnp.asarray(s)
    shape = jnp.broadcast_shapes(behavior.shape, s.shape)
    pairs = _head_pairs(head)
    if pairs is None:
        a = jnp.full(shape, head.a, jnp.int32)
        b = jnp.full(shape, head.b, jnp.int32)
    else:
        table = jnp.asarray(pairs, jnp.int32)
        a = jnp.broadcast_to(table[behavior, 0], shape)
        b = jnp.broadcast_to(table[behavior, 1], shape)
    pos = jnp.broadcast_to(s > 0, shape)
    return jnp.where(pos, a, b), jnp.where(pos, b, a)


def _take(lp, tok):
    return jnp.take_along_axis(lp, tok[..., None].astype(jnp.int32), axis=-1)[..., 0]


def per_pair_metrics(logits, ref_logits, chosen, rejected, *, beta) -> dict:
    """TRL's DPOTrainer metrics of single-token answers, per pair.

    Args:
      logits: ``(..., V)`` policy logits ``W x``. ref_logits: ``(..., V)`` reference logits
        ``W_ref x``, or ``None`` for a reference-free head (then the reference log-probs are 0,
        as TRL's ``reference_free=True``, and ``"kl"`` is NaN).
      chosen, rejected: int ``(...)`` token indices in ``[0, V)`` (broadcast against ``logits[..., 0]``).
      beta: β > 0 (scalar or broadcastable to ``(...)``).

    Returns:
      dict of ``(...)`` arrays: ``"logps/chosen"``, ``"logps/rejected"`` (``log π(y|x)``, nats, full
      softmax over V); ``"logits/chosen"``, ``"logits/rejected"`` (TRL's mean of the policy logits
      over the vocabulary at the completion: for a one-token answer both are ``mean_v (W x)_v``);
      ``"rewards/chosen"``, ``"rewards/rejected"`` (``β (log π − log π_ref)``, nats);
      ``"rewards/margins"`` (chosen − rejected); ``"rewards/accuracies"`` (1.0 where the margin is
      > 0, else 0.0; NaN for NaN logits); ``"entropy"`` (of ``π(·|x)``, nats); ``"kl"``
      (``KL(π(·|x) ‖ π_ref(·|x))``, nats); and ``"probs"`` ``(..., V)``.

    Source: TRL ``DPOTrainer.get_batch_loss_metrics`` (metric names); docs/theory.md §7.
    """
    logits = jnp.asarray(logits)
    dtype = jnp.result_type(logits.dtype, float)
    logits = logits.astype(dtype)
    batch = logits.shape[:-1]
    chosen = jnp.broadcast_to(jnp.asarray(chosen), batch)
    rejected = jnp.broadcast_to(jnp.asarray(rejected), batch)
    lp = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(lp)
    c, r = _take(lp, chosen), _take(lp, rejected)
    if ref_logits is None:
        rc = rr = jnp.zeros((), dtype)
        kl = jnp.full(batch, jnp.nan, dtype)
    else:
        lpr = jax.nn.log_softmax(jnp.asarray(ref_logits, dtype), axis=-1)
        rc, rr = _take(lpr, chosen), _take(lpr, rejected)
        kl = jnp.sum(jnp.where(probs > 0, probs * (lp - lpr), 0.0), axis=-1)
    mean_logits = jnp.mean(logits, axis=-1)
    rw_c = beta * (c - rc)
    rw_r = beta * (r - rr)
    margin = rw_c - rw_r
    acc = jnp.where(jnp.isnan(margin), jnp.nan, (margin > 0).astype(dtype))
    return {
        "logps/chosen": c,
        "logps/rejected": r,
        "logits/chosen": mean_logits,
        "logits/rejected": mean_logits,
        "rewards/chosen": rw_c,
        "rewards/rejected": rw_r,
        "rewards/margins": margin,
        "rewards/accuracies": acc,
        "entropy": -jnp.sum(jnp.where(probs > 0, probs * lp, 0.0), axis=-1),
        "kl": kl,
        "probs": probs,
    }


class VocabTrajectory(NamedTuple):
    """The result of either vocabulary layer (a pytree; vmapped calls stack every leaf).

    Attributes:
      steps: ``(T,)`` recorded step indices ``0, r, 2r, …, steps``.
      metrics: dict of per-behaviour expectations: every key of :func:`per_pair_metrics` as ``(T, K)``
        (``"probs"``: ``(T, K, V)``), plus ``"loss"`` ``(T, K)`` (the objective, nats) and
        ``"displacement"`` ``(T, K)`` (the fraction — empirical — or probability — population — of
        pairs whose chosen log-prob is below its value at step 0: likelihood displacement).
        Empirical: NaN for a behaviour absent from the sample.
      loss_total: ``(T,)`` the mixture-weighted objective that is optimised (empirical: the mean over
        all pairs of the split).
      grad_norm: ``(T,)`` Frobenius norm of the (full-batch) gradient of ``loss_total`` in ``W``.
      weights: ``(K,)`` behaviour weights (empirical: the fraction of the split's pairs; population:
        the mixture weights ω_k).
      w: ``(T, V, d)`` the head at the recorded steps.
    """

    steps: jax.Array
    metrics: dict
    loss_total: jax.Array
    grad_norm: jax.Array
    weights: jax.Array
    w: jax.Array

    def mean(self, name: str):
        """The ``weights``-weighted mean over behaviours of ``metrics[name]``: ``(T,)`` (``"probs"``:
        ``(T, V)``); behaviours of weight 0 (and their NaN) are left out.

        Raises:
          ValueError: an unknown metric name (naming the choices).
        """
        check_choice("metric", name, tuple(self.metrics))
        v = self.metrics[name]
        wts = self.weights / jnp.sum(self.weights, axis=-1, keepdims=True)
        wb = wts[..., None, :]  # (..., 1, K)
        k_axis = -1
        if name == "probs":
            wb, k_axis = wb[..., None], -2
        return jnp.sum(jnp.where(wb > 0, wb * v, 0.0), axis=k_axis)


# ---------------------------------------------------------------------------------------------- objectives
def _objective_names(loss_type) -> tuple[str, ...]:
    if isinstance(loss_type, str):
        return (loss_type,)
    if isinstance(loss_type, (list, tuple)) and loss_type and all(isinstance(v, str) for v in loss_type):
        return tuple(loss_type)
    raise ValueError(f"loss_type must be a TRL loss name or a non-empty list of names, got {loss_type!r}")


def _static_loss_type(loss_type):
    names = _objective_names(loss_type)
    return names[0] if isinstance(loss_type, str) else names


def _split_hparams(hparams: dict):
    """Numbers (and arrays) are traced; strings, booleans and ``None`` are static."""
    traced, static = {}, []
    for name, value in sorted(hparams.items()):
        if value is None or isinstance(value, (str, bool, np.bool_)):
            static.append((name, value))
        else:
            check_finite(name, value)
            traced[name] = value
    return traced, tuple(static)


def _needs_reference(loss_type) -> bool:
    from .losses import get_objective

    return any(get_objective(name).needs_reference for name in _objective_names(loss_type))


def _batch_level(loss_type) -> bool:
    from .losses import get_objective

    return any(get_objective(name).batch_level for name in _objective_names(loss_type))


def _validate_objective(loss_type, beta, loss_weights, hparams, has_reference: bool):
    """Names, β, weights and hyper-parameters checked before sampling or compiling (one-line errors)."""
    from .losses import get_objective, objective_loss

    names = _objective_names(loss_type)
    for name in names:
        get_objective(name)  # unknown name: the closest suggested
    check_scalar("beta", beta)
    check_positive("beta", beta)
    if not has_reference and _needs_reference(loss_type):
        needy = [n for n in names if get_objective(n).needs_reference]
        raise ValueError(f"loss_type {needy[0]!r} needs a reference policy but head has no w_ref; pass "
                         "Head.create(w_ref, w_init) or a reference-free loss_type (e.g. 'sft')")
    if is_concrete((beta, loss_weights, hparams)):
        z = jnp.zeros((2,), jnp.result_type(float))
        ref = (z, z) if has_reference else (None, None)
        objective_loss(_static_loss_type(loss_type), z, z, *ref, beta=beta, loss_weights=loss_weights, **hparams)


def _objective(loss_type, static_hparams, c, r, rc, rr, beta, loss_weights, hparams):
    from .losses import objective_loss

    return objective_loss(loss_type, c, r, rc, rr, beta=beta, loss_weights=loss_weights,
                          **dict(static_hparams), **hparams)


def _behavior_mean(values, beh, k: int):
    """Mean of ``values (n, ...)`` per behaviour → ``(k, ...)``; NaN where a behaviour has no pair."""
    tot = jax.ops.segment_sum(values, beh, k)
    cnt = jax.ops.segment_sum(jnp.ones(values.shape[:1], values.dtype), beh, k)
    cnt = cnt.reshape(cnt.shape + (1,) * (values.ndim - 1))
    return jnp.where(cnt > 0, tot / jnp.where(cnt > 0, cnt, 1.0), jnp.nan)


def _check_head(head, k: int, d: int, what: str = "head"):
    if not isinstance(head, Head):
        raise ValueError(f"{what} must be a dynamics.Head, got {type(head).__name__}; build it with Head.create")
    if head.dim != d:
        raise ValueError(f"{what} has d = {head.dim} but the distribution has d = {d}; they must match")
    if _head_pairs(head) is not None:
        head.token_pairs(k)  # raises for a wrong number of pairs


# ---------------------------------------------------------------------------------------------- empirical layer
@partial(jax.jit, static_argnums=2)
def _sample_jit(dist, key, n: int):
    return dist.sample(key, n)


def sample_pairs(dist, key, n: int):
    """``dist.sample(key, n)`` compiled once per ``(dist structure, n)`` (the same pairs as the eager
    call; eager sampling dispatches and compiles every operation separately, ~10× slower on first use).
    Distributions whose ``sample`` cannot be traced are sampled eagerly."""
    try:
        return _sample_jit(dist, key, n)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
        return dist.sample(key, n)


def vocab_empirical_trajectory(dist, key, *, head: Head, loss_type="sigmoid", beta=1.0, lr=0.1, steps: int = 100,
                               n: int = 1024, n_eval: int = 2048, optimizer=None, batch_size: int | None = None,
                               record_every: int = 1, loss_weights=None, **hparams):
    """Train the full ``V×d`` head on ``n`` sampled pairs; metrics on them and on ``n_eval`` held-out pairs.

    Each step computes the four log-probabilities of every (mini)batch pair with the full softmax
    of ``W x`` and ``W_ref x``, the per-pair objective :func:`dynamics.losses.objective_loss`, its mean
    over the batch, ``jax.grad`` in ``W`` and the optimizer step. Batch-level objectives
    (``get_objective(name).batch_level``: batch statistics) use the minibatch as their batch, as TRL
    does; at record time the whole split is the batch.

    Args:
      dist: a preference distribution with ``sample(key, n) -> (x (n, d), s (n,), behavior (n,))``,
        ``num_behaviors`` K and ``dim`` d (``dynamics.GaussianPreference`` etc.).
      key: PRNG key, split as :func:`dynamics.empirical_trajectory` does into the training sample,
        the held-out sample and the minibatch order (the same key draws the same pairs).
      head: reference ``W_ref`` (or ``None``: reference-free), initial ``W_0`` and token pairs.
      loss_type: a TRL loss name (``dynamics.losses``), a list of names combined with
        ``loss_weights`` (TRL semantics), or ``"sft"``.
      beta: β > 0. lr: η > 0 on ``W`` (ignored for an optax transformation).
      steps, record_every: optimizer steps and recording cadence (static; ``record_every | steps``).
      n, n_eval: training and held-out pairs (static, ≥ 1).
      optimizer: ``None``/"sgd", "momentum", "adam" or an optax ``GradientTransformation`` (static).
      batch_size: ``None``/``0``/``n`` full batch; else minibatch SGD with per-epoch reshuffling and
        the last partial batch dropped (the order of :func:`dynamics.empirical_trajectory`).
      loss_weights: weights of a list ``loss_type``. hparams: the objective's hyper-parameters
        (``label_smoothing``, ``f_divergence_type``, …); numbers are traced, strings static.

    Returns:
      ``(train, eval)`` :class:`VocabTrajectory` with ``T = steps // record_every + 1``; ``eval``'s
      ``grad_norm`` is that of the held-out mean objective; both carry the same ``w``.

    Raises:
      ValueError: an unknown objective (closest suggested), bad β/η/schedule/batch size, a head whose
        ``d`` or number of token pairs does not match ``dist``, an objective that needs a reference
        with a reference-free head, a sample of the wrong shape.

    Source: docs/theory.md §7 (model), §8 (objectives); TRL ``DPOTrainer`` (metrics, batch-level losses).
    """
    from .empirical import check_sample
    from .population import as_default_float

    n = check_int("n", n)
    n_eval = check_int("n_eval", n_eval)
    loss_type = _static_loss_type(loss_type)
    _validate_objective(loss_type, beta, loss_weights, hparams, head is not None and head.w_ref is not None)
    steps, record_every = check_schedule(steps, record_every, lr, optimizer)
    batch_size = check_batch_size(batch_size, n)
    if hasattr(dist, "validate") and is_concrete(dist):
        dist = dist.validate()
    dist = as_default_float(dist)
    k = dist.num_behaviors
    dim = getattr(dist, "dim", None)
    if dim is not None:
        _check_head(head, k, dim)  # before sampling or compiling
    key_train, key_eval, key_batch = jax.random.split(key, 3)
    train = check_sample(sample_pairs(dist, key_train, n), n, "sample(key, n)", dim=dim)
    held_out = check_sample(sample_pairs(dist, key_eval, n_eval), n_eval, "sample(key, n_eval)", dim=dim)
    _check_head(head, k, train[0].shape[1])
    traced, static = _split_hparams(hparams)
    lw = None if loss_weights is None else jnp.asarray(loss_weights, jnp.result_type(float))
    # the token pairs enter as a (K, 2) array: one compilation serves every choice of pairs
    return _train(train, held_out, head.token_pairs(k), key_batch, head.w_ref, head.w_init, beta,
                  0.0 if lr is None else lr, lw, traced,
                  loss_type=loss_type, static_hparams=static, num_behaviors=k, optimizer=optimizer, steps=steps,
                  record_every=record_every, batch_size=batch_size)


@partial(jax.jit, static_argnames=("loss_type", "static_hparams", "num_behaviors", "optimizer", "steps",
                                   "record_every", "batch_size"))
def _train(train, held_out, table, key, w_ref, w0, beta, lr, loss_weights, hparams, *, loss_type, static_hparams,
           num_behaviors, optimizer, steps, record_every, batch_size):
    dtype = jnp.result_type(train[0].dtype, float)
    beta = _traced_beta(beta, dtype)
    lr = _traced_lr("lr", lr, dtype, optimizer)
    w0 = w0.astype(dtype)
    w_ref = None if w_ref is None else w_ref.astype(dtype)
    data = {name: _prep_split(split, table, w_ref, w0, dtype) for name, split in (("train", train), ("eval", held_out))}
    pair_loss, pair_metrics = _pair_fns(loss_type, static_hparams, beta, loss_weights, hparams, dtype)
    step_idx, recs, ws, _ = _fit(w0, make_optimizer(optimizer, lr), data, _PAIR_FIELDS, pair_loss, pair_metrics,
                                 key=key, num_behaviors=num_behaviors, steps=steps, record_every=record_every,
                                 batch_size=batch_size, dim=data["train"]["x"].shape[1])
    return _vocab_results(data, step_idx, recs, ws, num_behaviors, dtype)


def _traced_beta(beta, dtype):
    import equinox as eqx

    beta = jnp.asarray(beta, dtype)
    return eqx.error_if(beta, ~(beta > 0), "beta must be > 0 (a value under jit/vmap was <= 0 or NaN); pass beta > 0")


def _traced_lr(name, lr, dtype, optimizer, *, allow_zero=False):
    import equinox as eqx
    import optax

    lr = jnp.asarray(lr, dtype)
    if isinstance(optimizer, optax.GradientTransformation):
        return lr
    if allow_zero:
        return eqx.error_if(lr, ~(lr >= 0), f"{name} must be >= 0 (a value under jit/vmap was < 0 or NaN); "
                            f"pass {name} >= 0")
    return eqx.error_if(lr, ~(lr > 0), f"{name} must be > 0 (a value under jit/vmap was <= 0 or NaN); pass {name} > 0")


#: the per-pair arrays the single-token loss reads, in the order of :func:`_pair_fns`' ``pair_loss``
_PAIR_FIELDS = ("x", "c_tok", "r_tok", "rc", "rr")


def _prep_split(split, table, w_ref, w0, dtype):
    """Per-pair arrays of one split ``(x, s, behavior)``: tokens, reference log-probs, step-0 chosen log-prob."""
    x, s, beh = split
    x = x.astype(dtype)
    a, b = table[beh, 0], table[beh, 1]
    c_tok, r_tok = jnp.where(s > 0, a, b), jnp.where(s > 0, b, a)
    ref_logits = None if w_ref is None else x @ w_ref.T
    if ref_logits is None:
        rc = rr = None
    else:
        lpr = jax.nn.log_softmax(ref_logits, axis=-1)
        rc, rr = _take(lpr, c_tok), _take(lpr, r_tok)
    c0 = _take(jax.nn.log_softmax(x @ w0.T, axis=-1), c_tok)
    return dict(x=x, beh=beh, c_tok=c_tok, r_tok=r_tok, ref_logits=ref_logits, rc=rc, rr=rr, c0=c0)


def _pair_fns(loss_type, static_hparams, beta, loss_weights, hparams, dtype):
    """``(pair_loss(w, *fields) (n,), pair_metrics(w, split) dict of (n, ...))`` of single-token answers, head ``w``."""

    def pair_loss(w, x, c_tok, r_tok, rc, rr):
        lp = jax.nn.log_softmax(x @ w.T, axis=-1)
        return _objective(loss_type, static_hparams, _take(lp, c_tok), _take(lp, r_tok), rc, rr, beta,
                          loss_weights, hparams)

    def pair_metrics(w, dd):
        per = per_pair_metrics(dd["x"] @ w.T, dd["ref_logits"], dd["c_tok"], dd["r_tok"], beta=beta)
        per["displacement"] = (per["logps/chosen"] < dd["c0"]).astype(dtype)
        return per

    return pair_loss, pair_metrics


def _tree_norm(tree):
    """Euclidean (Frobenius) norm over every leaf of a pytree of arrays."""
    leaves = jax.tree_util.tree_leaves(tree)
    total = jnp.sum(leaves[0] * leaves[0])
    for leaf in leaves[1:]:
        total = total + jnp.sum(leaf * leaf)
    return jnp.sqrt(total)


def _fit(params0, opt, data, fields, pair_loss, pair_metrics, *, key, num_behaviors, steps, record_every,
         batch_size, dim, recorded=None):
    """The one empirical training loop of the vocabulary layers (single-token, sequence, representation).

    ``params0`` is any pytree of trainable arrays; ``data`` maps ``"train"`` / ``"eval"`` to dicts of
    per-pair arrays (``"beh"`` among them); ``pair_loss(params, *[split[f] for f in fields]) -> (n,)``;
    ``pair_metrics(params, split) -> dict of (n, ...)``. Each step takes the (mini)batch of ``fields``
    (the order of :func:`dynamics._train.epoch_orders`), ``jax.grad`` of the batch mean in ``params``
    and the optimizer step. Records at steps ``0, r, …, steps`` the per-behaviour means of
    ``pair_metrics`` and of ``"loss"``, the mean loss and the gradient norm over all leaves of each
    split, and ``recorded(params)`` (default ``params``).

    Returns ``(steps (T,), {split: (metrics, loss_total, grad_norm)}, recorded params (T, ...), final params)``.
    """
    import optax

    k = num_behaviors
    tr = data["train"]
    n = tr["beh"].shape[0]
    grad_fn = jax.grad(lambda p, *args: jnp.mean(pair_loss(p, *args)))
    order = None if batch_size is None else epoch_orders(key, n, batch_size, steps, dim)

    def take(t):
        arrays = tuple(tr[f] for f in fields)
        if batch_size is None:
            return arrays
        idx = minibatch_index(t, key, order, n, batch_size)
        return tuple(None if v is None else v[idx] for v in arrays)

    def step_fn(carry):
        t, p, state = carry
        g = grad_fn(p, *take(t))
        updates, state = opt.update(g, state, p)
        return t + 1, optax.apply_updates(p, updates), state

    def record(carry):
        t, p, _ = carry
        out = {}
        for name, dd in data.items():
            args = tuple(dd[f] for f in fields)
            ell = pair_loss(p, *args)
            g = grad_fn(p, *args)
            per = pair_metrics(p, dd)
            per["loss"] = ell
            out[name] = ({m: _behavior_mean(v, dd["beh"], k) for m, v in per.items()}, jnp.mean(ell),
                         _tree_norm(g))
        return t, out, (p if recorded is None else recorded(p))

    carry0 = (jnp.int32(0), params0, opt.init(params0))
    (_, final, _), (step_idx, recs, ps) = _run_recorded_once(step_fn, record, carry0, steps, record_every)
    return step_idx, recs, ps, final


def _vocab_results(data, step_idx, recs, ws, num_behaviors, dtype):
    """``(train, eval)`` :class:`VocabTrajectory` of :func:`_fit`'s records (``ws``: the recorded heads)."""
    result = []
    for name, dd in data.items():
        metrics, loss_total, gnorm = recs[name]
        cnt = jax.ops.segment_sum(jnp.ones(dd["beh"].shape, dtype), dd["beh"], num_behaviors)
        result.append(VocabTrajectory(steps=step_idx, metrics=metrics, loss_total=loss_total, grad_norm=gnorm,
                                      weights=cnt / dd["beh"].shape[0], w=ws))
    return tuple(result)


def _run_recorded_once(step_fn, record_fn, carry, steps: int, record_every: int):
    """:func:`dynamics._train.run_recorded` with ``record_fn`` traced once (half the compile time):
    record, then ``record_every`` steps (none after the last record)."""
    num = steps // record_every + 1

    def body(c, i):
        rec = record_fn(c)
        todo = jnp.where(i < num - 1, record_every, 0)
        return jax.lax.fori_loop(0, todo, lambda _, cc: step_fn(cc), c), rec

    return jax.lax.scan(body, carry, jnp.arange(num))


# ---------------------------------------------------------------------------------------------- SFT then DPO
def sft_then_dpo(dist, key=None, *, layer: str = "empirical", head: Head, sft_steps: int, sft_lr, dpo_steps: int,
                 dpo_lr, dpo_loss_type="sigmoid", beta=1.0, optimizer=None, record_every: int = 1,
                 loss_weights=None, **kwargs):
    """Supervised fine-tuning on the chosen answers, then DPO from the SFT head with it as reference.

    Stage 1 runs ``loss_type="sft"`` (``−log π(y_w|x)``) for ``sft_steps`` steps at ``sft_lr`` from
    ``head``; stage 2 runs ``dpo_loss_type`` for ``dpo_steps`` steps at ``dpo_lr`` from the final SFT
    head ``W_sft`` with reference ``W_ref = W_sft`` and the same token pairs (TRL's usual recipe).
    The empirical layer uses the same ``key`` in both stages (the same training and held-out pairs
    and minibatch order).

    Args:
      dist: a preference distribution. key: PRNG key (empirical layer; unused by the population layer).
      layer: "empirical" (:func:`vocab_empirical_trajectory`) or "population"
        (:func:`dynamics.vocab_population.vocab_population_trajectory`).
      head: the starting head (its reference is used by SFT only through the metrics).
      sft_steps, sft_lr, dpo_steps, dpo_lr: the two schedules (``record_every`` divides both).
      dpo_loss_type, beta, loss_weights: the DPO-stage objective (``loss_weights`` for a list).
      optimizer, record_every: shared by both stages. kwargs: passed to both entry points (e.g. ``n``,
        ``n_eval``, ``batch_size``) except objective hyper-parameters, which go to the DPO stage only
        (SFT takes none).

    Returns:
      ``{"sft": stage1, "dpo": stage2}``; each stage is the layer's return value (empirical:
      ``(train, eval)`` :class:`VocabTrajectory`; population: one :class:`VocabTrajectory`).

    Raises:
      ValueError: an unknown layer, or any error of the stage's entry point.

    Source: docs/theory.md §7 (SFT stage); Rafailov et al. 2023 (DPO from the SFT model as reference).
    """
    check_choice("layer", layer, ("empirical", "population"))
    layer_kw = {name: kwargs.pop(name) for name in ("n", "n_eval", "batch_size") if name in kwargs}
    if layer == "empirical":
        if key is None:
            raise ValueError("key is required for layer='empirical'; pass a jax.random.key")
        run = lambda h, **kw: vocab_empirical_trajectory(dist, key, head=h, optimizer=optimizer,
                                                         record_every=record_every, **layer_kw, **kw)
        final = lambda out: out[0].w[-1]
    else:
        if layer_kw:
            raise ValueError(f"{sorted(layer_kw)} apply to layer='empirical' only; drop them for the population layer")
        try:
            from .vocab_population import vocab_population_trajectory
        except ImportError as err:
            raise ValueError("layer='population' needs dynamics.vocab_population, which is not available "
                             f"({err}); use layer='empirical'") from None
        run = lambda h, **kw: vocab_population_trajectory(dist, head=h, optimizer=optimizer,
                                                          record_every=record_every, **kw)
        final = lambda out: out.w[-1]
    sft = run(head, loss_type="sft", beta=beta, lr=sft_lr, steps=sft_steps)
    w_sft = final(sft)
    head_sft = head.replace(w_ref=w_sft, w_init=w_sft)
    dpo = run(head_sft, loss_type=dpo_loss_type, beta=beta, lr=dpo_lr, steps=dpo_steps, loss_weights=loss_weights,
              **kwargs)
    return {"sft": sft, "dpo": dpo}


# ---------------------------------------------------------------------------------------------- Ren & Sutherland
def logp_change_decomposition(head: Head, w, x_obs, y_obs, batch, *, loss_type="sigmoid", beta=1.0, lr=0.1,
                              loss_weights=None, **hparams) -> dict:
    """First-order change of ``log π(y_o|x_o)`` under one SGD step, per (observed pair, training pair).

    For a last-layer head the empirical NTK is exactly ``x_oᵀx_u ⊗ I_V``, so one step
    ``W ← W − η ∇_W L`` on ``L = (1/B) Σ_u ℓ_u`` changes ``log π(y|x_o)`` by
    ``Σ_u −η (e_y − π(x_o))ᵀ (x_oᵀ x_u) G_u + O(η²)``, with ``G_u = ∂L/∂z_u`` (``z_u = W x_u``;
    it holds the ``1/B`` of the mean, and for batch-level objectives the cross-pair terms).
    Ren & Sutherland, "Learning dynamics of LLM finetuning" (ICLR 2025), eq. (3)–(5) (here
    ``A_o = e_y − π(x_o)``, ``K_ou = x_oᵀ x_u``).

    Args:
      head: reference, token pairs (``head.w_init`` is not used). w: ``(V, d)`` the current head.
      x_obs: ``(M, d)`` observed prompts. y_obs: int ``(M,)`` the observed tokens in ``[0, V)``.
      batch: ``(x (B, d), s (B,), behavior (B,))`` the step's training pairs.
      loss_type, beta, loss_weights, hparams: the objective (as :func:`vocab_empirical_trajectory`).
      lr: η of the plain SGD step.

    Returns:
      dict: ``"terms"`` ``(M, B)`` the first-order change contributed by each training pair (nats);
      ``"first_order"`` ``(M,)`` their sum; ``"A"`` ``(M, V)`` ``e_y − π(x_o)``; ``"K"`` ``(M, B)``
      ``x_oᵀx_u``; ``"G"`` ``(B, V)``.

    Raises:
      ValueError: shapes that disagree, a token outside ``[0, V)``, a bad objective.
    """
    x, s, beh = batch
    w = jnp.asarray(w)
    v, d = w.shape
    x_obs, x = jnp.asarray(x_obs, w.dtype), jnp.asarray(x, w.dtype)
    y_obs = jnp.asarray(y_obs)
    if x_obs.ndim != 2 or x_obs.shape[1] != d or y_obs.shape != x_obs.shape[:1]:
        raise ValueError(f"x_obs {x_obs.shape} and y_obs {y_obs.shape} must be (M, d={d}) and (M,)")
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"batch x has shape {x.shape}; expected (B, d={d})")
    if is_concrete(y_obs) and y_obs.size and not bool(jnp.all((y_obs >= 0) & (y_obs < v))):
        raise ValueError(f"y_obs holds tokens outside [0, V={v}); pass token indices in range")
    loss_type = _static_loss_type(loss_type)
    _validate_objective(loss_type, beta, loss_weights, hparams, head.w_ref is not None)
    lw = None if loss_weights is None else jnp.asarray(loss_weights, w.dtype)
    traced, static = _split_hparams(hparams)
    c_tok, r_tok = pair_tokens(head, jnp.asarray(beh), jnp.asarray(s))
    w_ref = None if head.w_ref is None else jnp.asarray(head.w_ref, w.dtype)
    return _decomposition(w, w_ref, x_obs, y_obs, x, c_tok, r_tok, beta, lr, lw, traced, loss_type=loss_type,
                          static_hparams=static)


@partial(jax.jit, static_argnames=("loss_type", "static_hparams"))
def _decomposition(w, w_ref, x_obs, y_obs, x, c_tok, r_tok, beta, lr, loss_weights, hparams, *, loss_type,
                   static_hparams):
    v = w.shape[0]
    if w_ref is None:
        rc = rr = None
    else:
        lpr = jax.nn.log_softmax(x @ w_ref.T, axis=-1)
        rc, rr = _take(lpr, c_tok), _take(lpr, r_tok)

    def mean_loss(z):
        lp = jax.nn.log_softmax(z, axis=-1)
        return jnp.mean(_objective(loss_type, static_hparams, _take(lp, c_tok), _take(lp, r_tok), rc, rr, beta,
                                   loss_weights, hparams))

    g = jax.grad(mean_loss)(x @ w.T)  # (B, V)
    a = jax.nn.one_hot(y_obs, v, dtype=w.dtype) - jax.nn.softmax(x_obs @ w.T, axis=-1)  # (M, V)
    kern = x_obs @ x.T  # (M, B)
    terms = -lr * kern * (a @ g.T)
    return {"terms": terms, "first_order": jnp.sum(terms, axis=1), "A": a, "K": kern, "G": g}
