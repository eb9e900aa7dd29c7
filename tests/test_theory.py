"""Tests of dynamics/theory.py (claims C1–C5) against independent computations.

Every prediction is compared with something computed another way: NumPy float64
re-implementations of the formulas from the raw distribution parameters, finite
differences of the population dynamics, Monte Carlo samples, or closed forms.
Also the `dpo-sims validate` entry point (quick plan) end to end.
Budget (2 shared CPU cores): about 2.5 min of CPU for this file, of which the quick
validation run is about 1 min; the x64 tests use the `x64` fixture of conftest.py.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from conftest import random_dist_params
from dynamics import theory as th

SQRT2 = np.sqrt(2.0)


# ----------------------------------------------------------------- helpers
make_dist = random_dist_params  # random distribution from NumPy float64 parameters (kept for independent checks)


def np_components(pr):
    """(π (2K,), m (2K, d), S (2K, d, d)) of z = s x, straight from docs/theory.md §2.2."""
    k = len(pr["w"])
    pi = np.concatenate([pr["w"] * pr["p"], pr["w"] * (1 - pr["p"])])
    m = np.concatenate([pr["mu_pos"], -pr["mu_neg"]])
    s = np.concatenate([pr["cov_pos"], pr["cov_neg"]])
    beh = np.concatenate([np.arange(k), np.arange(k)])
    return pi, m, s, beh


def np_mean_cov(pr):
    pi, m, s, _ = np_components(pr)
    mbar = pi @ m
    cov = np.einsum("c,cij->ij", pi, s) + np.einsum("c,ci,cj->ij", pi, m - mbar, m - mbar)
    return mbar, cov


def np_loss(loss, h, beta, label_smoothing):
    """ℓ(h) from docs/theory.md §1.3, written out independently in float64 NumPy."""
    logsig = lambda x: -np.logaddexp(0.0, -x)
    if loss == "sigmoid":
        return -logsig(beta * h)
    if loss == "cdpo":
        return -(1 - label_smoothing) * logsig(beta * h) - label_smoothing * logsig(-beta * h)
    if loss == "robust":
        return (-(1 - label_smoothing) * logsig(beta * h) + label_smoothing * logsig(-beta * h)) / (1 - 2 * label_smoothing)
    if loss == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


def np_gaussian_accuracy(pr, u):
    from scipy.stats import norm

    pi, m, s, _ = np_components(pr)
    return float(np.sum(pi * norm.cdf((m @ u) / np.sqrt(np.einsum("i,cij,j->c", u, s, u)))))


# --------------------------------------------------------------- loss facts
@pytest.mark.parametrize("loss", dd.LOSSES)
def test_initial_slope_lipschitz_and_curvature_match_numerical_derivatives(loss):
    beta, label_smoothing = 0.7, (0.2 if loss in ("cdpo", "robust") else 0.0)
    h = 1e-5
    fd = -(np_loss(loss, h, beta, label_smoothing) - np_loss(loss, -h, beta, label_smoothing)) / (2 * h)
    closed = {"sigmoid": beta / 2, "cdpo": beta * (1 - 2 * label_smoothing) / 2, "robust": beta / (2 * (1 - 2 * label_smoothing)),
              "hinge": beta, "ipo": 1 / beta}[loss]
    assert float(th.initial_loss_slope(loss, beta, label_smoothing)) == pytest.approx(closed, rel=1e-6)
    assert fd == pytest.approx(closed, rel=1e-6)

    grid = np.linspace(-60 / beta, 60 / beta, 400_001)
    vals = np_loss(loss, grid, beta, label_smoothing)
    deriv = np.diff(vals) / np.diff(grid)
    lip = float(th.loss_lipschitz(loss, beta, label_smoothing))
    if loss == "ipo":
        assert np.isinf(lip)
    else:
        assert np.max(np.abs(deriv)) <= lip * (1 + 1e-6)
        assert np.max(np.abs(deriv)) >= lip * (1 - 1e-3)  # attained in the limit: the bound is tight
    curv = float(th.loss_curvature_bound(loss, beta, label_smoothing))
    second = np.diff(deriv) / np.diff(grid)[1:]
    if loss == "hinge":
        assert np.isinf(curv)
    else:
        assert np.max(second) <= curv * (1 + 1e-3)
        assert np.max(second) >= curv * (1 - 1e-3)


def test_loss_arguments_are_validated():
    with pytest.raises(ValueError, match="loss"):
        th.initial_loss_slope("dpo", 1.0)
    with pytest.raises(ValueError, match="beta"):
        th.loss_lipschitz("sigmoid", 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        th.loss_lipschitz("robust", 1.0, 0.5)
    with pytest.raises(ValueError, match="no effect"):
        th.initial_loss_slope("sigmoid", 1.0, 0.1)
    dist = dd.GaussianPreference.single(1.0, d=2)
    with pytest.raises(ValueError, match="lr"):
        th.c1_first_step(dist, beta=1.0, lr=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        th.c1_bands(dist, n=10, alpha=1.5)
    with pytest.raises(ValueError, match="n must be"):
        th.c1_bands(dist, n=0, alpha=0.1)
    with pytest.raises(ValueError, match="kappa"):
        th.c5_scale_separation(dist, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        th.c3_isotropic_bound(1.0, 0.0)


# ----------------------------------------------------------------------- C1
@pytest.mark.parametrize("loss", dd.LOSSES)
def test_c1_first_population_step_is_exact(x64, rng, loss):
    """δ_1 = 2η(−ℓ'(0)) m̄ with m̄ from the raw parameters; population GD agrees to 1e-10."""
    cases = [make_dist(rng, 3, 4, kind=kind) for kind in ("iso", "diag", "full")]
    dists = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[c[0] for c in cases])
    betas, lrs = rng.uniform(0.2, 2.0, 3), rng.uniform(0.01, 0.2, 3)
    label_smoothing = 0.15 if loss in ("cdpo", "robust") else 0.0
    trajs = jax.vmap(lambda dist, b, l: dd.population_trajectory(dist, beta=b, lr=l, steps=1, loss=loss, label_smoothing=label_smoothing))(
        dists, jnp.asarray(betas), jnp.asarray(lrs))
    for i, ((dist, pr), beta, lr) in enumerate(zip(cases, betas, lrs)):
        traj = jax.tree_util.tree_map(lambda a: a[i], trajs)
        mbar, cov = np_mean_cov(pr)
        slope = float(th.initial_loss_slope(loss, beta, label_smoothing))
        fs = th.c1_first_step(dist, beta=beta, lr=lr, loss=loss, label_smoothing=label_smoothing)
        np.testing.assert_allclose(np.asarray(fs.delta), 2 * lr * slope * mbar, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(traj.delta[1]), np.asarray(fs.delta), rtol=1e-10, atol=1e-13)
        assert float(traj.metrics["weight_change"][1]) == pytest.approx(SQRT2 * lr * slope * np.linalg.norm(mbar),
                                                                         rel=1e-10)
        # loss sandwich: first order ≤ L(δ_1) ≤ upper; ipo is exactly quadratic
        l1 = float(traj.metrics["loss"][1])
        first = np_loss(loss, 0.0, beta, label_smoothing) - 2 * lr * slope**2 * mbar @ mbar
        assert float(fs.loss_first_order) == pytest.approx(first, rel=1e-12)
        assert l1 >= first - 1e-12
        assert l1 <= float(fs.loss_upper) + 1e-12
        if loss == "ipo":
            quad = fs.delta @ (cov + np.outer(mbar, mbar)) @ fs.delta
            assert l1 == pytest.approx(first + float(quad), rel=1e-10)


