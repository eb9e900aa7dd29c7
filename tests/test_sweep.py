"""Sweep configs, grouping/vmapping against direct core calls, resume after kill -9, divergence.

Budget (2 shared cores): about a minute — four small compile groups plus one
sweep in a subprocess.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
import xarray as xr

import dynamics as dd
from sims import sweep as sw
from sims.cli import UsageError, main
from sims.store import ResultsStore

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 2e-5, 2e-6  # vmapped + fast-compiled vs direct float32 calls


def _write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _run_cli(capsys, *args):
    code = main(["sweep", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- parsing
def test_example_config_parses_and_expands():
    cfg = sw.load_config("builtin:example")
    assert cfg.axes == ("distinguishability", "lr")
    np.testing.assert_allclose(cfg.grid["lr"], [0.01, 10**-1.5, 0.1])
    assert cfg.shape == (4, 3) and cfg.num_configs == 12 and cfg.seeds == 4
    assert cfg.base["loss"] == "sigmoid" and cfg.base["distinguishability"] == [1.0]
    assert cfg.base["kappa"] == 1.0 and cfg.base["flip_labels"] is False  # defaults filled in
    assert "example" in sw.builtin_configs() and "reproduce_priority" in sw.builtin_configs()
    assert sw.load_config("builtin:example").fingerprint() == cfg.fingerprint()


def test_axis_forms_and_element_axes(tmp_path):
    cfg = sw.load_config(_write(tmp_path, """
        seeds = 3
        [base]
        distinguishability = [2.0, 1.0, 0.5]
        angle = 70.0
        [grid]
        distinguishability_1 = {linspace = [0.5, 1.5, 3]}
        n = {logspace = [2, 3, 2]}
        loss = ["sigmoid", "ipo"]
        flip_labels = [false, true]
        sigma = [0.5, 1.0]
    """))
    assert cfg.num_behaviors == 3
    assert cfg.grid["distinguishability_1"] == [0.5, 1.0, 1.5]
    assert cfg.grid["n"] == [100, 1000]
    f = sw.configuration_fields(cfg, (2, 1, 1, 1, 0))
    assert f["distinguishability"] == [2.0, 1.5, 0.5] and f["n"] == 1000 and f["loss"] == "ipo"
    assert f["flip_labels"] is True and f["sigma"] == [0.5, 0.5, 0.5]
    assert cfg.base["distinguishability"] == [2.0, 1.0, 0.5]  # base untouched
    assert not cfg.is_static_axis("distinguishability_1") and cfg.is_static_axis("n")
    # blocks: static axes get length 1, dynamic ones fill from the last axis inwards
    plan = sw.plan_sweep(cfg, chunk_size=8)
    assert plan.block == (2, 1, 1, 2, 2)
    assert len(plan.chunks) == 2 * 2 * 2 * 1 * 1
    # the last Δ₁ block holds one configuration × 2 × 2, padded to 8 by repeating the last one
    idx, region, extents = sw._chunk_configs(cfg, plan, (1, 1, 0, 0, 0))
    assert region[0] == slice(2, 3) and extents == (1, 1, 1, 2, 2) and len(idx) == 4
    params, statics = sw._chunk_inputs(cfg, idx, plan.chunk_configs)
    assert params["distinguishability"].shape == (8, 3) and statics["n"] == 1000 and statics["loss"] == "sigmoid"
    np.testing.assert_array_equal(params["distinguishability"][:, 1], [1.5] * 8)
    np.testing.assert_array_equal(params["flip_labels"], [False, False, True, True] + [True] * 4)
    # no [grid]: one chunk with the base configuration alone
    bare = sw.parse_config({"seeds": 2})
    p0 = sw.plan_sweep(bare)
    assert p0.block == () and p0.chunks == [()]
    idx0, region0, ext0 = sw._chunk_configs(bare, p0, ())
    assert idx0.shape == (1, 0) and region0 == () and ext0 == ()
    assert sw._chunk_inputs(bare, idx0, 1)[0]["lr"].tolist() == [pytest.approx(0.1)]


BAD = [
    ("[base]\nlrr = 0.1\n", "base.lrr: unknown key — did you mean 'lr'?"),
    ("sedes = 3\n", "sedes: unknown top-level key — did you mean 'seeds'?"),
    ("lr = 0.1\n", "lr: unknown top-level key — put it under [base]"),
    ("[grid]\ndistinguishabilty = [1.0]\n", "grid.distinguishabilty: unknown axis — did you mean 'distinguishability'?"),
    ("[grid]\nlr = []\n", "grid.lr: the axis has no values"),
    ("[grid]\nlr = [0.1, 0.1]\n", "grid.lr: repeated value(s) [0.1]"),
    ("[base]\nsteps = \"ten\"\n", "base.steps: expected an integer, got a string 'ten'"),
    ("[base]\nsteps = 100.0\n", "base.steps: expected an integer, got a float 100.0; write 100"),
    ("[base]\nbeta = \"x\"\n", "base.beta: expected a number, got a string 'x'"),
    ("[grid]\nflip_labels = [1, 0]\n", "grid.flip_labels[0]: expected true or false"),
    ("[grid]\nlr = {linspace = [0, 1]}\n", "grid.lr: linspace = [0, 1]: expected [start, stop, count]"),
    ("[grid]\nlr = {range = [0, 1, 2]}\n", "grid.lr: a table axis needs exactly one key"),
    ("[grid]\nlr = [0.1, -0.1]\n", "grid.lr[1]: lr = -0.1 is out of range; pass a value > 0"),
    ("[base]\nloss = \"sigmod\"\n", "base.loss: unknown value 'sigmod' — did you mean 'sigmoid'?"),
    ("[base]\nsteps = 10\nrecord_every = 3\n", "base.record_every: record_every = 3 does not divide steps = 10"),
    ("[base]\nn = 8\nbatch_size = 16\n", "base.batch_size: batch_size = 16 exceeds n = 8"),
    ("[base]\ndistinguishability = [1.0, 2.0]\nsigma = [1.0, 1.0, 1.0]\n", "base.sigma: has 3 values but distinguishability gives K = 2"),
    ("[base]\ndistinguishability = [1.0, 2.0]\n[grid]\ndistinguishability = [1.0]\n",
     "grid.distinguishability: there are K = 2 behaviours; sweep one of them with distinguishability_0, distinguishability_1"),
    ("[grid]\nmode = [\"both\"]\n", "grid.mode: mode cannot be swept"),
    ("[base]\ndistinguishability = [1.0, 1.0, 1.0]\nangle = 150.0\n", "base.angle: angle = 150.0° between every pair of K = 3 directions is impossible"),
    ("[base]\nmethod = \"flow\"\noptimizer = \"adam\"\n", "base.method: method = \"flow\" is plain gradient flow"),
    ("[base]\nlabel_smoothing = 0.1\n", "base.label_smoothing: label_smoothing applies to loss = cdpo or robust only"),
    ("[base]\neps = 0.1\n", "base.eps: eps was renamed; use label_smoothing instead"),
    ("[grid]\neps = [0.0, 0.1]\n", "grid.eps: eps was renamed; use label_smoothing instead"),
    ("[base]\ndistribution = \"file\"\npath = \"nope.npz\"\n", "base.path: "),
    ("[base]\nd = 4\n[grid\n", "not valid TOML"),
    ("[base]\nn = 1000000000\nd = 4096\n", "one configuration needs about"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, text, message):
    cfg = _write(tmp_path, text)
    out = tmp_path / "res.zarr"
    code, stdout, err = _run_cli(capsys, cfg, "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]


def test_missing_config_and_unknown_builtin(tmp_path, capsys):
    code, _, err = _run_cli(capsys, tmp_path / "none.toml", "--out", tmp_path / "o.zarr")
    assert code == 2 and "no such config file" in err
    code, _, err = _run_cli(capsys, "builtin:exampel", "--out", tmp_path / "o.zarr")
    assert code == 2 and "did you mean 'example'?" in err and not (tmp_path / "o.zarr").exists()


def test_dry_run_writes_nothing(tmp_path, capsys):
    code, out, _ = _run_cli(capsys, "builtin:example", "--out", tmp_path / "o.zarr", "--dry-run", "--chunk-size", "5")
    assert code == 0 and "12 configurations x 4 seeds" in out and "chunks of 3 configurations" in out
    assert not (tmp_path / "o.zarr").exists()


# ----------------------------------------------------------------------------- model build
def test_build_distribution_matches_independent_construction():
    """Generated directions (Cholesky of the cosine matrix), κ, aligned head and flip, vs NumPy."""
    d, theta, kappa, hn = 5, 70.0, 1.7, 0.8
    delta = np.array([2.0, 1.0, 0.5])
    sigma = np.array([1.0, 0.7, 1.3])
    p = np.array([0.5, 0.8, 0.3])
    w = np.array([0.5, 0.3, 0.2])
    fields = dict(distinguishability=delta, sigma=sigma, p=p, weight=w, angle=theta, kappa=kappa,
                  aligned_head_norm=hn, flip_labels=False)
    dist, head = jax.jit(partial(sw.build_distribution, d=d))(fields)  # traceable, as inside the sweep
    b = np.asarray(dist.mu_pos - dist.mu_neg, dtype=np.float64)
    c = math.cos(math.radians(theta))
    gram = b @ b.T / np.outer(kappa * delta, kappa * delta)
    np.testing.assert_allclose(gram, np.where(np.eye(3, dtype=bool), 1.0, c), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), kappa * delta, rtol=1e-6)
    assert np.allclose(b[0, 1:], 0) and np.allclose(b[1, 2:], 0) and np.allclose(b[:, 3:], 0)
    np.testing.assert_allclose(np.asarray(dist.mu_pos + dist.mu_neg), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dist.cov_pos), sigma[:, None, None] ** 2 * np.eye(d), rtol=1e-6)
    # aligned head: W_a − W_b = hn · m̄/‖m̄‖ with m̄ = Σ ω_k (p_k μ_k⁺ − (1 − p_k) μ_k⁻)
    mu_p, mu_n = b / 2, -b / 2
    mbar = np.sum(w[:, None] * (p[:, None] * mu_p - (1 - p[:, None]) * mu_n), axis=0)
    u = np.asarray(head.w_ref[0] - head.w_ref[1])
    np.testing.assert_allclose(u, hn * mbar / np.linalg.norm(mbar), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(head.w_ref), np.asarray(head.w_init))
    # K = 1, κ = 1, no head, no flip: bit-identical to GaussianPreference.single
    one, head1 = sw.build_distribution(dict(distinguishability=[1.3], sigma=[0.8], p=[0.6], weight=[1.0],
                                            angle=90.0, kappa=1.0, aligned_head_norm=0.0, flip_labels=False), d=4)
    ref = dd.GaussianPreference.single(1.3, d=4, sigma=0.8, p=0.6)
    for name in ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos", "weight"):
        np.testing.assert_array_equal(np.asarray(getattr(one, name)), np.asarray(getattr(ref, name)))
    assert not np.asarray(head1.w_ref).any()
    # flip on a file distribution with asymmetric covariances: s → −s swaps means and covariances and p → 1 − p
    rng = np.random.default_rng(0)
    a1, a2 = rng.normal(size=(2, 3, 3))
    fd = dd.GaussianPreference.create(rng.normal(size=(1, 3)), rng.normal(size=(1, 3)), a1 @ a1.T, a2 @ a2.T, p_pos=0.7)
    flipped, _ = jax.jit(partial(sw.build_distribution, file_dist=fd))(dict(kappa=1.0, aligned_head_norm=0.0,
                                                                            flip_labels=True))
    np.testing.assert_allclose(np.asarray(flipped.mu_pos), np.asarray(fd.mu_neg), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(flipped.cov_neg), np.asarray(fd.cov_pos), rtol=1e-6)
    assert float(flipped.p_pos[0]) == pytest.approx(0.3)  # was 0.7 (p kept: z ≠ −z when p ≠ 1/2)


def test_sweep_flip_is_z_to_minus_z_on_an_asymmetric_file_distribution(tmp_path):
    """flip_labels through a whole population sweep equals an independent float64 z → −z reference.

    p = (0.3, 0.8) and off-centre classes with unequal covariances: the old flip (swap the classes,
    keep p) and no flip are ≥ 1e-2 nats away after 30 steps from δ_0 = init_offset · m̄/‖m̄‖ (asserted in
    tests/test_transforms.py; from δ_0 = 0 the losses on z and −z coincide).
    """
    from test_transforms import BETA, LR, OFFSET, STEPS, _asymmetric, _np_dpo_population_loss, _unit_mbar, _z_components

    mp, mn, cp, cn, p, w = _asymmetric()
    dd.GaussianPreference.create(mp, mn, cp, cn, p, w).save(tmp_path / "asym.npz")
    cfg = sw.load_config(_write(tmp_path, f"""
        name = "flip"
        [base]
        mode = "population"
        distribution = "file"
        path = "asym.npz"
        beta = {BETA}
        lr = {LR}
        steps = {STEPS}
        init_offset = {OFFSET}
        [grid]
        flip_labels = [false, true]
    """))
    res = sw.run_sweep(cfg, tmp_path / "flip.zarr", progress=False)
    ds = xr.open_zarr(res.path).load()
    got = ds["population_loss"].values  # (flip, step)
    for j, sign in enumerate((1.0, -1.0)):
        ref = _np_dpo_population_loss(_z_components(mp, mn, cp, cn, p, w, sign=sign), BETA, LR, STEPS,
                                      OFFSET * _unit_mbar(mp, mn, p, w))  # δ_0 along the unflipped m̄
        np.testing.assert_allclose(got[j], ref, rtol=1e-4, atol=1e-5)  # float32 sweep


def test_seed_key_derivation():
    k = sw.seed_key(7, np.arange(3))
    for s in range(3):
        np.testing.assert_array_equal(jax.random.key_data(k[s]),
                                      jax.random.key_data(jax.random.fold_in(jax.random.key(7), s)))


# ----------------------------------------------------------------------------- sweeps
SMALL = """
    name = "small"
    seeds = 2
    seed = 7
    [base]
    mode = "both"
    loss = "hinge"
    optimizer = "momentum"
    beta = 0.7
    lr = 0.05
    steps = 6
    record_every = 2
    n = 48
    batch_size = 16
    d = 3
    distinguishability = [1.5, 1.0]
    angle = 70.0
    sigma = [0.8, 1.1]
    p = [0.6, 0.4]
    weight = [0.7, 0.3]
    kappa = 1.3
    aligned_head_norm = 0.4
    flip_labels = true
    [grid]
    n_eval = [32, 40]
    distinguishability_1 = [0.5, 1.0, 2.0]
