"""The vocabulary objectives in the one engine entry point, ``dpo-sims sweep`` and ``simulate``.

References: direct calls of :func:`dynamics.vocab_population_trajectory` /
:func:`dynamics.vocab_empirical_trajectory` on the distribution built independently here (NumPy),
configuration by configuration, in float64; the margin engine (:func:`dynamics.population_trajectory`)
at V = 2; a closed form of the first step. Bad input: one line, exit 2, naming the field.
"""
from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

import dynamics as dd
from sims import simulate
from sims import sweep as sw
from sims.cli import UsageError, main

TOL = dict(rtol=1e-12, atol=1e-12)


def _dist(delta):
    """The sweep's generated law for distinguishability ``delta`` (K = 2, d = 2, angle 90°, σ = 1, p = ½)."""
    b = np.diag(np.asarray(delta, float))  # b_0 = Δ_0 e_1, b_1 = Δ_1 e_2
    return dd.GaussianPreference.create(b / 2, -b / 2, np.stack([np.eye(2)] * 2), p_pos=[0.5, 0.5],
                                        weight=[0.5, 0.5])


# ----------------------------------------------------------------------------- names (JAX-free copies)
def test_schema_objective_tuples_equal_the_registry():
    """The JAX-free schema's objective names, f-divergences and hyper-parameter fields are the registry's."""
    assert sw.schema.OBJECTIVE_NAMES == dd.losses.OBJECTIVE_NAMES
    assert sw.schema.F_DIVERGENCE_NAMES == dd.losses.F_DIVERGENCES
    every = set().union(*(o.hparams for o in dd.losses.OBJECTIVES.values()))
    assert set(sw.schema.OBJECTIVE_HPARAMS) <= every
    assert set(sw.schema.LOSS_CHOICES) == set(dd.losses.OBJECTIVE_NAMES) | set(dd.LOSSES)
    assert simulate.LOSS_CHOICES == dd.LOSSES


# ----------------------------------------------------------------------------- the engine entry point
@pytest.mark.slow  # four compilations of the vocabulary layers: ~100 s on the loaded 2-core machine
def test_trajectories_runs_the_vocabulary_layers_per_configuration(x64):
    """C = 2 configurations (distribution, β, η, a per-configuration hyper-parameter) through
    ``dd.trajectories`` equal the direct vocabulary calls of each configuration (float64)."""
    dists = [_dist([1.0, 1.5]), _dist([2.0, 0.5])]
    batch = jax.tree.map(lambda *a: np.stack(a), *dists)
    head = dd.Head.zeros(2, vocab_size=2, pairs=((0, 1), (1, 0)))
    beta, lr, gamma = np.array([0.5, 2.0]), np.array([0.1, 0.3]), np.array([0.2, 0.6])
    pop = dd.trajectories(batch, layer="population", loss="simpo", beta=beta, lr=lr, steps=2, head=head,
                          simpo_gamma=gamma)
    key = jax.random.key(5)
    train, held = dd.trajectories(batch, key, layer="empirical", loss="simpo", beta=beta, lr=lr, steps=2,
                                  head=head, n=32, n_eval=16, simpo_gamma=gamma)
    assert pop.metrics["probs"].shape == (2, 3, 2, 2) and train.loss_total.shape == (2, 3)
    for c in range(2):
        kw = dict(head=head, loss_type="simpo", beta=beta[c], lr=lr[c], steps=2, simpo_gamma=gamma[c])
        ref = dd.vocab_population_trajectory(dists[c], **kw)
        rt, re = dd.vocab_empirical_trajectory(dists[c], key, n=32, n_eval=16, **kw)
        np.testing.assert_allclose(pop.loss_total[c], ref.loss_total, **TOL)
        np.testing.assert_allclose(train.loss_total[c], rt.loss_total, **TOL)
        np.testing.assert_allclose(held.grad_norm[c], re.grad_norm, **TOL)
        for m in ref.metrics:
            np.testing.assert_allclose(pop.metrics[m][c], ref.metrics[m], **TOL, err_msg=m)
            np.testing.assert_allclose(train.metrics[m][c], rt.metrics[m], **TOL, err_msg=m)


