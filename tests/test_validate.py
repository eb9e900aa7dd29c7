"""``dpo-sims validate`` can fail: planted errors in the package make ``validate --quick`` fail.

Each plant monkeypatches one function of the package (and clears JAX's caches, so that
no program traced before the plant is reused):

* ``gradient``   — the population gradient × 1.01;
* ``covariance`` — the population gradient without its covariance term ``S_c δ E[ℓ'']``;
* ``flip``       — ``c5_flip_labels`` that forgets ``p → 1 − p`` (misalignment data wrong
  for unbalanced behaviours);
* ``momentum``   — ``optimizer="momentum"`` with coefficient 0.8 instead of 0.9.

The fast suite runs the batteries that detect two plants (``--claims C1`` for the
gradient, ``--claims C5`` for the flip) and checks that the same batteries pass
unplanted; the ``slow`` tests run the whole ``validate --quick`` once per plant (one
module-scoped run each).
"""
import contextlib
import json

import jax
import numpy as np
import optax
import pytest

import dynamics
import dynamics.population as population
import dynamics.theory as theory
from sims import validate as v


@contextlib.contextmanager
def _patched(monkeypatch_ctx, name):
    mp = monkeypatch_ctx
    if name == "gradient":
        orig = population.population_gradient
        mp.setattr(population, "population_gradient", lambda *a, **k: 1.01 * orig(*a, **k))
    elif name == "covariance":
        def no_cov(dist, delta, *, beta, loss="sigmoid", label_smoothing=0.0, label_noise=None, loss_weight=None):
            comps = population.training_components(dist, label_noise, loss_weight)
            mu, sigma = population._margin_moments(comps, delta)
            _, e_l1, _ = population.expected_loss_terms(loss, mu, sigma, beta, label_smoothing)
            return (comps.weight * e_l1) @ comps.mean

        mp.setattr(population, "population_gradient", no_cov)
    elif name == "flip":
        def wrong_flip(dist):
            return dist.replace(mu_pos=dist.mu_neg, mu_neg=dist.mu_pos, cov_pos=dist.cov_neg, cov_neg=dist.cov_pos)

        mp.setattr(theory, "c5_flip_labels", wrong_flip)
        transforms = getattr(dynamics, "transforms", None)
        if transforms is not None and hasattr(transforms, "flip_labels"):
            mp.setattr(transforms, "flip_labels", wrong_flip)
    elif name == "momentum":
        import dynamics._train as train

        orig = train.make_optimizer

        def wrong(optimizer, lr):
            return optax.sgd(lr, momentum=0.8) if optimizer == "momentum" else orig(optimizer, lr)

        for mod in (train, population, dynamics.empirical, dynamics.batched):
            if hasattr(mod, "make_optimizer"):
                mp.setattr(mod, "make_optimizer", wrong)
    elif name != "none":
        raise ValueError(name)
    jax.clear_caches()
    v._config_fn.cache_clear()
    try:
        yield
    finally:
        jax.clear_caches()
        v._config_fn.cache_clear()


def _run(name, claims=v.CLAIMS, out_dir=None):
    with pytest.MonkeyPatch.context() as mp, _patched(mp, name):
        rows, _ = v.run_validation(v.PLANS["quick"], seed=0, out_dir=out_dir, log=lambda *a: None, claims=claims)
    return rows


def _failed(rows):
    return [(r.claim, r.setting, r.kind, r.check[:70]) for r in rows if r.passed is False]


# ----------------------------------------------------------------- fast suite
@pytest.fixture(scope="module")
def c1_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("c1")
    return {"none": _run("none", ("C1",), out_dir=str(out)), "gradient": _run("gradient", ("C1",)), "out": out}


def test_gradient_times_1_01_fails_c1(c1_rows):
    assert not _failed(c1_rows["none"])
    failed = _failed(c1_rows["gradient"])
    # the population first step is 1.01 η β m̄: the exact C1 check (tolerance 1e-4) catches it
    assert any(c == "C1" and kind == "exact" for c, _, kind, _ in failed), failed
    row = next(r for r in c1_rows["gradient"] if r.kind == "exact" and "population first step" in r.check)
    assert row.value == pytest.approx(0.01, rel=0.05)


@pytest.fixture(scope="module")
def c5_rows():
    return {name: _run(name, ("C5",)) for name in ("none", "flip")}