"""


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """The SMALL sweep in chunks of 2 (two n_eval groups; each group's second chunk padded), counting compiles."""
    tmp = tmp_path_factory.mktemp("small")
    cfg_path = _write(tmp, SMALL)
    cfg = sw.load_config(cfg_path)
    mode = sw.resolve_compile_mode(cfg)
    before = sw._RUNNERS[mode]._cache_size()
    res = sw.run_sweep(cfg, tmp / "small.zarr", chunk_size=2, progress=False)
    compiles = sw._RUNNERS[mode]._cache_size() - before
    return cfg_path, cfg, res, compiles


def _small_direct(delta1):
    """SMALL's distribution and head built independently (NumPy), for Δ₁ = delta1."""
    c, s = math.cos(math.radians(70.0)), math.sin(math.radians(70.0))
    b = np.array([[1.5, 0.0, 0.0], [delta1 * c, delta1 * s, 0.0]])
    mp, mn = 1.3 * b / 2, -1.3 * b / 2  # κ = 1.3 about the midpoint 0
    p, w = np.array([0.6, 0.4]), np.array([0.7, 0.3])
    mbar = np.sum(w[:, None] * (p[:, None] * mp - (1 - p[:, None]) * mn), axis=0)
    u = 0.4 * mbar / np.linalg.norm(mbar)
    head = dd.Head.create(np.stack([u / 2, -u / 2]))
    cov = np.array([0.8, 1.1])[:, None, None] ** 2 * np.eye(3)
    dist = dd.GaussianPreference.create(mn, mp, cov, cov, p_pos=1 - p, weight=w)  # flip_labels: s → −s
    return dist, head


def test_sweep_equals_direct_core_calls(small_sweep):
    cfg_path, cfg, res, compiles = small_sweep
    assert res.n_chunks == 4 and res.computed == 4 and not res.diverged
    assert compiles == 2  # one per n_eval group: each padded second chunk reused its group's compile
    ds = xr.open_zarr(res.path).load()
    assert dict(ds.sizes) == {"n_eval": 2, "distinguishability_1": 3, "seed": 2, "split": 2, "step": 4,
                              "behavior": 2, "behavior_other": 2, "chunk": 4}
    assert ds.attrs["dynamics_version"] == dd.__version__ and ds.attrs["jax_version"] == jax.__version__
    assert ds.attrs["config_fingerprint"] == cfg.fingerprint() and "cpu" in ds.attrs["jax_devices"][0].lower()
    assert json.loads(ds.attrs["config"])["grid"]["distinguishability_1"] == [0.5, 1.0, 2.0]
    assert ds["chunk_done"].values.all()
    np.testing.assert_array_equal(ds["step"].values, [0, 2, 4, 6])
    tol = dict(rtol=RTOL, atol=ATOL)
    for j, delta1 in enumerate([0.5, 1.0, 2.0]):
        dist, head = _small_direct(delta1)
        common = dict(beta=0.7, lr=0.05, steps=6, loss="hinge", optimizer="momentum", record_every=2, head=head)
        pop = dd.population_trajectory(dist, **common)
        for i in range(2):
            for m, v in pop.metrics.items():
                np.testing.assert_allclose(ds[f"population_{m}"].values[i, j], np.asarray(v), **tol, err_msg=m)
        assert not ds["population_diverged"].values.any()
        for s in range(2):
            emp = dd.empirical_trajectory(dist, jax.random.fold_in(jax.random.key(7), s), n=48, n_eval=32,
                                          batch_size=16, **common)
            for m, v in emp.eval.items():
                np.testing.assert_allclose(ds[m].sel(split="eval").values[0, j, s], np.asarray(v), **tol,
                                           err_msg=f"eval/{m}")
            for i in range(2):  # the training run does not depend on n_eval
                for m, v in emp.train.items():
                    np.testing.assert_allclose(ds[m].sel(split="train").values[i, j, s], np.asarray(v), **tol,
                                               err_msg=f"train/{m}")
                np.testing.assert_allclose(ds["cum_batch_mean_norm"].values[i, j, s],
                                           np.asarray(emp.cum_batch_mean_norm), rtol=RTOL)
            # the n_eval = 40 group holds its own held-out sample
            assert not np.allclose(ds["loss"].sel(split="eval").values[1, j, s], np.asarray(emp.eval["loss"]))
        assert not ds["diverged"].values.any()
        # stored distribution properties: Δ_k after κ, m_kᵀm̄ (C4 rates), the priority gap
        np.testing.assert_allclose(ds["behavior_distinguishability"].values[0, j], [1.3 * 1.5, 1.3 * delta1], rtol=1e-5)
        mk = np.asarray(dist.behavior_mean)
        np.testing.assert_allclose(ds["behavior_projection"].values[0, j], mk @ np.asarray(dist.mean), rtol=1e-5)
        b0, b1 = np.asarray(dist.mu_pos - dist.mu_neg, dtype=np.float64)
        bbar = (b0 + b1) / 2
        gap01 = (b0 - b1) @ bbar / (np.linalg.norm(bbar) * max(np.linalg.norm(b0), np.linalg.norm(b1)))
        np.testing.assert_allclose(ds["priority_gap"].values[0, j], [[0, gap01], [-gap01, 0]], rtol=1e-5, atol=1e-6)


def test_rerun_resumes_and_mismatch_is_refused(small_sweep, tmp_path, capsys):
    cfg_path, cfg, res, _ = small_sweep
    fp = ResultsStore.read_attrs(res.path)["config_fingerprint"]
    code, out, err = _run_cli(capsys, cfg_path, "--out", res.path)
    assert code == 0 and "4 of 4 chunks already done" in err and "(0 computed, 4 resumed)" in out
    changed = _write(tmp_path, SMALL.replace("lr = 0.05", "lr = 0.03"))
    code, _, err = _run_cli(capsys, changed, "--out", res.path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds the results of a different sweep (differs in: base.lr)" in err and "--overwrite" in err
    assert ResultsStore.read_attrs(res.path)["config_fingerprint"] == fp  # untouched


def test_ctrl_c_keeps_finished_chunks(small_sweep, tmp_path, monkeypatch, capsys):
    cfg_path = small_sweep[0]
    out = tmp_path / "int.zarr"
    original = ResultsStore.write_chunk
    calls = []

    def write_then_interrupt(self, *a, **k):
        original(self, *a, **k)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(ResultsStore, "write_chunk", write_then_interrupt)
    code, _, err = _run_cli(capsys, cfg_path, "--out", out, "--chunk-size", "2")
    assert code == 130 and "1 of 4 chunks are saved" in err
    assert ResultsStore(out).done().tolist() == [True, False, False, False]
    monkeypatch.setattr(ResultsStore, "write_chunk", original)
    code, _, err = _run_cli(capsys, cfg_path, "--out", out)
    assert code == 0 and "1 of 4 chunks already done" in err
    a, b = xr.open_zarr(out).load(), xr.open_zarr(small_sweep[2].path).load()
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)


def test_diverged_flag_only_for_the_lr_that_blows_up(tmp_path, capsys):
    cfg = _write(tmp_path, """
        seeds = 2
        [base]
        steps = 40
        record_every = 10
        n = 32
        n_eval = 32
        d = 4
        [grid]
        loss = ["ipo"]
        lr = [0.01, 0.05, 100.0]
    """)
    out = tmp_path / "div.zarr"
    code, stdout, _ = _run_cli(capsys, cfg, "--out", out, "--chunk-size", "1")
    assert code == 0 and "diverged: 2 of 6 runs [2 NaN/inf] (loss_type=ipo, lr=100.0)" in stdout
    ds = xr.open_zarr(out).load()
    assert ds["chunk_done"].values.all()  # the sweep went on past the diverging chunk
    ds = ds.squeeze("loss_type")  # the axis `loss` is the dimension loss_type (the metric is `loss`)
    np.testing.assert_array_equal(ds["diverged"].values, [[False, False], [False, False], [True, True]])
    np.testing.assert_array_equal(ds["population_diverged"].values, [False, False, True])
    stable = ds.sel(lr=[0.01, 0.05])
    for v in ("loss", "weight_change", "population_loss"):
        assert np.isfinite(stable[v].values).all(), v
    assert not np.isfinite(ds["population_loss"].values[2, -1])
    # sanity: IPO GD with lr = 100 is unstable (step factor |1 − 4 η λ| ≫ 1 with λ ≥ σ² = 1)


KILL = """
    name = "killme"
    seeds = 2
    [base]
    d = 32
    n = 1024
    n_eval = 256
    steps = 200
    record_every = 50
    [grid]
    distinguishability = {linspace = [0.5, 3.0, 4]}
"""


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path, capsys):
    cfg = _write(tmp_path, KILL)
    out = tmp_path / "killed.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "sims", "sweep", str(cfg), "--out", str(out), "--chunk-size", "1",
                             "--no-progress"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "chunk_done" / "0").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no chunk finished in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = ResultsStore(out).done()
    assert 1 <= done.sum() < 4, done  # killed mid-run, finished chunk kept
    code, _, err = _run_cli(capsys, cfg, "--out", out, "--chunk-size", "1")
    assert code == 0 and f"{int(done.sum())} of 4 chunks already done" in err
    code, _, _ = _run_cli(capsys, cfg, "--out", tmp_path / "whole.zarr", "--chunk-size", "1")
    assert code == 0
    a, b = xr.open_zarr(out).load(), xr.open_zarr(tmp_path / "whole.zarr").load()
    assert set(a.data_vars) == set(b.data_vars)
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
    assert a["chunk_done"].values.all() and np.isfinite(a["loss"].values).all()


