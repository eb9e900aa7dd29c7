"""dynamics.reduced (the per-pair / per-component maths every engine shares) and the minibatch
helpers of dynamics._train, each against an independent float64 NumPy reference or closed form.

These are small, fast tests (no trajectories) and the runner of the mutation test of both modules
(mutants applied in memory, one at a time): every function is pinned by values a wrong formula
would miss.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import expit, log_expit, log_softmax
from scipy.stats import norm

from dynamics import _train, reduced

BETA = 1.3


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def np_loss(loss, h, beta, ls):
    """ℓ(h) of TRL's losses (NumPy)."""
    if loss == "sigmoid":
        return -log_expit(beta * h)
    if loss == "cdpo":
        return -(1 - ls) * log_expit(beta * h) - ls * log_expit(-beta * h)
    raise ValueError(loss)


def np_grad(loss, h, beta, ls):
    if loss == "sigmoid":
        return -beta * expit(-beta * h)
    if loss == "cdpo":
        return -(1 - ls) * beta * expit(-beta * h) + ls * beta * expit(beta * h)
    raise ValueError(loss)


def test_choose_picks_the_chosen_token_by_label():
    s = np.array([1.0, -1.0, 1.0, -1.0])
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([-1.0, -2.0, -3.0, -4.0])
    c, r = map(np.asarray, reduced.choose(jnp.asarray(s), jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_array_equal(c, [1.0, -2.0, 3.0, -4.0])
    np.testing.assert_array_equal(r, [-1.0, 2.0, -3.0, 4.0])


@pytest.mark.parametrize("loss,ls", [("sigmoid", 0.0), ("cdpo", 0.2)])
def test_split_metrics_match_numpy(loss, ls):
    rng = np.random.default_rng(0)
    n, k = 40, 3
    h = rng.normal(size=n)
    lc, lr = rng.normal(size=n) - 1.0, rng.normal(size=n) - 2.0
    rc, rr = rng.normal(size=n) - 1.5, rng.normal(size=n) - 1.2
    policy = rng.normal(size=n)
    beh = rng.integers(0, 2, size=n)  # behaviour 2 is absent → NaN
    got = reduced.split_metrics(*(jnp.asarray(v) for v in (h, lc, lr, rc, rr, policy, beh)), k=k, beta=BETA,
                                loss=loss, label_smoothing=ls)
    ell = np_loss(loss, h, BETA, ls)
    want = {"loss": ell.mean(), "reward_accuracy": (h > 0).mean(), "policy_accuracy": (policy > 0).mean(),
            "rewards_chosen": BETA * (lc - rc).mean(), "rewards_rejected": BETA * (lr - rr).mean(),
            "rewards_margin": BETA * h.mean(), "logps_chosen": lc.mean(), "logps_rejected": lr.mean()}
    for name, v in want.items():
        np.testing.assert_allclose(float(got[name]), v, rtol=1e-12, err_msg=name)
    for name, vals in (("behavior_loss", ell), ("behavior_reward_accuracy", h > 0),
                       ("behavior_policy_accuracy", policy > 0)):
        ref = [vals[beh == j].mean() for j in range(2)] + [np.nan]
        np.testing.assert_allclose(np.asarray(got[name]), ref, rtol=1e-12, err_msg=name)
    assert set(got) == set(want) | {"behavior_loss", "behavior_reward_accuracy", "behavior_policy_accuracy"}


def test_split_metrics_nan_head_gives_nan_accuracy_not_zero():
    h = jnp.array([jnp.nan, 1.0])
    got = reduced.split_metrics(h, h, h, 0.0, 0.0, jnp.array([1.0, jnp.nan]), jnp.array([0, 0]), k=1, beta=1.0,
                                loss="sigmoid", label_smoothing=0.0)
    assert np.isnan(float(got["reward_accuracy"])) and np.isnan(float(got["policy_accuracy"]))
    h = jnp.array([-1.0, 2.0, 0.0])  # a zero margin is not a correct preference
    got = reduced.split_metrics(h, h, h, 0.0, 0.0, h, jnp.array([0, 0, 0]), k=1, beta=1.0,
                                loss="sigmoid", label_smoothing=0.0)
    assert float(got["reward_accuracy"]) == pytest.approx(1 / 3)


def test_head_logps_is_the_softmax_of_the_moved_head():
    rng = np.random.default_rng(1)
    n, v, a, b = 6, 5, 3, 1
    z0, half = rng.normal(size=(n, v)), rng.normal(size=n)
    logits = z0.copy()
    logits[:, a] += half
    logits[:, b] -= half
    lp = log_softmax(logits, axis=-1)
    got_a, got_b = map(np.asarray, reduced.head_logps(jnp.asarray(z0), jnp.asarray(half), a, b))
    np.testing.assert_allclose(got_a, lp[:, a], rtol=1e-12)
    np.testing.assert_allclose(got_b, lp[:, b], rtol=1e-12)


@pytest.mark.parametrize("vocab", [2, 3, 7])
def test_zero_head_logps_match_the_full_softmax(vocab):
    x = np.array([-3.0, -0.4, 0.0, 1.1, 5.0])
    logits = np.zeros((x.size, vocab))
    logits[:, 0], logits[:, 1] = x / 2, -x / 2
    lp = log_softmax(logits, axis=-1)
    la, lb, ref = map(np.asarray, reduced.zero_head_logps(jnp.asarray(x), vocab))
    np.testing.assert_allclose(la, lp[:, 0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(lb, lp[:, 1], rtol=1e-12, atol=1e-15)
    assert float(ref) == pytest.approx(-math.log(vocab), rel=1e-14)


@pytest.mark.parametrize("loss,ls", [("sigmoid", 0.0), ("cdpo", 0.15)])
def test_pair_grad_weight_is_the_loss_derivative(loss, ls):
    h = np.linspace(-4, 4, 17)
    got = np.asarray(reduced.pair_grad_weight(loss, jnp.asarray(h), BETA, ls))
    np.testing.assert_allclose(got, np_grad(loss, h, BETA, ls), rtol=1e-12, atol=1e-15)
    fd = (np_loss(loss, h + 1e-6, BETA, ls) - np_loss(loss, h - 1e-6, BETA, ls)) / 2e-6
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-9)


def test_reduced_update_steps_delta_by_twice_the_update():
    g, delta, d0 = jnp.array([0.5, -2.0, 1.0]), jnp.array([1.0, 2.0, -1.0]), jnp.array([0.2, 0.0, 0.4])
    lr = 0.1
    opt = optax.sgd(lr)
    new, _ = reduced.reduced_update(opt, g, opt.init(delta), delta, d0)
    np.testing.assert_allclose(np.asarray(new), np.asarray(delta - 2 * lr * g), rtol=1e-14)
    # the optimizer sees Δ = (δ − δ_0)/2 as its parameters: weight decay λ adds λΔ to the gradient
    wd = 0.3
    opt = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    new, _ = reduced.reduced_update(opt, g, opt.init(delta), delta, d0)
    want = np.asarray(delta) - 2 * lr * (np.asarray(g) + wd * (np.asarray(delta) - np.asarray(d0)) / 2)
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-14)
    # Adam's first step: u = −η g/(|g| + eps)
    opt = optax.adam(lr, eps=1e-8)
    new, _ = reduced.reduced_update(opt, g, opt.init(delta), delta, d0)
    want = np.asarray(delta) - 2 * lr * np.asarray(g) / (np.abs(np.asarray(g)) + 1e-8)
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-10)


def test_safe_sqrt_values_and_gradient():
    x = jnp.array([4.0, 0.25, 0.0, -1.0, jnp.nan])
    np.testing.assert_array_equal(np.asarray(reduced.safe_sqrt(x)), [2.0, 0.5, 0.0, 0.0, np.nan])
    grads = np.asarray(jax.vmap(jax.grad(reduced.safe_sqrt))(jnp.array([4.0, 0.0, -1.0])))
    np.testing.assert_array_equal(grads, [0.25, 0.0, 0.0])


def test_weight_change_is_the_frobenius_distance_of_the_heads():
    delta, d0 = np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, 0.5])
    w_t = np.stack([delta / 2, -delta / 2])  # W = [δ/2; −δ/2] (zero reference)
    w_0 = np.stack([d0 / 2, -d0 / 2])
    got = float(reduced.weight_change(jnp.asarray(delta), jnp.asarray(d0)))
    assert got == pytest.approx(np.linalg.norm(w_t - w_0), rel=1e-14)


