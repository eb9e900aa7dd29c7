"""When a training trajectory counts as *diverged* — defined once, used by every layer.

A trajectory has diverged when either

1. it produced a NaN or inf (loss, or the head), or
2. its recorded loss rose far above where it started: at some recorded step ``t``

       loss_t > loss_0 + LOSS_RISE_FACTOR · max(|loss_0|, 1)

   (``LOSS_RISE_FACTOR = 10``; units of the loss: nats for the sigmoid family, the
   loss's own units for hinge and IPO).

Rule 2 is what catches the bounded-gradient losses (DPO/``sigmoid``, ``cdpo``,
``robust``, SLiC/``hinge``): their gradient is bounded by ``β‖x‖``, so a step
size far beyond the stable range throws the head to ``‖W‖ ~ η β ‖x‖`` and the loss
to hundreds of nats *without* ever overflowing — e.g. DPO at η = 10⁴ sits at
300–2700 nats with every value finite. Gradient descent with a step size in its
stable range never raises the loss above its start (the descent lemma), and a
transient overshoot of a few nats is not flagged; ten times the starting loss
(at least 10 units) above it is. From the usual start ``δ_0 = 0`` the sigmoid
loss starts at ``log 2`` nats, so the bound is ``log 2 + 10 ≈ 10.7`` nats: a mean
loss of ~10.7 nats means a typical pair's reward margin is about ``−10.7/β``, the
head confidently prefers the rejected answers.

NaN stays NaN: the metrics of a diverged trajectory are stored as they came out
(accuracies and weight change of a NaN head are NaN, not 0); this module only
decides the flag. Source: docs/theory.md §3 (population GD) and the descent lemma.
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["LOSS_RISE_FACTOR", "loss_bound", "loss_diverged", "diverged"]

#: how many starting losses (at least 1 unit each) the loss may rise above its start
LOSS_RISE_FACTOR = 10.0


def loss_bound(loss0):
    """The divergence bound ``loss_0 + LOSS_RISE_FACTOR · max(|loss_0|, 1)`` (same shape as ``loss0``)."""
    loss0 = jnp.asarray(loss0)
    return loss0 + LOSS_RISE_FACTOR * jnp.maximum(jnp.abs(loss0), 1.0)


def loss_diverged(loss, axis: int = -1):
    """Per-trajectory divergence flag from recorded losses.

    Args:
      loss: recorded losses with the time axis ``axis`` (index 0 along it = step 0), e.g.
        ``(T,)``, or ``(C, S, T)`` for a batch of configurations and seeds.
      axis: the time axis (reduced).

    Returns:
      bool array of ``loss``'s shape without ``axis``: True where a loss is NaN/inf or
      rises above :func:`loss_bound` of the first recorded loss. Traceable (jit/vmap).
    """
    loss = jnp.moveaxis(jnp.asarray(loss), axis, -1)
    bound = loss_bound(loss[..., :1])
    nonfinite = ~jnp.all(jnp.isfinite(loss), axis=-1)
    rose = jnp.any(loss > bound, axis=-1)  # NaN compares False; caught by nonfinite
    return nonfinite | rose


def diverged(loss, *arrays):
    """Whether ONE trajectory diverged: :func:`loss_diverged` of ``loss (T,)``, or any
    non-finite value in ``arrays`` (e.g. the head ``δ_t (T, d)``). Returns a bool scalar."""
    flag = loss_diverged(loss)
    for a in arrays:
        flag = flag | ~jnp.all(jnp.isfinite(a))
    return flag
