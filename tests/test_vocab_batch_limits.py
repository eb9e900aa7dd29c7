"""Population limits of the batch-level objectives (dynamics/vocab_population.py, docs/theory.md §8.5).

References are independent of the code under test: NumPy float64 Monte Carlo of TRL's batch computation
(sorting a batch of 10⁶ pairs, the batch mean of the margin, KTO's mismatched-completion KL estimate), central
finite differences of the population value with the batch statistic held at its value (the sources detach it),
and the empirical layer at N = 2·10⁵. Each test also plants the tempting wrong limit (independent pairing for
``aot``, a fixed β for ``beta_dpo``, z_ref = 0 for ``kto``) and checks that the reference rejects it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit, log_expit, logsumexp

import dynamics
from dynamics import vocab_population as vp

PAIRS = ((0, 1), (2, 1))
BETA = 0.7
N_MC = 10**6


def _setup(seed=0, pairs=PAIRS, shift=0.4):
    rng = np.random.default_rng(seed)
    k, d, v = 2, 3, 3
    a = rng.normal(size=(k, d, d)) * 0.3
    cov = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(d)
    dist = dynamics.GaussianPreference.create(rng.normal(size=(k, d)), rng.normal(size=(k, d)), cov,
                                              p_pos=[0.6, 0.3], weight=[0.6, 0.4])
    w_ref = rng.normal(size=(v, d)) * 0.4
    w = w_ref + rng.normal(size=(v, d)) * shift
    return dist, dynamics.Head.create(w_ref, pairs=pairs), w, w_ref


def _sample_logps(dist, w, w_ref, pairs, n=N_MC, seed=1):
    """NumPy float64: per pair (c, r, c_ref, r_ref) and the full log-softmaxes, for n pairs."""
    x, s, beh = (np.asarray(t, np.float64) for t in dist.sample(jax.random.key(seed), n))
    ab = np.asarray(pairs)[beh.astype(int)]
    ch, rj = np.where(s > 0, ab[:, 0], ab[:, 1]), np.where(s > 0, ab[:, 1], ab[:, 0])
    idx = np.arange(n)
    lp = x @ w.T - logsumexp(x @ w.T, axis=1, keepdims=True)
    lpr = x @ w_ref.T - logsumexp(x @ w_ref.T, axis=1, keepdims=True)
    return (lp[idx, ch], lp[idx, rj], lpr[idx, ch], lpr[idx, rj]), (lp, lpr, ab)


def _value(dist, w, head, name, **hp):
    return float(vp.vocab_population_objective(dist, w, head=head, loss_type=name, beta=BETA, **hp)[0])


def _fd_check(dist, w, head, name, frozen, hp=None, atol=1e-9):
    """Directional central difference of the value with the detached statistic frozen vs the Stein gradient."""
    grad = np.asarray(vp.vocab_population_gradient(dist, w, head=head, loss_type=name, beta=BETA, **(hp or {})))
    direction = np.random.default_rng(11).normal(size=w.shape)
    h = 1e-5
    fd = (_value(dist, w + h * direction, head, name, **frozen)
          - _value(dist, w - h * direction, head, name, **frozen)) / (2 * h)
    np.testing.assert_allclose(np.sum(grad * direction), fd, rtol=1e-6, atol=atol)
    return grad


# ------------------------------------------------------------------------------------------------- aot
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_aot_quantile_coupling_matches_sorted_monte_carlo(x64, label_smoothing):
    """Sorted-batch pairing of 10⁶ NumPy pairs ≈ the population quantile coupling; independent pairing is far.

    Tolerance: 5 standard errors of the per-pair loss (sd/√N ≈ 7e-4 at N = 4·10⁵) plus 1e-4 for the O(log N / N)
    bias of the sorted estimator; the planted independent coupling is ≈ 0.07 away (> 10 tolerances).
    """
    dist, head, w, w_ref = _setup()
    (c, r, cr, rr), _ = _sample_logps(dist, w, w_ref, PAIRS, n=400_000)
    eps = label_smoothing
    loss = lambda dl: -(1 - eps) * log_expit(BETA * dl) - eps * log_expit(-BETA * dl)
    sorted_pairs = loss(np.sort(c - r) - np.sort(cr - rr))
    indep = loss((c - r) - (cr - rr)[np.random.default_rng(3).permutation(c.size)])
    tol = 5 * sorted_pairs.std() / np.sqrt(c.size) + 1e-4
    pop = _value(dist, w, head, "aot", label_smoothing=eps)
    assert abs(pop - sorted_pairs.mean()) <= tol
    assert abs(indep.mean() - sorted_pairs.mean()) > 10 * tol  # the planted wrong limit fails this test


def test_mixture_transport_against_brentq(x64):
    """T = Q_B ∘ F_A of two Gaussian mixtures, tails included, against scipy's brentq on the plain CDFs."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    wts, mu_a, sd_a = np.array([0.36, 0.24, 0.12, 0.28]), np.array([0.6, -2.8, 0.3, 1.9]), np.array([1.1, 1.1, .4, .4])
    mu_b, sd_b = np.array([0.3, -0.6, -0.2, -1.0]), np.array([0.18, 0.18, 0.5, 0.5])
    a = np.array([-9.0, -3.0, -1.0, 0.0, 0.5, 2.0, 4.0, 6.0])
    got = np.asarray(vp._mixture_transport(jnp.asarray(a), (wts, mu_a, sd_a), (wts, mu_b, sd_b)))
    for ai, ti in zip(a, got):
        lower = norm.cdf((ai - mu_a) / sd_a) @ wts <= 0.5
        if lower:  # match the lower tail, as the code does (1 − F loses the far left in float64 otherwise)
            q = norm.logcdf((ai - mu_a) / sd_a)
            f = lambda t: np.logaddexp.reduce(np.log(wts) + norm.logcdf((t - mu_b) / sd_b)) - np.logaddexp.reduce(
                np.log(wts) + q)
        else:
            q = norm.logsf((ai - mu_a) / sd_a)
            f = lambda t: np.logaddexp.reduce(np.log(wts) + q) - np.logaddexp.reduce(
                np.log(wts) + norm.logsf((t - mu_b) / sd_b))
        assert abs(ti - brentq(f, -60, 60, xtol=1e-14)) <= 1e-10


