"""dynamics.priority: the covariance-aware priority score (docs/theory.md §4.4).

The τ-series of every behaviour's loss is checked against finite differences of the
population layer's own gradient flow (RK4, float64), and the formulas against an
independent float64 NumPy computation from the raw distribution parameters.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd


def _random_dist(rng, k=3, d=5, balanced=False):
    """K behaviours with midpoints, anisotropic Σ⁺ ≠ Σ⁻, unbalanced p, unequal weights (float64)."""
    b = rng.normal(size=(k, d)) * rng.uniform(0.5, 2.0, size=(k, 1)) / np.sqrt(d)
    mid = 0.4 * rng.normal(size=(k, d)) / np.sqrt(d)

    def cov():
        a = rng.normal(size=(k, d, d)) / np.sqrt(d)
        return a @ np.swapaxes(a, -1, -2) * rng.uniform(0.3, 1.5, size=(k, 1, 1)) + 0.1 * np.eye(d)

    p = np.full(k, 0.5) if balanced else rng.uniform(0.25, 0.75, size=k)
    w = rng.dirichlet(np.full(k, 3.0))
    return dd.GaussianPreference(jnp.asarray(mid + b / 2), jnp.asarray(mid - b / 2), jnp.asarray(cov()),
                                 jnp.asarray(cov()), jnp.asarray(p), jnp.asarray(w))


def _numpy_series(dist, l1, l2):
    """(r_k, a_k) from the raw parameters in float64 NumPy (nothing from the package)."""
    mp, mn = np.asarray(dist.mu_pos, float), np.asarray(dist.mu_neg, float)
    cp, cn = np.asarray(dist.cov_pos, float), np.asarray(dist.cov_neg, float)
    p, w = np.asarray(dist.p_pos, float), np.asarray(dist.weight, float)
    m_k = p[:, None] * mp - (1 - p)[:, None] * mn  # E[s x | k]
    outer = lambda m: np.einsum("ki,kj->kij", m, m)
    mk2 = p[:, None, None] * (cp + outer(mp)) + (1 - p)[:, None, None] * (cn + outer(mn))  # E[zzᵀ|k]
    m_bar = w @ m_k
    m2 = np.einsum("k,kij->ij", w, mk2)
    r = -2 * l1**2 * m_k @ m_bar
    a = 4 * l1**2 * l2 * (np.einsum("i,kij,j->k", m_bar, mk2, m_bar) + m_k @ m2 @ m_bar)
    return r, a


# ℓ'(0), ℓ''(0) by hand: sigmoid family −β/2 + cβ and β²/4; ipo −1/β... (2(0 − 1/(2β))) and 2; hinge −β and 0
def _derivs(loss, beta, label_smoothing):
    c = {"cdpo": label_smoothing, "robust": -label_smoothing / (1 - 2 * label_smoothing)}.get(loss, 0.0)
    if loss == "ipo":
        return -1.0 / beta, 2.0
    if loss == "hinge":
        return -beta, 0.0
    return -beta / 2 + c * beta, beta**2 / 4


@pytest.mark.parametrize("loss,label_smoothing", [("sigmoid", 0.0), ("cdpo", 0.2), ("robust", 0.1), ("ipo", 0.0),
                                      ("hinge", 0.0)])
def test_loss_series_matches_numpy_and_flow_finite_differences(x64, loss, label_smoothing):
    rng = np.random.default_rng(7)
    dist = _random_dist(rng)
    beta = 1.3
    rate, curv = map(np.asarray, dd.loss_series(dist, beta=beta, loss=loss, label_smoothing=label_smoothing))
    r_np, a_np = _numpy_series(dist, *_derivs(loss, beta, label_smoothing))
    np.testing.assert_allclose(rate, r_np, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(curv, a_np, rtol=1e-12, atol=1e-14)
    # finite differences of the package's gradient flow dδ/dτ = −2∇L (RK4), one-sided 4-point stencils
    h = 2e-3
    tr = dd.population_trajectory(dist, beta=beta, lr=h, steps=3, loss=loss, label_smoothing=label_smoothing, method="flow", substeps=8)
    L = np.asarray(tr.metrics["behavior_loss"], float)  # (4, K) at τ = 0, h, 2h, 3h
    fd_rate = (-11 * L[0] + 18 * L[1] - 9 * L[2] + 2 * L[3]) / (6 * h)
    fd_curv = (2 * L[0] - 5 * L[1] + 4 * L[2] - L[3]) / h**2
    scale = np.abs(rate).max()
    np.testing.assert_allclose(fd_rate, rate, atol=1e-5 * scale)
    np.testing.assert_allclose(fd_curv, curv, atol=1e-3 * max(np.abs(curv).max(), scale))


def test_predicted_drop_is_second_order_accurate_and_saturates(x64):
    """For r_k < 0 ≤ a_k the Padé drop matches the true flow drop to O(τ³); bounded by 2r²/a."""
    rng = np.random.default_rng(4)  # a draw with 2|r_k|/a_k ≈ 2 for both (the Padé pole is far from τ ≤ 0.2)
    dist = _random_dist(rng, k=2, d=4, balanced=True)
    beta = 1.0
    rate, curv = map(np.asarray, dd.loss_series(dist, beta=beta))
    assert np.all(rate < 0) and np.all(curv > 0)  # this draw: both behaviours learned, decelerating
    errs = []
    for tau in (0.2, 0.1, 0.05):
        tr = dd.population_trajectory(dist, beta=beta, lr=tau / 4, steps=4, method="flow", substeps=16)
        bl = np.asarray(tr.metrics["behavior_loss"], float)
        true = bl[0] - bl[-1]
        pred = np.asarray(dd.predicted_loss_drop(dist, beta=beta, horizon=tau))
        first = -rate * tau  # the gap's (first-order) prediction
        assert np.all(np.abs(pred - true) < np.abs(first - true))
        errs.append(np.abs(pred - true).max())
    # third order: halving τ divides the error by about 8 (≥ 6 allowed)
    assert errs[0] / errs[1] > 6 and errs[1] / errs[2] > 6
    big = np.asarray(dd.predicted_loss_drop(dist, beta=beta, horizon=1e8))
    np.testing.assert_allclose(big, 2 * rate**2 / curv, rtol=1e-6)


def test_priority_score_formula_shape_and_errors(x64):
    rng = np.random.default_rng(11)
    dist = _random_dist(rng, k=4, d=6)
    beta, tau = 0.7, 3.0
    score = np.asarray(dd.priority_score(dist, beta=beta, horizon=tau))
    r, a = _numpy_series(dist, *_derivs("sigmoid", beta, 0.0))
    drop = -r * tau / (1 + tau * np.abs(a) / (2 * np.abs(r)))
    want = (drop[:, None] - drop[None, :]) / (np.abs(drop)[:, None] + np.abs(drop)[None, :])
    np.testing.assert_allclose(score, want, rtol=1e-12, atol=1e-15)
    assert score.shape == (4, 4) and np.all(np.abs(score) <= 1) and np.allclose(score, -score.T)
    # vmappable over stacked distributions
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), dist)
    out = jax.vmap(lambda dd_: dd.priority_score(dd_, beta=beta, horizon=tau))(stacked)
    np.testing.assert_allclose(np.asarray(out[1]), score, rtol=1e-12)
    with pytest.raises(ValueError, match="horizon"):
        dd.predicted_loss_drop(dist, beta=beta, horizon=-1.0)
    with pytest.raises(ValueError, match="beta"):
        dd.loss_series(dist, beta=0.0)
    with pytest.raises(ValueError, match="loss"):
        dd.loss_series(dist, beta=1.0, loss="kto")
