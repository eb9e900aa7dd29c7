"""The displacement study (sims/displacement.py): its analysis functions against independent NumPy
computations, its bad-input errors, and (slow) the end-to-end ``dpo-sims study displacement --quick``."""
import json

import numpy as np
import pytest
from scipy.special import log_softmax

import dynamics as dd
from sims import displacement as disp
from sims.cli import main


def _np_expected(w, mu, pairs, sigma, order=40):
    """NumPy, per behaviour: ``(E log π_W(y_w|x) − log(1/V), E π_W(·|x) (V,))`` on a 2-D Gauss–Hermite rule
    over x ~ N(s μ_k, σ²I), labels s = ±1 with probability 1/2 (chosen a_k for s = +1, b_k for s = −1)."""
    g, gw = np.polynomial.hermite_e.hermegauss(order)
    gw = gw / np.sqrt(2.0 * np.pi)
    nodes = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    wts = np.outer(gw, gw).reshape(-1)
    logp, probs = [], []
    for k, (a, b) in enumerate(pairs):
        tot, p = 0.0, 0.0
        for s, chosen in ((1.0, a), (-1.0, b)):
            lp = log_softmax((s * mu[k] + sigma * nodes) @ w.T, axis=1)
            tot += 0.5 * (wts @ lp[:, chosen])
            p = p + 0.5 * (wts @ np.exp(lp))
        logp.append(tot + np.log(w.shape[0]))
        probs.append(p)
    return np.array(logp), np.array(probs)


def _traj(logps, probs, weights):
    """A hand-made VocabTrajectory holding the two metrics the analysis functions read."""
    from dynamics.vocab import VocabTrajectory

    t = logps.shape[0]
    return VocabTrajectory(steps=np.arange(t), metrics={"logps/chosen": logps, "probs": probs}, loss_total=np.zeros(t),
                           grad_norm=np.zeros(t), weights=np.asarray(weights), w=np.zeros((t, 3, 2)))


def test_chosen_logp_change_and_mass_shift_direct():
    """From the first record to the last, per behaviour and ω-weighted (unequal weights 0.2/0.8);
    mass_shift rows sum to 0 and mark where the mass went."""
    logps = np.array([[-1.0, -2.0], [-1.5, -1.0], [-1.25, -0.5]])  # (T, K)
    probs = np.array([[[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]],
                      [[0.4, 0.3, 0.3], [0.2, 0.4, 0.4]],
                      [[0.3, 0.3, 0.4], [0.1, 0.6, 0.3]]])  # (T, K, V)
    got = disp.chosen_logp_change(_traj(logps, probs, [0.2, 0.8]))
    np.testing.assert_allclose(got["per_behavior"], [-0.25, 1.5])
    np.testing.assert_allclose(got["mean"], 0.2 * -0.25 + 0.8 * 1.5)
    np.testing.assert_allclose(disp.mass_shift(probs), [[-0.2, 0.0, 0.2], [-0.1, 0.3, -0.2]], atol=1e-15)
    stacked = disp.chosen_logp_change(_traj(np.stack([logps, -logps]), np.stack([probs, probs]),
                                            np.array([[0.2, 0.8], [0.2, 0.8]])))  # a vmapped (β) axis
    np.testing.assert_allclose(stacked["mean"], [1.15, -1.15])


@pytest.mark.slow
def test_chosen_logp_change_one_dpo_step_closed_form(x64):
    """One population DPO (sigmoid) step from W = W_ref = 0 has a closed form: every margin is 0, so
    ∂ℓ/∂z = −(β/2)(e_w − e_l) for every pair and W_1 = (ηβ/2) Σ_k ω_k (e_{a_k} − e_{b_k}) μ_k⁺ᵀ.
    Behaviour 0 (" Yes"/" No") shares its direction with behaviour 1 (" No"/" Never", Δ twice as large):
    behaviour 1's push on " No" outweighs behaviour 0's own, so behaviour 0's chosen log-prob falls
    (−0.116 nats) while behaviour 1's rises (+0.472); an independent NumPy quadrature gives both, and
    the expected probabilities of every token. (Slow: one population compile, ~20–70 s on 2 loaded cores.)"""
    from dynamics.vocab_population import vocab_population_trajectory

    pairs = ((0, 1), (1, 2))
    dist = dd.GaussianPreference.from_angles([2.0, 4.0], angles_deg=0.0, d=2, sigma=1.0)
    head = dd.Head.zeros(2, vocab_size=3, pairs=pairs)
    lr, beta = 1.0, 1.0
    tr = vocab_population_trajectory(dist, head=head, loss_type="sigmoid", beta=beta, lr=lr, steps=1)
    mu = np.asarray(dist.mu_pos)
    w1 = np.zeros((3, 2))
    for k, (a, b) in enumerate(pairs):
        w1[a] += lr * beta / 2 * 0.5 * mu[k]
        w1[b] -= lr * beta / 2 * 0.5 * mu[k]
    np.testing.assert_allclose(np.asarray(tr.w[1]), w1, atol=1e-12)
    expected, probs1 = _np_expected(w1, mu, pairs, 1.0)
    got = disp.chosen_logp_change(tr)
    np.testing.assert_allclose(got["per_behavior"], expected, atol=1e-6)
    np.testing.assert_allclose(got["mean"], expected.mean(), atol=1e-6)  # equal behaviour weights
    assert got["per_behavior"][0] < -0.1 and got["per_behavior"][1] > 0.4  # displacement of behaviour 0 only
    shift = disp.mass_shift(tr.metrics["probs"])
    np.testing.assert_allclose(shift, probs1 - 1.0 / 3.0, atol=1e-6)
    np.testing.assert_allclose(shift.sum(-1), 0.0, atol=1e-12)


