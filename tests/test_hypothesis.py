"""Property-based tests (hypothesis) of the invariants of the model (docs/theory.md §1, §3, §4).

* C1 exactness: the first population GD step from δ = 0 is η β m̄ for ANY distribution.
* C3: the accuracy bound never exceeds the exact Gaussian accuracy, for any head u.
* The full V×d head (autodiff log-softmax) and the reduced δ path give the same trajectory.
* DPO population loss is non-increasing along (small-step) gradient flow.

Shapes are fixed per test (K = 2, d = 3) so that each jitted function compiles once;
hypothesis varies the values (25 examples each, derandomized). Budget: about 15 s on 2 CPU cores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynamics as dd
from dynamics import theory as th

K, D = 2, 3
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)

finite = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)


@st.composite
def distributions(draw, k=K, d=D):
    """Random valid GaussianPreference (full covariances A Aᵀ + εI, any balance and weights)."""
    mu_pos = np.array(draw(st.lists(finite, min_size=k * d, max_size=k * d))).reshape(k, d)
    mu_neg = np.array(draw(st.lists(finite, min_size=k * d, max_size=k * d))).reshape(k, d)
    covs = []
    for _ in range(2):
        a = np.array(draw(st.lists(st.floats(-1.5, 1.5), min_size=k * d * d, max_size=k * d * d))).reshape(k, d, d)
        covs.append(a @ np.swapaxes(a, -1, -2) + draw(st.floats(0.01, 1.0)) * np.eye(d))
    p = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k)))
    w = np.array(draw(st.lists(st.floats(0.05, 1.0), min_size=k, max_size=k)))
    return dd.GaussianPreference.create(mu_pos, mu_neg, covs[0], covs[1], p, w / w.sum())


@jax.jit
def _first_step(dist, beta, lr):
    return dd.population_trajectory(dist, beta=beta, lr=lr, steps=1).delta[1]


@SETTINGS
@given(dist=distributions(), beta=st.floats(0.01, 5.0), lr=st.floats(1e-3, 1.0))
def test_c1_first_population_step_is_eta_beta_mbar(dist, beta, lr):
    delta1 = np.asarray(_first_step(dist, beta, lr), np.float64)
    expected = lr * beta * np.asarray(dist.mean, np.float64)
    np.testing.assert_allclose(delta1, expected, rtol=2e-5, atol=1e-6 * max(1.0, np.abs(expected).max()))
    pred = th.c1_first_step(dist, beta=beta, lr=lr)
    np.testing.assert_allclose(np.asarray(pred.delta), expected, rtol=1e-5, atol=1e-7)


@jax.jit
def _bound_and_exact(dist, u):
    return th.c3_accuracy_bound(dist, u)[0], dd.gaussian_accuracy(dist, u)[0]


@SETTINGS
@given(dist=distributions(), u=st.lists(finite, min_size=D, max_size=D), at_mean=st.booleans())
def test_c3_bound_never_exceeds_exact_accuracy(dist, u, at_mean):
    u = dist.mean if at_mean else jnp.asarray(u)
    bound, exact = map(float, _bound_and_exact(dist, u))
    assert bound <= exact + 1e-6
    assert 0.0 <= exact <= 1.0 + 1e-6 and bound <= 1.0


@jax.jit
def _both_paths(dist, key, beta, lr, w0):
    n, n_eval = 48, 32
    k_data, k_batch = jax.random.split(key)
    x, s, beh = dist.sample(k_data, n + n_eval)
    train, held = (x[:n], s[:n], beh[:n]), (x[n:], s[n:], beh[n:])
    head = dd.Head.create(jnp.zeros((4, D)), w0)
    kw = dict(num_behaviors=K, beta=beta, lr=lr, steps=6, batch_size=16, head=head)
    full = dd.trajectory_on_data(train, held, k_batch, path="full", **kw)
    reduced = dd.trajectory_on_data(train, held, k_batch, path="reduced", **kw)
    return full, reduced, (x[:n], s[:n]), (x[n:], s[n:])


@SETTINGS
@given(dist=distributions(), seed=st.integers(0, 2**31 - 1), beta=st.floats(0.05, 3.0), lr=st.floats(1e-3, 0.5),
       w0=st.lists(st.floats(-1.0, 1.0), min_size=4 * D, max_size=4 * D))
def test_full_head_equals_reduced_delta(dist, seed, beta, lr, w0):
    """V = 4 vocabulary rows, a start W_0 ≠ W_ref = 0, minibatch SGD: same δ, weights and metrics."""
    w0 = jnp.asarray(np.array(w0).reshape(4, D))
    full, reduced, train, held = _both_paths(dist, jax.random.key(seed), beta, lr, w0)
    scale = max(1.0, float(jnp.abs(reduced.delta).max()))
    np.testing.assert_allclose(np.asarray(full.delta), np.asarray(reduced.delta), atol=2e-5 * scale)
    np.testing.assert_allclose(np.asarray(full.weights), np.asarray(reduced.weights), atol=2e-5 * scale)
    deltas = np.asarray(reduced.delta, np.float64)  # (T, d); W_ref = 0 so policy and reward margins agree
    for split, (x, s) in (("train", train), ("eval", held)):
        a, b = getattr(full, split), getattr(reduced, split)
        for name in ("loss", "weight_change", "rewards_margin", "logps_chosen"):
            np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-4,
                                       atol=1e-4 * max(1.0, float(np.abs(np.asarray(b[name])).max())))
        # 0/1 averages may differ only on near-ties: |margin| within float32 rounding of the logits
        x, s = np.asarray(x, np.float64), np.asarray(s, np.float64)
        margins = s[None, :] * (deltas @ x.T)  # (T, n)
        tol = 1e-5 * (1.0 + np.abs(x @ np.asarray(w0, np.float64).T).max())
        near = np.mean(np.abs(margins) < tol, axis=1)
        for name in ("reward_accuracy", "policy_accuracy"):
            assert np.all(np.abs(np.asarray(a[name]) - np.asarray(b[name])) <= near + 1e-6)


@jax.jit
def _flow_loss(dist, beta, lr):
    return dd.population_trajectory(dist, beta=beta, lr=lr, steps=40, method="flow").metrics["loss"]


@SETTINGS
@given(dist=distributions(), beta=st.floats(0.05, 5.0), u=st.floats(0.01, 0.2))
def test_dpo_population_loss_monotone_under_gradient_flow(dist, beta, u):
    """dL/dτ = −2‖∇L‖² ≤ 0; the step τ per record is a fraction u of 1/(β²/4 λ_max(E zzᵀ))."""
    second = np.asarray(dist.z_covariance() + jnp.outer(dist.mean, dist.mean), np.float64)
    lr = u / (beta**2 / 4 * np.linalg.eigvalsh(second)[-1])
    loss = np.asarray(_flow_loss(dist, beta, lr), np.float64)
    assert np.isclose(loss[0], np.log(2.0), atol=1e-6)
    assert np.all(np.diff(loss) <= 1e-6 * np.maximum(1.0, np.abs(loss[1:])))
