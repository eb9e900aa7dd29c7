"""Analytic (population) layer: gradients, C1, closed forms, Monte Carlo, large-N agreement."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import dynamics as dd
from conftest import random_dist


@pytest.mark.parametrize("loss", dd.LOSSES)
def test_gradient_matches_finite_differences(x64, rng, loss):
    dist = random_dist(rng, k=2, d=5)
    beta, label_smoothing = 1.7, 0.1
    for scale in (0.3, 3.0):  # β σ_a around 1 and around 10
        delta = jnp.asarray(rng.normal(size=5) * scale)
        g = np.asarray(dd.population_gradient(dist, delta, beta=beta, loss=loss, label_smoothing=label_smoothing))
        f = lambda v: float(dd.population_loss(dist, jnp.asarray(v), beta=beta, loss=loss, label_smoothing=label_smoothing))
        h = 1e-5
        fd = np.array([(f(delta + h * e) - f(delta - h * e)) / (2 * h) for e in np.eye(5)])
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_c1_first_step_is_eta_beta_mbar(x64, rng):
    dist = random_dist(rng, k=3, d=7)
    eta, beta = 0.37, 0.8
    traj = dd.population_trajectory(dist, beta=beta, lr=eta, steps=1)
    mbar = np.asarray(dist.mean)
    np.testing.assert_allclose(np.asarray(traj.delta[1]), eta * beta * mbar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(float(traj.metrics["weight_change"][1]),
                               eta * beta * np.linalg.norm(mbar) / np.sqrt(2), rtol=1e-12)
    # one balanced behaviour: η β Δ / (2√2), whatever the covariance
    single = dd.GaussianPreference.single(2.5, d=4, sigma=3.0)
    t1 = dd.population_trajectory(single, beta=beta, lr=eta, steps=1)
    assert abs(float(t1.metrics["weight_change"][1]) - eta * beta * 2.5 / (2 * np.sqrt(2))) < 1e-12


def test_ipo_population_gd_matches_closed_form(x64, rng):
    """IPO is quadratic: δ_{t+1} = δ_t − 4η (E[zzᵀ] δ_t − c m̄), c = 1/(2β)."""
    dist = random_dist(rng, k=2, d=4)
    eta, beta, steps = 0.05, 0.5, 30
    traj = dd.population_trajectory(dist, beta=beta, lr=eta, steps=steps, loss="ipo")
    mbar = np.asarray(dist.mean)
    second = np.asarray(dist.z_covariance()) + np.outer(mbar, mbar)
    c = 1 / (2 * beta)
    delta = np.zeros(4)
    for t in range(steps):
        delta = delta - 4 * eta * (second @ delta - c * mbar)
    np.testing.assert_allclose(np.asarray(traj.delta[-1]), delta, rtol=1e-10, atol=1e-12)
    loss = (delta @ mbar - c) ** 2 + delta @ np.asarray(dist.z_covariance()) @ delta
    assert abs(float(traj.metrics["loss"][-1]) - loss) < 1e-10


def test_reward_accuracy_formula_vs_monte_carlo(rng):
    dist = random_dist(rng, k=3, d=6)
    u = jnp.asarray(rng.normal(size=6), dtype=jnp.float32)
    acc, per = dd.gaussian_accuracy(dist, u)
    x, s, beh = dist.sample(jax.random.key(1), 400_000)
    hit = np.asarray(s * (x @ u) > 0)
    beh = np.asarray(beh)
    se = np.sqrt(0.25 / hit.size)
    assert abs(hit.mean() - float(acc)) < 4.5 * se
    for k in range(3):
        sel = hit[beh == k]
        assert abs(sel.mean() - float(per[k])) < 4.5 * np.sqrt(0.25 / sel.size)


def test_population_loss_vs_monte_carlo(rng):
    dist = random_dist(rng, k=2, d=5)
    delta = jnp.asarray(rng.normal(size=5), dtype=jnp.float32)
    for loss in dd.LOSSES:
        pl = float(dd.population_loss(dist, delta, beta=1.3, loss=loss, label_smoothing=0.1))
        x, s, _ = dist.sample(jax.random.key(7), 400_000)
        vals = np.asarray(dd.loss_fn(loss, s * (x @ delta), 1.3, 0.1), dtype=np.float64)
        assert abs(vals.mean() - pl) < 4.5 * vals.std() / np.sqrt(vals.size), loss


def test_large_n_empirical_matches_population():
    """N = 5·10⁵, d = 8, anisotropic, K = 2, imbalanced: max |Δ loss| over 60 steps < 2e-3."""
    rng = np.random.default_rng(3)
    dist = random_dist(rng, k=2, d=8, kind="full", imbalance=True)
    kw = dict(beta=1.0, lr=0.2, steps=60)
    pop = dd.population_trajectory(dist, **kw)
    emp = dd.empirical_trajectory(dist, jax.random.key(0), n=500_000, n_eval=1, **kw)
    gap = np.max(np.abs(np.asarray(emp.train["loss"]) - np.asarray(pop.metrics["loss"])))
    assert gap < 2e-3, gap
    acc_gap = np.max(np.abs(np.asarray(emp.train["reward_accuracy"][1:]) - np.asarray(pop.metrics["reward_accuracy"][1:])))
    assert acc_gap < 5e-3, acc_gap


def test_gradient_flow_matches_small_step_gd(x64, rng):
    dist = random_dist(rng, k=2, d=4)
    flow = dd.population_trajectory(dist, beta=1.0, lr=0.5, steps=8, method="flow", substeps=8)
    gd = dd.population_trajectory(dist, beta=1.0, lr=0.005, steps=800, record_every=100)
    # GD with step h approximates the flow with O(h) error
    np.testing.assert_allclose(np.asarray(gd.delta), np.asarray(flow.delta), atol=5e-3)
    assert float(jnp.max(jnp.abs(gd.delta - flow.delta))) > 0  # distinct integrators


def test_flow_rk4_is_fourth_order(x64, rng):
    dist = random_dist(rng, k=1, d=3)
    ref = dd.population_trajectory(dist, beta=2.0, lr=1.0, steps=2, method="flow", substeps=512).delta[-1]
    e1 = float(jnp.linalg.norm(dd.population_trajectory(dist, beta=2.0, lr=1.0, steps=2, method="flow", substeps=16).delta[-1] - ref))
    e2 = float(jnp.linalg.norm(dd.population_trajectory(dist, beta=2.0, lr=1.0, steps=2, method="flow", substeps=32).delta[-1] - ref))
    assert 10 < e1 / e2 < 24  # ≈ 2⁴


def test_dpo_population_loss_decreases_and_accuracy_exact(x64, rng):
    dist = random_dist(rng, k=2, d=6)
    traj = dd.population_trajectory(dist, beta=1.0, lr=0.05, steps=100, record_every=10)
    loss = np.asarray(traj.metrics["loss"])
    assert np.all(np.diff(loss) < 0)
    # exact accuracy of the recorded head, recomputed per component with scipy
    comps = dist.components()
    delta = np.asarray(traj.delta[-1])
    mu = np.asarray(comps.mean) @ delta
    sd = np.sqrt(np.einsum("i,cij,j->c", delta, np.asarray(comps.cov), delta))
    acc = np.sum(np.asarray(comps.weight) * stats.norm.cdf(mu / sd))
    assert abs(float(traj.metrics["reward_accuracy"][-1]) - acc) < 1e-12


def test_adam_population_differs_but_is_finite(rng):
    dist = random_dist(rng, k=2, d=4)
    a = dd.population_trajectory(dist, beta=1.0, lr=0.05, steps=20, optimizer="adam")
    g = dd.population_trajectory(dist, beta=1.0, lr=0.05, steps=20)
    assert not bool(a.diverged)
    # first Adam step moves every coordinate of Δ by lr (sign of the gradient)
    step1 = np.abs(np.asarray(a.delta[1]) / 2)
    np.testing.assert_allclose(step1, 0.05, rtol=1e-3)
    assert float(jnp.max(jnp.abs(a.delta[-1] - g.delta[-1]))) > 1e-3


def test_divergence_is_flagged(rng):
    dist = dd.GaussianPreference.single(2.0, d=3, sigma=1.0)
    bad = dd.population_trajectory(dist, beta=1.0, lr=1e3, steps=20, loss="ipo")
    good = dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=20, loss="ipo")
    assert bool(bad.diverged) and not bool(good.diverged)