def test_aot_gradient_is_the_derivative_of_the_coupling(x64):
    """TRL differentiates through the sort (ranks fixed); its limit is the derivative of ∫ℓ(β(Q_A − Q_B)) du."""
    dist, head, w, _ = _setup(2)
    _fd_check(dist, w, head, "aot", {})


def test_aot_at_the_reference_is_log_two(x64):
    """W = W_ref: A = B pathwise, T is the identity, so the loss is log 2 and the gradient −(β/2) E[(e_w − e_l)xᵀ]."""
    dist, head, _, w_ref = _setup(4)
    assert abs(_value(dist, w_ref, head, "aot") - np.log(2.0)) <= 1e-9
    comps = dist.components()
    mean_x = np.asarray(comps.sign)[:, None] * np.asarray(comps.mean)
    grad = np.zeros_like(w_ref)
    for c in range(len(comps.weight)):
        a, b = PAIRS[int(comps.behavior[c])]
        ch, rj = (a, b) if comps.sign[c] > 0 else (b, a)
        grad[ch] += -BETA / 2 * comps.weight[c] * mean_x[c]
        grad[rj] -= -BETA / 2 * comps.weight[c] * mean_x[c]
    np.testing.assert_allclose(vp.vocab_population_gradient(dist, w_ref, head=head, loss_type="aot", beta=BETA),
                               grad, rtol=0, atol=1e-9)


# -------------------------------------------------------------------------------------------- beta_dpo
def test_beta_dpo_batch_beta_matches_monte_carlo(x64):
    """β_b = max(β(1 + a(h̄ − M₀)), 10⁻³) with h̄ the batch mean: population E h is exact; a fixed β is far."""
    dist, head, w, w_ref = _setup(5, shift=0.8)
    (c, r, cr, rr), _ = _sample_logps(dist, w, w_ref, PAIRS, n=400_000)
    h = (c - cr) - (r - rr)
    beta_b = max(BETA * (1 + 0.6 * h.mean()), 1e-3)
    per = -log_expit(beta_b * h)
    # 5 standard errors by the delta method: the influence of pair i includes its share of h̄ through β_b
    dloss_dbeta = np.mean(-h * expit(-beta_b * h))
    tol = 5 * np.std(per + dloss_dbeta * 0.6 * BETA * (h - h.mean())) / np.sqrt(h.size)
    assert abs(_value(dist, w, head, "beta_dpo") - per.mean()) <= tol
    assert abs(np.mean(-log_expit(BETA * h)) - per.mean()) > 10 * tol  # planted: no adaptation
    assert abs(_value(dist, w, head, "beta_dpo", beta_dpo_margin=h.mean()) - per.mean()) <= tol


