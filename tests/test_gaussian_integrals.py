"""The 1-D Gaussian integrals against scipy.integrate.quad (float64, ≤ 1e-9), both quadrature rules."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

import dynamics as dd
from dynamics import gaussian_integrals as gi

# one compilation per shape (op-by-op dispatch of the ~100-op rules would dominate the test time)
_sfe = jax.jit(dd.sigmoid_family_expectations, static_argnames="implementation")


@functools.partial(jax.jit, static_argnames="implementation")
def _jac(p, implementation="fast"):
    """Forward-mode Jacobian (3 outputs × (μ, σ, β)) at ``p = (μ, σ, β)``."""
    f = lambda q: jnp.stack(dd.sigmoid_family_expectations(q[0], q[1], q[2], implementation=implementation))
    return jax.jacfwd(f)(p)


def _quad(g, mu, sigma, kinks=(0.0,)):
    """quad over the standard-normal variable, told where the integrand's kinks (in a) are."""
    f = lambda u: g(mu + sigma * u) * np.exp(-0.5 * u * u) / np.sqrt(2 * np.pi)
    pts = [(k - mu) / sigma for k in kinks if abs((k - mu) / sigma) < 30] or None
    val, err = integrate.quad(f, -40, 40, points=pts, limit=1000, epsabs=1e-14, epsrel=1e-13)
    return val


def _integrands(beta):
    """softplus(−βa), sigmoid(−βa), sigmoid(βa)·sigmoid(−βa) in float64 NumPy."""
    return (lambda a: np.logaddexp(0.0, -beta * a),
            lambda a: special.expit(-beta * a),
            lambda a: special.expit(beta * a) * special.expit(-beta * a))


# β·σ and μ/σ of the accuracy grid: both signs of μ, and |μ|·β up to 60 (the kink 300 σ away at β·σ = 0.2)
BETA_SIGMA = (1e-3, 0.1, 1.0, 1.8, 10.0, 50.0, 200.0)
MU_OVER_SIGMA = (0.0, 0.37, -1.3, 4.0, -15.0, 40.0, -300.0)
SIGMA = 0.7


@functools.lru_cache(maxsize=None)
def _quad_grid():
    """(β·σ, μ/σ, μ, σ, β) points and the quad values (P, 3), computed once per session."""
    pts, ref = [], []
    for bs in BETA_SIGMA:
        for zz in MU_OVER_SIGMA + ((60.0 / bs, -60.0 / bs) if bs >= 1.0 else ()):  # β|μ| = 60
            beta, mu = bs / SIGMA, zz * SIGMA
            pts.append((bs, zz, mu, SIGMA, beta))
            ref.append([_quad(g, mu, SIGMA) for g in _integrands(beta)])
    return np.array(pts), np.array(ref)


@pytest.mark.parametrize("implementation", gi.QUADRATURE_RULES)
def test_sigmoid_family_vs_quad(x64, implementation):
    pts, ref = _quad_grid()
    mu, sigma, beta = (jnp.asarray(pts[:, i]) for i in (2, 3, 4))
    # through jit(vmap(...)), as the engines call it
    fn = jax.jit(jax.vmap(lambda m, s, b: jnp.stack(dd.sigmoid_family_expectations(m, s, b,
                                                                                   implementation=implementation))))
    got = np.asarray(fn(mu, sigma, beta))
    assert got.dtype == np.float64
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))  # absolute, relative above 1
    i, j = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= 1e-9, f"error {err.max():.2e} at beta*sigma={pts[i, 0]}, mu/sigma={pts[i, 1]}, output {j}"


def test_fast_rule_vs_reference_rule(x64):
    """Dense grid across the Gauss–Hermite / split switch (β·σ = 1.8) and kinks far outside the window."""
    bs = np.concatenate([np.geomspace(1e-3, 400, 57), [1.8 - 1e-9, 1.8, 1.8 + 1e-9]])
    z = np.concatenate([np.linspace(-30, 30, 121), [-1e3, 1e3, -1e8, 1e8]])
    bs, z = np.meshgrid(bs, z, indexing="ij")
    sigma = 1.3
    mu, beta = z * sigma, bs / sigma
    fast = np.array(_sfe(mu, sigma, beta))
    ref = np.array(_sfe(mu, sigma, beta, implementation="reference"))
    assert np.all(np.isfinite(fast))
    err = np.abs(fast - ref) / np.maximum(1.0, np.abs(ref))
    assert err.max() <= 1e-11, f"{err.max():.2e}"


def test_float32_inputs_give_float32(rng):
    mu = rng.normal(size=200) * 3
    sigma = rng.uniform(0.01, 3.0, size=200)
    beta = rng.uniform(0.1, 50.0, size=200)
    got = _sfe(mu.astype(np.float32), sigma.astype(np.float32), beta.astype(np.float32))
    assert all(v.dtype == jnp.float32 for v in got)
    with jax.enable_x64(True):
        ref = np.array(_sfe(mu, sigma, beta))
    err = np.abs(np.array(got) - ref) / np.maximum(1.0, np.abs(ref))
    assert err.max() <= 2e-5  # float32 rounding (inputs and ~100-term sums), not the rule


def _derivative_integrands(beta):
    """∂/∂a and ∂/∂β of the three integrands (a = μ + σu, so ∂μ = ∂a and ∂σ = u ∂a)."""
    s = lambda x: special.expit(x)
    da = (lambda a: -beta * s(-beta * a),
          lambda a: -beta * s(-beta * a) * s(beta * a),
          lambda a: beta * s(beta * a) * s(-beta * a) * (1 - 2 * s(beta * a)))
    db = (lambda a: -a * s(-beta * a),
          lambda a: -a * s(-beta * a) * s(beta * a),
          lambda a: a * s(beta * a) * s(-beta * a) * (1 - 2 * s(beta * a)))
    return da, db