def test_memory_check_and_chunk_size_limits(tmp_path):
    cfg = sw.parse_config({"seeds": 4, "base": {"n": 10_000, "d": 64}, "grid": {"lr": [0.1, 0.2, 0.3]}})
    per = sw.plan_sweep(cfg, memory=1 << 40).bytes_per_config
    # dynamics.chunking's model of the factored engines, float32: the empirical kernel holds
    # 12 + 2·(1 + 2·2) = 22 numbers per pair (n + n_eval of them), the distribution 2(d + d²), the
    # head 4d and 4 seeds × 101 records × (2·12 + 2 + d) metrics; the population kernel 2
    # components × (d + d) × 4, 1344 quadrature nodes × 2 components × 8 and 101 × (d + 6 + 3)
    emp = 4 * ((10_000 + 2048) * 22 + 2 * (64 + 64 * 64) + 4 * 64 + 4 * 101 * (2 * 12 + 2 + 64))
    pop = 4 * (2 * (64 + 64) * 4 + 1344 * 2 * 8 + 101 * (64 + 6 + 3))
    assert per == emp + pop == 1_359_572
    with pytest.raises(UsageError, match="one configuration needs about"):
        sw.plan_sweep(cfg, memory=per - 1)
    with pytest.raises(UsageError, match=r"--chunk-size 3 needs .* pass --chunk-size <= 2"):
        sw.plan_sweep(cfg, chunk_size=3, memory=int(2.5 * per))
    assert sw.plan_sweep(cfg, memory=int(4.5 * per)).block == (2,)  # automatic: half the memory