def test_c1_single_behaviour_is_independent_of_covariance(x64):
    for sigma in (0.1, 1.0, 7.0):
        dist = dd.GaussianPreference.single(2.5, d=4, sigma=sigma)
        fs = th.c1_first_step(dist, beta=0.3, lr=0.05)
        assert float(fs.weight_change) == pytest.approx(0.05 * 0.3 * 2.5 / (2 * SQRT2), rel=1e-12)


def test_c1_first_empirical_step_is_eta_beta_zbar(rng):
    dist, _ = make_dist(rng, 2, 6)
    x, s, beh = dist.sample(jax.random.key(3), 512)
    held = dist.sample(jax.random.key(4), 8)
    beta, lr = 0.8, 0.3
    tr = dd.trajectory_on_data((x, s, beh), held, jax.random.key(5), num_behaviors=2, beta=beta, lr=lr, steps=1)
    zbar = np.mean(np.asarray(s, np.float64)[:, None] * np.asarray(x, np.float64), axis=0)
    np.testing.assert_allclose(np.asarray(tr.delta[1]), lr * beta * zbar, rtol=2e-5, atol=1e-6)


def test_c1_bands_closed_form(rng):
    dist, pr = make_dist(rng, 3, 5)
    _, cov = np_mean_cov(pr)
    n, alpha = 300, 0.07
    b = th.c1_bands(dist, n=n, alpha=alpha)
    tr, op = np.trace(cov), np.linalg.eigvalsh(cov)[-1]
    assert float(b.trace) == pytest.approx(tr, rel=1e-5)
    assert float(b.op_norm) == pytest.approx(op, rel=1e-5)
    assert float(b.chebyshev) == pytest.approx(np.sqrt(tr / (n * alpha)), rel=1e-5)
    assert float(b.gaussian) == pytest.approx(np.sqrt(tr / n) + np.sqrt(2 * op * np.log(1 / alpha) / n), rel=1e-5)
    # the mixture covariance agrees with a Monte Carlo estimate
    x, s, _ = dist.sample(jax.random.key(0), 200_000)
    z = np.asarray(s)[:, None] * np.asarray(x, np.float64)
    np.testing.assert_allclose(np.cov(z.T), cov, atol=0.05)


