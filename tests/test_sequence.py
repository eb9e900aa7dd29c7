"""Responses of L ≥ 1 positions (dynamics.sequence): sequence log-probs, squeezing, CHES.

Checked against: the single-token layer (dynamics.vocab) at L = 1, ρ = 1 (same key, same pairs);
an independent float64 NumPy objective with central finite differences on the full head; the exact
cubature at ρ = 1 (the QMC rule's error); the empirical layer at large N (population, ρ < 1); the
O(η²) remainder of the first-order (NTK) decomposition; a hand-made squeezing case; E[CHES] in
closed form vs Monte Carlo.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from dynamics import sequence as sq
from conftest import random_dist


@pytest.fixture(autouse=True)
def _x64(x64):
    yield


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_seq_logps(w, x, y):
    """Σ_t log softmax(W x_t)[y_t]: x (n, L, d), y (n, L) → (n,)."""
    lp = np_log_softmax(x @ w.T)
    return np.take_along_axis(lp, y[..., None], axis=-1)[..., 0].sum(axis=-1)


def np_tokens(table, beh, s):
    table = np.asarray(table)
    a, b = table[beh, 0], table[beh, 1]
    pos = (s > 0)[:, None]
    return np.where(pos, a, b), np.where(pos, b, a)


def np_objective(name, w, w_ref, xc, xr, yc, yr, beta, length):
    """Mean objective over the pairs, by hand (TRL: sigmoid; simpo with per-token averages, γ = 0.5)."""
    c, r = np_seq_logps(w, xc, yc), np_seq_logps(w, xr, yr)
    if name == "sigmoid":
        h = (c - np_seq_logps(w_ref, xc, yc)) - (r - np_seq_logps(w_ref, xr, yr))
        return np.mean(np.logaddexp(0.0, -beta * h))
    assert name == "simpo"
    q = c / length - r / length - 0.5 / beta
    return np.mean(np.logaddexp(0.0, -beta * q))


def _setup(rng, k=2, d=3, v=3, length=2, rho=0.5):
    base = random_dist(rng, k, d)
    tokens = rng.integers(0, v, size=(k, 2, length))
    tokens[:, 1, 0] = (tokens[:, 0, 0] + 1) % v  # the two sequences differ
    head = dd.Head.create(rng.normal(size=(v, d)) * 0.4, rng.normal(size=(v, d)) * 0.4)
    return sq.SequencePreference.create(base, length=length, rho=rho, tokens=tokens), head


# ------------------------------------------------------------------------------------- L = 1, ρ = 1 reduction
def test_single_position_shared_context_is_the_vocab_layer(rng):
    base = random_dist(rng, 2, 3)
    head = dd.Head.create(rng.normal(size=(3, 3)) * 0.3, pairs=[(0, 1), (2, 0)])
    dist = sq.SequencePreference.create(base, length=1, rho=1.0)
    key = jax.random.key(7)
    kw = dict(head=head, loss_type="sigmoid", beta=0.7, lr=0.3, steps=4, n=48, n_eval=24)
    seq = sq.sequence_empirical_trajectory(dist, key, **kw)
    ref = dd.vocab_empirical_trajectory(base, key, **kw)
    # the same pairs: base.sample(key) is the prompt part, and at ρ = 1 every context is it
    xc, xr, s, beh = dist.sample(key, 16)
    x0, s0, b0 = base.sample(key, 16)
    np.testing.assert_array_equal(np.asarray(xc[:, 0]), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(xr[:, 0]), np.asarray(x0))
    for got, want in zip(seq, ref):
        np.testing.assert_allclose(got.w, want.w, rtol=0, atol=1e-13)
        np.testing.assert_allclose(got.loss_total, want.loss_total, rtol=0, atol=1e-13)
        np.testing.assert_allclose(got.grad_norm, want.grad_norm, rtol=0, atol=1e-13)
        for name, val in want.metrics.items():
            np.testing.assert_allclose(got.metrics[name], val, rtol=0, atol=1e-13, err_msg=name)
    # CHES is exactly 0 with one shared context (H⁺ = H⁻)
    np.testing.assert_allclose(seq[0].metrics["ches"], 0.0, atol=1e-12)


# ------------------------------------------------------------------------ objective and gradient vs NumPy
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_sequence_objective_and_gradient_vs_numpy(rng, loss_type):
    dist, head = _setup(rng)
    key = jax.random.key(3)
    n, beta, lr = 40, 0.8, 0.05
    out, _ = sq.sequence_empirical_trajectory(dist, key, head=head, loss_type=loss_type, beta=beta, lr=lr, steps=1,
                                              n=n, n_eval=8)
    xc, xr, s, beh = (np.asarray(a) for a in dist.sample(jax.random.split(key, 3)[0], n))
    yc, yr = np_tokens(dist.tokens, beh, s)
    w0, w_ref = np.asarray(head.w_init), np.asarray(head.w_ref)
    f = lambda w: np_objective(loss_type, w, w_ref, xc, xr, yc, yr, beta, dist.length)
    np.testing.assert_allclose(float(out.loss_total[0]), f(w0), rtol=1e-12)
    eps = 1e-6
    fd = np.zeros_like(w0)
    for i in np.ndindex(*w0.shape):
        e = np.zeros_like(w0)
        e[i] = eps
        fd[i] = (f(w0 + e) - f(w0 - e)) / (2 * eps)
    grad = (w0 - np.asarray(out.w[1])) / lr  # one GD step
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-8)
    np.testing.assert_allclose(float(out.grad_norm[0]), np.linalg.norm(fd), rtol=1e-7)
    # sequence metrics: logps/chosen per behaviour by hand
    c = np_seq_logps(w0, xc, yc)
    for j in range(dist.num_behaviors):
        np.testing.assert_allclose(float(out.metrics["logps/chosen"][0, j]), c[beh == j].mean(), rtol=1e-12)


# --------------------------------------------------------------------------------------- population layer
def test_qmc_and_margin_rules_match_the_cubature_at_rho_one(rng):
    dist, head = _setup(rng, k=1, d=2, v=3, length=2, rho=1.0)
    kw = dict(head=head, loss_type="sigmoid", beta=1.0, lr=0.5, steps=2)
    exact = sq.sequence_population_trajectory(dist, method="cubature", **kw)
    qmc = sq.sequence_population_trajectory(dist, method="qmc", qmc_points=4096, **kw)
    # stated error (docs/theory.md §9.4): smooth metrics ≤ 2e-3 at 4096 scrambled-Sobol points
    for name in ("loss", "logps/chosen", "logps/rejected", "entropy", "kl", "squeeze/argmax_prob"):
        np.testing.assert_allclose(qmc.metrics[name], exact.metrics[name], rtol=0, atol=2e-3, err_msg=name)
    np.testing.assert_allclose(qmc.w, exact.w, rtol=0, atol=2e-3)
    # a margin-only objective at ρ = 1: the exact 1-D integrals (method="margin", auto) vs the cubature
    margin = sq.sequence_population_trajectory(dist, **kw)
    np.testing.assert_allclose(margin.w, exact.w, rtol=0, atol=1e-9)
    np.testing.assert_allclose(margin.loss_total, exact.loss_total, rtol=0, atol=1e-9)
    np.testing.assert_allclose(margin.grad_norm, exact.grad_norm, rtol=0, atol=1e-9)


@pytest.mark.slow  # N = 1e5 pairs of 2 positions: ~30 s on the loaded CI machine
def test_population_vs_empirical_at_large_n(rng):
    dist, head = _setup(rng, k=2, d=2, v=3, length=2, rho=0.5)
    kw = dict(head=head, loss_type="sigmoid", beta=1.0, lr=0.5, steps=2)
    n, key = 100_000, jax.random.key(0)
    pop = sq.sequence_population_trajectory(dist, qmc_points=4096, **kw)
    emp, _ = sq.sequence_empirical_trajectory(dist, key, n=n, n_eval=8, **kw)
    xc, xr, s, beh = (np.asarray(a) for a in dist.sample(jax.random.split(key, 3)[0], n))
    yc, yr = np_tokens(dist.tokens, beh, s)
    # sequence log-probs: 5 standard errors of the N = 1e5 sample (sd measured here) + the QMC error (2e-3)
    for t in range(3):
        w = np.asarray(emp.w[t])
        for name, val in (("logps/chosen", np_seq_logps(w, xc, yc)), ("logps/rejected", np_seq_logps(w, xr, yr))):
            for j in range(2):
                sel = val[beh == j]
                tol = 5 * sel.std() / np.sqrt(sel.size) + 2e-3
                assert abs(float(pop.metrics[name][t, j]) - float(emp.metrics[name][t, j])) < tol, (name, t, j)
    # bounded metrics (sd ≤ 1/2, per-behaviour N ≥ 2e4): 5 standard errors ≤ 2e-2
    for name in ("loss", "rewards/accuracies", "displacement", "squeeze/argmax_prob", "squeeze/argmax_change"):
        np.testing.assert_allclose(pop.metrics[name], emp.metrics[name], rtol=0, atol=2e-2, err_msg=name)
    np.testing.assert_allclose(pop.metrics["ches"], emp.metrics["ches"], rtol=5e-2)
    np.testing.assert_allclose(pop.w, emp.w, rtol=0, atol=2e-2)


@pytest.mark.slow  # two cubature compilations: ~40 s on the loaded CI machine
def test_population_single_position_shared_context_is_the_vocab_population_layer(rng):
    base = random_dist(rng, 2, 2)
    head = dd.Head.create(rng.normal(size=(3, 2)) * 0.3, pairs=[(0, 1), (2, 0)])
    dist = sq.SequencePreference.create(base, length=1, rho=1.0)
    for loss_type in ("sigmoid", "apo_zero"):  # the exact 1-D margin path, and the cubature
        kw = dict(head=head, loss_type=loss_type, beta=0.7, lr=0.3, steps=3)
        got = sq.sequence_population_trajectory(dist, **kw)
        want = dd.vocab_population_trajectory(base, **kw)
        np.testing.assert_allclose(got.w, want.w, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got.loss_total, want.loss_total, rtol=0, atol=1e-10)
        for name in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies", "kl"):
            np.testing.assert_allclose(got.metrics[name], want.metrics[name], rtol=0, atol=1e-8, err_msg=name)


def test_expected_ches_closed_form_vs_monte_carlo(rng):
    dist, _ = _setup(rng, k=2, d=3, length=3, rho=0.3)
    sample = jax.jit(lambda key: dist.sample(key, 100_000))  # compiled: eager sampling dispatches op by op
    xc, xr, s, beh = (np.asarray(a) for a in sample(jax.random.key(5)))
    hc, hr = xc.sum(1), xr.sum(1)
    ches = (hc * hr).sum(-1) - (hc * hc).sum(-1)
    want = np.asarray(sq.expected_ches(dist))
    for j in range(2):
        sel = ches[beh == j]
        assert abs(sel.mean() - want[j]) < 5 * sel.std() / np.sqrt(sel.size)


# ---------------------------------------------------------------------------------- Ren & Sutherland, exact
def test_decomposition_is_first_order_exact(rng):
    dist, head = _setup(rng)
    key = jax.random.key(11)
    n = 40
    xc, xr, s, beh = dist.sample(jax.random.split(key, 3)[0], n)
    yc, yr = np_tokens(dist.tokens, np.asarray(beh), np.asarray(s))
    w0 = np.asarray(head.w_init)
    errs = []
    for lr in (0.4, 0.2, 0.1):
        out, _ = sq.sequence_empirical_trajectory(dist, key, head=head, beta=0.8, lr=lr, steps=1, n=n, n_eval=8)
        dec = sq.sequence_logp_change_decomposition(w0, xc, yc, (xc, xr, yc, yr), w_ref=head.w_ref, beta=0.8,
                                                     lr=lr)
        actual = np_seq_logps(np.asarray(out.w[1]), np.asarray(xc), yc) - np_seq_logps(w0, np.asarray(xc), yc)
        np.testing.assert_allclose(np.asarray(dec["terms"]).sum(axis=(1, 2)), dec["first_order"], rtol=1e-12)
        errs.append(np.max(np.abs(np.asarray(dec["first_order"]) - actual)))
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert np.all((ratios > 3.5) & (ratios < 4.5)), (errs, ratios)


# -------------------------------------------------------------------------------------------------- squeezing
def test_squeezing_pushes_mass_to_the_argmax_at_rejected_positions():
    # one behaviour, s = +1 always; context x = (1, g), g ~ N(0, I_20) per position (ρ = 0): a "bias"
    # coordinate and a private part; token 0 is the argmax (π ≈ 0.79), chosen 1, rejected 2 (π ≈ 0.11)
    d = 21
    mu = np.zeros((1, d))
    mu[0, 0] = 1.0
    cov = np.diag(np.r_[0.0, np.ones(d - 1)])[None]
    base = dd.GaussianPreference.create(mu, mu, cov, cov, p_pos=1.0)
    dist = sq.SequencePreference.create(base, length=1, rho=0.0, tokens=[[[1], [2]]])
    w0 = np.zeros((3, d))
    w0[0, 0] = 2.0
    head = dd.Head.create(w0)
    n, lr = 4, 0.02
    out, _ = sq.sequence_empirical_trajectory(dist, jax.random.key(0), head=head, lr=lr, steps=1, n=n, n_eval=4)
    xc, xr, _, _ = (np.asarray(a) for a in dist.sample(jax.random.split(jax.random.key(0), 3)[0], n))
    w1 = np.asarray(out.w[1])
    p0, p1 = np.exp(np_log_softmax(xr[:, 0] @ w0.T)), np.exp(np_log_softmax(xr[:, 0] @ w1.T))
    assert np.all(p1[:, 0] > p0[:, 0]) and np.all(p1[:, 2] < p0[:, 2])  # squeezed onto the argmax
    np.testing.assert_allclose(float(out.metrics["squeeze/argmax_change"][1, 0]), (p1[:, 0] - p0[:, 0]).mean(),
                               rtol=1e-10)
    assert float(out.metrics["squeeze/argmax_change"][1, 0]) > 0
    np.testing.assert_allclose(float(out.metrics["squeeze/argmax_prob"][1, 0]), p1.max(1).mean(), rtol=1e-12)
    # at the chosen positions the argmax loses mass (the chosen token gains): the metric is on rejected ones
    q0, q1 = np.exp(np_log_softmax(xc[:, 0] @ w0.T)), np.exp(np_log_softmax(xc[:, 0] @ w1.T))
    assert np.all(q1[:, 0] < q0[:, 0])


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_one_line_errors(rng):
    base = random_dist(rng, 2, 3)
    with pytest.raises(ValueError, match="rho"):
        sq.SequencePreference.create(base, length=2, rho=1.5)
    with pytest.raises(ValueError, match="tokens has shape"):
        sq.SequencePreference.create(base, length=2, tokens=[[[0, 1], [1, 0]]])
    with pytest.raises(ValueError, match="identical"):
        sq.SequencePreference.create(base, length=1, tokens=[[[0], [0]], [[0], [1]]])
    dist = sq.SequencePreference.create(base, length=1, rho=0.5)
    with pytest.raises(ValueError, match="cubature"):
        sq.sequence_population_trajectory(dist, head=dd.Head.zeros(3, 3), method="cubature", steps=1)
    with pytest.raises(ValueError, match="method"):
        sq.sequence_population_trajectory(dist, head=dd.Head.zeros(3, 3), method="cubatur", steps=1)
    shared = sq.SequencePreference.create(base, length=1, rho=1.0)
    with pytest.raises(ValueError, match="margin-only"):
        sq.sequence_population_trajectory(shared, head=dd.Head.zeros(3, 3), method="margin", loss_type="sft", steps=1)
    with pytest.raises(ValueError, match="SequencePreference"):
        sq.sequence_empirical_trajectory(base, jax.random.key(0), head=dd.Head.zeros(3, 3), steps=1)


# ------------------------------------------------------------------------------------------- study part (c)
@pytest.mark.slow  # three compilations (one per V): ~30 s idle, ~100 s on the loaded CI machine
def test_run_part_c_quick(tmp_path):
    import json

    from sims.squeezing import RHOS, VOCAB_SIZES, run_part_c

    out = run_part_c(True, tmp_path)
    json.dumps(out)  # serialisable
    assert (tmp_path / "displacement_c.png").stat().st_size > 0
    for split in ("train", "eval"):
        d = out["split"][split]
        assert np.shape(d["squeeze_argmax_change"]) == (len(VOCAB_SIZES), len(RHOS))
        # CHES is the closed form −L (1 − ρ) tr S (tr S = d/2 here) within sampling error
        want = -out["length"] * (1 - np.asarray(RHOS)) * out["dim"] / 2
        np.testing.assert_allclose(d["ches"], np.broadcast_to(want, (3, 3)), rtol=0, atol=1.5)
        assert np.all(np.asarray(d["squeeze_argmax_change"]) > 0)  # squeezing at every (V, ρ)