def test_prob_positive_is_the_normal_tail_with_its_point_mass_limit():
    mu = np.array([0.3, -1.2, 2.0, 0.5, -0.5, 0.0, np.nan, 1.0])
    sigma = np.array([0.7, 2.0, 0.1, 0.0, 0.0, 0.0, 1.0, np.nan])
    got = np.asarray(reduced.prob_positive(jnp.asarray(mu), jnp.asarray(sigma)))
    want = np.concatenate([norm.cdf(mu[:3] / sigma[:3]), [1.0, 0.0, 0.0, np.nan, np.nan]])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # at σ = 0 the accuracy is a step in μ: zero (finite) derivative, not 0/0
    for m in (0.5, -0.5):
        assert float(jax.grad(lambda v: reduced.prob_positive(v, jnp.float64(0.0)))(m)) == 0.0


def test_per_behavior_is_the_weighted_conditional_mean():
    w = np.array([0.1, 0.3, 0.2, 0.4])
    vals = np.array([1.0, 3.0, -2.0, 5.0])
    beh = np.array([0, 0, 1, 1])
    got = np.asarray(reduced.per_behavior(jnp.asarray(w), jnp.asarray(vals), jnp.asarray(beh), 2))
    np.testing.assert_allclose(got, [(0.1 + 0.9) / 0.4, (-0.4 + 2.0) / 0.6], rtol=1e-14)


