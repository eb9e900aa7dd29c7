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
Under the caller's own ``jax.jit`` the failure is raised by JAX's dispatch (no package frame is
on the stack then), so its type stays ``JaxRuntimeError``; uncaught, it is printed as its traceback
and the one line (:func:`_show_check_error`, the interpreter's ``sys.excepthook``).
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


def _traced_message(field: str, rule: str, fix: str) -> str:
    return f"{field} {rule} (a value under jit/vmap was outside or NaN); {fix}"


# the distribution constructors' in-graph checks (GaussianPreference.create / single / from_angles / validate)
TRACED_MESSAGES.update({
    "distinguishability": _traced_message("distinguishability", "must be >= 0", "pass distinguishability >= 0"),
    "sigma": _traced_message("sigma", "must be > 0", "pass sigma > 0 (a standard deviation)"),
    "p_pos": _traced_message("p_pos", "must lie in [0, 1]", "pass 0 <= p_pos <= 1 (p of single / from_angles)"),
    "weight": _traced_message("weight", "must be >= 0 and sum to 1", "pass behaviour weights >= 0 divided by "
                                                                   "their sum"),
    "angles": _traced_message("angles", "must lie in [0, π] radians", "pass radians in [0, π] (or angles_deg in "
                                                                      "[0, 180])"),
    "angles_deg": _traced_message("angles_deg", "must lie in [0, 180] degrees", "pass degrees in [0, 180]"),
    "angles_symmetric": _traced_message("angles", "must be a symmetric (K, K) matrix", "pass (A + Aᵀ)/2"),
    "angles_psd": _traced_message("angles", "must give a PSD cosine matrix", "no set of directions has these "
                                                                            "angles — widen or narrow them"),
})
for _name in ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos", "weight"):
    TRACED_MESSAGES[f"{_name}_finite"] = _traced_message(_name, "must be finite", "pass finite values")
for _name in ("cov_pos", "cov_neg"):
    TRACED_MESSAGES[f"{_name}_symmetric"] = _traced_message(_name, "must be symmetric", "pass (Σ + Σᵀ)/2")
    TRACED_MESSAGES[f"{_name}_diagonal"] = _traced_message(
        _name, "must have variances >= 0 on its diagonal (a negative one is not PSD)",
        "pass a PSD covariance (variances >= 0)")
    TRACED_MESSAGES[f"{_name}_variances"] = _traced_message(f"{_name} (variances)", "must be >= 0",
                                                            "pass variances >= 0")
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


def _show_check_error(kind, value, tb) -> None:
    """``sys.excepthook``: an uncaught error of a failed in-graph check (:data:`TRACED_MESSAGES`) is shown
    as its traceback and ONE line, ``<its type>: <message>``, in place of the twenty-line text JAX gives
    it; any other exception goes to the previous hook unchanged.

    Under the caller's own ``jax.jit`` the compiled program runs in JAX's dispatch, after the package's
    functions have returned (they only traced it), so no package frame can catch the error there; JAX
    raises a ``JaxRuntimeError`` whose text holds the host callback's whole stack. Its type is kept
    (``except jax.errors.JaxRuntimeError`` still catches it); only what the interpreter prints changes.
    """
    message = traced_check_message(value) if isinstance(value, Exception) and not isinstance(value, ValueError) \
        else None
    if message is None:
        return _PREVIOUS_EXCEPTHOOK[0](kind, value, tb)
    import sys
    import traceback

    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    frames = "".join(traceback.format_list(traceback.extract_tb(tb))) if tb is not None else ""
    sys.stderr.write(("Traceback (most recent call last):\n" + frames if frames else "") + f"{name}: {message}\n")


_PREVIOUS_EXCEPTHOOK: list = [None]


def _install_excepthook() -> None:
    import sys

    if sys.excepthook is not _show_check_error:
        _PREVIOUS_EXCEPTHOOK[0] = sys.excepthook
        sys.excepthook = _show_check_error


_install_excepthook()


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


def traced_require(x, checks):
    """In-graph checks of values traced by ``jit`` / ``vmap``: ``x`` returned, tied to ``checks``.

    ``checks``: ``(ok, key)`` pairs, ``ok`` a boolean array (True where valid; NaN must give False) and
    ``key`` one of :data:`TRACED_MESSAGES`. Nothing is added when every ``ok`` is concrete (the
    concrete ``check_*`` functions, with the value in the message, run first). One
    ``equinox.branched_error_if`` (one ``lax.cond``) for all checks, so the compiled program grows by
    one predicate and no value is baked in: no recompile per value. Use the returned ``x`` (an unused
    result is dead code and is not checked).

    Raises:
      ValueError: the check's one-line message, at once, where the predicate is known while tracing
        (the caller's eager ``jax.vmap``); at run time (the caller's ``jax.jit``) JAX raises a
        ``JaxRuntimeError`` holding the message (:func:`traced_check_message`).
    """
    checks = [(ok, key) for ok, key in checks if not is_concrete(ok)]
    if not checks:
        return x
    import equinox as eqx
    import jax.numpy as jnp

    bad = jnp.stack([~jnp.all(ok) for ok, _ in checks])
    with one_line_check_errors():  # eager vmap: equinox raises EquinoxTracetimeError(message) here
        return eqx.branched_error_if(x, jnp.any(bad), jnp.argmax(bad), [TRACED_MESSAGES[key] for _, key in checks])


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


def check_key(name: str, key):
    """A JAX PRNG key: a typed key (``jax.random.key(seed)``, any shape) or legacy raw key data
    (``jax.random.PRNGKey(seed)``: uint32, last axis 2); returned unchanged (it may be traced).

    Raises ValueError naming ``name`` and the fix, e.g. ``key must be a PRNG key, got 0 (int); pass
    key=jax.random.key(0)`` (a seed is not a key).
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    if dtype is not None and np.dtype(dtype) == np.uint32 and np.shape(key)[-1:] == (2,):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        got, seed = f"{int(key)} (int, a seed)", int(key)
    elif dtype is not None:
        got, seed = f"an array of dtype {dtype} and shape {tuple(np.shape(key))}", 0
    else:
        got, seed = f"{key!r} ({type(key).__name__})", 0
    raise ValueError(f"{name} must be a PRNG key, got {got}; pass {name}=jax.random.key({seed})")


def check_choice(name: str, value: str, choices) -> str:
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {name} {value!r}{hint}; choose one of {choices}")
    return value
