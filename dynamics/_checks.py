"""Input validation that names the field, its value and the fix.

Checks run only on concrete values: inside ``jax.jit`` / ``jax.vmap`` the
arguments are tracers and the checks are skipped (validate before tracing, as
the public entry points do).
"""
from __future__ import annotations

import difflib

import jax
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds no JAX tracer (so its value can be inspected)."""
    leaves = jax.tree_util.tree_leaves(x)
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def _short(value) -> str:
    arr = np.asarray(value)
    if arr.size <= 6:
        return np.array2string(arr, precision=4, separator=", ") if arr.ndim else repr(arr.item())
    return f"array of shape {arr.shape}"


def check_finite(name: str, value) -> None:
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.dtype == object:
        raise ValueError(f"{name}: object array is not allowed; pass a numeric array")
    if np.issubdtype(arr.dtype, np.number) and not np.all(np.isfinite(arr)):
        where = f" (first at index {np.argwhere(~np.isfinite(arr))[0].tolist()})" if arr.ndim else ""
        raise ValueError(f"{name} contains NaN or inf{where}; pass finite values")


def check_scalar(name: str, value) -> None:
    """A hyper-parameter must be a scalar (sweep it with ``jax.vmap``, not by passing an array)."""
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}; use jax.vmap to sweep {name}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    if not is_concrete(value):
        return
    check_finite(name, value)
    arr = np.asarray(value)
    bad = arr < 0 if allow_zero else arr <= 0
    if np.any(bad):
        rel = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {rel}, got {_short(value)}; pass a value {rel}")


def check_in_range(name: str, value, lo: float, hi: float, *, hi_open: bool = False) -> None:
    if not is_concrete(value):
        return
    check_finite(name, value)
    arr = np.asarray(value)
    bad = (arr < lo) | ((arr >= hi) if hi_open else (arr > hi))
    if np.any(bad):
        bracket = ")" if hi_open else "]"
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}{bracket}, got {_short(value)}; "
            f"pass values in [{lo}, {hi}{bracket}"
        )


def check_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; pass an integer >= {minimum}")
    return int(value)


def check_choice(name: str, value: str, choices) -> str:
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {name} {value!r}{hint}; choose one of {choices}")
    return value