def _np_rk4(f, y, dt, steps):
    for _ in range(steps):
        k1 = f(y)
        k2 = f(y + dt / 2 * k1)
        k3 = f(y + dt / 2 * k2)
        k4 = f(y + dt * k3)
        y = y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


def test_gradient_flow_is_rk4_of_minus_twice_the_gradient():
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = np.array([1.0, -0.5])
    grad = lambda dl: a @ dl + b  # L(δ) = ½δᵀAδ + bᵀδ
    d0, dt, sub = np.array([0.3, -0.8]), 0.2, 3
    got = np.asarray(reduced.gradient_flow(lambda dl: jnp.asarray(a) @ dl + jnp.asarray(b), jnp.asarray(d0), dt, sub))
    np.testing.assert_allclose(got, _np_rk4(lambda y: -2 * grad(y), d0, dt, sub), rtol=1e-13)
    # and the exact flow δ(τ) = δ* + e^{−2Aτ}(δ_0 − δ*), δ* = −A⁻¹b (RK4 error O(dt⁴))
    star = -np.linalg.solve(a, b)
    lam, vec = np.linalg.eigh(a)
    exact = star + vec @ (np.exp(-2 * lam * dt * sub) * (vec.T @ (d0 - star)))
    np.testing.assert_allclose(got, exact, atol=2e-3)


def test_stein_gradient_matches_quadrature_of_the_component_expectations():
    rng = np.random.default_rng(2)
    j, d, ls = 3, 4, 0.1
    mu, sigma = rng.normal(size=j), rng.uniform(0.3, 1.5, size=j)
    w, means, s_delta = rng.uniform(0.1, 1.0, size=j), rng.normal(size=(j, d)), rng.normal(size=(j, d))
    x, wts = np.polynomial.hermite_e.hermegauss(80)  # ∫ f(a) φ(a) da ≈ Σ wts f(x) / √(2π)
    e1 = np.array([np.sum(wts * np_grad("cdpo", m + s * x, BETA, ls)) / np.sqrt(2 * np.pi) for m, s in zip(mu, sigma)])
    # E[ℓ''(a)] = E[ℓ'(a)(a − μ)]/σ² (Stein)
    e2 = np.array([np.sum(wts * np_grad("cdpo", m + s * x, BETA, ls) * x) / s / np.sqrt(2 * np.pi)
                   for m, s in zip(mu, sigma)])
    want = (w * e1) @ means + (w * e2) @ s_delta
    got = np.asarray(reduced.stein_gradient("cdpo", *(jnp.asarray(v) for v in (mu, sigma, w, means, s_delta)),
                                            BETA, ls))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_population_step_gd_and_flow():
    a = jnp.array([[1.5, 0.2], [0.2, 0.7]])
    grad = lambda dl: a @ dl - 1.0
    delta, d0, lr = jnp.array([0.4, -0.2]), jnp.array([0.1, 0.1]), 0.3
    step, state0 = reduced.population_step(grad, method="gd", optimizer=None, lr=lr, d0=d0)
    t, new, _ = step((jnp.int32(4), delta, state0))
    assert int(t) == 5
    np.testing.assert_allclose(np.asarray(new), np.asarray(delta - 2 * lr * grad(delta)), rtol=1e-14)
    step, state0 = reduced.population_step(grad, method="flow", optimizer=None, lr=lr, d0=d0, substeps=3)
    assert state0 == ()
    t, new, _ = step((jnp.int32(0), delta, state0))
    an = np.asarray(a)
    want = _np_rk4(lambda y: -2 * (an @ y - 1.0), np.asarray(delta), lr / 3, 3)
    assert int(t) == 1
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-13)
    # momentum: the second step uses v = g_1 + 0.9 g_0
    step, state = reduced.population_step(grad, method="gd", optimizer="momentum", lr=lr, d0=d0)
    _, d1, state = step((jnp.int32(0), delta, state))
    _, d2, _ = step((jnp.int32(1), d1, state))
    g0, g1 = np.asarray(grad(delta)), np.asarray(grad(d1))
    np.testing.assert_allclose(np.asarray(d2), np.asarray(d1) - 2 * lr * (g1 + 0.9 * g0), rtol=1e-13)


