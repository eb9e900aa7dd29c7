"""The last layer: a ``V×d`` unembedding head with a frozen reference.

``π_W(y|x) = softmax(W x)_y``. Only rows ``a`` ("Yes") and ``b`` ("No") enter
the DPO margin, ``h = s·δᵀx`` with ``δ = (W_a − W_b) − (W_ref,a − W_ref,b)``
(docs/theory.md §1.2). :class:`Head` holds ``W_ref`` and the initial ``W_0``; the
reduced form used by the fast paths is ``(δ_0, u_ref)`` with
``u_ref = W_ref,a − W_ref,b``.

Answer vocabularies (:mod:`dynamics.vocab`, docs/theory.md §7): ``pairs`` names one token pair
``(a_k, b_k)`` per behaviour k, all sharing the one head; for a pair of behaviour k with label
``s = +1`` the chosen token is ``a_k`` and the rejected ``b_k``, for ``s = −1`` the reverse. The
margin-only engines (population, empirical, batched) use ``(a, b)`` only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["Head"]


@struct.dataclass
class Head:
    """Reference and initial head (a pytree).

    Attributes:
      w_ref: ``(V, d)`` frozen reference head ``W_ref``.
      w_init: ``(V, d)`` head at step 0, ``W_0`` (usually ``W_ref``).
      a, b: static row indices of the answer tokens ("Yes", "No"), ``a ≠ b``.
      pairs: static tuple of K ``(a_k, b_k)`` token pairs, one per behaviour (``None``: every
        behaviour uses ``(a, b)``); read by :mod:`dynamics.vocab` and :meth:`token_pairs`.

    ``w_ref`` may be ``None`` (a reference-free head, for the reference-free objectives of
    :mod:`dynamics.vocab` such as SFT; the margin-only engines need a reference).
    """

    w_ref: jax.Array | None
    w_init: jax.Array
    a: int = struct.field(pytree_node=False, default=0)
    b: int = struct.field(pytree_node=False, default=1)
    pairs: tuple | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def zeros(cls, d: int, vocab_size: int = 2, a: int = 0, b: int = 1, dtype=None, *, pairs=None):
        """``W_ref = W_0 = 0`` of shape ``(V, d)``: the usual simulation start (``pairs`` as :meth:`create`)."""
        w = jnp.zeros((vocab_size, d), dtype=dtype or jnp.result_type(float))
        return cls.create(w, w, a, b, pairs=pairs)

    @classmethod
    def create(cls, w_ref, w_init=None, a: int = 0, b: int = 1, *, pairs=None):
        """Validated constructor; ``w_init`` defaults to ``w_ref``.

        Args:
          w_ref: ``(V, d)`` reference head, or ``None`` for a reference-free head (then ``w_init``
            is required). w_init: ``(V, d)`` initial head.
          a, b: the answer rows of the margin-only engines.
          pairs: optional sequence of K ``(a_k, b_k)`` token pairs, one per behaviour
            (:mod:`dynamics.vocab`); stored as a tuple of int pairs.

        Raises ValueError for non-2D heads, V < 2, shapes that differ, a/b
        out of range or equal, a pair that is not two distinct tokens in ``[0, V)``,
        or strings, complex numbers or NaN/inf in the heads.
        """
        from ._checks import check_finite

        if w_ref is None and w_init is None:
            raise ValueError("w_ref and w_init are both None; pass w_init (V, d) for a reference-free head")
        for name, value in (("w_ref", w_ref), ("w_init", w_init)):
            if value is not None:
                check_finite(name, value)  # strings, complex, NaN: named here, not as a dtype traceback
        dtype = jnp.result_type(float)
        w_ref = None if w_ref is None else jnp.asarray(w_ref, dtype=dtype)
        w_init = w_ref if w_init is None else jnp.asarray(w_init, dtype=dtype)
        name, w = ("w_init", w_init) if w_ref is None else ("w_ref", w_ref)
        if w.ndim != 2 or w.shape[0] < 2:
            raise ValueError(f"{name} has shape {w.shape}; expected (V, d) with V >= 2")
        if w_init.shape != w.shape:
            raise ValueError(f"w_init has shape {w_init.shape}; expected w_ref's shape {w.shape}")
        v = w.shape[0]
        if not (0 <= a < v and 0 <= b < v) or a == b:
            raise ValueError(f"answer rows a={a}, b={b} must be distinct indices in [0, V={v})")
        return cls(w_ref, w_init, int(a), int(b), _check_pairs(pairs, v))

    @property
    def dim(self) -> int:
        return self.w_init.shape[-1]

    @property
    def vocab_size(self) -> int:
        """V, the number of answer tokens (rows of the head)."""
        return self.w_init.shape[-2]

    def token_pairs(self, num_behaviors: int):
        """The ``(a_k, b_k)`` token pair of each behaviour: int32 ``(K, 2)``.

        ``pairs=None`` gives ``(a, b)`` for every behaviour.

        Raises:
          ValueError: ``pairs`` holds a number of pairs other than ``num_behaviors``.
        """
        if self.pairs is None:
            return jnp.tile(jnp.array([[self.a, self.b]], jnp.int32), (num_behaviors, 1))
        if len(self.pairs) != num_behaviors:
            raise ValueError(f"head.pairs has {len(self.pairs)} token pairs but there are K={num_behaviors} "
                             "behaviours; pass one (a_k, b_k) per behaviour (or pairs=None)")
        return jnp.array(self.pairs, jnp.int32)

    def check_margin_only(self, where: str) -> "Head":
        """Refuse per-behaviour token pairs in a margin-only engine (which reads rows ``a``, ``b`` only).

        ``pairs`` that all equal ``(a, b)`` are accepted (the same model). Returns ``self``.

        Raises:
          ValueError: a pair differs from ``(a, b)`` (one line, pointing to the vocabulary layers).
        """
        if self.pairs is not None and any(tuple(p) != (self.a, self.b) for p in self.pairs):
            raise ValueError(f"{where} is a margin-only engine (rows a={self.a}, b={self.b}) and cannot use per-behaviour "
                             f"head.pairs {list(self.pairs)}; use dynamics.trajectories (it runs the vocabulary layer) or "
                             "dynamics.vocab_population_trajectory / vocab_empirical_trajectory")
        return self

    def _reference(self):
        if self.w_ref is None:
            raise ValueError("head has no reference (w_ref=None); the margin-only engines need one: "
                             "pass Head.create(w_ref, w_init)")
        return self.w_ref

    @property
    def u_ref(self):
        """``W_ref,a − W_ref,b``, shape ``(d,)``."""
        w_ref = self._reference()
        return w_ref[..., self.a, :] - w_ref[..., self.b, :]

    @property
    def delta_init(self):
        """``δ_0 = (W_0,a − W_0,b) − u_ref``, shape ``(d,)``."""
        return self.w_init[..., self.a, :] - self.w_init[..., self.b, :] - self.u_ref

    def with_delta(self, delta):
        """The full head ``W_0 + (e_a − e_b) Δᵀ`` with ``δ − δ_0 = 2Δ``: ``(V, d)``."""
        half = (delta - self.delta_init) / 2.0
        return self.w_init.at[..., self.a, :].add(half).at[..., self.b, :].add(-half)


def _check_pairs(pairs, v: int):
    """``pairs`` as a tuple of K ``(a_k, b_k)`` int pairs of distinct tokens in ``[0, V)``; ``None`` stays."""
    if pairs is None:
        return None
    import numpy as np

    try:
        items = list(pairs)
    except TypeError:
        raise ValueError(f"pairs must be a sequence of (a_k, b_k) token pairs, got {pairs!r}") from None
    if not items:
        raise ValueError("pairs is empty; pass one (a_k, b_k) token pair per behaviour, or pairs=None")
    out = []
    for k, pair in enumerate(items):
        arr = np.asarray(pair)
        if arr.shape != (2,) or not (np.issubdtype(arr.dtype, np.integer)
                                     or (arr.dtype.kind == "f" and np.all(arr == np.round(arr)))):
            raise ValueError(f"pairs[{k}] = {pair!r}; expected two integer token indices (a_k, b_k)")
        a_k, b_k = (int(t) for t in arr)
        if not (0 <= a_k < v and 0 <= b_k < v):
            raise ValueError(f"pairs[{k}] = ({a_k}, {b_k}) names a token outside the vocabulary [0, V={v}); "
                             f"pass token indices in [0, {v})")
        if a_k == b_k:
            raise ValueError(f"pairs[{k}] = ({a_k}, {b_k}): chosen and rejected tokens must be distinct; "
                             "pass two different tokens")
        out.append((a_k, b_k))
    return tuple(out)
