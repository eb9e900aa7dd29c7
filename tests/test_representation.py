"""A trainable representation ``x = A φ`` under the V-token head (dynamics/representation.py, docs/theory.md §10).

References independent of the code under test: central finite differences of the population loss, the
existing last-layer population layer on the hand-built law of ``x = A_0 φ``, Monte Carlo (the empirical
layer at N = 2·10⁵ against the population layer, with a stated tolerance), the closed form of LoRA's first
step, a NumPy float64 two-layer trainer written here, and NumPy moments of ``A φ``.
"""
import jax
import numpy as np
import pytest
from scipy.special import expit, log_expit, logsumexp

import dynamics as dd

pytestmark = pytest.mark.usefixtures("x64")


def _dist(seed=0, k=2, d=2):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(2, k, d, d)) * 0.5
    cov = a @ np.swapaxes(a, -1, -2) + 0.3 * np.eye(d)
    return dd.GaussianPreference.create(rng.normal(size=(k, d)), rng.normal(size=(k, d)), cov[0], cov[1],
                                        p_pos=np.linspace(0.65, 0.35, k), weight=np.full(k, 1.0 / k))


def _setup(seed=0, v=2, d=3, d_phi=2, k=2, pairs=None):
    rng = np.random.default_rng(seed + 100)
    dist = _dist(seed, k, d_phi)
    w_ref = rng.normal(size=(v, d)) * 0.5
    w0 = w_ref + rng.normal(size=(v, d)) * 0.2  # W_0 ≠ W_ref: the reference is a given pair (A_ref, W_ref)
    a0 = rng.normal(size=(d, d_phi)) / np.sqrt(d_phi)
    head = dd.Head.create(w_ref, w0, pairs=pairs)
    return dist, head, a0


def _np_law_of_x(dist, a):
    """The GaussianPreference of x = A φ, built by hand (mean A μ, covariance A Σ Aᵀ)."""
    mp, mn = np.asarray(dist.mu_pos), np.asarray(dist.mu_neg)
    cp, cn = np.asarray(dist.cov_pos), np.asarray(dist.cov_neg)
    sym = lambda c: (c + np.swapaxes(c, -1, -2)) / 2
    return dd.GaussianPreference.create(mp @ a.T, mn @ a.T, sym(a @ cp @ a.T), sym(a @ cn @ a.T),
                                        p_pos=np.asarray(dist.p_pos), weight=np.asarray(dist.weight))