# --------------------------------------------------------------------------- _train minibatch helpers
@pytest.mark.parametrize("batch_size,n,want", [(None, 8, None), (0, 8, None), (8, 8, None), (3, 8, 3), (1, 8, 1)])
def test_check_batch_size(batch_size, n, want):
    assert _train.check_batch_size(batch_size, n) == want


def test_check_batch_size_rejects_too_large():
    with pytest.raises(ValueError, match="batch_size=9 exceeds n=8"):
        _train.check_batch_size(9, 8)


@pytest.mark.parametrize("n,bs,steps,d,copies,want", [
    (10, 3, 9, 2, 1, True),    # E = ⌈9/3⌉ = 3 epochs ≤ 2d = 4
    (10, 3, 12, 2, 1, True),   # E = 4 = 2d: the boundary fits
    (10, 3, 13, 2, 1, False),  # E = 5 > 4
    (10, 3, 9, 1, 1, False),   # E = 3 > 2
    (1 << 20, 1 << 19, 16, 4, 2, True),   # 2 · 8 · 2²⁰ = 2²⁴ = PERM_TABLE_MAX entries: fits
    (1 << 20, 1 << 19, 16, 4, 3, False),  # 3 · 8 · 2²⁰ > 2²⁴
    (4_500_000, 2_250_000, 7, 2, 1, False),  # E = ⌈7/2⌉ = 4 (not 3.5): 4 · 4.5e6 > 2²⁴
])
def test_epoch_orders_fit(n, bs, steps, d, copies, want):
    assert _train.PERM_TABLE_MAX == 1 << 24
    assert _train.epoch_orders_fit(n, bs, steps, d, copies=copies) is want


def test_minibatches_follow_the_epoch_permutations():
    n, bs, steps, d = 10, 3, 8, 4  # 3 batches per epoch (pair 9 of each epoch's order dropped), 3 epochs
    key = jax.random.key(5)
    perms = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n)) for e in range(3)]
    table = _train.epoch_orders(key, n, bs, steps, d)
    np.testing.assert_array_equal(np.asarray(table), np.stack(perms))
    assert _train.epoch_orders(key, n, bs, steps, 1) is None  # 3 epochs > 2d: no table
    for t in range(steps):
        want = perms[t // 3][(t % 3) * bs:(t % 3 + 1) * bs]
        for tab in (table, None):
            got = np.asarray(_train.minibatch_index(jnp.int32(t), key, tab, n, bs))
            np.testing.assert_array_equal(got, want, err_msg=f"step {t}, table {tab is not None}")
    # n // batch_size batches per epoch: n = 10, B = 4 → 2 per epoch, 5 steps → ⌈5/2⌉ = 3 epochs
    assert _train.epoch_orders(key, 10, 4, 5, 4).shape == (3, 10)
    for e in range(2):  # within an epoch the batches are disjoint
        seen = np.concatenate([np.asarray(_train.minibatch_index(jnp.int32(3 * e + i), key, table, n, bs))
                               for i in range(3)])
        assert len(set(seen.tolist())) == 9


def test_segment_mean_with_an_empty_segment():
    v = jnp.array([1.0, 2.0, 4.0, -3.0])
    got = np.asarray(_train.segment_mean(v, jnp.array([0, 2, 0, 2]), 3))
    np.testing.assert_array_equal(got, [2.5, np.nan, -0.5])
    got = np.asarray(_train.segment_mean(v, jnp.array([1, 0, 0, 0]), 2))  # a one-pair segment
    np.testing.assert_array_equal(got, [1.0, 1.0])


def test_run_recorded_records_every_r_steps():
    step = lambda c: (c[0] + 1, c[1] * 2.0)
    final, recs = _train.run_recorded(step, lambda c: c[1], (jnp.int32(0), jnp.float64(1.0)), 6, 2)
    assert int(final[0]) == 6 and float(final[1]) == 64.0
    np.testing.assert_array_equal(np.asarray(recs), [1.0, 4.0, 16.0, 64.0])


def test_progress_ticks_report_every_kth_step():
    seen = []
    step = lambda c: (c[0] + 1, c[1] + 1.0)
    with _train.progress_ticks(2, lambda t: seen.append(int(t))):
        _train.run_recorded(step, lambda c: c[1], (jnp.int32(0), jnp.float64(0.0)), 6, 3)
        jax.effects_barrier()
    assert sorted(seen) == [2, 4, 6]
    seen.clear()
    with _train.progress_ticks(1, lambda t: seen.append(int(t))):
        _train.run_recorded(step, lambda c: c[1], (jnp.int32(0), jnp.float64(0.0)), 6, 3)
        jax.effects_barrier()
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
