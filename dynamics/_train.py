"""Shared training machinery for the population and empirical layers."""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import optax

from ._checks import check_int, check_positive

OPTIMIZERS = ("sgd", "momentum", "adam")

#: heavy-ball coefficient μ of ``optimizer="momentum"`` (``optax.sgd(lr, momentum=μ)``, not Nesterov)
MOMENTUM = 0.9
#: Adam's ``(b1, b2, eps)`` of ``optimizer="adam"`` (the optax / PyTorch defaults; ``eps_root = 0``)
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


def make_optimizer(optimizer, lr) -> optax.GradientTransformation:
    """The optax transformation of an optimizer name.

    ``None``/"sgd" → ``optax.sgd(lr)`` (plain GD/SGD: ``u = −η g``); "momentum" →
    heavy ball ``v ← g + μ v``, ``u = −η v`` with ``μ = MOMENTUM`` (0.9, not
    Nesterov); "adam" → ``optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)``
    (bias-corrected, ``u = −η m̂/(√v̂ + eps)``); an ``optax.GradientTransformation``
    is used as is (``lr`` ignored). ``lr`` is η on the head ``W`` (per step).

    Only sign-equivariant optimizers without weight decay keep the full head
    and the reduced δ form equal (docs/theory.md §1); SGD, momentum and Adam are.

    Raises:
      ValueError: an unknown optimizer name (naming the choices).
    """
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer is None or optimizer == "sgd":
        return optax.sgd(lr)
    if optimizer == "momentum":
        return optax.sgd(lr, momentum=MOMENTUM, nesterov=False)
    if optimizer == "adam":
        return optax.adam(lr, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, eps_root=0.0)
    from ._checks import check_choice

    check_choice("optimizer", optimizer, OPTIMIZERS)
    raise AssertionError  # unreachable


def check_schedule(steps, record_every, lr, optimizer) -> tuple[int, int]:
    steps = check_int("steps", steps, minimum=0)
    record_every = check_int("record_every", record_every, minimum=1)
    if steps % record_every:
        raise ValueError(
            f"steps={steps} is not a multiple of record_every={record_every}; "
            "pick steps = k * record_every"
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        if lr is None:
            raise ValueError("lr is required unless optimizer is an optax.GradientTransformation")
        from ._checks import check_scalar

        check_scalar("lr", lr)
        check_positive("lr", lr)
    return steps, record_every


def check_batch_size(batch_size, n: int):
    """Validate a minibatch size against ``n`` pairs; ``None``, ``0`` (as in sweep configs) or ``n``
    mean full batch → ``None``."""
    if batch_size is None or (not isinstance(batch_size, bool) and isinstance(batch_size, int) and batch_size == 0):
        return None
    batch_size = check_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds n={n}; pass batch_size <= n, or 0 / None for full batch")
    return None if batch_size == n else batch_size


#: ``(every, callback)`` while a program is traced inside :func:`progress_ticks`, else ``None``
_PROGRESS_TICKS = contextvars.ContextVar("dpo_progress_ticks", default=None)


@contextlib.contextmanager
def progress_ticks(every: int, callback):
    """Trace progress reports into the training loops: while a program is *traced* inside this
    context, :func:`run_recorded` calls ``callback(step)`` on the host (``jax.debug.callback``,
    unordered) after every ``every``-th step of each loop it runs. Programs traced outside it carry
    no callback (and cost nothing); ``dpo-sims sweep`` uses it for its progress within a chunk.
    """
    token = _PROGRESS_TICKS.set((check_int("every", every), callback))
    try:
        yield
    finally:
        _PROGRESS_TICKS.reset(token)


def run_recorded(step_fn, record_fn, carry, steps: int, record_every: int):
    """Run ``steps`` steps of ``step_fn``; record ``record_fn`` at steps 0, r, 2r, …, steps.

    Returns ``(final_carry, records)`` with records stacked on a leading
    ``(steps // record_every + 1,)`` axis. Inside :func:`progress_ticks` (at trace time) the loop
    also reports its step to the host every ``every`` steps.
    """
    rec0 = record_fn(carry)
    ticks = _PROGRESS_TICKS.get()

    def inner(r, i, cc):
        cc = step_fn(cc)
        if ticks is not None:
            t = r * record_every + i + 1
            jax.lax.cond(t % ticks[0] == 0, lambda: jax.debug.callback(ticks[1], t), lambda: None)
        return cc

    def outer(c, r):
        c = jax.lax.fori_loop(0, record_every, lambda i, cc: inner(r, i, cc), c)
        return c, record_fn(c)

    carry, recs = jax.lax.scan(outer, carry, jnp.arange(steps // record_every, dtype=jnp.int32))
    recs = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b], axis=0), rec0, recs)
    return carry, recs


def segment_mean(values, segment_ids, num_segments):
    """Mean of ``values (n,)`` per segment → ``(num_segments,)``; NaN where empty."""
    tot = jax.ops.segment_sum(values, segment_ids, num_segments)
    cnt = jax.ops.segment_sum(jnp.ones_like(values), segment_ids, num_segments)
    return jnp.where(cnt > 0, tot / jnp.where(cnt > 0, cnt, 1.0), jnp.nan)


#: most int32 entries of one precomputed minibatch-order table (64 MiB); beyond it the
#: epoch's permutation is recomputed at each step (same values, one sort per step)
PERM_TABLE_MAX = 1 << 24


def epoch_orders_fit(n: int, batch_size: int, steps: int, d: int, copies: int = 1) -> bool:
    """Whether the order tables of :func:`epoch_orders` are precomputed.

    Yes when the table, ``E · n`` int32 entries (``E = ⌈steps / (n // batch_size)⌉`` epochs), is at
    most twice the ``n × d`` training embeddings it indexes — so a vmapped run (seeds,
    configurations) holds at most twice its data's memory in tables — and ``copies`` tables (held
    at once by one call) stay within :data:`PERM_TABLE_MAX` entries.
    """
    num_epochs = -(-steps // (n // batch_size))
    return num_epochs <= 2 * d and copies * num_epochs * n <= PERM_TABLE_MAX


def epoch_orders(key, n: int, batch_size: int, steps: int, d: int):
    """The minibatch orders of every epoch, ``(E, n)`` int32, or ``None`` (see :func:`epoch_orders_fit`).

    Epoch ``e`` visits the pairs in the order ``jax.random.permutation(fold_in(key, e), n)``
    (per-epoch reshuffling; the last partial batch is dropped). With ``None``,
    :func:`minibatch_index` draws the epoch's permutation at each step instead — the same indices
    either way.
    """
    if not epoch_orders_fit(n, batch_size, steps, d):
        return None
    num_epochs = -(-steps // (n // batch_size))
    return jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), n))(jnp.arange(num_epochs))


def minibatch_index(t, key, table, n: int, batch_size: int):
    """Indices ``(batch_size,)`` of the pairs in step ``t``'s minibatch (see :func:`epoch_orders`)."""
    per_epoch = n // batch_size
    epoch = t // per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n) if table is None else table[epoch]
    return jax.lax.dynamic_slice(perm, ((t % per_epoch) * batch_size,), (batch_size,))
