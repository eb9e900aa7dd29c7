"""The 1-D Gaussian integrals against scipy.integrate.quad (float64, ≤ 1e-9)."""
import numpy as np
import pytest
from scipy import integrate, special

import dynamics as dd


def _quad(g, mu, sigma, kinks=(0.0,)):
    """quad over the standard-normal variable, told where the integrand's kinks (in a) are."""
    f = lambda u: g(mu + sigma * u) * np.exp(-0.5 * u * u) / np.sqrt(2 * np.pi)
    pts = [(k - mu) / sigma for k in kinks if abs((k - mu) / sigma) < 30] or None
    val, err = integrate.quad(f, -40, 40, points=pts, limit=1000, epsabs=1e-14, epsrel=1e-13)
    return val


@pytest.mark.parametrize("beta_sigma", [0.1, 1.0, 10.0, 100.0, 200.0])
@pytest.mark.parametrize("mu_over_sigma", [0.0, 0.37, -1.3, 4.0, -15.0])
def test_sigmoid_family_vs_quad(x64, beta_sigma, mu_over_sigma):
    sigma = 0.7
    beta = beta_sigma / sigma
    mu = mu_over_sigma * sigma
    got = np.array(dd.sigmoid_family_expectations(mu, sigma, beta))
    ref = np.array([
        _quad(lambda a: np.logaddexp(0.0, -beta * a), mu, sigma),
        _quad(lambda a: special.expit(-beta * a), mu, sigma),
        _quad(lambda a: special.expit(beta * a) * special.expit(-beta * a), mu, sigma),
    ])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


def test_point_mass_limit(x64):
    mu, beta = 0.4, 3.0
    got = np.array(dd.sigmoid_family_expectations(mu, 0.0, beta))
    s = special.expit(-beta * mu)
    np.testing.assert_allclose(got, [np.logaddexp(0, -beta * mu), s, s * (1 - s)], atol=1e-12)


@pytest.mark.parametrize("loss", dd.LOSSES)
@pytest.mark.parametrize("beta_sigma", [0.1, 10.0, 200.0])
def test_expected_loss_terms_vs_quad(x64, loss, beta_sigma):
    sigma, mu, eps = 1.3, 0.21, 0.15
    beta = beta_sigma / sigma
    e_l, e_l1, e_l2 = (float(v) for v in dd.expected_loss_terms(loss, mu, sigma, beta, eps))
    kinks = (0.0, 1.0 / beta)  # the sigmoid family is sharpest at 0, the hinge kinks at 1/β
    ref_l = _quad(lambda a: np.asarray(dd.loss_fn(loss, a, beta, eps)), mu, sigma, kinks)
    ref_l1 = _quad(lambda a: np.asarray(dd.loss_grad_fn(loss, a, beta, eps)), mu, sigma, kinks)
    # Stein: E[ℓ''(a)] = E[ℓ'(a)(a − μ)]/σ² (valid for the hinge's point mass too)
    ref_l2 = _quad(lambda a: np.asarray(dd.loss_grad_fn(loss, a, beta, eps)) * (a - mu), mu, sigma, kinks) / sigma**2
    scale = max(1.0, abs(ref_l))
    assert abs(e_l - ref_l) <= 1e-9 * scale
    assert abs(e_l1 - ref_l1) <= 1e-9 * max(1.0, abs(ref_l1))
    # the hinge's indicator integrand makes quad itself less precise at the jump
    tol = 1e-7 if loss == "hinge" else 1e-9
    assert abs(e_l2 - ref_l2) <= tol * max(1.0, abs(ref_l2))


def test_gauss_hermite_would_fail(x64):
    """Documents why a special rule is needed: 64-node Gauss–Hermite errs at β·σ = 50."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    gh = np.sum(w * np.logaddexp(0, -50.0 * x)) / np.sqrt(2 * np.pi)
    ours = float(dd.sigmoid_family_expectations(0.0, 1.0, 50.0)[0])
    ref = _quad(lambda a: np.logaddexp(0, -50.0 * a), 0.0, 1.0)
    assert abs(gh - ref) > 1e-3
    assert abs(ours - ref) < 1e-9
