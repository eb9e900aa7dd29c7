"""The open-question studies (sims/study.py) and the custom-distribution tutorial (docs/custom-distributions.md)."""
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from sims.cli import main
from sims.study import (
    SWEEP_STUDIES, _stack, _two_behaviours, behavior_margin, equal_rate_weights, ipo_time_to_learn, reweightings,
    run_study, study_config, time_to_learn,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"


# ----------------------------------------------------------------------------- time-to-learn
def test_time_to_learn_hand_computed():
    step = np.array([0, 2, 4, 6, 8])
    # final = mean of the last ceil(0.2·5) = 1 record = 4 → target 2 lies between step 2 (1) and 4 (3): 2 + 2·(1/2)
    v = np.array([0.0, 1.0, 3.0, 4.0, 4.0])
    assert time_to_learn(step, v, tail=0.2) == pytest.approx(3.0)
    # default tail 0.1 of 5 records → 1 record; fraction 0.75 → target 3 reached exactly at step 4
    assert time_to_learn(step, v, fraction=0.75) == pytest.approx(4.0)
    # start given explicitly; final = mean of the last ceil(0.4·5) = 2 records = 5 → target 3 → step 3
    assert time_to_learn(step, v + 1.0, start=1.0, tail=0.4) == pytest.approx(3.0)
    # batched (2, T): second row falls below its start → never learned (NaN); explicit final
    out = time_to_learn(step, np.stack([v, -v]), final=np.array([2.0, -4.0]))
    assert out[0] == pytest.approx(2.0) and math.isnan(out[1])
    # a non-monotone trajectory: the first crossing counts, interpolated
    w = np.array([0.0, 3.0, 1.0, 2.0, 2.0])
    assert time_to_learn(step, w, tail=0.2) == pytest.approx(2.0 * (1.0 / 3.0))
    with pytest.raises(ValueError, match="fraction"):
        time_to_learn(step, v, fraction=1.5)
    with pytest.raises(ValueError, match="last axis"):
        time_to_learn(step, v[:4])


def test_behavior_margin_is_mean_margin_monte_carlo():
    dist = _two_behaviours(1.0, 2.0, d=3, sigma=0.7, angle_deg=70.0)
    delta = np.array([[0.3, -0.2, 0.5]])
    x, s, beh = (np.asarray(a, np.float64) for a in dist.sample(jax.random.key(0), 200_000))
    h = 2.0 * s * (x @ delta[0])
    m = behavior_margin(delta, np.asarray(dist.behavior_mean), beta=2.0)[0]
    for k in range(2):
        hk = h[beh == k]
        assert abs(hk.mean() - m[k]) < 4.5 * hk.std() / np.sqrt(hk.size)


# ----------------------------------------------------------------------------- re-weighting
def test_equal_rate_weights_equalise_projection_closed_form(rng):
    # orthogonal m_k: closed form λ_k ∝ 1/(ω_k ‖m_k‖²), normalised Σ ω λ = 1
    w = np.array([0.2, 0.5, 0.3])
    m = np.diag([0.5, 1.0, 2.0]) @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
    lam, exact = equal_rate_weights(m, w)
    ref = 1.0 / (w * np.sum(m**2, axis=1))
    np.testing.assert_allclose(lam, ref / np.sum(w * ref), rtol=1e-10)
    assert exact
    # correlated but feasible behaviours: m_kᵀ m̄_λ equal across k, computed independently
    m = np.array([[1.0, 0.0, 0.0, 0.0], [0.3, 1.2, 0.0, 0.0], [0.0, 0.2, 0.0, 0.8]])
    lam, exact = equal_rate_weights(m, w)
    mbar = np.einsum("k,kd->d", w * lam, m)
    rates = m @ mbar
    assert exact and np.all(lam > 0)
    np.testing.assert_allclose(rates, rates[0], rtol=1e-9)
    assert np.sum(w * lam) == pytest.approx(1.0)
    # infeasible: cos∠ = 0.5 > Δ_w/Δ_s = 0.4 → the NNLS solution drops the strong behaviour
    d60 = _two_behaviours(1.0, 2.5, d=4, sigma=1.0, angle_deg=60.0)
    lam, exact = equal_rate_weights(np.asarray(d60.behavior_mean), np.asarray(d60.weight))
    assert not exact and lam[1] == 0.0 and lam[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="weight"):
        equal_rate_weights(m, np.array([0.5, 0.5, 0.0]))


def test_reweightings_and_sampling_give_the_same_population_trajectory():
    dist = _two_behaviours(1.0, 2.5, d=4, sigma=1.0, angle_deg=75.0)
    ws = reweightings(np.asarray(dist.behavior_mean), np.asarray(dist.weight), np.asarray(dist.distinguishability),
                      ["uniform", "inv_delta_sq", "equal_rate", "sampling"])
    np.testing.assert_allclose(ws["inv_delta_sq"][0], np.array([1 / 1.0, 1 / 6.25]) / (0.5 * (1 + 1 / 6.25)),
                               rtol=1e-5)
    lam = ws["equal_rate"][0]
    rates = np.asarray(dist.behavior_mean) @ (np.asarray(dist.behavior_mean).T @ (0.5 * lam))
    assert ws["equal_rate"][2] and rates[0] == pytest.approx(rates[1], rel=1e-9)
    # sampling weights ω' ∝ ω λ with unit loss weights: the same population objective → the same δ_t
    loss_w = dd.population_trajectory(dist, beta=1.0, lr=0.2, steps=30, loss_weight=jnp.asarray(lam, jnp.float32))
    samp = dd.population_trajectory(dist.replace(weight=jnp.asarray(ws["sampling"][1], jnp.float32)), beta=1.0,
                                    lr=0.2, steps=30)
    np.testing.assert_allclose(np.asarray(samp.delta), np.asarray(loss_w.delta), atol=1e-6)
    # and the initial per-behaviour margin growth is equal: dM_k/dt at t = 0 ∝ m_kᵀ m̄_λ
    m1 = behavior_margin(np.asarray(loss_w.delta[1:2]), np.asarray(dist.behavior_mean), 1.0)[0]
    assert m1[0] == pytest.approx(m1[1], rel=1e-5)


# ----------------------------------------------------------------------------- Q1 theory checks
def test_ipo_time_to_learn_matches_closed_form():
    """Population IPO GD on orthogonal behaviours: τ_k = log(1 − f)/log(1 − 4η h_k), h_k = σ² + ω_k‖m_k‖²."""
    sigma, lr = 0.8, 0.01
    dists = _stack([_two_behaviours(1.0, s, d=4, sigma=sigma) for s in (1.0, 2.0, 3.0)])
    tr = jax.vmap(lambda d: dd.population_trajectory(d, beta=1.0, lr=lr, steps=1500, loss="ipo"))(dists)
    m = np.asarray(dists.behavior_mean, np.float64)
    tau = time_to_learn(np.asarray(tr.step[0]), np.moveaxis(behavior_margin(np.asarray(tr.delta), m, 1.0), -1, -2))
    h = sigma**2 + 0.5 * np.sum(m**2, axis=-1)
    expected = ipo_time_to_learn(h, lr)
    np.testing.assert_allclose(tau, expected, atol=0.05)  # linear interpolation between integer steps
    assert expected[2, 0] / expected[2, 1] == pytest.approx(
        math.log(1 - 4 * lr * h[2, 1]) / math.log(1 - 4 * lr * h[2, 0]))
    with pytest.raises(ValueError, match="lr"):
        ipo_time_to_learn(np.array([10.0]), 0.1)


def test_q1_sigmoid_priority_ordering_agrees_with_gap_sign():
    """C4: the behaviour with the positive priority gap has the smaller time-to-learn (never = +∞)."""
    rng = np.random.default_rng(5)
    pairs = [(*rng.uniform(0.5, 3.0, 2), rng.uniform(30.0, 150.0)) for _ in range(12)]
    pairs += [(1.0, 2.5, 90.0), (2.5, 1.0, 90.0), (1.0, 1.0, 90.0)]
    dists = _stack([_two_behaviours(a, b, d=4, sigma=1.0, angle_deg=g) for a, b, g in pairs])
    cfg = study_config("Q1", quick=True)
    lr = cfg["lr"]["sigmoid"] * cfg["lr_scale"]
    tr = jax.vmap(lambda d: dd.population_trajectory(d, beta=1.0, lr=lr, steps=cfg["steps"], record_every=2))(dists)
    margins = behavior_margin(np.asarray(tr.delta), np.asarray(dists.behavior_mean), 1.0)
    tau = time_to_learn(np.asarray(tr.step[0]), np.moveaxis(margins, -1, -2))
    tau = np.nan_to_num(tau, nan=np.inf)
    gap = np.array([float(dd.priority_gap(np.asarray(dists.preference_direction[i]))[0, 1]) for i in range(len(pairs))])
    for g, t, p in zip(gap[:-1], tau[:-1], pairs[:-1]):
        assert np.sign(g) == np.sign(t[1] - t[0]), (p, g, t)
    # equal behaviours: zero gap and equal τ
    assert gap[-1] == 0.0 and tau[-1, 0] == pytest.approx(tau[-1, 1], rel=1e-6)


# ----------------------------------------------------------------------------- the study command
def test_study_q1_quick_runs_and_writes_files(tmp_path, capsys):
    res = run_study("q1", tmp_path, quick=True, log=lambda msg: None)
    for ext in ("md", "png", "json"):
        assert (tmp_path / f"Q1.{ext}").stat().st_size > 500
    saved = json.loads((tmp_path / "Q1.json").read_text())
    out = capsys.readouterr().out
    assert "## Q1" in out and "headline" in out
    cfg = study_config("Q1", quick=True)
    grid = [(s, r) for r in cfg["label_noise"] for s in cfg["distinguishability_strong"]]
    for loss in cfg["losses"]:
        r = saved["losses"][loss]
        for i, (s, rho) in enumerate(grid):
            if s == cfg["distinguishability_weak"]:  # symmetric control: equal τ
                assert r["ratio_population"][i] == pytest.approx(1.0, abs=1e-6)
            else:  # the more distinguishable behaviour is learned first, in both layers
                assert r["ratio_population"][i] > 1.2 and r["ratio_empirical_mean"][i] > 1.1
    # IPO: the closed form printed beside the measurement agrees
    np.testing.assert_allclose(saved["losses"]["ipo"]["ratio_population"], saved["ipo_closed_form_ratio"], rtol=0.02)
    assert saved["gap_sign"]["agree"] == saved["gap_sign"]["pairs"]
    assert "Command: `dpo-sims study Q1 --quick" in (tmp_path / "Q1.md").read_text()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(f"Q1_{loss}.zarr" for loss in cfg["losses"])
    assert res["quick"] is True


# ----------------------------------------------------------------------------- studies as built-in sweep configs
@pytest.mark.parametrize("quick", [False, True])
def test_study_sweep_configs_parse_and_build_the_study_geometry(quick):
    """Q1's built-in sweep builds two orthogonal balanced behaviours, m_0 = Δ_w/2 e₁, m_1 = Δ_s/2 e₂ (closed form)."""
    from sims.study import _grid_distributions, _sweep_config

    for name in SWEEP_STUDIES:
        cfg = study_config(name, quick=quick)
        scfg = _sweep_config(name, cfg["sweep"], quick=quick)
        assert scfg.base["record_head"] is True and scfg.seeds == cfg["seeds"]
    cfg = study_config("Q1", quick=quick)
    scfg = _sweep_config("Q1", cfg["sweep"], quick=quick)
    assert scfg.axes == ("label_noise", "distinguishability_1")
    m = np.asarray(_grid_distributions(scfg).behavior_mean, np.float64)  # (G, K, d), grid in C order
    grid = [(s, r) for r in cfg["label_noise"] for s in cfg["distinguishability_strong"]]
    expected = np.zeros((len(grid), 2, cfg["d"]))
    expected[:, 0, 0] = cfg["distinguishability_weak"] / 2
    expected[:, 1, 1] = [s / 2 for s, _ in grid]
    np.testing.assert_allclose(m, expected, atol=1e-6)
    assert study_config("Q2")["weightings"][0] == "uniform"  # the embedded ones still load


def test_record_head_stores_the_ipo_closed_form_head(tmp_path):
    """``record_head``: the stored population head is IPO's closed-form GD path, NaN past each d.

    One balanced behaviour, μ± = ±Δ/2 e₁, Σ = σ²I: m = E[s x] = Δ/2 e₁ and H = E[zzᵀ] = σ²I + m mᵀ, so
    population IPO GD from 0 gives δ_t = (1 − (1 − 4ηh)^t) ‖m‖/(2βh) e₁ with h = σ² + Δ²/4
    (docs/theory.md §1.3, §3.1; as :func:`sims.study.ipo_time_to_learn`).
    """
    from sims.store import open_results
    from sims.sweep import parse_config, run_sweep

    beta, lr, steps, sigma = 1.0, 0.02, 30, 0.8
    cfg = parse_config({"seeds": 2, "base": {"loss": "ipo", "beta": beta, "lr": lr, "steps": steps, "record_every": 3,
                                            "n": 64, "n_eval": 64, "sigma": sigma, "record_head": True},
                        "grid": {"d": [2, 3], "distinguishability": [1.0, 2.0]}}, source="<test>")
    run_sweep(cfg, tmp_path / "s.zarr", progress=False, log=lambda m: None)
    ds = open_results(tmp_path / "s.zarr").load()
    assert ds["population_delta"].dims == ("d", "distinguishability", "step", "dim")
    assert ds["delta"].dims == ("d", "distinguishability", "seed", "step", "dim") and ds.sizes["dim"] == 3
    t = ds["step"].values
    for dl in (1.0, 2.0):
        h = sigma**2 + dl**2 / 4
        closed = (1 - (1 - 4 * lr * h) ** t) * (dl / 2) / (2 * beta * h)
        for d in (2, 3):
            pop = ds["population_delta"].sel(d=d, distinguishability=dl).values
            np.testing.assert_allclose(pop[:, 0], closed, rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(pop[:, 1:d], 0.0, atol=1e-7)
            emp = ds["delta"].sel(d=d, distinguishability=dl).values  # (S, T, dim)
            assert np.all(emp[:, 0, :d] == 0.0) and np.all(np.isfinite(emp[..., :d]))
            assert np.all(np.isnan(pop[:, d:])) and np.all(np.isnan(emp[..., d:]))
            # the finite-sample head is near the population one (n = 64: within a stated 40%)
            assert np.all(np.abs(emp[:, -1, 0] - closed[-1]) < 0.4 * closed[-1])


def _tiny_study(name, sweep_over: dict, **flat):
    """A study's config shrunk for a test: ``sweep_over`` merged into its sweep part, ``flat`` into the settings."""
    from sims.study import _merge

    cfg = study_config(name, quick=True)
    cfg["sweep"] = _merge(cfg["sweep"], sweep_over)
    cfg.update(flat)
    return cfg


@pytest.mark.slow
def test_study_q3_from_its_sweep_store(tmp_path):
    """Q3 from the stored heads: the population accuracy is the Bayes accuracy Φ(Δ/2σ) (closed form) and the
    exact held-out accuracy of the trained heads agrees with the Monte Carlo held-out accuracy (4.5 SE)."""
    from scipy.stats import norm

    from sims.study import run_q3

    dims, ns = [2, 4], [16, 256]
    cfg = _tiny_study("Q3", {"seeds": 2, "base": {"steps": 40, "n_eval": 4096},
                             "grid": {"distinguishability": [1.0], "d": dims, "n": ns}},
                      distinguishability=[1.0], dims=dims, d_max=4, n=ns, steps=40, seeds=2, n_eval=4096)
    res = run_q3(cfg, tmp_path, log=lambda m: None)
    assert (tmp_path / "store" / "Q3.zarr").is_dir() and (tmp_path / "Q3.png").is_file()
    assert [(r["n"], r["d"]) for r in res["rows"]] == [(n, d) for n in ns for d in dims]
    for r in res["rows"]:
        assert r["population_accuracy"] == pytest.approx(norm.cdf(0.5), abs=2e-6)
        assert r["heldout_accuracy"] <= r["bayes_accuracy"] + 1e-6
        se = math.sqrt(r["heldout_accuracy"] * (1 - r["heldout_accuracy"]) / (4096 * 2))
        assert abs(r["heldout_accuracy_mc"] - r["heldout_accuracy"]) < 4.5 * se
        assert 0.0 <= r["train_accuracy"] <= 1.0


@pytest.mark.slow
def test_study_q5_from_its_sweep_stores(tmp_path):
    """Q5 from one sweep per family: the mixture's static accuracy at e₁ is its closed form
    ½Φ((Δ/2 + a)/√(1 − a²)) + ½Φ((Δ/2 − a)/√(1 − a²)) (σ = 1), its moments match the Gaussian's,
    and every family's prediction is the Gaussian sweep's population loss."""
    from scipy.stats import norm

    from sims.study import run_q5

    cfg = _tiny_study("Q5", {"seeds": 1, "base": {"steps": 20, "n_eval": 1024}, "grid": {"n": [256], "d": [3]}},
                      dims=[3], d_max=3, n=[256], nu=[5.0], steps=20, seeds=1, n_eval=1024, static_samples=20000)
    res = run_q5(cfg, tmp_path, log=lambda m: None)
    for fam in ("gaussian", "laplace", "student_t", "mixture"):
        assert (tmp_path / "store" / f"Q5_{fam}.zarr").is_dir()
    a, half = cfg["mixture_spread"], cfg["distinguishability"] / 2
    s = math.sqrt(1 - a**2)
    assert res["static_accuracy"]["family"]["mixture"] == pytest.approx(
        0.5 * norm.cdf((half + a) / s) + 0.5 * norm.cdf((half - a) / s), abs=1e-5)
    assert res["static_accuracy"]["gaussian_formula"] == pytest.approx(norm.cdf(half), abs=1e-12)
    assert res["mixture_equivalent_cov_max_abs_error"] < 1e-5
    assert [r["family"] for r in res["rows"]] == ["gaussian", "laplace", "student_t", "mixture"]
    assert len({r["final_loss_predicted"] for r in res["rows"]}) == 1 and res["rows"][0]["loss_gap_excess"] == 0.0
    assert math.log(2) - 0.3 < res["prediction_loss"][0][-1] < math.log(2)  # the loss falls from log 2


def test_study_bad_name_exits_2(capsys):
    assert main(["study", "Q9"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'Q9'" in err and "Q1" in err


# ----------------------------------------------------------------------------- the tutorial
def test_tutorial_code_runs_and_is_right(capsys):
    text = (DOCS / "custom-distributions.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    assert len(blocks[0].strip().splitlines()) < 30  # "a new family in under 30 lines"
    ns: dict = {}
    exec(compile("\n".join(blocks), "custom-distributions.md", "exec"), ns)
    assert "population loss at step 100" in capsys.readouterr().out
    pop, emp, make, sigmas = ns["pop"], ns["emp"], ns["make"], ns["sigmas"]
    assert pop.metrics["loss"].shape == (3, 11) and emp.eval["loss"].shape == (3, 4, 11)
    # sampling: first two moments equal those of the moment-matched Gaussian (Monte Carlo)
    fam = make(jnp.asarray(1.3))
    x, s, beh = (np.asarray(a, np.float64) for a in fam.sample(jax.random.key(1), 200_000))
    eq = fam.gaussian_equivalent()
    pos = s > 0
    np.testing.assert_allclose(x[pos].mean(0), np.asarray(eq.mu_pos[0]), atol=0.02)
    np.testing.assert_allclose(np.cov(x[pos].T), np.asarray(eq.cov_pos[0]), atol=0.04)
    assert abs(pos.mean() - 0.5) < 0.005 and np.all(beh == 0)
    # C1 holds for any family: the first population step is δ_1 = η β m̄ for every σ
    # (δ_1 = −2η ∇L(0) on the moment-matched Gaussian the population layer uses; m̄ = μ⁺ = (0.75, 0, 0, 0))
    for sg in np.asarray(sigmas):
        g = dd.population_gradient(make(jnp.asarray(sg)).gaussian_equivalent(), jnp.zeros(4), beta=1.0)
        np.testing.assert_allclose(-2 * 0.1 * np.asarray(g), [0.075, 0, 0, 0], atol=1e-7)
    assert float(pop.metrics["weight_change"][0, 0]) == 0.0
    # block 3: the family's parameter swept by the sweep engine; each stored run = a direct call
    from sims.sweep import seed_key

    ds, common = ns["ds"].load(), ns["common"]
    np.testing.assert_allclose(ds["noise_scale"].values, [0.5, 1.0, 2.0])
    for i, sg in enumerate([0.5, 1.0, 2.0]):
        np.testing.assert_allclose(ds["population_loss"].values[i], pop.metrics["loss"][i], rtol=2e-5)
        for s in (0, 3):
            run = dd.empirical_trajectory(make(jnp.asarray(sg)), seed_key(0, s), n=512, **common)
            np.testing.assert_allclose(ds["loss"].sel(split="eval").values[i, s], run.eval["loss"], rtol=2e-5,
                                       atol=2e-6)
    # light-tailed noise: the moment-matched population loss predicts the held-out loss closely
    np.testing.assert_allclose(np.asarray(emp.eval["loss"][:, :, -1]).mean(1), np.asarray(pop.metrics["loss"][:, -1]),
                               atol=0.02)
