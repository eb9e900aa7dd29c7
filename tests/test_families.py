"""Non-Gaussian families, the custom-distribution protocol, and interventions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import dynamics as dd
from conftest import random_dist


@pytest.mark.parametrize("family,nu,kurtosis", [("laplace", np.inf, 6.0), ("student_t", 8.0, 4.5)])
def test_elliptical_moments(rng, family, nu, kurtosis):
    """Same mean and covariance as the base Gaussian; marginal kurtosis 3 E[W²] (Laplace 6, t_ν 3(ν−2)/(ν−4))."""
    base = dd.GaussianPreference.create(np.array([1.0, -0.5]), np.array([-1.0, 0.0]), np.array([[2.0, 0.6], [0.6, 1.0]]),
                                        p_pos=1.0)
    dist = dd.EllipticalPreference.create(base, family, nu)
    x, s, _ = (np.asarray(v, np.float64) for v in dist.sample(jax.random.key(0), 400_000))
    assert np.all(s > 0)
    np.testing.assert_allclose(x.mean(0), [1.0, -0.5], atol=0.015)
    np.testing.assert_allclose(np.cov(x.T), [[2.0, 0.6], [0.6, 1.0]], atol=0.05)
    xc = (x[:, 1] - x[:, 1].mean()) / x[:, 1].std()
    assert abs(np.mean(xc**4) - kurtosis) < 0.35 * (kurtosis - 2)


def test_mixture_components_are_exact(rng):
    k, m, d = 2, 3, 3
    mu_pos = rng.normal(size=(k, m, d))
    mu_neg = rng.normal(size=(k, m, d))
    cov = np.broadcast_to(0.3 * np.eye(d), (k, m, d, d))
    mix = rng.dirichlet(np.ones(m), size=k)
    dist = dd.GaussianMixturePreference.create(mu_pos, mu_neg, cov, cov, mix, mix, p_pos=[0.3, 0.6], weight=[0.4, 0.6])
    delta = jnp.asarray(rng.normal(size=d), dtype=jnp.float32)
    x, s, beh = dist.sample(jax.random.key(2), 400_000)
    # exact population loss and accuracy of the mixture vs Monte Carlo
    vals = np.asarray(dd.loss_fn("sigmoid", s * (x @ delta), 1.0), np.float64)
    pl = float(dd.population_loss(dist, delta, beta=1.0))
    assert abs(vals.mean() - pl) < 4.5 * vals.std() / np.sqrt(vals.size)
    acc, _ = dd.gaussian_accuracy(dist, delta)
    hit = np.asarray(s * (x @ delta) > 0)
    assert abs(hit.mean() - float(acc)) < 4.5 * np.sqrt(0.25 / hit.size)
    # moment-matched Gaussian: same first two moments of x per class
    eq = dist.gaussian_equivalent()
    xs = np.asarray(x)[(np.asarray(beh) == 1) & (np.asarray(s) > 0)]
    np.testing.assert_allclose(xs.mean(0), eq.mu_pos[1], atol=0.03)
    np.testing.assert_allclose(np.cov(xs.T), eq.cov_pos[1], atol=0.06)


def test_population_runs_on_mixture_and_elliptical(rng):
    dist = dd.GaussianMixturePreference.create(rng.normal(size=(1, 2, 2)), rng.normal(size=(1, 2, 2)),
                                               np.broadcast_to(np.eye(2), (1, 2, 2, 2)), np.broadcast_to(np.eye(2), (1, 2, 2, 2)))
    exact = dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=10)
    matched = dd.population_trajectory(dist.gaussian_equivalent(), beta=1.0, lr=0.1, steps=10)
    # C1 is a statement about the mean only: the first step agrees exactly
    np.testing.assert_allclose(exact.delta[1], matched.delta[1], rtol=1e-5)
    ell = dd.EllipticalPreference.create(random_dist(rng, k=1, d=2), "student_t", 5.0)
    t = dd.population_trajectory(ell, beta=1.0, lr=0.1, steps=3)
    t2 = dd.population_trajectory(ell.base, beta=1.0, lr=0.1, steps=3)
    np.testing.assert_allclose(t.metrics["loss"], t2.metrics["loss"])


def test_flip_rate_half_gives_zero_expected_gradient(x64, rng):
    dist = random_dist(rng, k=2, d=4)
    g = dd.population_gradient(dist, jnp.zeros(4), beta=1.0, label_noise=jnp.array([0.5, 0.5]))
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-15)
    traj = dd.population_trajectory(dist, beta=1.0, lr=0.5, steps=20, label_noise=jnp.array([0.5, 0.5]))
    np.testing.assert_allclose(np.asarray(traj.delta), 0.0, atol=1e-15)
    # a quarter of flips: the first step shrinks by exactly (1 − 2ρ)
    t1 = dd.population_trajectory(dist, beta=1.0, lr=0.5, steps=1, label_noise=jnp.array([0.25, 0.25]))
    np.testing.assert_allclose(np.asarray(t1.delta[1]), 0.5 * 0.5 * np.asarray(dist.mean), rtol=1e-12)


def test_label_noise_population_vs_monte_carlo(rng):
    dist = random_dist(rng, k=2, d=3)
    rho = jnp.array([0.1, 0.35])
    delta = jnp.asarray(rng.normal(size=3), dtype=jnp.float32)
    x, s, beh = dist.sample(jax.random.key(0), 400_000)
    s_noisy = dd.noisy_labels(jax.random.key(1), s, beh, rho)
    flipped = np.asarray(s_noisy != s)
    for k, r in enumerate([0.1, 0.35]):
        sel = np.asarray(beh) == k
        assert abs(flipped[sel].mean() - r) < 5 * np.sqrt(r * (1 - r) / sel.sum())
    vals = np.asarray(dd.loss_fn("sigmoid", s_noisy * (x @ delta), 1.0), np.float64)
    pl = float(dd.population_loss(dist, delta, beta=1.0, label_noise=rho))
    assert abs(vals.mean() - pl) < 4.5 * vals.std() / np.sqrt(vals.size)


def test_loss_weight_reweights_behaviours(x64, rng):
    dist = random_dist(rng, k=2, d=3)
    delta = jnp.asarray(rng.normal(size=3))
    lam = jnp.array([2.0, 0.5])
    m = dd.population_metrics(dist, delta, beta=1.0)
    w = np.asarray(dist.weight)
    expected = np.sum(np.asarray(lam) * w * np.asarray(m["behavior_loss"]))
    assert abs(float(dd.population_loss(dist, delta, beta=1.0, loss_weight=lam)) - expected) < 1e-12


def test_interventions_full_equals_reduced(x64, rng):
    dist = random_dist(rng, k=2, d=3)
    kw = dict(n=64, beta=1.0, lr=0.1, steps=6, n_eval=16, label_noise=jnp.array([0.2, 0.0]),
              loss_weight=jnp.array([1.5, 0.5]), batch_size=16, optimizer="momentum")
    r = dd.empirical_trajectory(dist, jax.random.key(0), path="reduced", **kw)
    f = dd.empirical_trajectory(dist, jax.random.key(0), path="full", **kw)
    np.testing.assert_allclose(np.asarray(r.delta), np.asarray(f.delta), atol=1e-10)
    np.testing.assert_allclose(np.asarray(r.train["loss"]), np.asarray(f.train["loss"]), atol=1e-10)
    clean = dd.empirical_trajectory(dist, jax.random.key(0), **{**kw, "label_noise": None})
    assert float(jnp.max(jnp.abs(clean.delta[-1] - r.delta[-1]))) > 1e-4


@struct.dataclass
class ShiftedUniform:
    """A user-defined family: x = s·shift + U(−1, 1)^d (the tutorial's example)."""

    shift: jax.Array  # (d,)
    num_behaviors: int = struct.field(pytree_node=False, default=1)

    @property
    def dim(self):
        return self.shift.shape[-1]

    def sample(self, key, n):
        ks, kx = jax.random.split(key)
        s = jnp.where(jax.random.bernoulli(ks, 0.5, (n,)), 1.0, -1.0)
        x = s[:, None] * self.shift + jax.random.uniform(kx, (n, self.dim), minval=-1.0, maxval=1.0)
        return x, s, jnp.zeros((n,), jnp.int32)


def test_custom_family_vmapped_through_empirical_layer():
    shifts = jnp.linspace(0.0, 2.0, 8)[:, None] * jnp.array([1.0, 0.0])
    dists = ShiftedUniform(shifts)
    out = jax.vmap(lambda dist, k: dd.empirical_trajectory(dist, k, n=256, n_eval=256, beta=1.0, lr=0.5, steps=10))(
        dists, jax.random.split(jax.random.key(0), 8))
    acc = np.asarray(out.eval["reward_accuracy"][:, -1])
    # exact accuracy of the direction e₁ is P(shift + U > 0) = (1 + shift)/2 (capped at 1)
    exact = np.minimum((1 + np.asarray(shifts[:, 0])) / 2, 1.0)
    assert np.all(np.abs(acc[1:] - exact[1:]) < 0.08)
    assert np.all(np.diff(acc) > -0.05)


def test_bad_family_inputs():
    base = dd.GaussianPreference.single(1.0, d=2)
    with pytest.raises(ValueError, match="nu must be > 2"):
        dd.EllipticalPreference.create(base, "student_t", 2.0)
    with pytest.raises(ValueError, match="unknown family"):
        dd.EllipticalPreference.create(base, "cauchy")
    with pytest.raises(ValueError, match="label_noise must lie in"):
        dd.population_trajectory(base, beta=1.0, lr=0.1, steps=1, label_noise=jnp.array([0.7]))
    with pytest.raises(ValueError, match="loss_weight must be >= 0"):
        dd.population_trajectory(base, beta=1.0, lr=0.1, steps=1, loss_weight=jnp.array([-1.0]))
    with pytest.raises(ValueError, match=r"label_noise has shape \(2,\)"):
        dd.empirical_trajectory(base, jax.random.key(0), n=8, beta=1.0, lr=0.1, steps=1, label_noise=jnp.array([0.1, 0.1]))

    @struct.dataclass
    class Broken:
        num_behaviors: int = struct.field(pytree_node=False, default=1)

        def sample(self, key, n):
            return jnp.zeros((n,)), jnp.ones((n,)), jnp.zeros((n,), jnp.int32)

    with pytest.raises(ValueError, match=r"returned x of shape \(8,\); expected \(n, d\)"):
        dd.empirical_trajectory(Broken(), jax.random.key(0), n=8, beta=1.0, lr=0.1, steps=1)


def test_mixture_from_gaussian_keeps_moments_and_is_bimodal(x64, rng):
    """from_gaussian: the moment-matched Gaussian is the base (closed form), sub-covariances PSD,
    spread 0 is the base itself, and samples have the base's moments with two modes along v_k."""
    base = random_dist(rng, k=2, d=3)
    mix = dd.GaussianMixturePreference.from_gaussian(base, 0.8)
    eq = mix.gaussian_equivalent()
    for name in ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos", "weight"):
        np.testing.assert_allclose(getattr(eq, name), getattr(base, name), rtol=1e-10, atol=1e-12, err_msg=name)
    assert np.linalg.eigvalsh(np.asarray(mix.cov_pos)).min() > -1e-10
    # the split direction carries spread² of the variance along it: a² vᵀΣ⁻¹v = spread²
    v = np.array(base.mu_pos - base.mu_neg)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    for k in range(2):
        a = np.asarray(mix.mu_pos[k, 0] - base.mu_pos[k]) @ v[k]
        np.testing.assert_allclose(a**2 * v[k] @ np.linalg.solve(np.asarray(base.cov_pos[k]), v[k]), 0.64, rtol=1e-10)
    delta = jnp.asarray(rng.normal(size=3))
    zero = dd.GaussianMixturePreference.from_gaussian(base, 0.0)
    np.testing.assert_allclose(dd.population_loss(zero, delta, beta=1.0), dd.population_loss(base, delta, beta=1.0),
                               rtol=1e-12)
    assert abs(float(dd.population_loss(mix, delta, beta=3.0)) - float(dd.population_loss(base, delta, beta=3.0))) > 1e-4
    x, s, beh = (np.asarray(t) for t in mix.sample(jax.random.key(5), 300_000))
    sel = (beh == 0) & (s > 0)
    np.testing.assert_allclose(x[sel].mean(0), base.mu_pos[0], atol=0.03)
    np.testing.assert_allclose(np.cov(x[sel].T), base.cov_pos[0], atol=0.06)
    with pytest.raises(ValueError, match="spread must be < 1"):
        dd.GaussianMixturePreference.from_gaussian(base, 1.0)
    with pytest.raises(ValueError, match="spread"):
        dd.GaussianMixturePreference.from_gaussian(base, -0.1)
