"""dynamics.fitting: Gaussian fit, Ledoit–Wolf shrinkage and per-behaviour properties vs NumPy."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import dynamics as dd


def _data(seed=0, k=3, d=5, counts=((30, 25), (12, 40), (20, 20))):
    """Unequal class counts, different means/covariances per (behaviour, class)."""
    rng = np.random.default_rng(seed)
    xs, ss, bs = [], [], []
    for kk in range(k):
        for sign, m in zip((1, -1), counts[kk]):
            a = rng.normal(size=(d, d)) * (0.3 + kk)
            xs.append(rng.normal(size=(m, d)) @ a + rng.normal(size=d) * 2)
            ss.append(np.full(m, sign))
            bs.append(np.full(m, kk))
    perm = rng.permutation(sum(len(s) for s in ss))
    return np.concatenate(xs)[perm], np.concatenate(ss)[perm], np.concatenate(bs)[perm]


def test_fit_moments_match_numpy():
    x, s, b = _data()
    dist = dd.fit_gaussian(x, s, b, names=["a", "b", "c"])
    assert dist.names == ("a", "b", "c")
    for k in range(3):
        for sign, mu, cov in ((1, dist.mu_pos, dist.cov_pos), (-1, dist.mu_neg, dist.cov_neg)):
            rows = x[(b == k) & (s == sign)]
            np.testing.assert_allclose(np.asarray(mu[k]), rows.mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(cov[k]), np.cov(rows.T), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(dist.p_pos[k]), np.mean(s[b == k] == 1), rtol=1e-6)
    counts = np.bincount(b)
    np.testing.assert_allclose(np.asarray(dist.weight), counts / counts.sum(), rtol=1e-6)
    uni = dd.fit_gaussian(x, s, b, weight="uniform")
    np.testing.assert_allclose(np.asarray(uni.weight), np.full(3, 1 / 3), rtol=1e-6)


def test_fit_round_trips_through_the_theory_npz(tmp_path):
    x, s, b = _data(seed=1)
    dist = dd.fit_gaussian(x, s, b, names=["a", "b", "c"])
    dist.save(tmp_path / "d.npz")
    back = dd.GaussianPreference.load(tmp_path / "d.npz")
    for f in ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos", "weight"):
        np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(dist, f)))
    assert back.names == ("a", "b", "c")


def _np_gap(b):
    k = len(b)
    g = np.zeros((k, k))
    for i, j in itertools.product(range(k), range(k)):
        if i != j:
            bbar = (b[i] + b[j]) / 2
            g[i, j] = (b[i] - b[j]) @ bbar / (np.linalg.norm(bbar) * max(np.linalg.norm(b[i]), np.linalg.norm(b[j])))
    return g


def test_properties_match_numpy():
    x, s, b = _data(seed=2)
    props = dd.behavior_properties(x, s, b)
    mus = {}
    for k in range(3):
        pos, neg = x[(b == k) & (s == 1)], x[(b == k) & (s == -1)]
        mus[k] = pos.mean(0) - neg.mean(0)
        assert props.n[k] == len(pos) + len(neg) and props.n_pos[k] == len(pos) and props.n_neg[k] == len(neg)
        np.testing.assert_allclose(props.p_pos[k], len(pos) / (len(pos) + len(neg)), rtol=1e-6)
        np.testing.assert_allclose(props.distinguishability[k], np.linalg.norm(mus[k]), rtol=1e-5)
        cp, cn = np.cov(pos.T), np.cov(neg.T)
        np.testing.assert_allclose(props.concentration[k],
                                   max(np.linalg.eigvalsh(cp)[-1], np.linalg.eigvalsh(cn)[-1]), rtol=1e-4)
        np.testing.assert_allclose(props.trace[k], max(np.trace(cp), np.trace(cn)), rtol=1e-5)
    np.testing.assert_allclose(props.priority_gap, _np_gap(np.stack([mus[k] for k in range(3)])),
                               rtol=1e-4, atol=1e-6)
    # the same numbers as the fitted distribution's own properties (one definition)
    dist = dd.fit_gaussian(x, s, b)
    np.testing.assert_array_equal(props.distinguishability, np.asarray(dist.distinguishability, np.float64))


def _lw_explicit(x):
    """Ledoit–Wolf (2004) intensity written out with an explicit sum over samples (float64)."""
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta2 = np.linalg.norm(s - mu * np.eye(d), "fro") ** 2 / d
    beta2 = sum(np.linalg.norm(np.outer(r, r) - s, "fro") ** 2 for r in xc) / (n**2 * d)
    return min(beta2, delta2) / delta2


@pytest.mark.parametrize("n,d", [(40, 5), (30, 25), (20, 60)])
def test_ledoit_wolf_intensity(n, d):
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) * np.linspace(0.5, 3, d)
    alpha = dd.ledoit_wolf_shrinkage(x)
    np.testing.assert_allclose(alpha, _lw_explicit(x), rtol=1e-10)
    sk = pytest.importorskip("sklearn.covariance")
    np.testing.assert_allclose(alpha, sk.ledoit_wolf_shrinkage(x), rtol=1e-8)
    assert 0.0 <= alpha <= 1.0


def test_ledoit_wolf_is_small_for_isotropic_data_with_many_samples():
    x = np.random.default_rng(0).normal(size=(20000, 4))
    # S ≈ I: the target is (nearly) the truth, so the intensity is large; it agrees with the explicit sum
    np.testing.assert_allclose(dd.ledoit_wolf_shrinkage(x), _lw_explicit(x), rtol=1e-9)
    assert dd.ledoit_wolf_shrinkage(x) > 0.5  # E‖S − I‖² and the sampling noise are both O(d/n)
    y = x * np.array([1.0, 2.0, 4.0, 8.0])  # strongly anisotropic, n ≫ d: almost no shrinkage
    assert dd.ledoit_wolf_shrinkage(y) < 0.01


def test_shrinkage_options():
    x, s, b = _data(seed=3, counts=((8, 9), (10, 7), (9, 9)), d=12)  # per-class n < d: S singular
    plain = dd.fit_gaussian(x, s, b)
    ev = np.linalg.eigvalsh(np.asarray(plain.cov_pos[0], np.float64))
    assert ev[0] < 1e-5 * ev[-1]  # rank ≤ 7 < d (up to float32 rounding)
    half = dd.fit_gaussian(x, s, b, shrinkage=0.5)
    rows = x[(b == 0) & (s == 1)]
    c = np.cov(rows.T)
    np.testing.assert_allclose(np.asarray(half.cov_pos[0]), 0.5 * c + 0.5 * np.trace(c) / 12 * np.eye(12),
                               rtol=1e-4, atol=1e-6)
    lw = dd.fit_gaussian(x, s, b, shrinkage="ledoit-wolf")
    a = dd.ledoit_wolf_shrinkage(rows)
    assert 0 < a <= 1
    np.testing.assert_allclose(np.asarray(lw.cov_pos[0]), (1 - a) * c + a * np.trace(c) / 12 * np.eye(12),
                               rtol=1e-4, atol=1e-6)
    assert np.linalg.eigvalsh(np.asarray(lw.cov_pos[0], np.float64))[0] > 0  # well-conditioned now
    # the means and traces do not move
    np.testing.assert_allclose(np.asarray(lw.mu_pos), np.asarray(plain.mu_pos), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lw.trace), np.asarray(plain.trace), rtol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(shrinkage=1.5), "shrinkage"),
    (dict(shrinkage="oas"), "shrinkage"),
    (dict(weight="equal"), "weight"),
    (dict(names=["a"]), "names has 1"),
    (dict(num_behaviors=2), r"must lie in \[0, K=2\)"),
])
def test_bad_arguments(kwargs, match):
    x, s, b = _data(seed=4)
    with pytest.raises(ValueError, match=match):
        dd.fit_gaussian(x, s, b, **kwargs)


def test_bad_data():
    x, s, b = _data(seed=5)
    with pytest.raises(ValueError, match="labels must be"):
        dd.fit_gaussian(x, np.where(s > 0, 1, 0), b)
    xn = x.copy()
    xn[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dd.fit_gaussian(xn, s, b)
    with pytest.raises(ValueError, match="s \\(n,\\)"):
        dd.fit_gaussian(x, s[:-1], b)
    # behaviour 1 with a single s=-1 row: the covariance needs 2
    keep = ~((b == 1) & (s == -1))
    keep[np.flatnonzero((b == 1) & (s == -1))[0]] = True
    with pytest.raises(ValueError, match=r"behaviour 1 .* has 1 sample\(s\) with s=-1"):
        dd.fit_gaussian(x[keep], s[keep], b[keep])