def test_c1_bands_cover_monte_carlo(rng):
    """Miss rates of both bands ≤ α (Gaussian z), by direct NumPy simulation of z̄_N."""
    dist, _ = make_dist(rng, 1, 4, symmetric=True)  # μ⁻ = −μ⁺, Σ⁻ = Σ⁺: z ~ N(μ⁺, Σ⁺)
    assert bool(th.z_is_gaussian(dist))
    n, alpha, reps = 64, 0.1, 20_000
    b = th.c1_bands(dist, n=n, alpha=alpha)
    m = np.asarray(dist.mean, np.float64)
    c = np.asarray(dist.z_covariance(), np.float64)
    zbar = rng.multivariate_normal(m, c / n, size=reps)  # z̄_N of Gaussian z is exactly N(m̄, C/N)
    dev = np.linalg.norm(zbar - m, axis=1)
    se = np.sqrt(alpha * (1 - alpha) / reps)
    assert np.mean(dev > float(b.chebyshev)) <= alpha + 3 * se
    assert np.mean(dev > float(b.gaussian)) <= alpha + 3 * se
    # and the Gaussian band is not vacuous: its radius is within 2x of the true (1−α) quantile
    assert float(b.gaussian) <= 2.0 * np.quantile(dev, 1 - alpha)


def test_z_is_gaussian(rng):
    dist, _ = make_dist(rng, 1, 3, symmetric=True)
    assert bool(th.z_is_gaussian(dist))
    mix, _ = make_dist(rng, 2, 3)
    assert not bool(th.z_is_gaussian(mix))
    one_sided = dist.replace(mu_neg=dist.mu_neg + 1.0, p_pos=jnp.ones(1))  # only the s = +1 component
    assert bool(th.z_is_gaussian(one_sided))


# ----------------------------------------------------------------------- C2
def test_c2_bound_tight_when_margins_are_very_negative(x64):
    """All pairs identical with margin ≪ 0: |ℓ'| ≈ β at every step, so the bound is attained."""
    d, n, beta, lr, steps = 3, 16, 0.5, 0.01, 10
    x0 = np.array([0.6, -0.8, 1.2])
    x = jnp.asarray(np.tile(x0, (n, 1)))
    s = jnp.ones(n)
    beh = jnp.zeros(n, jnp.int32)
    w_init = np.zeros((2, d))
    w_init[0] = -40.0 * x0  # δ_0 = −40 x0: margin −40‖x0‖² ≈ −98, σ(βh) ≈ e^{-49}
    head = dd.Head.create(np.zeros((2, d)), w_init)
    tr = dd.trajectory_on_data((x, s, beh), (x[:2], s[:2], beh[:2]), jax.random.key(0), num_behaviors=1,
                               beta=beta, lr=lr, steps=steps, head=head)
    cum = np.asarray(tr.cum_batch_mean_norm)
    np.testing.assert_allclose(cum, np.arange(steps + 1) * np.linalg.norm(x0), rtol=1e-12)
    bound = np.asarray(th.c2_weight_change_bound(cum, beta=beta, lr=lr))
    np.testing.assert_allclose(bound, SQRT2 * lr * beta * np.arange(steps + 1) * np.linalg.norm(x0), rtol=1e-12)
    wc = np.asarray(tr.train["weight_change"])
    assert np.all(wc <= bound * (1 + 1e-12))
    np.testing.assert_allclose(wc[1:] / bound[1:], 1.0, rtol=1e-9)  # |ℓ'| = β(1 − e^{-49}): attained


