"""The exact population layer of the V-token model (dynamics/vocab_population.py, docs/theory.md §7).

References are independent of the code under test: scipy's adaptive cubature of NumPy integrands,
NumPy Monte Carlo with common random numbers, central finite differences, the closed form of the
first SFT step from a zero head, and the existing two-token engine (dynamics.population_trajectory).
"""
import jax
import numpy as np
import pytest
from scipy.integrate import cubature
from scipy.special import expit, log_expit, logsumexp
from scipy.stats import norm

import dynamics
import dynamics.losses



@pytest.fixture(autouse=True)
def x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def _vp():
    from dynamics import vocab_population

    return vocab_population


def _dist(seed=0, k=2, d=3, scale=0.4):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d)) * scale
    cov = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(d)
    return dynamics.GaussianPreference.create(rng.normal(size=(k, d)), rng.normal(size=(k, d)), cov,
                                              p_pos=np.linspace(0.6, 0.3, k), weight=np.linspace(0.7, 0.3, k) /
                                              np.linspace(0.7, 0.3, k).sum())


def _one_component(mu, cov):
    """A distribution whose only component with weight is x ~ N(mu, cov), s = +1 (chosen = a = 0)."""
    mu = np.asarray(mu, float)[None]
    return dynamics.GaussianPreference.create(mu, mu, np.asarray(cov, float)[None], p_pos=[1.0])


# ---------------------------------------------------------------- NumPy objectives (TRL's formulas)
def _np_objective(name, c, r, rc, rr, beta):
    cl, rl = c - rc, r - rr
    if name == "sft":
        return -c
    if name == "sigmoid":
        return -log_expit(beta * (cl - rl))
    if name == "apo_zero":  # TRL: 1 − σ(β chosen_logratio) + σ(β rejected_logratio)
        return 1.0 - expit(beta * cl) + expit(beta * rl)
    if name == "nca_pair":  # TRL: −log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr)
        return -log_expit(beta * cl) - 0.5 * log_expit(-beta * cl) - 0.5 * log_expit(-beta * rl)
    raise AssertionError(name)


def _np_logsoftmax(z):
    return z - logsumexp(z, axis=0, keepdims=True)


def _adaptive_value(name, w, w_ref, mu, cov, beta, chosen=0, rejected=1):
    """E f over x ~ N(mu, cov) by scipy's adaptive cubature in the whitened r-dim image (NumPy only)."""
    b = np.concatenate([w - w.mean(0), w_ref - w_ref.mean(0)])
    lam, q = np.linalg.eigh(b @ cov @ b.T)
    keep = lam > 1e-12 * lam.max()
    root = q[:, keep] * np.sqrt(lam[keep])
    m = b @ mu
    v = w.shape[0]

    def integrand(xi):  # xi (n, r)
        u = (m[:, None] + root @ xi.T)  # (2V, n)
        lp, lpr = _np_logsoftmax(u[:v]), _np_logsoftmax(u[v:])
        f = _np_objective(name, lp[chosen], lp[rejected], lpr[chosen], lpr[rejected], beta)
        return f * np.exp(-0.5 * np.sum(xi * xi, axis=1)) / (2 * np.pi) ** (xi.shape[1] / 2)

    r = root.shape[1]
    res = cubature(integrand, [-9.0] * r, [9.0] * r, rtol=1e-11, atol=1e-12, max_subdivisions=200000)
    assert res.status == "converged"
    return res.estimate