# ----------------------------------------------------------------------------- the package's schema, --help, progress
def test_schema_name_tuples_equal_the_registries():
    """The JAX-free schema keeps the loss, optimizer and compile-mode names as tuples: they must be
    the registries' (a loss added to dynamics.LOSSES without updating LOSS_NAMES fails here)."""
    from dynamics import chunking
    from dynamics._train import OPTIMIZERS

    assert sw.LOSS_NAMES == tuple(dd.LOSSES)
    assert sw.OPTIMIZER_NAMES == tuple(OPTIMIZERS) and sw.FIELDS["optimizer"].choices == tuple(OPTIMIZERS)
    assert sw.COMPILE_MODES == chunking.COMPILE_MODES
    cfg = sw.parse_config({"base": {"loss": "ipo"}})  # parsing syncs the field with the registry
    # the loss axis takes the margin losses and every other objective of the registry
    assert cfg.base["loss"] == "ipo" and sw.FIELDS["loss"].choices == tuple(dd.LOSSES) + tuple(
        n for n in dd.losses.OBJECTIVE_NAMES if n not in dd.LOSSES)
    # every name the package re-exports lazily lives in the submodule it names
    for name, module in sw._LAZY.items():
        assert getattr(sw, name) is getattr(getattr(sw, module), name), name
    assert all(hasattr(sw, name) for name in sw.__all__)