def test_c2_bound_never_violated_on_random_runs(rng):
    """Minibatch SGD, DPO; the other losses are checked by `dpo-sims validate`."""
    dist, _ = make_dist(rng, 2, 4)
    loss, label_smoothing = "sigmoid", 0.0

    def run(key, beta, lr):
        tr = dd.empirical_trajectory(dist, key, n=64, beta=beta, lr=lr, steps=15, loss=loss, label_smoothing=label_smoothing,
                                     batch_size=16, n_eval=4)
        return tr.train["weight_change"], tr.cum_batch_mean_norm

    keys = jax.random.split(jax.random.key(1), 8)
    betas = jnp.asarray(rng.uniform(0.3, 3.0, 8))
    lrs = jnp.asarray(rng.uniform(0.05, 1.0, 8))
    wc, cum = jax.vmap(run)(keys, betas, lrs)
    bound = th.c2_weight_change_bound(cum, beta=betas[:, None], lr=lrs[:, None], loss=loss, label_smoothing=label_smoothing)
    assert np.all(np.asarray(wc) <= np.asarray(bound) * (1 + 1e-5) + 1e-7)
    assert np.max(np.asarray(wc)[:, 1:] / np.asarray(bound)[:, 1:]) > 0.05  # a bound, not a vacuous number


# ----------------------------------------------------------------------- C3
def test_c3_bound_formula_and_below_exact(rng):
    from scipy.stats import norm

    for k, d, kind in ((1, 2, "iso"), (2, 5, "full"), (4, 3, "diag")):
        dist, pr = make_dist(rng, k, d, kind=kind)
        pi, m, s, _ = np_components(pr)
        for u in (np.asarray(dist.mean, np.float64), rng.normal(size=d)):
            t = (m @ u) / np.sqrt(np.einsum("i,cij,j->c", u, s, u))
            expected = 1 - np.sum(pi * np.where(t > 0, np.exp(-t**2 / 2), 1.0))
            bound, per, holds = th.c3_accuracy_bound(dist, jnp.asarray(u))
            assert float(bound) == pytest.approx(expected, abs=1e-5)
            assert bool(holds) == bool(np.all(t > 0))
            exact = float(np.sum(pi * norm.cdf(t)))
            assert float(bound) <= exact + 1e-6
            assert float(dd.gaussian_accuracy(dist, jnp.asarray(u))[0]) == pytest.approx(exact, abs=1e-5)
            assert np.all(np.asarray(per) <= np.asarray(dd.gaussian_accuracy(dist, jnp.asarray(u))[1]) + 1e-6)


def test_c3_bound_below_monte_carlo_accuracy(rng):
    dist, _ = make_dist(rng, 2, 4)
    u = dist.mean
    x, s, _ = dist.sample(jax.random.key(11), 200_000)
    mc = float(np.mean(np.asarray(s) * np.asarray(x @ u) > 0))
    bound = float(th.c3_accuracy_bound(dist, u)[0])
    assert bound <= mc + 3 * np.sqrt(mc * (1 - mc) / 200_000)
    assert float(dd.gaussian_accuracy(dist, u)[0]) == pytest.approx(mc, abs=4 * np.sqrt(0.25 / 200_000))


def test_c3_isotropic_closed_form():
    for delta, sigma in ((0.5, 1.0), (3.0, 0.7), (6.0, 2.0)):
        dist = dd.GaussianPreference.single(delta, d=3, sigma=sigma)
        expected = 1 - np.exp(-delta**2 / (8 * sigma**2))
        assert float(th.c3_isotropic_bound(delta, sigma)) == pytest.approx(expected, rel=1e-6)
        assert float(th.c3_first_step_bound(dist)[0]) == pytest.approx(expected, rel=1e-5)
        # the wrong sign of u violates the hypothesis and gives the trivial bound 0
        bound, _, holds = th.c3_accuracy_bound(dist, -dist.mean)
        assert not bool(holds) and float(bound) == 0.0