def test_wrong_flip_fails_c5(c5_rows):
    assert not _failed(c5_rows["none"])
    failed = _failed(c5_rows["flip"])
    # the law check of the flipped distribution (behaviour means of z must be negated) catches it
    assert any(c == "C5" and kind == "exact" for c, _, kind, _ in failed), failed
    row = next(r for r in c5_rows["flip"] if r.kind == "exact")
    assert row.value > 0.01


def test_validation_json_rows_and_claim_selection(c1_rows):
    """validation.json: one row per check with the required fields; --claims validated (exit 2)."""
    from sims.cli import main

    rows = c1_rows["none"]
    data = json.loads((c1_rows["out"] / "validation.json").read_text())
    assert len(data) == len(rows) and {r["claim"] for r in data} == {"C1"}
    for r in data:
        assert {"claim", "check", "setting", "gated", "passed", "statistic", "kind"} <= set(r)
        assert isinstance(r["gated"], bool) and r["kind"] in v.KINDS
        assert (r["passed"] is None) == (not r["gated"])
    assert main(["validate", "--claims", "C9"]) == 2
    assert main(["validate", "--claims", ""]) == 2


def test_c4_settings_which_keep_the_loss_a_function_of_the_projection():
    """With zero midpoints and isotropic Σ_k (symmetric, per_behavior_sigma) L_k(δ) depends on δ only
    through (δᵀb_k, ‖δ‖); class midpoints and anisotropic Σ_k break that (population loss)."""
    import jax.numpy as jnp

    key = jax.random.key(0)
    for setting, sym in (("symmetric", True), ("midpoints", False), ("per_behavior_sigma", True),
                         ("anisotropic", False)):
        dist = v.c4_pair(key, setting)
        b = np.asarray(dist.mu_pos - dist.mu_neg)[0]
        rng = np.random.default_rng(1)
        u = rng.normal(size=b.size)
        w = rng.normal(size=b.size)
        # two heads with the same δᵀb_0 and the same norm
        e = b / np.linalg.norm(b)
        perp = lambda a: a - (a @ e) * e
        p1, p2 = perp(u), perp(w)
        p2 = p2 / np.linalg.norm(p2) * np.linalg.norm(p1)
        d1, d2 = 0.3 * e + p1, 0.3 * e + p2
        bl = [np.asarray(dynamics.population_metrics(dist, jnp.asarray(d, jnp.float32), beta=1.0)["behavior_loss"])[0]
              for d in (d1, d2)]
        assert (abs(bl[0] - bl[1]) < 1e-5) == sym, setting
    with pytest.raises(ValueError, match="setting"):
        v.c4_pair(key, "skewed")


# ----------------------------------------------------------------- slow suite
@pytest.fixture(scope="module")
def quick_rows():
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["covariance", "momentum", "gradient", "flip"])
def test_validate_quick_fails_on_each_plant(quick_rows, name):
    rows = quick_rows.setdefault(name, _run(name))
    failed = _failed(rows)
    assert failed, f"validate --quick passed with the {name} plant"
    if name == "momentum":
        assert any(s == "momentum" for _, s, _, _ in failed), failed
    if name == "covariance":
        assert any(k == "evidence" for _, _, k, _ in failed), failed


# ------------------------------------------------------------- objectives battery (OBJ)
@pytest.mark.slow  # ~50 s on the loaded 2-core machine: two compiles (population and empirical aot)
def test_planted_aot_gradient_fails_the_objectives_battery():
    """``aot``'s population gradient × 1.5 → its OBJ row fails (the loss moves ~10 gates away).

    A plant of × 1.01 changes the loss after 3 steps by ~1e-4, below the Monte Carlo gate of N = 2·10⁴
    (~5e-3) and of N = 2·10⁵ (~1.5e-3): the battery gates sampling error, not 1 % errors (those are the
    finite-difference tests' job, tests/test_vocab_batch_limits.py).
    """
    import dataclasses

    from dynamics import vocab_population as vp

    plan = dataclasses.replace(v.PLANS["quick"], obj_names=("aot",))
    orig = vp._aot_terms
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vp, "_aot_terms", lambda *a, **k: (lambda out: (out[0], 1.5 * out[1]))(orig(*a, **k)))
        jax.clear_caches()
        try:
            rows = v.check_objectives(jax.random.key(7), plan, lambda *a: None)
        finally:
            jax.clear_caches()
    assert [r.passed for r in rows] == [False], [(r.check, r.statistic, r.tolerance) for r in rows]
