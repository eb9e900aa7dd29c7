"""Input validation that names the field, its value and the fix.

The ``check_*`` functions run on concrete values (at the public entry points,
before anything is sampled or compiled): inside ``jax.jit`` / ``jax.vmap`` the
arguments are tracers and they are skipped. The hyper-parameters that can be
traced (β, η, ε) are checked again inside the compiled function by
:func:`traced_check_hparams` (``equinox.error_if``), so a negative learning rate
under ``jax.vmap`` raises instead of silently doing gradient ascent.

A traced check fails at run time inside XLA, so JAX reports it as a ``JaxRuntimeError`` of
about twenty lines (the callback's traceback and equinox's advice). :func:`traced_check_message`
finds the one-line message in it: the public functions that run the compiled code eagerly
re-raise it as a one-line ``ValueError`` (:func:`one_line_check_errors`), and ``dpo-sims`` prints
it and exits 2; JAX's log record of the same failure ("jax.pure_callback failed" and a
traceback on stderr) is dropped for these checks only. Any other runtime error is untouched.
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


def check_numeric(name: str, value) -> None:
    """Refuse strings, booleans, object arrays and complex values (real numbers only), naming the field.

    Raises ValueError, e.g. ``lr must be a real number, got '0.1' (str); pass a number, e.g. lr=0.1``.
    """
    if not is_concrete(value):
        if _is_complex(value):
            raise ValueError(f"{name} is complex ({value.dtype}); pass real values (take .real if meant)")
        return
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r} (str); pass a number, e.g. {name}=0.1")
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a real number, got {value!r} (bool); pass a number, e.g. {name}=0.1")
    try:
        arr = np.asarray(value)
    except Exception:  # ragged nested lists and the like
        raise ValueError(f"{name} could not be read as a numeric array ({type(value).__name__}); "
                         "pass a rectangular array of real numbers") from None
    if arr.dtype == object:
        raise ValueError(f"{name}: object array is not allowed; pass a numeric array")
    if arr.dtype.kind in "USV":
        raise ValueError(f"{name} holds strings ({_short(arr)}, dtype {arr.dtype}); pass real numbers")
    if arr.dtype.kind == "c":
        raise ValueError(f"{name} is complex ({arr.dtype}); pass real values (take .real if meant)")
    if arr.dtype.kind == "b":
        raise ValueError(f"{name} holds booleans ({_short(arr)}); pass real numbers (bools are not numbers here)")


def _is_complex(value) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and np.issubdtype(dtype, np.complexfloating)


def check_finite(name: str, value) -> None:
    check_numeric(name, value)
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if np.issubdtype(arr.dtype, np.number) and not np.all(np.isfinite(arr)):
        where = f" (first at index {np.argwhere(~np.isfinite(arr))[0].tolist()})" if arr.ndim else ""
        raise ValueError(f"{name} contains NaN or inf{where}; pass finite values")


def check_scalar(name: str, value) -> None:
    """A hyper-parameter must be a scalar (sweep it with ``jax.vmap``, not by passing an array)."""
    check_numeric(name, value)
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


#: the messages of the in-graph checks (:func:`traced_check_hparams`), one line each
TRACED_MESSAGES = {
    "beta": "beta must be > 0 (a value under jit/vmap was <= 0 or NaN); pass beta > 0",
    "lr": "lr must be > 0 (a value under jit/vmap was <= 0 or NaN; a negative lr would do gradient ascent); "
          "pass lr > 0",
    "label_smoothing": "label_smoothing must lie in [0, 0.5) (a value under jit/vmap was outside); "
                       "pass 0 <= label_smoothing < 0.5",
}
_MESSAGE_SET = frozenset(TRACED_MESSAGES.values())


def traced_check_message(exc: BaseException):
    """The one-line message of an in-graph check (:data:`TRACED_MESSAGES`) that ``exc`` reports, else None.

    ``exc`` is what JAX raised when a compiled call failed (a ``JaxRuntimeError`` whose text holds
    the callback's traceback, or equinox's own ``EquinoxRuntimeError``); its cause/context chain is
    searched too. Any other error gives None (it is an internal error: keep its traceback).
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(("_EquinoxRuntimeError:", "EquinoxRuntimeError:", "EqxRuntimeError:")):
                line = line.split(":", 1)[1].strip()
            if line in _MESSAGE_SET:
                return line
        exc = exc.__cause__ or exc.__context__
    return None


