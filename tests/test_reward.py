"""Bradley–Terry oracle DPO and exact KL-regularised RLHF (dynamics/reward.py, docs/theory.md §11)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from dynamics import reward as R
from dynamics.vocab_population import vocab_population_objective

D, V = 3, 3


def _dist(rng, d=D):
    return dd.GaussianPreference.create(rng.normal(size=(2, d)), rng.normal(size=(2, d)),
                                        np.stack([0.5 * np.eye(d), np.diag([0.3, 0.8, 0.4][:d])]),
                                        p_pos=[0.6, 0.3], weight=[0.4, 0.6])


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    dist = _dist(rng)
    head = dd.Head.create(np.zeros((V, D)), pairs=((0, 1), (2, 1)))
    return dist, head, rng.normal(size=(V, D)), 0.5 * rng.normal(size=(V, D))


def _mc_components(dist, n, seed):
    """NumPy float64 sample of (component, z = s x) from the mixture."""
    c = dist.components()
    rng = np.random.default_rng(seed)
    wt, mean, cov = (np.asarray(a, np.float64) for a in (c.weight, c.mean, c.cov))
    idx = rng.choice(len(wt), size=n, p=wt / wt.sum())
    z = mean[idx] + np.einsum("nij,nj->ni", np.linalg.cholesky(cov)[idx], rng.standard_normal((n, D)))
    return idx, z, np.asarray(c.behavior), np.asarray(c.sign)


def _sig(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def test_oracle_loss_and_gradient_vs_monte_carlo(x64):
    dist, head, theta, w = _setup()
    beta = 0.7
    loss, _ = R.oracle_population_loss(dist, w, head=head, theta_star=theta, beta=beta)
    grad = np.asarray(R.oracle_population_gradient(dist, w, head=head, theta_star=theta, beta=beta))
    n = 10**6
    idx, z, beh, _ = _mc_components(dist, n, 1)
    pairs = np.array([[0, 1], [2, 1]])
    a, b = pairs[beh[idx], 0], pairs[beh[idx], 1]
    h = np.einsum("nd,nd->n", w[a] - w[b], z)  # w_ref = 0
    t = np.einsum("nd,nd->n", theta[a] - theta[b], z)
    ell = lambda u: np.logaddexp(0.0, -beta * u)
    dell = lambda u: -beta * _sig(-beta * u)
    f = _sig(t) * ell(h) + _sig(-t) * ell(-h)
    fh = _sig(t) * dell(h) - _sig(-t) * dell(-h)
    assert abs(float(loss) - f.mean()) < 5 * f.std() / np.sqrt(n)
    per = fh[:, None] * z
    mc_grad = np.zeros((V, D))
    for tok, sign in ((a, 1.0), (b, -1.0)):
        for v in range(V):
            g = sign * per * (tok == v)[:, None]
            mc_grad[v] += g.mean(0)
    # per-element SE bound: rows a and b of a pair carry ±the same per-sample vector
    se = per.std(0) / np.sqrt(n)
    assert np.max(np.abs(grad - mc_grad)) < 5 * 2 * se.max() + 1e-12


def test_oracle_gradient_vs_finite_differences(x64):
    dist, head, theta, w = _setup(2)
    kw = dict(head=head, theta_star=theta, beta=1.3, loss_type="sigmoid")
    grad = np.asarray(R.oracle_population_gradient(dist, w, **kw))
    eps = 1e-5
    fd = np.zeros_like(grad)
    for i in range(V):
        for j in range(D):
            e = np.zeros((V, D))
            e[i, j] = eps
            fd[i, j] = (float(R.oracle_population_loss(dist, w + e, **kw)[0])
                        - float(R.oracle_population_loss(dist, w - e, **kw)[0])) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=1e-8)


def test_large_true_reward_recovers_deterministic_labels(x64):
    # means at 9.5 sd along e1: with Θ* = λ e_a e1ᵀ, λ → ∞, the oracle keeps every label (P(t < 0) ~ 1e-21)
    dist = dd.GaussianPreference.create(np.array([[3.0, 0.5, 0.0]]), np.array([[-3.0, 0.2, -0.4]]),
                                        0.1 * np.eye(3), p_pos=0.4)
    head = dd.Head.zeros(3, vocab_size=2)
    w = np.array([[0.4, -0.3, 0.2], [-0.1, 0.5, 0.3]])
    theta = np.zeros((2, 3))
    theta[0, 0] = 1e3
    for lt, ls in (("sigmoid", 0.0), ("robust", 0.1)):
        ours = R.oracle_population_loss(dist, w, head=head, theta_star=theta, loss_type=lt, beta=0.8,
                                        label_smoothing=ls)[0]
        hp = {"label_smoothing": ls} if ls else {}
        det = vocab_population_objective(dist, w, head=head, loss_type=lt, beta=0.8, **hp)[0]
        assert abs(float(ours) - float(det)) < 1e-8, lt


def test_empirical_oracle_dpo_matches_population_at_large_n(x64):
    dist, head, theta, _ = _setup(3)
    kw = dict(head=head, theta_star=theta, beta=1.0, lr=0.5, steps=4)
    pop = R.oracle_population_trajectory(dist, **kw)
    emp = R.oracle_empirical_trajectory(dist, jax.random.key(0), n=200_000, **kw)
    # stated tolerance: the mean gradient's sampling error is ~1/sqrt(n) ≈ 2.2e-3 per element and step;
    # 4 steps of lr 0.5 → ~5e-3 on W; bound 0.015 (and 0.01 on the loss)
    assert np.max(np.abs(np.asarray(emp.w[-1]) - np.asarray(pop.w[-1]))) < 0.015
    assert abs(float(emp.loss[-1]) - float(pop.loss[-1])) < 0.01


def _rlhf_setup(seed=4, d=D):
    rng = np.random.default_rng(seed)
    dist = _dist(rng, d)
    theta = rng.normal(size=(V, d))
    theta -= theta.mean(0)  # W* is unique up to a common row shift; GD from W_ref keeps the row mean
    return dist, 0.3 * rng.normal(size=(V, d)), theta


def test_rlhf_gradient_vs_finite_differences(x64):
    # d = 2: a rank-2 image, 64² nodes (at d = 3 the default 24³ rule leaves a ~6e-6 gap to FD)
    dist, w_ref, theta = _rlhf_setup(d=2)
    w = w_ref + 0.4 * np.random.default_rng(5).normal(size=w_ref.shape)
    kw = dict(w_ref=w_ref, reward=theta, beta=0.6)
    grad = np.asarray(R.rlhf_gradient(dist, w, **kw))
    eps = 1e-5
    fd = np.zeros_like(grad)
    for i in range(V):
        for j in range(2):
            e = np.zeros((V, 2))
            e[i, j] = eps
            fd[i, j] = (float(R.rlhf_objective(dist, w + e, **kw)[0]) - float(R.rlhf_objective(dist, w - e, **kw)[0])) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_rlhf_optimum_is_stationary_and_gd_reaches_it(x64):
    dist, w_ref, theta = _rlhf_setup(d=2)
    beta = 2.0
    w_star = np.asarray(R.rlhf_optimum(w_ref, theta, beta))
    np.testing.assert_allclose(w_star, w_ref + theta / beta)
    assert np.max(np.abs(np.asarray(R.rlhf_gradient(dist, w_star, w_ref=w_ref, reward=theta, beta=beta)))) < 1e-10
    traj = R.rlhf_population_trajectory(dist, w_ref=w_ref, reward=theta, beta=beta, lr=1.0, steps=120,
                                        record_every=120)
    assert np.max(np.abs(np.asarray(traj.w[-1]) - w_star)) < 1e-6
    m = R.policy_metrics(dist, traj.w[-1], w_ref=w_ref, reward=theta, beta=beta)
    assert abs(float(m["reward_gap"])) < 1e-6


def test_exact_kl_and_reward_vs_monte_carlo(x64):
    dist, w_ref, theta = _rlhf_setup(6)
    w = w_ref + 0.7 * np.random.default_rng(7).normal(size=(V, D))
    beta = 0.5
    m = R.policy_metrics(dist, w, w_ref=w_ref, reward=theta, beta=beta)
    n = 10**6
    idx, z, _, sign = _mc_components(dist, n, 8)
    x = sign[idx][:, None] * z

    def logsm(a):
        return a - np.logaddexp.reduce(a, axis=1, keepdims=True)

    lp, lq = logsm(x @ w.T), logsm(x @ w_ref.T)
    kl = np.sum(np.exp(lp) * (lp - lq), 1)
    val = np.sum(np.exp(lp) * (x @ theta.T), 1)
    val_star = np.sum(np.exp(logsm(x @ (w_ref + theta / beta).T)) * (x @ theta.T), 1)
    for got, s in ((m["kl"], kl), (m["reward"], val), (m["reward_gap"], val_star - val)):
        assert abs(float(got) - s.mean()) < 5 * s.std() / np.sqrt(n)


def test_reinforce_matches_population_gradient_at_large_n(x64):
    dist, w_ref, theta = _rlhf_setup(9)
    w = w_ref + 0.5 * np.random.default_rng(10).normal(size=(V, D))
    kw = dict(w_ref=w_ref, reward=theta, beta=0.5)
    exact = np.asarray(R.rlhf_gradient(dist, w, **kw))
    # stated tolerance: 0.02 (observed max error ~5e-3 at n = 2e5 prompts × 4 responses)
    for k in (1, 4):
        est = np.asarray(R.reinforce_gradient(dist, jax.random.key(k), w, n=200_000, rloo_k=k, **kw))
        assert np.max(np.abs(est - exact)) < 0.02, k


def test_bad_input_one_line(x64):
    dist, head, theta, w = _setup()
    with pytest.raises(ValueError, match=r"theta_star has shape \(2, 3\)") as e:
        R.oracle_population_loss(dist, w, head=head, theta_star=theta[:2])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="beta") as e:
        R.rlhf_objective(dist, w, w_ref=np.zeros((V, D)), reward=theta, beta=0.0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="reward has shape"):
        R.rlhf_optimum(np.zeros((V, D)), theta[:, :2], 1.0)


def test_reinforce_trajectory_follows_population(x64):
    dist, w_ref, theta = _rlhf_setup(11, d=2)
    kw = dict(w_ref=w_ref, reward=theta, beta=1.0, lr=0.5, steps=5)
    pop = R.rlhf_population_trajectory(dist, **kw)
    emp = R.reinforce_trajectory(dist, jax.random.key(3), n=100_000, rloo_k=4, **kw)
    # stated tolerance 0.02 on W after 5 steps (per-step gradient noise ~ 1/sqrt(n·rloo_k) ≈ 1.6e-3)
    assert np.max(np.abs(np.asarray(emp.w[-1]) - np.asarray(pop.w[-1]))) < 0.02
    assert emp.w.shape == pop.w.shape == (6, V, 2)


def test_oracle_labels_keep_with_bradley_terry_probability(x64):
    rng = np.random.default_rng(12)
    theta = rng.normal(size=(V, D))
    n = 200_000
    x = rng.normal(size=(n, D))
    chosen, rejected = np.zeros(n, np.int32), np.full(n, 2, np.int32)
    ch, rj, kept = R.oracle_labels(jax.random.key(0), jnp.asarray(theta), jnp.asarray(x), chosen, rejected)
    ch, rj, kept = map(np.asarray, (ch, rj, kept))
    p = _sig(x @ (theta[0] - theta[2]))
    # kept ~ Bernoulli(p): the mean and the mean of p agree within 5 standard errors; swapped pairs are swapped
    assert abs(kept.mean() - p.mean()) < 5 * np.sqrt(np.mean(p * (1 - p)) / n)
    assert abs(np.mean(kept * (x[:, 0] > 0)) - np.mean(p * (x[:, 0] > 0))) < 5 / np.sqrt(n)
    assert np.all(ch[kept] == 0) and np.all(rj[kept] == 2) and np.all(ch[~kept] == 2) and np.all(rj[~kept] == 0)


def test_trajectories_compile_once_per_shape(x64):
    """β, lr and the reward are traced: a second run with other values reuses the compiled program."""
    dist, w_ref, theta = _rlhf_setup(d=2)
    before = R._trajectory._cache_size()
    a = R.rlhf_population_trajectory(dist, w_ref=w_ref, reward=theta, beta=2.0, lr=0.5, steps=4)
    b = R.rlhf_population_trajectory(dist, w_ref=w_ref, reward=0.5 * theta, beta=1.0, lr=0.25, steps=4)
    assert R._trajectory._cache_size() == before + 1
    assert not np.allclose(np.asarray(a.w[-1]), np.asarray(b.w[-1]))
    np.testing.assert_array_equal(np.asarray(a.step), np.arange(5))