def test_learning_times_first_recorded_step_past_the_fraction():
    """τ_k is the first recorded step where (L_0 − L_t)/(L_0 − L_T) ≥ f, checked against a direct loop
    on exponential decays of rates 0.02 and 0.1; a loss that rises is NaN ("never")."""
    step = np.arange(0, 201, 4)
    rates = np.array([0.02, 0.1])
    loss = np.exp(-np.outer(step, rates))  # (T, K)
    loss = np.concatenate([loss, (1.0 + 0.001 * step)[:, None]], axis=1)  # a third behaviour that never learns
    for f in (0.5, 0.9):
        tau = disp.learning_times(step, loss, f)
        for k, r in enumerate(rates):
            prog = (1 - np.exp(-r * step)) / (1 - np.exp(-r * step[-1]))
            assert tau[k] == step[np.nonzero(prog >= f)[0][0]]
        assert np.isnan(tau[2])
    # vmapped leading axes (β) pass through
    assert disp.learning_times(step, np.stack([loss, loss]), 0.5).shape == (2, 3)
    with pytest.raises(ValueError, match="fraction"):
        disp.learning_times(step, loss, 1.5)
    with pytest.raises(ValueError, match="expected"):
        disp.learning_times(step[:-1], loss)
    assert disp.max_abs_gap([1.0, np.nan, 3.0], [1.5, 2.0, 2.0]) == 1.0


@pytest.mark.parametrize("argv, needle", [
    (["--part", "z"], "unknown part 'z'"),
    (["--part", "a,e"], "unknown part 'e'"),
])
def test_study_displacement_bad_part_exits_2(tmp_path, capsys, argv, needle):
    assert main(["study", "displacement", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing ran


def test_study_displacement_bad_out_and_part_elsewhere_exit_2(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["study", "displacement", "--out", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a folder" in err and len(err.splitlines()) == 1
    assert main(["study", "Q1", "--part", "a", "--out", str(tmp_path)]) == 2
    assert "displacement study only" in capsys.readouterr().err


@pytest.mark.slow
def test_study_displacement_quick_end_to_end(tmp_path, capsys):
    assert main(["study", "displacement", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "displacement.json").read_text())
    for part in "abd":
        assert (tmp_path / f"displacement_{part}.png").stat().st_size > 10_000
    cfg = disp.config(quick=True)
    ran = [n for n in cfg["objectives"] if n not in res["skipped"]]
    assert "sigmoid" in ran
    assert ("kto" in res["skipped"]) != ("kto" in ran)  # kto: batch-level, skipped while its population layer raises
    gaps = res["max_abs_pop_emp_loss"]
    assert set(gaps["per_objective"]) == set(ran) and gaps["n"] == cfg["n"]
    assert gaps["max"] == max(gaps["per_objective"].values()) < 0.02  # N = 2·10⁴: a few standard errors
    assert set(res["chosen_logp_change"]) == set(ran)
    for name in ran:
        assert set(res["chosen_logp_change"][name]) == {f"beta={b:g}" for b in cfg["betas"]}
    assert res["c"] == "not available" or isinstance(res["c"], dict)
    for key in ("a", "b", "d", "config", "seconds"):
        assert key in res
    assert "Command: `dpo-sims study displacement --quick" in (tmp_path / "displacement.md").read_text()