# ------------------------------------------------------------------ V = 2 paper case: exact engines agree
@pytest.mark.parametrize("loss_type,hp,optimizer", [("sigmoid", {}, None), ("cdpo", {"label_smoothing": 0.2}, "adam")])
def test_v2_paper_head_equals_population_trajectory(loss_type, hp, optimizer):
    dist = _dist(0)
    beta, lr, steps = 0.7, 0.2, 12
    traj = _vp().vocab_population_trajectory(dist, head=dynamics.Head.zeros(3), loss_type=loss_type, beta=beta,
                                             lr=lr, steps=steps, optimizer=optimizer, **hp)
    ref = dynamics.population_trajectory(dist, beta=beta, lr=lr, steps=steps, loss=loss_type, optimizer=optimizer,
                                         label_smoothing=hp.get("label_smoothing", 0.0))
    w = np.asarray(traj.w)
    np.testing.assert_allclose(w[:, 0] - w[:, 1], ref.delta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w[:, 0] + w[:, 1], 0.0, atol=1e-12)  # the head stays [δ/2; −δ/2]
    np.testing.assert_allclose(traj.loss_total, ref.metrics["loss"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(traj.metrics["loss"], ref.metrics["behavior_loss"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(traj.metrics["rewards/accuracies"], ref.metrics["behavior_reward_accuracy"],
                               rtol=0, atol=1e-12)
    # rewards/margins = β E[h]; the population engine reports its weighted mean
    np.testing.assert_allclose(traj.mean("rewards/margins"), ref.metrics["rewards_margin"], rtol=0, atol=1e-12)
    # ‖∇_W L‖_F = √2 ‖∇_δ L‖ for the rank-one gradient (e_a − e_b) Gᵀ (docs/theory.md §1.4)
    np.testing.assert_allclose(traj.grad_norm, np.sqrt(2.0) * ref.metrics["grad_norm"], rtol=1e-12, atol=1e-14)
    # V = 2: displacement is the exact half-space probability P(δ_tᵀz < 0) of §7.5
    comps = dist.components()
    wt, m, cv = (np.asarray(a) for a in (comps.weight, comps.mean, comps.cov))
    p = np.zeros((steps, 2))
    for t in range(1, steps + 1):
        dl = np.asarray(ref.delta[t])
        below = norm.cdf(-(m @ dl) / np.sqrt(np.einsum("i,cij,j->c", dl, cv, dl)))  # P(δᵀz < 0) per component
        p[t - 1] = [(wt[2 * k:2 * k + 2] @ below[2 * k:2 * k + 2]) / wt[2 * k:2 * k + 2].sum() for k in range(2)]
    np.testing.assert_allclose(traj.metrics["displacement"][1:], p, atol=1e-12)
    np.testing.assert_array_equal(traj.metrics["displacement"][0], 0.0)


# ---------------------------------------------------------------------- cubature vs adaptive quadrature
@pytest.mark.parametrize("scale", [0.5, 1.5, 3.0])
def test_cubature_v3_sft_matches_adaptive_2d(scale):
    """V = 3, W_ref = 0, SFT: a 2-D integral (the two centred logit differences), default 64² rule."""
    rng = np.random.default_rng(1)
    d = 3
    mu, cov = rng.normal(size=d) * 0.5, np.eye(d) * 0.6 + 0.2
    w = rng.normal(size=(3, d))
    w *= scale / (np.linalg.norm(w - w.mean(0), 2) * np.sqrt(np.linalg.eigvalsh(cov).max()))  # ‖PW‖σ = scale
    head = dynamics.Head.create(np.zeros((3, d)))
    val, _ = _vp().vocab_population_objective(_one_component(mu, cov), w, head=head, loss_type="sft")
    ref = _adaptive_value("sft", w, np.zeros((3, d)), mu, cov, 1.0)
    assert abs(float(val) - ref) <= 1e-6


@pytest.mark.parametrize("name,scale", [("apo_zero", 1.0), ("apo_zero", 2.5), ("nca_pair", 2.5)])
def test_cubature_v2_reference_objective_matches_adaptive_2d(name, scale):
    """V = 2 with W_ref ≠ 0 and an objective of the individual log-ratios: a 2-D integral."""
    rng = np.random.default_rng(2)
    d = 3
    mu, cov = rng.normal(size=d) * 0.5, np.eye(d) * 0.5 + 0.1
    sd = np.sqrt(np.linalg.eigvalsh(cov).max())
    w, w_ref = rng.normal(size=(2, d)), rng.normal(size=(2, d))
    w *= scale / (np.linalg.norm(w - w.mean(0), 2) * sd)
    w_ref *= scale / (np.linalg.norm(w_ref - w_ref.mean(0), 2) * sd)
    beta = 1.0
    head = dynamics.Head.create(w_ref)
    val, _ = _vp().vocab_population_objective(_one_component(mu, cov), w, head=head, loss_type=name, beta=beta)
    ref = _adaptive_value(name, w, w_ref, mu, cov, beta)
    assert abs(float(val) - ref) <= 1e-6


def test_cubature_v3_rank3_matches_adaptive_3d():
    """V = 3, a rank-one centred reference: r = 3, default 24³ rule, against 3-D adaptive cubature."""
    rng = np.random.default_rng(3)
    d = 4
    mu, cov = rng.normal(size=d) * 0.5, np.eye(d) * 0.5
    w = rng.normal(size=(3, d)) * 0.6
    w_ref = np.outer([1.0, -1.0, 0.0], rng.normal(size=d)) * 0.5
    head = dynamics.Head.create(w_ref)
    vp = _vp()
    assert vp.image_rank(w_ref, d) == 3
    val, _ = vp.vocab_population_objective(_one_component(mu, cov), w, head=head, loss_type="apo_zero", beta=1.0)
    ref = _adaptive_value("apo_zero", w, w_ref, mu, cov, 1.0)
    assert abs(float(val) - ref) <= 1e-6


def test_cubature_v4_matches_higher_order_rule():
    """V = 4: r = 3 (W_ref = 0, SFT; default 24³ vs 48³) and r = 6 (W_ref ≠ 0, apo_zero; 7⁶ vs 10⁶)."""
    rng = np.random.default_rng(4)
    d = 6
    dist = _dist(4, k=2, d=d, scale=0.2)
    vp = _vp()
    w = rng.normal(size=(4, d)) * 0.25
    head0 = dynamics.Head.create(np.zeros((4, d)))
    lo = vp.vocab_population_objective(dist, w, head=head0, loss_type="sft")[1]
    hi = vp.vocab_population_objective(dist, w, head=head0, loss_type="sft", cubature_order=48)[1]
    np.testing.assert_allclose(lo, hi, rtol=0, atol=1e-6)
    head = dynamics.Head.create(rng.normal(size=(4, d)) * 0.25)
    assert vp.image_rank(head.w_ref, d) == 6
    lo = vp.vocab_population_objective(dist, w, head=head, loss_type="apo_zero", beta=1.0)[1]
    hi = vp.vocab_population_objective(dist, w, head=head, loss_type="apo_zero", beta=1.0, cubature_order=10)[1]
    np.testing.assert_allclose(lo, hi, rtol=0, atol=1e-6)


def test_margin_only_path_equals_cubature_path():
    """sigmoid at V = 3 with W_ref ≠ 0 (r = 4): exact 1-D integrals vs the cubature (a one-entry list)."""
    dist = _dist(5)
    rng = np.random.default_rng(5)
    w, w_ref = rng.normal(size=(3, 3)) * 0.5, rng.normal(size=(3, 3)) * 0.5
    head = dynamics.Head.create(w_ref)
    vp = _vp()
    exact = vp.vocab_population_objective(dist, w, head=head, loss_type="sigmoid", beta=0.8)
    cub = vp.vocab_population_objective(dist, w, head=head, loss_type=["sigmoid"], loss_weights=[1.0], beta=0.8)
    np.testing.assert_allclose(cub[1], exact[1], rtol=0, atol=1e-8)
    g_exact = vp.vocab_population_gradient(dist, w, head=head, loss_type="sigmoid", beta=0.8)
    g_cub = vp.vocab_population_gradient(dist, w, head=head, loss_type=["sigmoid"], loss_weights=[1.0], beta=0.8)
    np.testing.assert_allclose(g_cub, g_exact, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------- the Stein gradient
@pytest.mark.parametrize("name,with_ref", [("apo_zero", True), ("nca_pair", False)])
def test_stein_gradient_against_finite_differences_and_monte_carlo(name, with_ref):
    dist = _dist(3, scale=0.2)  # image sd ≤ 1.1: the default rule is accurate to ~1e-10 here (docs/theory.md §7.4)
    rng = np.random.default_rng(3)
    v, d, beta = 3, 3, 0.8
    w = rng.normal(size=(v, d)) * 0.3
    w_ref = rng.normal(size=(v, d)) * 0.3 if with_ref else np.zeros((v, d))
    head = dynamics.Head.create(w_ref)
    vp = _vp()
    value = lambda ww: float(vp.vocab_population_objective(dist, ww, head=head, loss_type=name, beta=beta)[0])
    grad = np.asarray(vp.vocab_population_gradient(dist, w, head=head, loss_type=name, beta=beta))
    h = 1e-5
    fd = np.zeros_like(w)
    for i in range(v):
        for j in range(d):
            e = np.zeros_like(w)
            e[i, j] = h
            fd[i, j] = (value(w + e) - value(w - e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-8)
    # Monte Carlo, NumPy, 10⁶ pairs; the directional derivative with common random numbers
    x, s, _ = (np.asarray(a) for a in dist.sample(jax.random.key(7), 10**6))
    ch = np.where(s > 0, 0, 1)
    idx = np.arange(len(s))

    def per_pair(ww):
        lp, lpr = _np_logsoftmax((x @ ww.T).T), _np_logsoftmax((x @ w_ref.T).T)
        return _np_objective(name, lp[ch, idx], lp[1 - ch, idx], lpr[ch, idx], lpr[1 - ch, idx], beta)

    f = per_pair(w)
    se = f.std() / np.sqrt(f.size)
    assert abs(f.mean() - value(w)) <= 5 * se
    direction = rng.normal(size=w.shape)
    hh = 1e-4
    df = (per_pair(w + hh * direction) - per_pair(w - hh * direction)) / (2 * hh)
    assert abs(df.mean() - np.sum(grad * direction)) <= 5 * df.std() / np.sqrt(df.size)


def test_sft_first_step_from_zero_head_closed_form():
    """W_ref = W_0 = 0: π is uniform, ∇_W L = −(E[e_y xᵀ] − (1/V)·1 E[x]ᵀ) exactly; loss log V.

    Two behaviours on different token pairs of one head: (0, 1) and (3, 1).
    """
    dist = _dist(6)
    v, d, lr = 4, 3, 0.3
    pairs = ((0, 1), (3, 1))
    head = dynamics.Head.create(np.zeros((v, d)), pairs=pairs)
    traj = _vp().vocab_population_trajectory(dist, head=head, loss_type="sft", lr=lr, steps=1)
    comps = dist.components()
    mean_x = np.asarray(comps.sign)[:, None] * np.asarray(comps.mean)
    beh = np.asarray(comps.behavior)
    chosen = np.array([pairs[k][0] if sg > 0 else pairs[k][1] for k, sg in zip(beh, np.asarray(comps.sign))])
    e_y_x = sum(comps.weight[c] * np.outer(np.eye(v)[chosen[c]], mean_x[c]) for c in range(len(chosen)))
    e_x = np.einsum("c,ci->i", comps.weight, mean_x)
    grad = -(e_y_x - np.outer(np.ones(v), e_x) / v)
    np.testing.assert_allclose(traj.w[1], -lr * grad, rtol=0, atol=1e-12)
    np.testing.assert_allclose(traj.grad_norm[0], np.linalg.norm(grad), rtol=1e-12)
    np.testing.assert_allclose(traj.metrics["loss"][0], np.log(v), rtol=0, atol=1e-12)
    np.testing.assert_allclose(traj.metrics["probs"][0], 1.0 / v, atol=1e-12)
    np.testing.assert_allclose(traj.metrics["kl"][0], 0.0, atol=1e-12)


def test_displacement_v3_against_monte_carlo():
    """V = 3: P(log π_W(y_w|x) < log π_{W_0}(y_w|x)) on the indicator rule, within 5e-3 of 10⁶ draws."""
    dist = _dist(8)
    rng = np.random.default_rng(8)
    w0 = rng.normal(size=(3, 3)) * 0.4
    head = dynamics.Head.create(np.zeros((3, 3)), w0)
    traj = _vp().vocab_population_trajectory(dist, head=head, loss_type="sft", lr=0.5, steps=4, record_every=4)
    np.testing.assert_array_equal(traj.metrics["displacement"][0], 0.0)  # W = W_0: nothing is displaced
    x, s, beh = (np.asarray(a) for a in dist.sample(jax.random.key(1), 10**6))
    ch = np.where(s > 0, 0, 1)
    idx = np.arange(len(s))
    lp = _np_logsoftmax((x @ np.asarray(traj.w[-1]).T).T)[ch, idx]
    lp0 = _np_logsoftmax((x @ w0.T).T)[ch, idx]
    for k in range(2):
        mc = np.mean(lp[beh == k] < lp0[beh == k])
        assert abs(float(traj.metrics["displacement"][-1, k]) - mc) <= 5e-3


# ------------------------------------------------------------------------- population ≈ empirical
@pytest.mark.slow
@pytest.mark.parametrize("loss_type,lr", [("sigmoid", 0.2), ("ipo", 0.02), ("sft", 0.2)])
def test_population_matches_empirical_at_large_n(loss_type, lr):
    vocab = pytest.importorskip("dynamics.vocab")
    if not hasattr(vocab, "vocab_empirical_trajectory"):
        pytest.skip("dynamics.vocab.vocab_empirical_trajectory is not available yet")
    dist = _dist(9, scale=0.3)
    rng = np.random.default_rng(9)
    head = dynamics.Head.create(rng.normal(size=(3, 3)) * 0.3)
    kw = dict(head=head, loss_type=loss_type, beta=0.5, lr=lr, steps=10, record_every=5)
    pop = _vp().vocab_population_trajectory(dist, **kw)
    train, _ = vocab.vocab_empirical_trajectory(dist, jax.random.key(0), n=200_000, n_eval=16, **kw)
    # N = 2·10⁵: sampling error ~ N^{-1/2} ≈ 2e-3 per expectation (docs/theory.md §3.4)
    np.testing.assert_allclose(train.loss_total, pop.loss_total, atol=2e-2)
    for name in ("logps/chosen", "rewards/margins", "entropy", "kl"):
        np.testing.assert_allclose(train.mean(name), pop.mean(name), atol=2e-2, err_msg=name)
    np.testing.assert_allclose(train.w, pop.w, atol=2e-2)
    np.testing.assert_allclose(train.grad_norm, pop.grad_norm, atol=2e-2)


# ------------------------------------------------------------------------------------ DPOP's kink
def _dpop_setting(d):
    """V = 3, K = 2 on the pairs (0, 1), (2, 1); W ≠ W_ref so the kink log π(y_w) = log π_ref(y_w) cuts the image."""
    dist = _dist(11, d=d, scale=0.4)
    rng = np.random.default_rng(11)
    w_ref = rng.normal(size=(3, d)) * 0.5
    w = w_ref + rng.normal(size=(3, d)) * 0.4
    return dist, dynamics.Head.create(w_ref, pairs=((0, 1), (2, 1))), w, w_ref


def _np_dpop_mc(dist, w, w_ref, beta, lam, n, seed):
    """NumPy float64 Monte Carlo of DPOP (Smaug Eq. 3) per mixture component: value, ∇_W (analytic per pair), SEs."""
    comps = dist.components()
    pairs = np.array(((0, 1), (2, 1)))
    rng = np.random.default_rng(seed)
    val, var, grad, gvar = 0.0, 0.0, np.zeros_like(w), np.zeros_like(w)
    for c in range(len(comps.weight)):
        pw, sg = float(comps.weight[c]), float(comps.sign[c])
        a, b = pairs[int(comps.behavior[c])]
        ch, rj = (a, b) if sg > 0 else (b, a)
        x = sg * np.asarray(comps.mean[c]) + rng.standard_normal((n, w.shape[1])) @ np.linalg.cholesky(
            np.asarray(comps.cov[c])).T
        lp, lpr = _np_logsoftmax((x @ w.T).T), _np_logsoftmax((x @ w_ref.T).T)
        pen = lpr[ch] - lp[ch]
        arg = beta * ((lp[ch] - lpr[ch]) - (lp[rj] - lpr[rj]) - lam * np.maximum(pen, 0.0))
        f = -log_expit(arg)
        dfd = -expit(-arg) * beta  # ∂f/∂(margin − λ·penalty) · β
        pi = np.exp(lp)
        gz = -(dfd * (1 + lam * (pen > 0)))[None] * pi - (-dfd)[None] * pi  # the −π parts of ∂c/∂z, ∂r/∂z
        gz[ch] += dfd * (1 + lam * (pen > 0))
        gz[rj] -= dfd
        per = np.einsum("vn,ni->nvi", gz, x)
        val += pw * f.mean()
        var += pw**2 * f.var() / n
        grad += pw * per.mean(0)
        gvar += pw**2 * per.var(0) / n
    return val, np.sqrt(var), grad, np.sqrt(gvar)


@pytest.mark.slow
@pytest.mark.parametrize("d", [2, 3])
def test_dpop_kink_split_against_monte_carlo(d):
    """DPOP (λ = 50): value and every gradient entry within 5 standard errors of 3·10⁵ NumPy pairs per component.

    d = 2 is the degenerate image (r = 2 < 2V − 2: no direction moves z_w alone). The smooth Hessian-form rule
    (the kink's Dirac term missed) is planted and must fail the same gradient check (off by > 15 errors).
    """
    dist, head, w, w_ref = _dpop_setting(d)
    beta, lam = 0.5, 50.0
    vp = _vp()
    kw = dict(head=head, loss_type="dpop", beta=beta, dpop_lambda=lam)
    val = float(vp.vocab_population_objective(dist, w, **kw)[0])
    grad = np.asarray(vp.vocab_population_gradient(dist, w, **kw))
    mc, se, g_mc, g_se = _np_dpop_mc(dist, w, w_ref, beta, lam, 300_000, seed=d)
    assert abs(val - mc) <= 5 * se
    assert np.all(np.abs(grad - g_mc) <= 5 * g_se + 1e-12), (grad - g_mc) / g_se
    # planted: the Hessian (smooth) form of the Stein gradient on the tensor rule
    comps, mean_x, chosen, rejected, _ = vp._components(dist, np.array(((0, 1), (2, 1))))
    g = vp._per_node_objective(("dpop",), beta, None, {"dpop_lambda": lam}, 3)
    xi, wt = vp._rule(vp.image_rank(w_ref, d), None, np.float64)
    per_c = jax.jit(jax.vmap(lambda mx, cv, ch, rj: vp._component_cubature(g, w, w_ref, mx, cv, ch, rj, xi, wt)[1]))
    smooth = np.einsum("c,cvi->vi", comps.weight, per_c(mean_x, comps.cov, chosen, rejected))
    assert np.max(np.abs(smooth - g_mc) / g_se) > 15


def test_dpop_gradient_is_the_derivative_of_the_split_value():
    """Central differences of the kink-split value (its split points move with W) vs the first-order gradient.

    The Hessian-form gradient on the smooth rule (the previous implementation) is off by ~0.2 here.
    """
    dist, head, w, _ = _dpop_setting(2)
    vp = _vp()
    kw = dict(head=head, loss_type="dpop", beta=0.5, dpop_lambda=50.0)
    grad = np.asarray(vp.vocab_population_gradient(dist, w, **kw))
    h = 1e-5
    for direction in np.random.default_rng(2).normal(size=(2,) + w.shape):
        fd = (float(vp.vocab_population_objective(dist, w + h * direction, **kw)[0])
              - float(vp.vocab_population_objective(dist, w - h * direction, **kw)[0])) / (2 * h)
        np.testing.assert_allclose(np.sum(grad * direction), fd, rtol=1e-7, atol=1e-8)


def test_dpop_at_the_reference_is_sigmoid():
    """W = W_ref: ρ_w ≡ 0, the penalty is 0 and (relu'(0) = 0, as per pair) the gradient is sigmoid's, exactly."""
    dist, head, _, w_ref = _dpop_setting(2)
    vp = _vp()
    val = float(vp.vocab_population_objective(dist, w_ref, head=head, loss_type="dpop", beta=0.5)[0])
    grad = np.asarray(vp.vocab_population_gradient(dist, w_ref, head=head, loss_type="dpop", beta=0.5))
    exact = np.asarray(vp.vocab_population_gradient(dist, w_ref, head=head, loss_type="sigmoid", beta=0.5))
    np.testing.assert_allclose(val, np.log(2.0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(grad, exact, rtol=0, atol=1e-12)


def test_static_problem_is_a_hashable_jit_key():
    """Equal fields and class ↔ equal and same hash; another class or field differs; a list field is unhashable."""
    sp = _vp().StaticProblem

    class Other(sp):
        pass

    a, b = sp(names=("dpop",), order=None), sp(order=None, names=("dpop",))
    assert a == b and hash(a) == hash(b) and a.names == ("dpop",)
    assert a != sp(names=("dpop",), order=8) and a != Other(names=("dpop",), order=None)
    with pytest.raises(TypeError):
        hash(sp(names=["dpop"]))


# ------------------------------------------------------------------------------------------ errors
def test_bad_input_one_line_errors():
    dist = _dist(0)
    vp = _vp()
    head = dynamics.Head.zeros(3)
    with pytest.raises(ValueError, match="batch-level"):
        vp.vocab_population_trajectory(dist, head=head, loss_type="aot_unpaired", steps=1)
    with pytest.raises(ValueError, match="alone"):
        vp.vocab_population_trajectory(dist, head=head, loss_type=["sigmoid", "aot"], steps=1)
    with pytest.raises(ValueError, match="loss_weights"):
        vp.vocab_population_trajectory(dist, head=head, loss_type=["sigmoid", "sft"], loss_weights=[1.0], steps=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        vp.vocab_population_trajectory(dist, head=head, loss_type="sigmoid", label_smoothing=0.1, steps=1)
    with pytest.raises(ValueError, match="sigmod|sigmoid"):
        vp.vocab_population_trajectory(dist, head=head, loss_type="sigmod", steps=1)
    with pytest.raises(ValueError, match="d = 4"):
        vp.vocab_population_trajectory(dist, head=dynamics.Head.zeros(4), steps=1)
    with pytest.raises(ValueError, match="beta"):
        vp.vocab_population_trajectory(dist, head=head, beta=-1.0, steps=1)
    with pytest.raises(ValueError, match="w has shape"):
        vp.vocab_population_objective(dist, np.zeros((3, 3)), head=head)