# ---------------------------------------------------------------------------------------------- population gradient
@pytest.mark.parametrize("loss_type,v", [("sigmoid", 2), ("nca_pair", 3)])
def test_population_gradient_matches_finite_differences(loss_type, v):
    """One GD step moves (W, A) by −η ∇; ∇ equals central differences of the step-0 population loss in W_0, A_0
    (references W_ref, A_ref held fixed). sigmoid: exact 1-D integrals; nca_pair: the Stein cubature."""
    pairs = [(0, 1), (2, 1)] if v == 3 else None
    dist, head, a0 = _setup(1, v=v, pairs=pairs)
    a_ref = a0 + 0.1
    lr_w, lr_a = 0.3, 0.2
    rep = dd.Representation.create(a0, a_ref)
    kw = dict(loss_type=loss_type, beta=0.7, lr_head=lr_w, lr_adapter=lr_a)
    one = dd.representation_population_trajectory(dist, head=head, representation=rep, steps=1, **kw)
    g_w = -(np.asarray(one.w[1]) - np.asarray(head.w_init)) / lr_w
    g_a = -(np.asarray(one.a[1]) - a0) / lr_a

    def loss(w0, a):
        h = head.replace(w_init=w0)
        r = dd.Representation.create(a, a_ref)
        return float(dd.representation_population_trajectory(dist, head=h, representation=r, steps=1,
                                                             **kw).loss_total[0])  # steps=1: one compilation

    eps = 1e-5
    w0 = np.asarray(head.w_init)
    fd_w = np.zeros_like(w0)
    for idx in np.ndindex(*w0.shape):
        e = np.zeros_like(w0)
        e[idx] = eps
        fd_w[idx] = (loss(w0 + e, a0) - loss(w0 - e, a0)) / (2 * eps)
    fd_a = np.zeros_like(a0)
    for idx in np.ndindex(*a0.shape):
        e = np.zeros_like(a0)
        e[idx] = eps
        fd_a[idx] = (loss(w0, a0 + e) - loss(w0, a0 - e)) / (2 * eps)
    assert np.abs(g_w).max() > 1e-2 and np.abs(g_a).max() > 1e-2  # a real gradient in both
    np.testing.assert_allclose(g_w, fd_w, atol=1e-7)
    np.testing.assert_allclose(g_a, fd_a, atol=1e-7)
    np.testing.assert_allclose(float(one.grad_norm[0]), np.sqrt(np.sum(fd_w**2) + np.sum(fd_a**2)), rtol=1e-6)
    # one G behind both gradients: the first-order change of WᵀW − AAᵀ vanishes (docs/theory.md §10.3)
    np.testing.assert_allclose(g_w.T @ w0 + w0.T @ g_w, g_a @ a0.T + a0 @ g_a.T, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- frozen = last layer
@pytest.mark.parametrize("loss_type,optimizer,lr", [("sigmoid", "sgd", 0.2), ("dpop", "adam", 0.01)])
def test_frozen_representation_is_the_last_layer_model(loss_type, optimizer, lr):
    """lr_adapter = 0 is today's V-token population layer on the hand-built law of x = A_0 φ, step by step."""
    dist, head, a0 = _setup(2)
    rep = dd.Representation.create(a0)
    steps = 4
    got = dd.representation_population_trajectory(dist, head=head, representation=rep, loss_type=loss_type,
                                                  beta=0.8, lr_head=lr, lr_adapter=0.0, steps=steps,
                                                  optimizer=optimizer)
    ref = dd.vocab_population_trajectory(_np_law_of_x(dist, a0), head=head, loss_type=loss_type, beta=0.8, lr=lr,
                                         steps=steps, optimizer=optimizer)
    np.testing.assert_array_equal(np.asarray(got.a), np.broadcast_to(a0, got.a.shape))
    np.testing.assert_allclose(got.w, ref.w, rtol=0, atol=1e-11)
    np.testing.assert_allclose(got.loss_total, ref.loss_total, rtol=0, atol=1e-11)
    assert float(ref.loss_total[-1]) < float(ref.loss_total[0]) - 1e-3  # it trains
    for name in ("logps/chosen", "rewards/margins", "rewards/accuracies", "kl", "loss"):
        np.testing.assert_allclose(got.metrics[name], ref.metrics[name], rtol=0, atol=1e-9, err_msg=name)


# ---------------------------------------------------------------------------------------------- population vs empirical
def test_population_matches_empirical_at_large_n():
    """The empirical layer at N = 2·10⁵ follows the population layer: |Δ| ≤ 1e-2 on the loss, margins, accuracy
    and the final (W, A) (the Monte Carlo error is ~ N^{−1/2} ≈ 2e-3 times O(1) scales)."""
    dist, head, a0 = _setup(3)
    rep = dd.Representation.create(a0)
    kw = dict(loss_type="sigmoid", beta=1.0, lr_head=0.5, lr_adapter=0.5, steps=10, record_every=5)
    pop = dd.representation_population_trajectory(dist, head=head, representation=rep, **kw)
    emp, _ = dd.representation_empirical_trajectory(dist, jax.random.key(0), head=head, representation=rep,
                                                    n=200_000, n_eval=16, **kw)
    assert float(pop.loss_total[0] - pop.loss_total[-1]) > 0.03  # the run moves
    assert float(np.abs(np.asarray(pop.a[-1]) - a0).max()) > 0.05  # and so does A
    np.testing.assert_allclose(emp.loss_total, pop.loss_total, atol=1e-2)
    for name in ("rewards/margins", "rewards/accuracies", "logps/chosen", "distinguishability"):
        np.testing.assert_allclose(emp.metrics[name], pop.metrics[name], atol=1e-2, err_msg=name)
    np.testing.assert_allclose(emp.w[-1], pop.w[-1], atol=1e-2)
    np.testing.assert_allclose(emp.a[-1], pop.a[-1], atol=1e-2)


# ---------------------------------------------------------------------------------------------- low rank vs full
def test_low_rank_full_rank_same_loss_different_dynamics():
    """r = min(d, d_φ): at the same effective A the loss is the same; the first LoRA step from B = 0 moves A by
    ΔB C = ΔA_full Cᵀ C (the full gradient preconditioned by CᵀC), not by ΔA_full; W moves the same."""
    dist, head, a0 = _setup(4)
    d, d_phi = a0.shape
    r = min(d, d_phi)
    rng = np.random.default_rng(7)
    b, c = rng.normal(size=(d, r)) * 0.3, rng.normal(size=(r, d_phi)) * 0.6
    a_eff = a0 + b @ c
    kw = dict(loss_type="sigmoid", beta=0.9, lr_head=0.1, lr_adapter=0.1)
    lora = dd.Representation.create(a0, a_ref=a0, rank=r, b_init=b, c_init=c)
    full = dd.Representation.create(a_eff, a_ref=a0)
    l_lora = dd.representation_population_trajectory(dist, head=head, representation=lora, steps=0, **kw)
    l_full = dd.representation_population_trajectory(dist, head=head, representation=full, steps=0, **kw)
    np.testing.assert_allclose(l_lora.loss_total, l_full.loss_total, rtol=0, atol=1e-13)
    np.testing.assert_allclose(l_lora.a[0], a_eff, rtol=0, atol=1e-13)
    # the first step from LoRA's start B = 0, against the full parametrisation at the same A = A_0
    lora0 = dd.Representation.create(a0, rank=r, c_init=c)
    s_lora = dd.representation_population_trajectory(dist, head=head, representation=lora0, steps=1, **kw)
    s_full = dd.representation_population_trajectory(dist, head=head, representation=dd.Representation.create(a0),
                                                     steps=1, **kw)
    da_full = np.asarray(s_full.a[1]) - a0
    da_lora = np.asarray(s_lora.a[1]) - a0
    np.testing.assert_allclose(s_lora.w[1], s_full.w[1], rtol=0, atol=1e-13)
    np.testing.assert_allclose(da_lora, da_full @ c.T @ c, rtol=0, atol=1e-13)
    assert np.abs(da_lora - da_full).max() > 1e-2 * np.abs(da_full).max()
    np.testing.assert_array_equal(np.asarray(s_lora.params["c"]), c)  # ∇_C = Bᵀ Wᵀ ∇_M = 0 at B = 0


# ---------------------------------------------------------------------------------------------- NumPy trainer
def _np_two_layer_dpo(phi, s, beh, pairs, w0, a0, w_ref, a_ref, beta, lr_w, lr_a, steps):
    """Plain full-batch GD on the DPO sigmoid loss of logits φ (W A)ᵀ; NumPy float64, gradients by hand."""
    n = phi.shape[0]
    rows = np.arange(n)
    ab = pairs[beh]
    c, r = np.where(s > 0, ab[:, 0], ab[:, 1]), np.where(s > 0, ab[:, 1], ab[:, 0])
    zr = phi @ (w_ref @ a_ref).T
    lpr = zr - logsumexp(zr, axis=1, keepdims=True)
    w, a, losses = w0.copy(), a0.copy(), []
    for t in range(steps + 1):
        z = phi @ (w @ a).T
        lp = z - logsumexp(z, axis=1, keepdims=True)
        h = beta * ((lp[rows, c] - lpr[rows, c]) - (lp[rows, r] - lpr[rows, r]))
        losses.append(np.mean(-log_expit(h)))
        if t == steps:
            break
        coef = -expit(-h) * beta / n  # ∂(mean loss)/∂h_i; ∂h/∂z = β (e_c − e_r): the softmax terms cancel
        g = np.zeros_like(z)
        np.add.at(g, (rows, c), coef)
        np.add.at(g, (rows, r), -coef)
        g_m = g.T @ phi  # (V, d_φ)
        w, a = w - lr_w * g_m @ a.T, a - lr_a * w.T @ g_m
    return np.array(losses), w, a


@pytest.mark.parametrize("v,pairs,lr_w", [(2, None, 0.4), (3, [(0, 1), (2, 0)], 0.4), (2, None, 0.0)])
def test_empirical_layer_matches_numpy_two_layer_trainer(v, pairs, lr_w):
    """Full-batch GD, per-group rates (lr_head = 0: the head is frozen, only A trains)."""
    dist, head, a0 = _setup(5, v=v, pairs=pairs)
    a_ref = a0 * 0.9
    rep = dd.Representation.create(a0, a_ref)
    n, steps, key = 256, 8, jax.random.key(3)
    tr, _ = dd.representation_empirical_trajectory(dist, key, head=head, representation=rep, loss_type="sigmoid",
                                                   beta=0.8, lr_head=lr_w, lr_adapter=0.7, steps=steps, n=n,
                                                   n_eval=8)
    phi, s, beh = (np.asarray(t) for t in dd.vocab.sample_pairs(dist, jax.random.split(key, 3)[0], n))
    table = np.asarray(head.token_pairs(dist.num_behaviors))
    losses, w, a = _np_two_layer_dpo(phi, s, beh, table, np.asarray(head.w_init), a0, np.asarray(head.w_ref), a_ref,
                                     0.8, lr_w, 0.7, steps)
    assert losses[-1] < losses[0] - 1e-3
    np.testing.assert_allclose(tr.loss_total, losses, rtol=0, atol=1e-10)
    np.testing.assert_allclose(tr.params["w"], w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(tr.params["a"], a, rtol=0, atol=1e-10)
    np.testing.assert_allclose(tr.a[-1], a, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------- properties
def test_representation_properties_closed_form():
    """‖A(μ⁺ − μ⁻)‖, max tr AΣAᵀ and max ‖AΣAᵀ‖_op against NumPy, and the trajectory's records at its A."""
    dist, head, a0 = _setup(6, k=3)
    a = np.random.default_rng(1).normal(size=(4, 2))
    got = dd.representation_properties(dist, a)
    mp, mn, cp, cn = (np.asarray(x) for x in (dist.mu_pos, dist.mu_neg, dist.cov_pos, dist.cov_neg))
    np.testing.assert_allclose(got["distinguishability"], np.linalg.norm((mp - mn) @ a.T, axis=1), rtol=1e-12)
    tr = lambda c: np.trace(a @ c @ a.T, axis1=-2, axis2=-1)
    np.testing.assert_allclose(got["cov_trace"], np.maximum(tr(cp), tr(cn)), rtol=1e-12)
    op = lambda c: np.linalg.eigvalsh(a @ c @ a.T)[..., -1]
    np.testing.assert_allclose(got["concentration"], np.maximum(op(cp), op(cn)), rtol=1e-12)
    # the empirical layer records them at each recorded A (of the law, closed form)
    rep = dd.Representation.create(a0)
    traj, _ = dd.representation_empirical_trajectory(dist, jax.random.key(0), head=head.replace(pairs=None),
                                                     representation=rep, lr_head=0.5, lr_adapter=0.5, steps=2, n=64,
                                                     n_eval=8, record_every=2)
    a_last = np.asarray(traj.a[-1])
    np.testing.assert_allclose(traj.metrics["distinguishability"][-1],
                               np.linalg.norm((mp - mn) @ a_last.T, axis=1), rtol=1e-12)


def test_lora_initialisation():
    a0 = np.ones((3, 4))
    rep = dd.Representation.create(a0, rank=2, key=jax.random.key(0))
    assert rep.rank == 2 and np.all(np.asarray(rep.b_init) == 0.0)
    c = np.asarray(rep.c_init)
    assert c.shape == (2, 4) and np.abs(c).max() <= 0.5 and np.abs(c).min() > 0  # U(−1/√d_φ, 1/√d_φ)
    np.testing.assert_array_equal(np.asarray(rep.a_ref), a0)  # A_ref = A_0 + B_0 C_0 = A_0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("build,match", [
    (lambda: dd.Representation.create(np.ones(3)), "a_init has shape"),
    (lambda: dd.Representation.create(np.ones((3, 2)), np.ones((2, 3))), "a_ref has shape"),
    (lambda: dd.Representation.create(np.ones((3, 2)), rank=0, key=jax.random.key(0)), "rank must be >= 1"),
    (lambda: dd.Representation.create(np.ones((3, 2)), rank=3, key=jax.random.key(0)),
     r"rank = 3 exceeds min\(d, d_phi\) = 2"),
    (lambda: dd.Representation.create(np.ones((3, 2)), rank=1), "neither c_init nor key"),
    (lambda: dd.Representation.create(np.ones((3, 2)), rank=1, c_init=np.ones((2, 2))), "c_init has shape"),
    (lambda: dd.Representation.create(np.ones((3, 2)), c_init=np.ones((1, 2))), "pass rank=r"),
])
def test_bad_representation(build, match):
    with pytest.raises(ValueError, match=match) as err:
        build()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kw,match", [
    (dict(head_d=4), "head has d = 4 but the representation maps to d = 3"),
    (dict(phi_d=3), "reads d_phi = 3 but the distribution has d = 2"),
    (dict(lr_head=-0.1), "lr_head must be >= 0"),
    (dict(lr_adapter=-1.0), "lr_adapter must be >= 0"),
    (dict(lr_head=0.0, lr_adapter=0.0), "both 0"),
    (dict(representation="A"), "representation must be a dynamics.Representation"),
])
@pytest.mark.parametrize("layer", ["population", "empirical"])
def test_bad_trajectory_input(kw, match, layer):
    kw = dict(kw)
    dist = _dist(0)
    head = dd.Head.zeros(kw.pop("head_d", 3))
    rep = kw.pop("representation", None) or dd.Representation.create(np.ones((3, kw.pop("phi_d", 2))))
    args = dict(head=head, representation=rep, steps=1, **kw)
    with pytest.raises(ValueError, match=match) as err:
        if layer == "population":
            dd.representation_population_trajectory(dist, **args)
        else:
            dd.representation_empirical_trajectory(dist, jax.random.key(0), n=8, n_eval=8, **args)
    assert "\n" not in str(err.value)
