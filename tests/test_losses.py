"""The Loss registry: every record against independent float64 NumPy/SciPy formulas (docs/theory.md §1)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, special

import dynamics as dd
from dynamics import losses as L
from dynamics import theory as th

BETA = 0.7


def np_loss(name, h, beta, label_smoothing):
    """ℓ(h) written from the papers' definitions (not the package's sigmoid-family rewrite)."""
    ls = lambda x: -np.logaddexp(0.0, -x)  # log σ(x)
    if name == "sigmoid":
        return -ls(beta * h)
    if name == "cdpo":
        return -(1 - label_smoothing) * ls(beta * h) - label_smoothing * ls(-beta * h)
    if name == "robust":
        return (-(1 - label_smoothing) * ls(beta * h) + label_smoothing * ls(-beta * h)) / (1 - 2 * label_smoothing)
    if name == "hinge":
        return np.maximum(0.0, 1.0 - beta * h)
    return (h - 1.0 / (2 * beta)) ** 2


def np_grad(name, h, beta, label_smoothing):
    sg = special.expit
    if name == "sigmoid":
        return -beta * sg(-beta * h)
    if name == "cdpo":
        return -(1 - label_smoothing) * beta * sg(-beta * h) + label_smoothing * beta * sg(beta * h)
    if name == "robust":
        return (-(1 - label_smoothing) * beta * sg(-beta * h) - label_smoothing * beta * sg(beta * h)) / (1 - 2 * label_smoothing)
    if name == "hinge":
        return np.where(beta * h < 1.0, -beta, 0.0)
    return 2.0 * (h - 1.0 / (2 * beta))


def _label_smoothing(name):
    return 0.15 if name in ("cdpo", "robust") else 0.0


EXPECTED = {  # name: (smoothed, TRL loss_type, sup|ℓ'|(β, ε), sup ℓ''(β, ε))
    "sigmoid": (False, "sigmoid", lambda b, e: b, lambda b, e: b**2 / 4),
    "cdpo": (True, "sigmoid", lambda b, e: b * (1 - e), lambda b, e: b**2 / 4),
    "robust": (True, "robust", lambda b, e: b * (1 - e) / (1 - 2 * e), lambda b, e: b**2 / 4),
    "hinge": (False, "hinge", lambda b, e: b, lambda b, e: np.inf),
    "ipo": (False, "ipo", lambda b, e: np.inf, lambda b, e: 2.0),
}


def test_losses_are_the_registry_in_order():
    assert dd.LOSSES == L.LOSSES == tuple(L.REGISTRY) == ("sigmoid", "cdpo", "robust", "hinge", "ipo")
    assert all(L.REGISTRY[n].name == n and L.REGISTRY[n].source for n in L.LOSSES)
    with pytest.raises(ValueError, match="already registered"):
        L._register(L.REGISTRY["ipo"])
    with pytest.raises(ValueError, match=r"unknown loss 'dpo'.*choose one of"):
        L.get_loss("dpo")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_record_value_and_derivative_vs_numpy(x64, name):
    label_smoothing = _label_smoothing(name)
    h = np.linspace(-6.0, 6.0, 241) + 0.0123  # avoid the hinge kink exactly on a grid point
    np.testing.assert_allclose(np.asarray(dd.loss_fn(name, h, BETA, label_smoothing)), np_loss(name, h, BETA, label_smoothing),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dd.loss_grad_fn(name, h, BETA, label_smoothing)), np_grad(name, h, BETA, label_smoothing),
                               rtol=1e-11, atol=1e-12)
    # and ℓ' is the derivative of ℓ (central differences on the NumPy loss)
    step = 1e-6
    fd = (np_loss(name, h + step, BETA, label_smoothing) - np_loss(name, h - step, BETA, label_smoothing)) / (2 * step)
    np.testing.assert_allclose(np.asarray(dd.loss_grad_fn(name, h, BETA, label_smoothing)), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("mu,sigma", [(0.3, 0.0), (2.0, 0.0), (-0.4, 1.7), (0.9, 0.6)])
def test_record_expectations_vs_quad(x64, name, mu, sigma):
    label_smoothing = _label_smoothing(name)
    got = [float(v) for v in dd.expected_loss_terms(name, mu, sigma, BETA, label_smoothing)]
    if sigma == 0.0:  # point mass: the values at μ (and ℓ'' = 0 for hinge away from its kink)
        second = {"ipo": 2.0, "hinge": 0.0}.get(name)
        if second is None:
            q = special.expit(BETA * mu)
            second = BETA**2 * q * (1 - q)
        ref = [np_loss(name, mu, BETA, label_smoothing), float(np_grad(name, mu, BETA, label_smoothing)), second]
    else:
        pdf = lambda a: np.exp(-0.5 * ((a - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        quad = lambda f: integrate.quad(lambda a: f(a) * pdf(a), -np.inf, np.inf, points=None, limit=400,
                                        epsabs=1e-13, epsrel=1e-12)[0]
        e1 = quad(lambda a: float(np_grad(name, a, BETA, label_smoothing)))
        ref = [quad(lambda a: float(np_loss(name, a, BETA, label_smoothing))), e1,
               quad(lambda a: float(np_grad(name, a, BETA, label_smoothing)) * (a - mu)) / sigma**2]  # Stein
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_record_fields_and_theory_bounds(name):
    smoothed, trl, lip, curv = EXPECTED[name]
    rec = L.REGISTRY[name]
    assert rec.smoothed is smoothed and L.uses_label_smoothing(name) is smoothed
    assert rec.trl_loss_type == trl
    beta = np.array([0.3, 2.0])
    label_smoothing = np.array([0.1, 0.4]) if smoothed else 0.0
    e = label_smoothing if smoothed else np.zeros(2)
    np.testing.assert_allclose(np.asarray(th.loss_lipschitz(name, beta, label_smoothing)), lip(beta, e), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(th.loss_curvature_bound(name, beta, label_smoothing)),
                               np.broadcast_to(curv(beta, e), (2,)), rtol=1e-6)
    assert np.asarray(th.loss_lipschitz(name, beta, label_smoothing)).shape == (2,)
    # −ℓ'(0) from the NumPy derivative
    np.testing.assert_allclose(np.asarray(th.initial_loss_slope(name, beta, label_smoothing)),
                               -np_grad(name, 0.0, beta, e), rtol=1e-6)


def test_label_smoothing_rule_is_one_check():
    assert [n for n in L.LOSSES if L.uses_label_smoothing(n)] == ["cdpo", "robust"]
    for n in ("cdpo", "robust"):
        L.check_label_smoothing(n, np.array([0.0, 0.49]))
        assert L.validate_loss(n, 1.0, 0.2) == n
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0.0, 0.5\)"):
            L.check_label_smoothing(n, 0.5)
        with pytest.raises(ValueError, match="label_smoothing must lie"):
            L.check_label_smoothing(n, -0.01)
    for n in ("sigmoid", "hinge", "ipo"):
        L.check_label_smoothing(n, 0.0)
        with pytest.raises(ValueError, match=r"label_smoothing=\[0.0, 0.1\] has no effect with loss='" + n
                           + r"'; it is the label smoothing of 'cdpo' and 'robust'"):
            L.check_label_smoothing(n, np.array([0.0, 0.1]))
        with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect"):
            L.validate_loss(n, 1.0, 0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.validate_loss("sigmoid", 0.0)
    with pytest.raises(ValueError, match="beta must be a scalar"):
        L.validate_loss("sigmoid", np.ones(2))
    with pytest.raises(ValueError, match="label_smoothing must be a scalar"):
        L.validate_loss("cdpo", 1.0, np.ones(2) * 0.1)


def test_register_adds_one_record_and_its_name(monkeypatch):
    import dataclasses

    monkeypatch.setattr(L, "REGISTRY", dict(L.REGISTRY))
    monkeypatch.setattr(L, "LOSSES", L.LOSSES)
    rec = dataclasses.replace(L.REGISTRY["ipo"], name="ipo_copy")
    assert L._register(rec) is rec
    assert L.REGISTRY["ipo_copy"] is rec and L.LOSSES == ("sigmoid", "cdpo", "robust", "hinge", "ipo", "ipo_copy")
    assert float(L.loss_fn("ipo_copy", 1.0, 0.5)) == pytest.approx(0.0)  # (1 − 1/(2·0.5))² = 0