# ----------------------------------------------------------------------- C4
@pytest.mark.parametrize("loss", ["sigmoid", "cdpo", "ipo"])
def test_c4_rates_match_gradient_flow_finite_difference(x64, rng, loss):
    """dL_k/dτ at τ = 0 from the population gradient flow (second-order one-sided difference)."""
    dist, pr = make_dist(rng, 3, 4)
    beta, label_smoothing, tau = 0.9, (0.1 if loss == "cdpo" else 0.0), 1e-4
    tr = dd.population_trajectory(dist, beta=beta, lr=tau, steps=2, loss=loss, label_smoothing=label_smoothing, method="flow")
    bl = np.asarray(tr.metrics["behavior_loss"])
    fd = (4 * bl[1] - bl[2] - 3 * bl[0]) / (2 * tau)
    rates = np.asarray(th.c4_initial_loss_rates(dist, beta=beta, loss=loss, label_smoothing=label_smoothing))
    np.testing.assert_allclose(rates, fd, rtol=1e-5, atol=1e-7)
    # and against the closed form from the raw parameters
    pi, m, _, beh = np_components(pr)
    mbar = pi @ m
    mk = np.stack([(pi[beh == j] @ m[beh == j]) / pr["w"][j] for j in range(3)])
    slope = float(th.initial_loss_slope(loss, beta, label_smoothing))
    np.testing.assert_allclose(rates, -2 * slope**2 * mk @ mbar, rtol=1e-10)


def test_c4_first_step_sandwich(x64, rng):
    dist, _ = make_dist(rng, 3, 4)
    beta, lr = 1.2, 0.05
    tr = dd.population_trajectory(dist, beta=beta, lr=lr, steps=1)
    change = np.asarray(tr.metrics["behavior_loss"][1] - tr.metrics["behavior_loss"][0])
    lo, hi = map(np.asarray, th.c4_first_step_loss_change(dist, beta=beta, lr=lr))
    assert np.all(change >= lo - 1e-12) and np.all(change <= hi + 1e-12)
    assert np.all(hi - lo < 0.1 * np.abs(lo))  # first order dominates at this step size