def test_beta_dpo_gradient_detaches_the_batch_beta(x64):
    dist, head, w, w_ref = _setup(6, shift=0.8)
    comps = dist.components()
    dw = w - w_ref
    mean_h = sum(float(comps.weight[c]) * float((dw[PAIRS[int(comps.behavior[c])][0]]
                                                  - dw[PAIRS[int(comps.behavior[c])][1]]) @ np.asarray(comps.mean[c]))
                 for c in range(len(comps.weight)))
    _fd_check(dist, w, head, "beta_dpo", {"beta_dpo_margin": mean_h})


# ------------------------------------------------------------------------------------------------- kto
def _kto_setup():
    """Prompts share a direction (x₁ ≈ 2), pairs on tokens (0, 1) only, and the policy lowers token 2's logit
    along it: the mismatched KL estimate is > 0 (z_ref ≈ 0.4)."""
    rng = np.random.default_rng(7)
    k, d, v = 2, 3, 3
    base = np.array([2.0, 0.0, 0.0])
    a = rng.normal(size=(k, d, d)) * 0.3
    cov = a @ a.transpose(0, 2, 1) + 0.2 * np.eye(d)
    dist = dynamics.GaussianPreference.create(base + 0.5 * rng.normal(size=(k, d)),
                                              base + 0.5 * rng.normal(size=(k, d)), cov, p_pos=[0.6, 0.3],
                                              weight=[0.6, 0.4])
    w_ref = rng.normal(size=(v, d)) * 0.3
    w = w_ref + rng.normal(size=(v, d)) * 0.3
    w[2] -= np.array([0.6, 0.0, 0.0])
    return dist, dynamics.Head.create(w_ref, pairs=((0, 1), (0, 1))), w, w_ref


#: unequal weights, so the loss is sensitive to z_ref (with equal ones the two halves' dependence nearly cancels)
KTO_HP = {"desirable_weight": 1.0, "undesirable_weight": 0.2}


def _np_kto(c, r, cr, rr, z):
    return 0.5 * ((1 - expit(BETA * ((c - cr) - z))) + 0.2 * (1 - expit(BETA * (z - (r - rr)))))


@pytest.mark.slow  # ~40 s on the loaded 2-core machine: the r = 4 cubature with Hessians
def test_kto_reference_point_matches_mismatched_completions(x64):
    """z_ref = max(mean(log π(y'|x) − log π_ref(y'|x)), 0), y' another example's completion (TRL's KL batch)."""
    dist, head, w, w_ref = _kto_setup()
    pairs = ((0, 1), (0, 1))
    (c, r, cr, rr), (lp, lpr, ab) = _sample_logps(dist, w, w_ref, pairs)
    rng = np.random.default_rng(9)
    # TRL's unpaired data holds every chosen and every rejected completion; the KL batch shifts them by one
    pool = np.where(rng.random(c.size) < 0.5, ab[:, 0], ab[:, 1])
    y_mis = np.roll(pool, 1)
    kl_terms = lp[np.arange(c.size), y_mis] - lpr[np.arange(c.size), y_mis]
    z = max(kl_terms.mean(), 0.0)
    assert z > 0.05
    per = _np_kto(c, r, cr, rr, z)
    # 5 standard errors by the delta method (the influence of pair i includes its share of z_ref)
    dloss_dz = (np.mean(_np_kto(c, r, cr, rr, z + 1e-6)) - np.mean(_np_kto(c, r, cr, rr, z - 1e-6))) / 2e-6
    tol = 5 * np.std(per + dloss_dz * (kl_terms - z)) / np.sqrt(c.size)
    assert abs(_value(dist, w, head, "kto", **KTO_HP) - per.mean()) <= tol
    assert abs(np.mean(_np_kto(c, r, cr, rr, 0.0)) - per.mean()) > 10 * tol  # planted z_ref = 0
    # the r = 4 tensor rule (12 points per dimension) differs from its own derivative by ~3e-6 here (§7.4)
    _fd_check(dist, w, head, "kto", {"kto_kl": z, **KTO_HP}, KTO_HP, atol=1e-5)


