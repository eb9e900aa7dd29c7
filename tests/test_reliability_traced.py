"""Reliability under tracing: the distribution constructors' checks hold for values traced by
``jax.vmap`` / ``jax.jit`` (one line), the sweep's traced construction still passes and compiles
once, traced angles are supported, a failed check under the caller's ``jax.jit`` is printed as one
line, and a seed passed as ``key`` is refused naming the fix."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from dynamics import _checks

REPO = Path(__file__).resolve().parents[1]
GP = dd.GaussianPreference


def _one_line(excinfo, key):
    assert str(excinfo.value) == _checks.TRACED_MESSAGES[key]
    assert "\n" not in str(excinfo.value) and excinfo.value.__suppress_context__


@pytest.mark.parametrize("build, bad, key", [
    (lambda v: GP.single(v, 2, 1.0), [1.0, -1.0], "distinguishability"),
    (lambda v: GP.single(1.0, 2, v), [1.0, -1.0], "sigma"),
    (lambda v: GP.single(1.0, 2, v), [1.0, 0.0], "sigma"),
    (lambda v: GP.single(1.0, 2, 1.0, v), [0.5, 1.5], "p_pos"),
    (lambda v: GP.single(1.0, 2, 1.0, v), [0.5, jnp.nan], "p_pos_finite"),
    (lambda v: GP.create(jnp.ones(2), -jnp.ones(2), v), [1.0, -1.0], "cov_pos_variances"),
    (lambda v: GP.create(jnp.ones(2), -jnp.ones(2), jnp.array([[1.0, 0.0], [0.0, v]])), [1.0, -0.5],
     "cov_pos_diagonal"),
    (lambda v: GP.create(jnp.ones(2), -jnp.ones(2), jnp.array([[1.0, v], [0.0, 1.0]])), [0.0, 0.5],
     "cov_pos_symmetric"),
    (lambda v: GP.create(jnp.ones((2, 2)), -jnp.ones((2, 2)), 1.0, weight=jnp.array([v, 1 - v])), [0.5, 1.2],
     "weight"),
    (lambda v: GP.from_angles(jnp.array([1.0, v]), math.pi / 2, d=2), [1.0, -1.0], "distinguishability"),
    (lambda v: GP.from_angles([1.0, 1.0], v, d=2), [1.0, 4.0], "angles"),
    (lambda v: GP.from_angles([1.0, 1.0], angles_deg=v, d=2), [90.0, -10.0], "angles_deg"),
    # three directions pairwise at 170°: cos = −0.985, the cosine matrix has eigenvalue 1 − 2·0.985 < 0
    (lambda v: GP.from_angles([1.0, 1.0, 1.0], angles_deg=v, d=3), [90.0, 170.0], "angles_psd"),
])
def test_traced_bad_distribution_values_are_refused_in_one_line(build, bad, key):
    """A bad value among vmapped ones was silently used (σ enters as σ², Δ flips the behaviour)."""
    with pytest.raises(ValueError) as e:
        jax.vmap(lambda v: build(v).mu_pos)(jnp.asarray(bad))
    _one_line(e, key)


def test_traced_construction_runs_the_same_values_and_compiles_once():
    """Good traced values give exactly the concrete construction, including traced angles (they raised
    TracerArrayConversionError); and one compiled program serves every value (no value is baked in)."""
    angles = jnp.array([0.3, math.pi / 2])
    traced = jax.jit(jax.vmap(lambda a: GP.from_angles(jnp.array([1.0, 2.0]), a, d=3, sigma=0.7)))(angles)
    for i, a in enumerate(np.asarray(angles)):
        b = np.asarray(traced.mu_pos[i] - traced.mu_neg[i])
        # closed form: ‖b_k‖ = Δ_k and cos∠(b_0, b_1) = cos a (float32 tolerance)
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), [1.0, 2.0], rtol=1e-6)
        np.testing.assert_allclose(b[0] @ b[1] / 2.0, math.cos(a), atol=1e-6)
        ref = GP.from_angles([1.0, 2.0], float(a), d=3, sigma=0.7)
        np.testing.assert_allclose(traced.mu_pos[i], ref.mu_pos, atol=1e-7)
    np.testing.assert_allclose(traced.cov_pos, np.broadcast_to(0.49 * np.eye(3), (2, 2, 3, 3)), rtol=1e-6)

    traces = []

    @jax.jit
    def build(delta, sigma, p):
        traces.append(1)
        dist = GP.single(delta, 3, sigma, p)
        return dist.mu_pos, dist.cov_pos, dist.p_pos

    for args in ((1.0, 1.0, 0.5), (0.5, 2.0, 0.3), (0.0, 0.1, 1.0)):
        ref = GP.single(args[0], 3, *args[1:])
        for got, want in zip(build(*args), (ref.mu_pos, ref.cov_pos, ref.p_pos)):
            np.testing.assert_array_equal(got, want)
    assert len(traces) == 1


def test_the_sweep_builder_still_passes_its_padded_configurations():
    """The sweep builds every configuration traced (``jax.vmap`` of ``build_distribution``), a chunk padded by
    repeating its last row: boundary values (Δ = 0, p = 0 and 1, angle 0° and 180°) must pass."""
    from sims.sweep.build import build_distribution

    fields = {"distinguishability": jnp.array([[0.0, 1.0], [2.0, 0.5], [2.0, 0.5]]),
              "sigma": jnp.array([0.5, 1.0, 1.0]), "p": jnp.array([0.0, 1.0, 1.0]),
              "angle": jnp.array([0.0, 180.0, 180.0]), "weight": jnp.array([[0.25, 0.75], [0.5, 0.5], [0.5, 0.5]])}
    dist, _ = jax.jit(jax.vmap(lambda f: build_distribution(f, d=3)))(fields)
    b = np.asarray(dist.mu_pos - dist.mu_neg)
    np.testing.assert_allclose(np.linalg.norm(b, axis=-1), fields["distinguishability"], atol=1e-6)
    np.testing.assert_allclose(b[1, 0] @ b[1, 1], -2.0 * 0.5, atol=1e-6)  # 180°: cos = −1


def test_a_failed_check_under_the_callers_jit_prints_one_line(capsys):
    """Under the caller's jax.jit the compiled program runs in JAX's dispatch (no package frame can catch
    it) and JAX's error text is ~20 lines of the callback's stack; uncaught, it is printed as the
    traceback and one line."""
    dist = GP.single(1.0, 2)
    f = jax.jit(lambda lr: dd.population_trajectory(dist, beta=1.0, lr=lr, steps=5).metrics["loss"])
    with pytest.raises(jax.errors.JaxRuntimeError) as e:
        jax.block_until_ready(f(-0.1))
    assert _checks.traced_check_message(e.value) == _checks.TRACED_MESSAGES["lr"]
    assert len(str(e.value).splitlines()) > 10  # JAX's own text (what the interpreter printed before)
    _checks._show_check_error(e.type, e.value, e.tb)
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.splitlines()[-1] == f"jax.errors.JaxRuntimeError: {_checks.TRACED_MESSAGES['lr']}", err
    assert "CpuCallback" not in err and "equinox" not in err
    assert sys.excepthook is _checks._show_check_error


@pytest.mark.slow
def test_an_uncaught_check_failure_under_jit_is_one_line_in_a_script(tmp_path):
    """The interpreter's report of the same failure, end to end (the excepthook is installed at import)."""
    script = tmp_path / "jit_lr.py"
    script.write_text("import jax, dynamics as dd\ndist = dd.GaussianPreference.single(1.0, 2)\n"
                      "jax.jit(lambda lr: dd.population_trajectory(dist, beta=1.0, lr=lr, steps=5)"
                      ".metrics['loss'])(-0.1)\n")
    res = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == f"jax.errors.JaxRuntimeError: {_checks.TRACED_MESSAGES['lr']}", res.stderr
    assert len(lines) <= 4, res.stderr  # "Traceback", the script's frame and its source line, the message