@pytest.mark.parametrize("command, expect", [("sweep", "label_smoothing"), ("validate", "--claims")])
def test_help_imports_no_jax(command, expect):
    code = textwrap.dedent(f"""
        import sys
        from sims.cli import main
        try:
            main([{command!r}, "--help"])
        except SystemExit:
            pass
        print("JAX-IMPORTED" if "jax" in sys.modules else "JAX-FREE")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO).stdout
    assert expect in out
    assert out.strip().splitlines()[-1] == "JAX-FREE"


def test_add_arguments_parses_checks_and_overrides_defaults():
    import argparse

    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    fields = {k: sw.FIELDS[k] for k in ("beta", "label_smoothing", "distinguishability", "flip_labels", "loss", "steps")}
    sw.add_arguments(parser, fields, defaults={"beta": 0.25})
    args = parser.parse_args(["--label-smoothing", "0.1", "--distinguishability", "1", "2.5", "--flip-labels",
                              "--loss", "ipo", "--steps", "7"])
    assert (args.beta, args.label_smoothing, args.distinguishability, args.flip_labels, args.loss, args.steps) == \
        (0.25, 0.1, [1.0, 2.5], True, "ipo", 7)
    assert parser.parse_args([]).beta == 0.25 and parser.parse_args([]).steps == 100
    with pytest.raises(argparse.ArgumentError, match=r"--label-smoothing.*pass a value in \[0, 0.5\)"):
        parser.parse_args(["--label-smoothing", "0.5"])
    with pytest.raises(argparse.ArgumentError, match="expected an integer"):
        parser.parse_args(["--steps", "1.5"])
    with pytest.raises(ValueError, match="name no field"):
        sw.add_arguments(argparse.ArgumentParser(), fields, defaults={"bogus": 1})


def test_progress_within_a_chunk_reports_every_step_share(tmp_path, monkeypatch):
    """A one-chunk sweep reports its loops' steps: every `steps // 20`-th step of the population
    run and of each seed's empirical run (3 runs × 20 reports), and the bar reaches 100 %."""
    import sims.sweep.run as sweep_run

    seen = []

    class Recorder(sweep_run._ChunkTicks):
        def __call__(self, step):
            seen.append(step)
            super().__call__(step)

    monkeypatch.setattr(sweep_run, "_ChunkTicks", Recorder)
    cfg = sw.parse_config({"seeds": 2, "base": {"mode": "both", "n": 16, "n_eval": 16, "d": 2, "steps": 40,
                                                "record_every": 20}, "grid": {"lr": [0.1, 0.2]}})
    res = sw.run_sweep(cfg, tmp_path / "p.zarr", progress=True, step_progress=True, log=lambda msg: None,
                       compile_mode="fast")
    assert res.n_chunks == 1
    assert sorted(seen) == sorted(list(range(2, 41, 2)) * 3)