@pytest.mark.parametrize("beta_sigma, mu_over_sigma", [(0.5, 0.3), (1.7, -2.0), (1.9, 0.1), (10.0, -0.8),
                                                      (200.0, 0.02), (30.0, 3.0)])
def test_gradients_vs_quad(x64, beta_sigma, mu_over_sigma):
    """jax.grad of the fast rule against quad of the differentiated integrands, all 9 partials."""
    sigma = 0.9
    beta, mu = beta_sigma / sigma, mu_over_sigma * sigma
    jac = _jac(jnp.array([mu, sigma, beta]))
    da, db = _derivative_integrands(beta)
    ref = np.array([[_quad(g, mu, sigma),
                     _quad(lambda a, g=g: g(a) * (a - mu) / sigma, mu, sigma),
                     _quad(h, mu, sigma)] for g, h in zip(da, db)])
    np.testing.assert_allclose(np.asarray(jac), ref, rtol=1e-8, atol=1e-9 * max(1.0, beta))


def test_gradient_finite_differences(x64):
    """Reverse-mode gradient of a loss-like combination against central differences of the rule."""
    @jax.jit
    def f(p):
        sp, sg, ss = dd.sigmoid_family_expectations(p[0], p[1], p[2])
        return sp + 0.3 * sg - 2.0 * ss
    for p in ([0.2, 0.5, 3.0], [-0.4, 1.0, 1.79], [0.05, 2.0, 40.0]):  # GH, at the switch, split
        p = np.array(p)
        g = np.asarray(jax.grad(f)(jnp.asarray(p)))
        h = 1e-5
        fd = [(float(f(jnp.asarray(p + h * e))) - float(f(jnp.asarray(p - h * e)))) / (2 * h) for e in np.eye(3)]
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    # reverse mode stays finite at σ = 0 and at σ = 1e-300 (the point-mass guard)
    for sigma in (0.0, 1e-300):
        assert np.all(np.isfinite(np.asarray(jax.grad(f)(jnp.array([0.3, sigma, 5.0])))))


@pytest.mark.parametrize("implementation", gi.QUADRATURE_RULES)
def test_point_mass_limit_and_gradient(x64, implementation):
    mu, beta = 0.4, 3.0
    s = special.expit(-beta * mu)
    point = [np.logaddexp(0, -beta * mu), s, s * (1 - s)]
    # σ = 0 gives the point values; σ → 0 is continuous (E[g(μ + σu)] = g(μ) + σ² g''(μ)/2 + ...)
    got = np.array(_sfe(mu, jnp.array([0.0, 1e-7]), beta, implementation=implementation))
    np.testing.assert_allclose(got, np.array(point)[:, None] * np.ones(2), atol=1e-12)
    # autodiff stays finite at σ = 0 (forward mode here, reverse mode below)
    jac = np.asarray(_jac(jnp.array([mu, 0.0, beta]), implementation=implementation))
    assert np.all(np.isfinite(jac))
    # ∂/∂μ at σ = 0 is the derivative of the point values
    np.testing.assert_allclose(jac[:, 0], [-beta * s, -beta * s * (1 - s), beta * s * (1 - s) * (2 * s - 1)],
                               rtol=1e-12)


def test_quadrature_rule_switches_the_default(x64):
    """quadrature_rule() changes what the engines compile: 1344 nodes (56 panels × 12) inside, 96 outside."""
    x = jnp.linspace(-2.0, 2.0, 7)
    loss = jax.jit(lambda m: dd.expected_loss_terms("sigmoid", m, 0.8, 25.0)[0])
    hlo = lambda: loss.lower(x).as_text()
    assert "7x96x" in hlo() and "7x56x12x" not in hlo()
    with gi.quadrature_rule("reference") as rule:
        assert rule == "reference" and gi.quadrature_nodes() == 1344
        assert "7x56x12x" in hlo() and "7x96x" not in hlo()
    assert gi.quadrature_nodes() == 96 and "7x96x" in hlo()
    with pytest.raises(ValueError, match="implementation='gauss' is not a quadrature rule"):
        dd.sigmoid_family_expectations(0.0, 1.0, 1.0, implementation="gauss")
    with pytest.raises(ValueError, match="implementation"):
        with gi.quadrature_rule("simpson"):
            pass
    assert gi.quadrature_nodes() == 96


@pytest.mark.parametrize("loss", dd.LOSSES)
@pytest.mark.parametrize("beta_sigma", [0.1, 10.0, 200.0])
def test_expected_loss_terms_vs_quad(x64, loss, beta_sigma):
    sigma, mu, label_smoothing = 1.3, 0.21, 0.15
    beta = beta_sigma / sigma
    e_l, e_l1, e_l2 = (float(v) for v in dd.expected_loss_terms(loss, mu, sigma, beta, label_smoothing))
    kinks = (0.0, 1.0 / beta)  # the sigmoid family is sharpest at 0, the hinge kinks at 1/β
    ref_l = _quad(lambda a: np.asarray(dd.loss_fn(loss, a, beta, label_smoothing)), mu, sigma, kinks)
    ref_l1 = _quad(lambda a: np.asarray(dd.loss_grad_fn(loss, a, beta, label_smoothing)), mu, sigma, kinks)
    # Stein: E[ℓ''(a)] = E[ℓ'(a)(a − μ)]/σ² (valid for the hinge's point mass too)
    ref_l2 = _quad(lambda a: np.asarray(dd.loss_grad_fn(loss, a, beta, label_smoothing)) * (a - mu), mu, sigma, kinks) / sigma**2
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
