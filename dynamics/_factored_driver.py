"""Shared driver of the factored engines: input checks, per-configuration arrays, chunked runs.

Both :func:`dynamics.factored_empirical.batched_empirical_trajectory` and
:func:`dynamics.factored_population.batched_population_trajectory` (and the traced entry point
:func:`dynamics.trajectories`) validate β, η, ε and the heads here, and run their compiled kernel
over balanced chunks of configurations (one compile per shape).
"""
from __future__ import annotations

from functools import partial

import jax
import numpy as np
import jax.numpy as jnp

from . import chunking
from ._checks import check_finite, check_in_range, check_positive
from ._train import check_schedule
from .batch import PreferenceBatch, _batch_cfg
from .head import Head
from .losses import uses_label_smoothing, validate_loss

_CHUNK_BUDGET = chunking.CHUNK_BUDGET  # bytes of working memory one automatic chunk may use (dynamics.chunking)
_MAX_AUTO_CHUNK = chunking.MAX_EMPIRICAL_CHUNK


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


def _check_label_smoothing(loss, label_smoothing):
    """ε is the label smoothing of cdpo/robust, in [0, 1/2); any other loss takes ε = 0 (as the core)."""
    if uses_label_smoothing(loss):
        check_in_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    elif np.any(label_smoothing != 0):
        raise ValueError(f"label_smoothing={float(np.max(np.abs(label_smoothing)))} has no effect with loss={loss!r}; it is the label "
                         "smoothing of 'cdpo' and 'robust' — pass label_smoothing=0 or choose one of those losses")


def _head_arrays(head, c, d, dtype):
    """``(arrays, a, b, head_kind)``: u_ref, d0 ``(C, d)``, w0, w_ref ``(C, V, d)`` (views) and
    "zero" (W_0 = W_ref = 0), "ref" (W_0 = W_ref) or "general"."""
    head = Head.zeros(d, dtype=dtype) if head is None else head
    if not isinstance(head, Head):
        raise ValueError(f"head must be a dynamics.Head (optionally with a leading (C,) axis), got {type(head).__name__}")
    head.check_margin_only("the factored engine")
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
    chunk = chunking.balanced_chunk(c, max(1, chunk), multiple)
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



def _common_inputs(batch, beta, lr, label_smoothing, steps, record_every, loss, optimizer):
    """Checks and per-configuration arrays shared by both batched engines.

    Returns ``(batch, steps, record_every, dtype, cfg)``: the validated batch and schedule, the
    active default float dtype (as the core engines use) and the distribution arrays with
    ``beta``, ``lr``, ``label_smoothing`` of shape ``(C,)``. Raises ValueError for a bad argument (named).
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
    cfg["label_smoothing"] = _per_config("label_smoothing", label_smoothing, c, dtype, positive=False)
    _check_label_smoothing(loss, cfg["label_smoothing"])
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