def test_c4_gap_sign_is_rate_order(rng):
    for _ in range(50):
        b = rng.normal(size=(2, 6)) * rng.uniform(0.2, 3.0, size=(2, 1))
        dist = dd.GaussianPreference.create(b / 2, -b / 2, rng.uniform(0.3, 2.0) ** 2)
        gap = float(dist.priority_gap[0, 1])
        rates = np.asarray(th.c4_initial_loss_rates(dist, beta=1.0))
        assert np.sign(gap) == np.sign(rates[1] - rates[0])
        # rate_1 − rate_2 = −(β²/8) ‖b̄‖ max‖b_k‖ gap_12
        bbar = b.mean(0)
        scale = np.linalg.norm(bbar) * np.linalg.norm(b, axis=1).max()
        assert rates[0] - rates[1] == pytest.approx(-scale * gap / 8, rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------- C5
def test_c5_scale_and_flip(rng):
    dist, pr = make_dist(rng, 3, 4)
    scaled = th.c5_scale_separation(dist, 2.5)
    np.testing.assert_allclose(np.asarray(scaled.distinguishability), 2.5 * np.asarray(dist.distinguishability),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(scaled.mu_pos + scaled.mu_neg), pr["mu_pos"] + pr["mu_neg"], atol=1e-5)
    flipped = th.c5_flip_labels(dist)
    flipped.validate()
    np.testing.assert_allclose(np.asarray(flipped.mean), -np.asarray(dist.mean), atol=1e-6)
    for _ in range(3):
        u = jnp.asarray(rng.normal(size=4))
        a, per = dd.gaussian_accuracy(dist, u)
        fa, fper = dd.gaussian_accuracy(flipped, u)
        assert float(fa) == pytest.approx(1 - float(a), abs=1e-6)
        np.testing.assert_allclose(np.asarray(fper), 1 - np.asarray(per), atol=1e-6)
    back = th.c5_flip_labels(flipped)
    np.testing.assert_allclose(np.asarray(back.p_pos), pr["p"], atol=1e-7)


def test_first_step_below():
    curve = jnp.array([0.9, 0.7, 0.55, 0.49, 0.3])
    assert int(th.first_step_below(curve, 0.5)) == 3
    assert int(th.first_step_below(curve, 0.5, step=jnp.arange(5) * 10)) == 30
    assert np.isnan(float(th.first_step_below(curve, 0.1)))  # "never" is NaN (one convention, first_step_where)
    # batched over leading axes; a hit at record 0 is step 0, not "never"
    got = np.asarray(th.first_step_below(jnp.array([[0.4, 0.6], [0.6, 0.6], [0.6, 0.4]]), 0.5, step=[5, 9]))
    np.testing.assert_array_equal(got[[0, 2]], [5.0, 9.0])
    assert np.isnan(got[1])


A_STEPS = 12  # alignment steps of the C5 tests (both share their compiled programs)


def test_c5_time_reversal_identity(x64, rng):
    """Misaligning with the alignment's own β, η retraces it: δ'_t = −δ_t, policy back to 0 at t = A."""
    dist, _ = make_dist(rng, 2, 3, balanced=True)
    beta, lr = 1.0, 0.3
    for kappa in (1.0, 2.0):
        mis = th.c5_misalignment(dist, kappa, beta=beta, lr=lr, steps=2 * A_STEPS, align_steps=A_STEPS)
        scaled = th.c5_scale_separation(dist, kappa)
        align = dd.population_trajectory(scaled, beta=beta, lr=lr, steps=2 * A_STEPS)
        flip = dd.population_trajectory(th.c5_flip_labels(scaled), beta=beta, lr=lr, steps=2 * A_STEPS,
                                        head=mis.head)
        np.testing.assert_allclose(np.asarray(flip.delta), -np.asarray(align.delta), atol=1e-10)
        u = np.asarray(mis.head.u_ref) + np.asarray(flip.delta)
        assert np.linalg.norm(u[A_STEPS]) < 1e-10
        np.testing.assert_allclose(np.asarray(mis.head.u_ref), np.asarray(align.delta[A_STEPS]), atol=1e-12)
        assert np.all(np.asarray(mis.original_accuracy[:A_STEPS]) > 0.5)
        assert int(mis.steps_until_flip) in (A_STEPS, A_STEPS + 1)
        assert float(mis.aligned_accuracy) == pytest.approx(float(mis.original_accuracy[0]), abs=1e-12)


def test_c5_misalignment_loss_falls_faster_with_kappa(x64):
    dist = dd.GaussianPreference.from_angles([1.0, 1.5], np.pi / 3, d=3, sigma=1.0)
    kappas = (1.0, 1.5, 2.0, 3.0)
    mis = [th.c5_misalignment(dist, k, beta=0.2, lr=1.0, steps=2 * A_STEPS, align_steps=A_STEPS, align_lr=0.5,
                              align_beta=1.0) for k in kappas]
    loss10 = np.array([float(m.loss[10]) for m in mis])
    assert np.all(np.diff(loss10) < 0)
    assert np.allclose([float(m.loss[0]) for m in mis], np.log(2.0), atol=1e-12)
    # first step: the C1 drop η β² κ² ‖m̄‖²/2 (flipped m̄ = −κ m̄), up to the second-order remainder
    drop1 = np.log(2.0) - np.array([float(m.loss[1]) for m in mis])
    pred = 1.0 * 0.2**2 * np.asarray(kappas) ** 2 * float(jnp.sum(dist.mean**2)) / 2
    assert np.all(drop1 <= pred * (1 + 1e-9)) and np.all(drop1 >= 0.9 * pred)
    # the aligned head is more accurate on more separable data
    assert np.all(np.diff([float(m.aligned_accuracy) for m in mis]) > 0)


# --------------------------------------------------------- the CLI (quick plan)
@pytest.mark.slow
def test_validate_quick_cli_passes_and_writes_report(tmp_path):
    from sims.cli import main

    out = tmp_path / "val"
    assert main(["validate", "--quick", "--out", str(out), "--seed", "0"]) == 0
    text = (out / "validation.md").read_text()
    assert "| C0 |" in text and "| C5 |" in text and "FAIL" not in text
    import json

    rows = json.loads((out / "validation.json").read_text())
    assert {r["claim"] for r in rows} == {"C0", "C1", "C2", "C3", "C4", "C5", "OBJ"}
    c4 = {r["setting"] for r in rows if r["claim"] == "C4" and r["kind"] in ("evidence", "identity")}
    assert c4 == {"symmetric", "midpoints", "per_behavior_sigma", "anisotropic"}
    assert all(r["passed"] for r in rows if r["gated"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6 and all((out / p).stat().st_size > 5000 for p in pngs)


def test_validate_cli_bad_input(tmp_path, capsys):
    from sims.cli import main

    assert main(["validate", "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["validate", "--out", str(f)]) == 2
    with pytest.raises(SystemExit) as e:
        main(["validate", "--quick", "--full"])
    assert e.value.code == 2


# ------------------------------------------------- the comparison layer's gates
def test_validation_gates_fail_on_wrong_results():
    """check_c0 / check_c2 pass on correct synthetic runs and fail on broken ones."""
    from sims import validate as v

    plan = v.PLANS["quick"]
    rng = np.random.default_rng(0)

    def records(power):
        pop = {"loss": np.full((64, plan.steps + 1), 0.5), "reward_accuracy": np.full((64, plan.steps + 1), 0.8)}
        emp = {}
        for n in plan.n_grid:
            noise = rng.normal(size=(64, plan.seeds)) * n ** (-power)
            emp[n] = {"train_loss": 0.5 + noise, "train_acc": 0.8 + noise}
        return [{"pop": pop, "emp": emp}]

    ok, _ = v.check_c0(records(0.5), plan)
    bad, _ = v.check_c0(records(1.0), plan)
    assert all(r.passed for r in ok) and not any(r.passed for r in bad)

    group = v.Group(1, 2, "sigmoid")
    cum = np.tile(np.arange(plan.steps + 1.0), (4, plan.seeds, 1))
    beta, lr = np.full(4, 1.0), np.full(4, 0.1)
    bound = np.sqrt(2) * 0.1 * cum
    for scale, expect in ((0.9, True), (1.01, False)):
        emp = {n: {"cum": cum, "weight_change": scale * bound} for n in plan.n_grid}
        rec = [{"group": group, "beta": beta, "lr": lr, "label_smoothing": np.zeros(4), "emp": emp}]
        (row,), _ = v.check_c2(rec, plan)
        assert row.passed is expect


def test_loglog_slope_and_coverage_helpers():
    from scipy import stats

    from sims import validate as v

    n = np.array([256, 1024, 4096, 16384])
    slope, se = v.loglog_slope(n, 3.0 * n ** -0.5)
    assert slope == pytest.approx(-0.5, abs=1e-12) and se == pytest.approx(0.0, abs=1e-10)
    cov, pval, lower = v._coverage_test(130, 2000, 0.05)
    assert cov == pytest.approx(0.935)
    assert pval == pytest.approx(stats.binom.sf(129, 2000, 0.05), rel=1e-9)
    assert pval < 0.01 and lower < 0.935
    lo, hi = v._binom_interval(np.array([0.3, 0.9]), 1000)
    inside = [stats.binom.cdf(h * 1000, 1000, p) - stats.binom.cdf(l * 1000 - 1, 1000, p)
              for l, h, p in zip(lo, hi, (0.3, 0.9))]
    assert min(inside) >= 0.95


def test_random_configurations_are_valid_and_varied():
    from sims import validate as v

    # shapes of the quick plan (8 configurations of K = 2, d = 24, robust): the compiled generator is shared
    dists, beta, lr, label_smoothing = v.random_configs(jax.random.key(3), 8, 2, 24, "robust")
    dists.validate()
    assert np.all(np.asarray(label_smoothing) <= 0.3) and np.any(np.asarray(label_smoothing) > 0)
    assert np.all((np.asarray(beta) >= 0.1) & (np.asarray(beta) <= 3.0))
    off = np.abs(np.asarray(dists.cov_pos) * (1 - np.eye(24))).max(axis=(-1, -2, -3))
    diag_var = np.asarray(jnp.diagonal(dists.cov_pos, axis1=-2, axis2=-1)).std(axis=-1).max(axis=-1)
    assert np.any(off > 1e-3) and np.any((off == 0) & (diag_var > 1e-3)) and np.any((off == 0) & (diag_var < 1e-6))
    gz, *_ = v.random_configs(jax.random.key(1), 8, 2, 8, gaussian_z=True)
    assert bool(jnp.all(jax.vmap(th.z_is_gaussian)(gz)))
    # the drawn step size is u / (curvature bound · λ_max(E[zzᵀ])) with u ≤ 0.8 (a stable GD step)
    second = jax.vmap(lambda d: d.z_covariance() + jnp.outer(d.mean, d.mean))(dists)
    lam = np.linalg.eigvalsh(np.asarray(second, np.float64))[:, -1]
    u = np.asarray(lr) * np.asarray(beta) ** 2 / 4 * lam
    assert np.all((u >= 0.1 * (1 - 1e-4)) & (u <= 0.8 * (1 + 1e-4)))
