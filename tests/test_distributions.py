"""Distributions: validation, properties vs NumPy, sampling moments, the .npz format."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from conftest import random_dist


def test_properties_vs_numpy(rng):
    dist = random_dist(rng, k=3, d=5)
    mp, mn = np.asarray(dist.mu_pos, np.float64), np.asarray(dist.mu_neg, np.float64)
    cp, cn = np.asarray(dist.cov_pos, np.float64), np.asarray(dist.cov_neg, np.float64)
    np.testing.assert_allclose(dist.distinguishability, np.linalg.norm(mp - mn, axis=1), rtol=1e-5)
    conc = np.maximum([np.linalg.norm(c, 2) for c in cp], [np.linalg.norm(c, 2) for c in cn])
    np.testing.assert_allclose(dist.concentration, conc, rtol=1e-4)
    np.testing.assert_allclose(dist.trace, np.maximum(np.trace(cp, axis1=1, axis2=2), np.trace(cn, axis1=1, axis2=2)), rtol=1e-5)
    b = mp - mn
    gap = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            if i != j:
                bbar = (b[i] + b[j]) / 2
                gap[i, j] = (b[i] - b[j]) @ bbar / (np.linalg.norm(bbar) * max(np.linalg.norm(b[i]), np.linalg.norm(b[j])))
    np.testing.assert_allclose(dist.priority_gap, gap, atol=1e-5)
    p, w = np.asarray(dist.p_pos), np.asarray(dist.weight)
    mbar = np.sum(w[:, None] * (p[:, None] * mp - (1 - p[:, None]) * mn), axis=0)
    np.testing.assert_allclose(dist.mean, mbar, atol=1e-5)


def test_sampling_moments(rng):
    dist = random_dist(rng, k=2, d=3)
    x, s, beh = (np.asarray(v) for v in dist.sample(jax.random.key(0), 300_000))
    w, p = np.asarray(dist.weight), np.asarray(dist.p_pos)
    for k in range(2):
        sel = beh == k
        assert abs(sel.mean() - w[k]) < 5 * np.sqrt(w[k] * (1 - w[k]) / len(beh))
        pos = s[sel] > 0
        assert abs(pos.mean() - p[k]) < 5 * np.sqrt(p[k] * (1 - p[k]) / sel.sum())
        for sign, mu, cov in ((1, dist.mu_pos[k], dist.cov_pos[k]), (-1, dist.mu_neg[k], dist.cov_neg[k])):
            xs = x[sel & (s == sign)]
            cov = np.asarray(cov)
            se = np.sqrt(np.diag(cov) / len(xs))
            assert np.all(np.abs(xs.mean(0) - np.asarray(mu)) < 5 * se)
            np.testing.assert_allclose(np.cov(xs.T), cov, atol=0.05 * np.abs(cov).max() + 0.02)


def test_singular_covariance_samples_on_subspace():
    cov = np.diag([1.0, 0.0, 4.0])
    dist = dd.GaussianPreference.create(np.zeros(3), np.ones(3), cov)
    x, s, _ = dist.sample(jax.random.key(1), 1000)
    x = np.asarray(x)
    assert np.allclose(x[np.asarray(s) > 0, 1], 0.0, atol=1e-6)


def test_from_angles_realises_the_angles():
    angles = np.array([[0, 0.3, 1.2], [0.3, 0, 1.0], [1.2, 1.0, 0]])
    dist = dd.GaussianPreference.from_angles([1.0, 2.0, 0.5], angles, d=6)
    b = np.asarray(dist.preference_direction, np.float64)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), [1.0, 2.0, 0.5], rtol=1e-6)
    cos = (b @ b.T) / np.outer(np.linalg.norm(b, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    with pytest.raises(ValueError, match="not PSD"):
        dd.GaussianPreference.from_angles([1, 1, 1], np.array([[0, 0.1, 3.0], [0.1, 0, 0.1], [3.0, 0.1, 0]]), d=3)


def test_save_load_roundtrip(tmp_path, rng):
    dist = random_dist(rng, k=2, d=3)
    dist = dist.replace(names=("honesty", "power-seeking"))
    dist.save(tmp_path / "d.npz")
    back = dd.GaussianPreference.load(tmp_path / "d.npz")
    for f in ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos", "weight"):
        np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(dist, f)))
    assert back.names == ("honesty", "power-seeking")


def test_load_refuses_missing_keys_and_pickles(tmp_path):
    np.savez(tmp_path / "missing.npz", mu_pos=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="missing keys"):
        dd.GaussianPreference.load(tmp_path / "missing.npz")
    arrays = dict(mu_pos=np.zeros((1, 2)), mu_neg=np.ones((1, 2)), cov_pos=np.eye(2)[None], cov_neg=np.eye(2)[None],
                  p_pos=np.array([0.5]), weight=np.array([1.0]), names=np.array([{"evil": 1}], dtype=object))
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(ValueError, match="object arrays"):
        dd.GaussianPreference.load(tmp_path / "obj.npz")
    with pytest.raises(FileNotFoundError):
        dd.GaussianPreference.load(tmp_path / "nope.npz")


@pytest.mark.parametrize("kwargs,match", [
    (dict(cov_pos=np.array([[1.0, 0.5], [0.0, 1.0]])), "cov_pos is not symmetric"),
    (dict(cov_pos=np.array([[1.0, 2.0], [2.0, 1.0]])), "cov_pos is not positive semi-definite"),
    (dict(cov_neg=np.array([[1.0, 0.0], [0.0, -1.0]])), "cov_neg is not positive semi-definite"),
    (dict(p_pos=1.5), "p_pos must lie in"),
    (dict(weight=[0.3]), "weight sums to"),
    (dict(mu_pos=np.array([np.nan, 0.0])), "mu_pos contains NaN"),
    (dict(mu_neg=np.zeros(3)), "mu_neg \\(1, 3\\)"),
    (dict(cov_pos=np.eye(3)), "cov_pos has shape"),
])
def test_bad_input_names_the_field(kwargs, match):
    base = dict(mu_pos=np.zeros(2), mu_neg=np.ones(2), cov_pos=np.eye(2))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dd.GaussianPreference.create(**base)


def test_bad_hyperparameters_raise():
    dist = dd.GaussianPreference.single(1.0, d=2)
    key = jax.random.key(0)
    cases = [
        (lambda: dd.population_trajectory(dist, beta=0.0, lr=0.1, steps=2), "beta must be > 0"),
        (lambda: dd.population_trajectory(dist, beta=1.0, lr=-1.0, steps=2), "lr must be > 0"),
        (lambda: dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=2, loss="dpo"), "unknown loss 'dpo'"),
        (lambda: dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=2, loss="cdpo", label_smoothing=0.7), "label_smoothing must lie"),
        (lambda: dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=5, record_every=2), "multiple of record_every"),
        (lambda: dd.population_trajectory(dist, beta=float("nan"), lr=0.1, steps=2), "beta contains NaN"),
        (lambda: dd.empirical_trajectory(dist, key, n=0, beta=1.0, lr=0.1, steps=2), "n must be >= 1"),
        (lambda: dd.empirical_trajectory(dist, key, n=8, beta=1.0, lr=0.1, steps=2, batch_size=9), "batch_size=9 exceeds n=8"),
        (lambda: dd.empirical_trajectory(dist, key, n=8, beta=1.0, lr=0.1, steps=2, optimizer="adamw"), "unknown optimizer"),
        (lambda: dd.empirical_trajectory(dist, key, n=8, beta=1.0, lr=0.1, steps=2, head=dd.Head.zeros(3)), "head has d = 3"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.slow
def test_vmap_over_distributions_matches_loop():
    """64 distributions through both layers in one vmapped call equal a Python loop."""
    deltas = jnp.linspace(0.2, 3.0, 64)
    sigmas = jnp.linspace(0.5, 1.5, 64)
    make = lambda dl, sg: dd.GaussianPreference.create(jnp.array([dl / 2, 0.0, 0.0]), jnp.array([-dl / 2, 0.0, 0.0]),
                                                      sg**2)
    dists = jax.vmap(make)(deltas, sigmas)
    betas = jnp.linspace(0.5, 2.0, 64)
    keys = jax.random.split(jax.random.key(0), 64)
    pop = jax.vmap(lambda d, b: dd.population_trajectory(d, beta=b, lr=0.1, steps=10, record_every=5))(dists, betas)
    emp = jax.vmap(lambda d, b, k: dd.empirical_trajectory(d, k, n=64, n_eval=64, beta=b, lr=0.1, steps=10,
                                                           record_every=5))(dists, betas, keys)
    assert pop.metrics["loss"].shape == (64, 3) and emp.train["loss"].shape == (64, 3)
    for i in range(0, 64, 9):
        d = make(deltas[i], sigmas[i])
        p = dd.population_trajectory(d, beta=betas[i], lr=0.1, steps=10, record_every=5)
        e = dd.empirical_trajectory(d, keys[i], n=64, n_eval=64, beta=betas[i], lr=0.1, steps=10, record_every=5)
        np.testing.assert_allclose(pop.metrics["loss"][i], p.metrics["loss"], rtol=2e-5)
        np.testing.assert_allclose(emp.train["loss"][i], e.train["loss"], rtol=2e-5)
        np.testing.assert_allclose(emp.delta[i], e.delta, rtol=2e-4, atol=1e-6)
    # more distinguishable behaviours learn faster (C1/C2), same σ ordering aside
    assert float(pop.metrics["weight_change"][-1, 1]) > float(pop.metrics["weight_change"][0, 1])


def test_more_bad_inputs(tmp_path):
    dist = dd.GaussianPreference.single(1.0, d=2)
    with pytest.raises(ValueError, match="beta must be a scalar"):
        dd.population_trajectory(dist, beta=jnp.array([1.0, 2.0]), lr=0.1, steps=2)
    with pytest.raises(ValueError, match="lr must be a scalar"):
        dd.empirical_trajectory(dist, jax.random.key(0), n=4, beta=1.0, lr=jnp.ones(3), steps=2)
    with pytest.raises(ValueError, match="no effect with loss='sigmoid'"):
        dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=2, label_smoothing=0.1)
    (tmp_path / "text.npz").write_text("not an archive")
    (tmp_path / "empty.npz").write_bytes(b"")
    for name in ("text.npz", "empty.npz"):
        with pytest.raises(ValueError, match="is not a .npz archive"):
            dd.GaussianPreference.load(tmp_path / name)
    with pytest.raises(ValueError, match="is not a .npz archive"):
        dd.GaussianPreference.load(tmp_path)


@pytest.mark.slow
def test_autodiff_through_population_is_finite_at_zero(x64):
    """jax.grad of the population loss at δ = 0 equals the Stein gradient (finite, no NaN)."""
    dist = dd.GaussianPreference.single(1.5, d=3, sigma=0.7)
    g_ad = jax.grad(lambda v: dd.population_loss(dist, v, beta=2.0))(jnp.zeros(3))
    g_st = dd.population_gradient(dist, jnp.zeros(3), beta=2.0)
    np.testing.assert_allclose(np.asarray(g_ad), np.asarray(g_st), atol=1e-12)
    # and through a whole trajectory, with respect to β
    dl = jax.grad(lambda b: dd.population_trajectory(dist, beta=b, lr=0.1, steps=3).metrics["loss"][-1])(2.0)
    h = 1e-6
    fd = (dd.population_trajectory(dist, beta=2.0 + h, lr=0.1, steps=3).metrics["loss"][-1]
          - dd.population_trajectory(dist, beta=2.0 - h, lr=0.1, steps=3).metrics["loss"][-1]) / (2 * h)
    assert abs(float(dl) - float(fd)) < 1e-6


@pytest.mark.slow
def test_float32_distribution_runs_under_x64():
    dist = dd.GaussianPreference.single(1.0, d=2)  # built in float32
    with jax.enable_x64(True):
        traj = dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=2)
        emp = dd.empirical_trajectory(dist, jax.random.key(0), n=8, n_eval=8, beta=1.0, lr=0.1, steps=2)
        assert traj.metrics["loss"].dtype == jnp.float64 and emp.train["loss"].dtype == jnp.float64
