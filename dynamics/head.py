"""The last layer: a ``V×d`` unembedding head with a frozen reference.

``π_W(y|x) = softmax(W x)_y``. Only rows ``a`` ("Yes") and ``b`` ("No") enter
the DPO margin, ``h = s·δᵀx`` with ``δ = (W_a − W_b) − (W_ref,a − W_ref,b)``
(docs/theory.md §1.2). :class:`Head` holds ``W_ref`` and the initial ``W_0``; the
reduced form used by the fast paths is ``(δ_0, u_ref)`` with
``u_ref = W_ref,a − W_ref,b``.
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
    """

    w_ref: jax.Array
    w_init: jax.Array
    a: int = struct.field(pytree_node=False, default=0)
    b: int = struct.field(pytree_node=False, default=1)

    @classmethod
    def zeros(cls, d: int, vocab_size: int = 2, a: int = 0, b: int = 1, dtype=None):
        """``W_ref = W_0 = 0`` of shape ``(V, d)``: the usual simulation start."""
        w = jnp.zeros((vocab_size, d), dtype=dtype or jnp.result_type(float))
        return cls.create(w, w, a, b)

    @classmethod
    def create(cls, w_ref, w_init=None, a: int = 0, b: int = 1):
        """Validated constructor; ``w_init`` defaults to ``w_ref``.

        Raises ValueError for non-2D heads, V < 2, shapes that differ, a/b
        out of range or equal, or strings, complex numbers or NaN/inf in the heads.
        """
        from ._checks import check_finite

        check_finite("w_ref", w_ref)  # strings, complex, NaN: named here, not as a dtype traceback
        if w_init is not None:
            check_finite("w_init", w_init)
        w_ref = jnp.asarray(w_ref, dtype=jnp.result_type(float))
        w_init = w_ref if w_init is None else jnp.asarray(w_init, dtype=w_ref.dtype)
        if w_ref.ndim != 2 or w_ref.shape[0] < 2:
            raise ValueError(f"w_ref has shape {w_ref.shape}; expected (V, d) with V >= 2")
        if w_init.shape != w_ref.shape:
            raise ValueError(f"w_init has shape {w_init.shape}; expected w_ref's shape {w_ref.shape}")
        v = w_ref.shape[0]
        if not (0 <= a < v and 0 <= b < v) or a == b:
            raise ValueError(f"answer rows a={a}, b={b} must be distinct indices in [0, V={v})")
        return cls(w_ref, w_init, int(a), int(b))

    @property
    def dim(self) -> int:
        return self.w_ref.shape[-1]

    @property
    def u_ref(self):
        """``W_ref,a − W_ref,b``, shape ``(d,)``."""
        return self.w_ref[..., self.a, :] - self.w_ref[..., self.b, :]

    @property
    def delta_init(self):
        """``δ_0 = (W_0,a − W_0,b) − u_ref``, shape ``(d,)``."""
        return self.w_init[..., self.a, :] - self.w_init[..., self.b, :] - self.u_ref

    def with_delta(self, delta):
        """The full head ``W_0 + (e_a − e_b) Δᵀ`` with ``δ − δ_0 = 2Δ``: ``(V, d)``."""
        half = (delta - self.delta_init) / 2.0
        return self.w_init.at[..., self.a, :].add(half).at[..., self.b, :].add(-half)