class one_line_check_errors:
    """Context manager (and decorator): a failed in-graph check inside raises ``ValueError(message)``
    (one line, no chained traceback) instead of JAX's twenty-line runtime error; anything else passes.

    For the public functions that run compiled code on the caller's values (e.g. under the caller's
    ``jax.vmap``, which executes at once). Under the caller's ``jax.jit`` the error surfaces at the
    caller's dispatch instead; :func:`traced_check_message` reads it there.
    """

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, ValueError):
            return False
        message = traced_check_message(exc)
        if message is None:
            return False
        raise ValueError(message) from None

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with one_line_check_errors():
                return fn(*args, **kwargs)

        return wrapped


class _DropCheckCallbackLog:
    """``logging`` filter for JAX's callback logger: drop its "jax.pure_callback failed" record (a
    traceback on stderr) when the failure is one of :data:`TRACED_MESSAGES` (it is raised anyway)."""

    def filter(self, record) -> bool:
        info = record.exc_info
        return not (info and info[1] is not None and traced_check_message(info[1]) is not None)


def _install_log_filter() -> None:
    import logging

    log = logging.getLogger("jax._src.callback")
    if not any(isinstance(f, _DropCheckCallbackLog) for f in log.filters):
        log.addFilter(_DropCheckCallbackLog())


_install_log_filter()


def traced_check_hparams(beta, lr, label_smoothing, *, loss: str, optimizer=None):
    """In-graph checks of β > 0, η > 0 and ε's range, for values traced by ``jit`` / ``vmap``.

    Call inside the compiled function and use the returned values (the check is tied to
    them). Under ``jax.vmap`` one bad element raises for the whole call. ``lr`` is not
    checked when ``optimizer`` is an ``optax.GradientTransformation`` (it is unused then).

    Returns ``(beta, lr, label_smoothing)``. Raises (at run time, via ``equinox.error_if``) an
    ``EqxRuntimeError`` whose message names the field, e.g. ``lr must be > 0 …``.
    """
    import equinox as eqx
    import optax

    beta = eqx.error_if(beta, ~(beta > 0), TRACED_MESSAGES["beta"])
    if not isinstance(optimizer, optax.GradientTransformation):
        lr = eqx.error_if(lr, ~(lr > 0), TRACED_MESSAGES["lr"])
    from .losses import uses_label_smoothing  # (local: losses imports this module)

    if uses_label_smoothing(loss):
        label_smoothing = eqx.error_if(label_smoothing, ~((label_smoothing >= 0) & (label_smoothing < 0.5)),
                                       TRACED_MESSAGES["label_smoothing"])
    return beta, lr, label_smoothing


#: the largest count a compiled program takes (JAX counts steps, sizes and indices in int32)
INT_MAX = 2**31 - 1


def check_int(name: str, value, *, minimum: int = 1, maximum: int = INT_MAX) -> int:
    """An integer count in ``[minimum, maximum]`` (bools refused), returned as ``int``.

    Raises ValueError naming ``name``, the value and the fix (``maximum``: JAX's int32 counters).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; pass an integer >= {minimum}")
    if value > maximum:
        raise ValueError(f"{name} = {value:,} is too large (at most {maximum:,}: the compiled program counts in "
                         f"int32); pass a smaller {name}")
    return int(value)


def check_choice(name: str, value: str, choices) -> str:
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {name} {value!r}{hint}; choose one of {choices}")
    return value