def test_trajectories_refuses_factored_and_margin_only_interventions():
    batch = jax.tree.map(lambda *a: np.stack(a), _dist([1.0, 1.0]), _dist([1.0, 2.0]))
    head = dd.Head.zeros(2, vocab_size=3)
    with pytest.raises(ValueError, match=r"implementation='factored' does not apply: model='vocabulary'") as e:
        dd.trajectories(batch, beta=1.0, lr=0.1, steps=1, head=head, implementation="factored", model="vocabulary")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"model='margin' does not apply: loss='simpo' is not a margin loss"):
        dd.trajectories(batch, beta=1.0, lr=0.1, steps=1, loss="simpo", model="margin")
    with pytest.raises(ValueError, match="implementation='factored' does not apply: loss='orpo'"):
        dd.trajectories(batch, beta=1.0, lr=0.1, steps=1, loss="orpo", implementation="factored")
    with pytest.raises(ValueError, match="label_noise is a margin-engine intervention"):
        dd.trajectories(batch, beta=1.0, lr=0.1, steps=1, loss="sft", label_noise=[0.1, 0.0])
    with pytest.raises(ValueError, match=r"unknown loss_type 'simpoo' \(did you mean 'simpo'\?\)"):
        dd.trajectories(batch, beta=1.0, lr=0.1, steps=1, loss="simpoo")
    with pytest.raises(ValueError, match="label_smoothing has no effect with loss 'sft'"):
        dd.trajectories(batch, beta=1.0, lr=0.1, steps=1, loss="sft", label_smoothing=0.1)


def test_margin_engines_refuse_per_behaviour_pairs():
    """population_trajectory, empirical_trajectory and the factored engine read rows (a, b) only: a head
    with other per-behaviour pairs is refused in one line pointing to the vocabulary layers."""
    dist = _dist([1.0, 1.0])
    head = dd.Head.zeros(2, vocab_size=3, pairs=((0, 1), (1, 2)))
    calls = [lambda: dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=1, head=head),
             lambda: dd.empirical_trajectory(dist, jax.random.key(0), n=8, beta=1.0, lr=0.1, steps=1, head=head),
             lambda: dd.batched.batched_empirical_trajectory(dd.batched.PreferenceBatch.from_dists([dist]),
                                                             jax.random.key(0), n=8, beta=1.0, lr=0.1, steps=1,
                                                             head=head)]
    for call in calls:
        with pytest.raises(ValueError, match="margin-only engine .* use dynamics.trajectories") as e:
            call()
        assert "\n" not in str(e.value)
    same = dd.Head.zeros(2, pairs=((0, 1), (0, 1)))  # every pair (a, b): the margin model itself
    assert same.check_margin_only("x") is same


# ----------------------------------------------------------------------------- bad input
def _parse(**base):
    return sw.parse_config({"base": {"d": 2, "distinguishability": [1.0, 1.5], **base}})