def test_kto_reference_point_is_the_mismatched_kl_over_both_completions(x64):
    """The z_ref the population layer computes, isolated: its loss equals the loss at a given ``kto_kl`` equal to
    the NumPy Monte Carlo KL estimate (y' half chosen, half rejected completions) within the estimate's 5 standard
    errors mapped through dL/dz; both values on the same cubature, so only z_ref differs. A z_ref from the
    rejected (or chosen) completions only is far outside (planted below)."""
    dist, head, w, w_ref = _kto_setup()
    (c, r, cr, rr), (lp, lpr, ab) = _sample_logps(dist, w, w_ref, ((0, 1), (0, 1)), n=2 * 10**5)
    idx = np.arange(c.size)
    kl_by_token = [lp[idx, t] - lpr[idx, t] for t in (0, 1)]  # every pair's behaviour uses tokens (0, 1)
    kl_terms = 0.5 * (kl_by_token[0] + kl_by_token[1])
    z = max(kl_terms.mean(), 0.0)
    se = np.std(kl_terms) / np.sqrt(c.size)
    assert z > 0.05
    auto = _value(dist, w, head, "kto", **KTO_HP)
    at = lambda zz: _value(dist, w, head, "kto", kto_kl=zz, **KTO_HP)
    slope = (at(z + 1e-4) - at(z - 1e-4)) / 2e-4
    assert abs(auto - at(z)) <= 5 * abs(slope) * se + 1e-9
    for t in (0, 1):  # planted: the KL over one side's completions only
        z_one = max(kl_by_token[t].mean(), 0.0)
        assert abs(at(z_one) - at(z)) > 10 * (5 * abs(slope) * se)


def test_batch_level_errors(x64):
    dist, head, w, _ = _setup()
    with pytest.raises(ValueError, match="aot_unpaired.*batch-level"):
        vp.vocab_population_objective(dist, w, head=head, loss_type="aot_unpaired")
    with pytest.raises(ValueError, match="alone"):
        vp.vocab_population_objective(dist, w, head=head, loss_type=["sigmoid", "aot"])
    with pytest.raises(ValueError, match="kl_logps"):
        vp.vocab_population_objective(dist, w, head=head, loss_type="kto", kl_logps=np.zeros(3),
                                      ref_kl_logps=np.zeros(3))


# ------------------------------------------------------------------------------ population ≈ empirical
def _kto_empirical(dist, head, w0, steps, lr, n, key):
    """Full-batch GD on TRL's KTO with the KL batch recomputed each step (not dynamics.vocab: it takes z given)."""
    x, s, beh = dist.sample(key, n)
    ab = jnp.asarray(head.pairs)[beh]
    ch, rj = jnp.where(s > 0, ab[:, 0], ab[:, 1]), jnp.where(s > 0, ab[:, 1], ab[:, 0])
    pool = jnp.roll(jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), (n,)) < 0.5, ab[:, 0], ab[:, 1]), 1)
    lpr = jax.nn.log_softmax(x @ head.w_ref.T, axis=-1)
    take = lambda a, t: jnp.take_along_axis(a, t[:, None], axis=1)[:, 0]

    def loss(w):
        lp = jax.nn.log_softmax(x @ w.T, axis=-1)
        z = jnp.mean(take(lp, pool) - take(lpr, pool))
        return jnp.mean(dynamics.losses.objective_loss("kto", take(lp, ch), take(lp, rj), take(lpr, ch),
                                                       take(lpr, rj), beta=BETA, kto_kl=z, **KTO_HP))

    w, out = jnp.asarray(w0), []
    for t in range(steps + 1):
        val, g = jax.value_and_grad(loss)(w)
        out.append(float(val))
        if t < steps:
            w = w - lr * g
    return np.asarray(out), np.asarray(w)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["aot", "beta_dpo", "kto"])
def test_population_matches_empirical_at_large_n(x64, loss_type):
    """N = 2·10⁵, V = 3, 4 GD steps: |loss_pop − loss_emp| ≤ 5 sd/√N (sd of the per-pair loss ≤ 0.6 → 7e-3)."""
    from dynamics.vocab import vocab_empirical_trajectory

    if loss_type == "kto":
        dist, head, w, _ = _kto_setup()
    else:
        dist, head, w, _ = _setup(12)
    head = dynamics.Head.create(head.w_ref, w, pairs=head.pairs)
    kw = dict(head=head, loss_type=loss_type, beta=BETA, lr=0.5, steps=4)
    pop = vp.vocab_population_trajectory(dist, **kw)
    n = 200_000
    if loss_type == "kto":
        kw.update(KTO_HP)
        pop = vp.vocab_population_trajectory(dist, **kw)
        emp_loss, emp_w = _kto_empirical(dist, head, w, 4, 0.5, n, jax.random.key(0))
    else:
        train, _ = vocab_empirical_trajectory(dist, jax.random.key(0), n=n, n_eval=16, **kw)
        emp_loss, emp_w = np.asarray(train.loss_total), np.asarray(train.w[-1])
    np.testing.assert_allclose(emp_loss, pop.loss_total, rtol=0, atol=5 * 0.6 / np.sqrt(n))
    np.testing.assert_allclose(emp_w, pop.w[-1], rtol=0, atol=2e-2)