def test_other_uncaught_errors_go_to_the_previous_hook(monkeypatch):
    seen = []
    monkeypatch.setattr(_checks, "_PREVIOUS_EXCEPTHOOK", [lambda *a: seen.append(a)])
    err = RuntimeError("lr must be > 0")  # not one of the exact messages
    _checks._show_check_error(RuntimeError, err, None)
    assert seen == [(RuntimeError, err, None)]


@pytest.mark.parametrize("key, want", [(0, "got 0 (int, a seed); pass key=jax.random.key(0)"),
                                       (7, "pass key=jax.random.key(7)"),
                                       (1.5, "got 1.5 (float); pass key=jax.random.key(0)"),
                                       (np.int32(3), "pass key=jax.random.key(3)")])
def test_a_seed_passed_as_key_is_refused_naming_key_and_the_fix(key, want):
    """It was JAX's TypeError ("invalid PRNG key data … Got 0") naming no field, or an IndexError."""
    dist = GP.single(1.0, 2)
    with pytest.raises(ValueError, match=r"^key must be a PRNG key, .*" + want.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.") + "$"):
        dd.empirical_trajectory(dist, key, n=8, n_eval=8, beta=1.0, lr=0.1, steps=1)
    batch = jax.tree.map(lambda *a: jnp.stack(a), dist, dist)
    with pytest.raises(ValueError, match=r"^key must be a PRNG key"):
        dd.trajectories(batch, key, layer="empirical", n=8, n_eval=8, beta=1.0, lr=0.1, steps=1)
    # keys still pass: typed (any shape) and legacy raw uint32 key data
    for ok in (jax.random.key(0), jax.random.PRNGKey(0), jax.random.split(jax.random.key(0), 3)):
        assert _checks.check_key("key", ok) is ok