@pytest.mark.parametrize("base, message", [
    ({"loss": "simpoo"}, "unknown value 'simpoo' — did you mean 'simpo'?"),
    ({"vocab_size": 3, "token_pairs": "0,1;1,3"}, "base.token_pairs: token_pairs: pair 1 (1,3) names a token outside"),
    ({"token_pairs": "1,1"}, "pair 0 (1,1) has chosen = rejected"),
    ({"token_pairs": "0,1;1,0;0,1"}, "token_pairs gives 3 pairs but there are K = 2 behaviours"),
    ({"loss": "sigmoid+sft", "loss_weights": "1,2,3"}, "has 3 weights but loss = 'sigmoid+sft' has 2 objectives"),
    ({"vocab_size": 1}, "vocab_size = 1 is out of range; pass a value >= 2"),
    ({"loss": "sigmoid", "rpo_alpha": 0.5}, "rpo_alpha is taken by no loss of the sweep"),
    ({"loss": "exo_pair"}, "label_smoothing must be > 0 with loss_type 'exo_pair'"),
    ({"loss": "sft", "label_smoothing": 0.1}, "label_smoothing applies to loss = cdpo or robust only among the margin losses (and exo_pair"),
])
def test_sweep_config_bad_objective_settings_one_line(base, message):
    with pytest.raises(UsageError) as e:
        _parse(**base)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_objective_input_exits_2(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(textwrap.dedent("""
        [base]
        vocab_size = 3
        token_pairs = "0,5"
    """))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "bad.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "token_pairs" in err and "outside the vocabulary [0, V=3)" in err
    assert not (tmp_path / "bad.zarr").exists()
    for argv, message in ((["--loss", "simpoo"], "did you mean 'simpo'?"),
                          (["--vocab-size", "3", "--token-pairs", "0,3"], "outside the vocabulary [0, V=3)"),
                          (["--token-pairs", "1,1"], "chosen = rejected"),
                          (["--vocab-size", "1"], "vocab_size = 1 is out of range"),
                          (["--loss", "sigmoid+sft", "--loss-weights", "1"], "has 1 weights but loss"),
                          (["--rpo-alpha", "0.5"], "--rpo-alpha has no effect with --loss sigmoid")):
        try:
            code = main(["simulate", "--steps", "1", *argv])
        except SystemExit as stop:  # argparse's own usage error
            code = stop.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err.splitlines()[-1], (argv, err)


def test_group_spec_picks_the_engine():
    """Margin losses at V = 2 with default hyper-parameters stay on the paper's engine (bit-identical
    stores); any other objective, V > 2, token pairs or a hyper-parameter off its default does not."""
    cfg = sw.parse_config({"base": {"d": 2, "distinguishability": [1.0, 1.5]},
                           "grid": {"loss": ["sigmoid", "rpo"], "vocab_size": [2, 3]}})
    specs = sw.plan._static_combos(cfg)
    assert [(s.loss, s.vocab_size, s.vocab) for s in specs] == [("sigmoid", 2, False), ("sigmoid", 3, True),
                                                                ("rpo", 2, True), ("rpo", 3, True)]
    spec = sw.plan._static_combos(_parse(loss="sigmoid", f_divergence_type="reverse_kl"))[0]
    assert not spec.vocab and spec.hparams == ()  # the default: the margin engine
    spec = sw.plan._static_combos(_parse(loss="sigmoid", f_divergence_type="js_divergence"))[0]
    assert spec.vocab and spec.hparams == (("f_divergence_type", "js_divergence"),)
    spec = sw.plan._static_combos(_parse(token_pairs="0,1;1,0"))[0]
    assert spec.vocab and spec.token_pairs == ((0, 1), (1, 0))
    # the new fields at their defaults leave the resolved config (old stores keep their fingerprint)
    assert "vocab_size" not in _parse().resolved()["base"] and _parse(vocab_size=3).resolved()["base"]["vocab_size"] == 3


# ----------------------------------------------------------------------------- the sweep end to end
SWEEP = """
    seeds = 1
    seed = 11
    [base]
    mode = "both"
    d = 2
    distinguishability = [1.0, 1.5]
    steps = 2
    n = 24
    n_eval = 16
    beta = 0.8
    lr = 0.3
    [grid]
    loss = ["sigmoid", "ipo", "simpo", "sft"]
    vocab_size = [2, 3]
"""


@pytest.fixture(scope="module")
def objective_sweep(tmp_path_factory):
    with jax.enable_x64(True):
        tmp = tmp_path_factory.mktemp("objectives")
        (tmp / "cfg.toml").write_text(textwrap.dedent(SWEEP))
        cfg = sw.load_config(tmp / "cfg.toml")
        res = sw.run_sweep(cfg, tmp / "obj.zarr", progress=False)
        import xarray as xr

        return res, xr.open_zarr(res.path).load()


@pytest.mark.slow
def test_sweep_over_objectives_and_vocab_size_equals_direct_calls(objective_sweep, x64):
    """Every (loss, V) group's stored curves equal the direct vocabulary calls (float64, 1e-12); the
    margin groups at V = 2 (the paper's engine) store the loss the vocabulary layer gives too."""
    from sims.sweep.build import vocab_metrics

    res, ds = objective_sweep
    assert res.computed == res.n_chunks and not res.diverged
    assert ds.sizes["token"] == 3 and ds["population_behavior_probs"].dims[-2:] == ("behavior", "token")
    dist = _dist([1.0, 1.5])
    key = jax.random.fold_in(jax.random.key(11), 0)  # the sweep's seed 0
    for i, loss in enumerate(["sigmoid", "ipo", "simpo", "sft"]):
        for j, v in enumerate([2, 3]):
            head = dd.Head.zeros(2, vocab_size=v)
            kw = dict(head=head, loss_type=loss, beta=0.8, lr=0.3, steps=2)
            pop = vocab_metrics(dd.vocab_population_trajectory(dist, **kw))
            train, held = (vocab_metrics(t) for t in dd.vocab_empirical_trajectory(dist, key, n=24, n_eval=16, **kw))
            at = dict(loss_type=i, vocab_size=j)
            if loss in dd.LOSSES and v == 2:  # the margin engine ran: its loss is the vocabulary layer's
                np.testing.assert_allclose(ds["population_loss"][at].values, pop["loss"], **TOL)
                np.testing.assert_allclose(ds["loss"][at].sel(split="train").values[0], train["loss"], **TOL)
                np.testing.assert_allclose(ds["loss"][at].sel(split="eval").values[0], held["loss"], **TOL)
                margin = dd.population_trajectory(dist, beta=0.8, lr=0.3, steps=2, loss=loss)
                np.testing.assert_allclose(ds["population_loss"][at].values, margin.metrics["loss"], **TOL)
                assert np.isnan(ds["population_logps_chosen"][at].values).all()
                continue
            for name, value in pop.items():
                got = ds[f"population_{name}"][at].values
                np.testing.assert_allclose(got[..., :v] if name.endswith("probs") else got, value, **TOL,
                                           err_msg=f"{loss} V={v} population_{name}")
            for split, ref in (("train", train), ("eval", held)):
                for name, value in ref.items():
                    got = ds[name][at].sel(split=split).values[0]
                    np.testing.assert_allclose(got[..., :v] if name.endswith("probs") else got, value, **TOL,
                                               equal_nan=True, err_msg=f"{loss} V={v} {split} {name}")
            if v == 2:
                assert np.isnan(ds["population_probs"][at].values[..., 2]).all()  # NaN past this group's V
    assert not ds["diverged"].values.any() and not ds["population_diverged"].values.any()


@pytest.mark.slow
def test_plot_reads_the_vocabulary_variables(objective_sweep, tmp_path):
    res, _ = objective_sweep
    out = tmp_path / "logps.png"
    assert main(["plot", str(res.path), "--y", "logps_chosen", "--hue", "loss_type", "--facet", "vocab_size",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 0


@pytest.mark.slow  # two compilations (~50 s on 2 loaded cores)
def test_simulate_vocabulary_first_step_closed_form(capsys, x64):
    """``simulate --loss sft --vocab-size 3``: from the zero head, one SFT step on the population changes
    ``E log π(y_w|x)`` by a closed form: W_1 = η Σ_c π_c (e_{y_w} − 1/V) m_cᵀ, so at the chosen token
    log π = z_w − logsumexp(z) with z = W_1 x; checked against a float64 NumPy Monte Carlo (5e-3)."""
    argv = ["simulate", "--loss", "sft", "--vocab-size", "3", "--token-pairs", "0,1;2,1",
            "--distinguishability", "1", "1.5", "--d", "2", "--steps", "1", "--rows", "2", "--n", "32",
            "--n-eval", "32", "--lr", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# vocabulary layers: K=2, d=2, V=3, token_pairs=[[0, 1], [2, 1]]")
    header = out[1].split()
    row0, row1 = (dict(zip(header, line.split())) for line in out[2:4])
    assert abs(float(row0["loss:pop"]) - np.log(3)) < 1e-4  # −log(1/3) at the zero head
    # NumPy: chosen token a_k for s = +1 (x ~ N(b/2, I)), b_k for s = −1 (x ~ N(−b/2, I)), p = ½
    rng = np.random.default_rng(0)
    b = np.diag([1.0, 1.5])
    w1 = np.zeros((3, 2))
    pairs = [(0, 1), (2, 1)]
    for k in range(2):
        for s, (tok, mean) in ((1, (pairs[k][0], b[k] / 2)), (-1, (pairs[k][1], -b[k] / 2))):
            w1 += 0.5 * 0.5 * 0.5 * np.outer(np.eye(3)[tok] - 1 / 3, mean)  # lr · ω_k · P(s) · E[∇]
    lp = []
    for k in range(2):
        for s in (1, -1):
            x = rng.standard_normal((200_000, 2)) + s * b[k] / 2
            tok = pairs[k][0] if s > 0 else pairs[k][1]
            z = x @ w1.T
            lp.append(np.mean(z[:, tok] - np.log(np.exp(z).sum(axis=1))))
    assert abs(float(row1["loss:pop"]) - (-np.mean(lp))) < 5e-3
