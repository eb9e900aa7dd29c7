"""Batched engines (dynamics.batched) against the core engines, a NumPy trainer, and statistics.

Float64 (the ``x64`` fixture) wherever equality is asserted. Budget: about 40 s on 2 cores
(most of it compiling one program per static combination, for both engines).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from conftest import random_dist
from dynamics.batched import (BATCHED_METRICS, POPULATION_METRICS, PreferenceBatch, batched_empirical_trajectory,
                              batched_population_trajectory, config_keys, sample_batch)

_QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def quick_compile(body):
    """Executor hook: jit the chunk program with XLA's backend optimisations off (compiles ~2x
    faster; the arithmetic is the same up to float rounding, far below the 1e-10 tolerances)."""
    return jax.jit(body, compiler_options=_QUICK_COMPILE)


def _shared_root_dist(rng, k, d, kind):
    """K behaviours whose 2K components all share one diagonal or full covariance."""
    if kind == "diag":
        cov = np.diag(rng.uniform(0.3, 2.0, size=d))
    else:
        a = rng.normal(size=(d, d)) / np.sqrt(d)
        cov = a @ a.T + 0.3 * np.eye(d)
    return dd.GaussianPreference.create(rng.normal(size=(k, d)), rng.normal(size=(k, d)), cov, cov,
                                        rng.uniform(0.2, 0.8, size=k), rng.dirichlet(np.ones(k)))


def _head(rng, d, kind, v=4):
    if kind == "zero":
        return None
    w_ref = rng.normal(size=(v, d)) * 0.3
    w0 = w_ref if kind == "ref" else w_ref + rng.normal(size=(v, d)) * 0.2
    return dd.Head.create(w_ref, w0, a=2, b=0)


def _assert_metrics_equal(got, want, c, atol=1e-10):
    for split in ("train", "eval"):
        for name in BATCHED_METRICS:
            np.testing.assert_allclose(getattr(got, split)[name][c], np.asarray(getattr(want, split)[name]),
                                       atol=atol, err_msg=f"config {c} {split}/{name}")
    np.testing.assert_allclose(got.delta[c], np.asarray(want.delta), atol=atol, err_msg=f"config {c} delta")
    assert bool(got.diverged[c]) == bool(want.diverged)


def _dists(rng, kind, k, d, c):
    if kind.endswith("shared"):
        return [_shared_root_dist(rng, k, d, kind.split("-")[0]) for _ in range(c)]
    return [random_dist(rng, k, d, kind=kind) for _ in range(c)]


# (cov kinds, K, draws, optimizer, loss, batch size, head). The core compiles once per case (its program
# does not depend on the covariance kind), the batched engine once per kind.
CASES = [
    (("iso", "full", "diag-shared"), 2, "independent", None, "hinge", 16, "ref"),  # sigmoid: NumPy test below
    (("diag",), 3, "common", "adam", "cdpo", 16, "general"),  # 2K = 6 components: the gather path
]


@pytest.mark.parametrize("kinds,k,draws,optimizer,loss,batch_size,head_kind", CASES)
def test_equals_core_empirical_trajectory(x64, rng, kinds, k, draws, optimizer, loss, batch_size, head_kind):
    """Configuration c of a batched run equals empirical_trajectory(dist_c, key_c) (same samples)."""
    d, c = 3, 3
    head = _head(rng, d, head_kind)
    beta, lr = np.array([0.6, 1.0, 1.7]), np.array([0.05, 0.1, 0.2])
    label_smoothing = 0.1 if loss in ("cdpo", "robust") else 0.0
    key = jax.random.key(11)
    kw = dict(n=48, n_eval=40, steps=8, record_every=2, loss=loss, batch_size=batch_size, optimizer=optimizer,
              head=head, label_smoothing=label_smoothing)
    for kind in kinds:
        dists = _dists(rng, kind, k, d, c)
        batch = PreferenceBatch.from_dists(dists)
        assert batch.cov_kind == {"iso": "isotropic", "diag": "diagonal", "full": "full"}[kind.split("-")[0]]
        assert batch.shared_root() == kind.endswith("shared")
        got = batched_empirical_trajectory(batch, key, beta=beta, lr=lr, draws=draws, chunk_size=2,
                                           executor=quick_compile, **kw)
        np.testing.assert_array_equal(got.step, np.arange(0, 9, 2))
        for i in range(c):
            key_i = key if draws == "common" else config_keys(key, i)
            want = dd.empirical_trajectory(dists[i], key_i, beta=beta[i], lr=lr[i], **kw)
            _assert_metrics_equal(got, want, i)
        assert float(np.abs(got.delta[:, -1] - got.delta[:, 0]).max()) > 1e-3  # it trained


def test_equals_core_population_trajectory(x64, rng):
    """Isotropic, diagonal and full covariances (O(Kd), O(Kd), O(Kd²) per step) against the core."""
    head = _head(rng, 4, "general")
    beta, lr = np.array([0.5, 1.0, 2.0]), np.array([0.1, 0.05, 0.2])
    kw = dict(steps=6, record_every=3, loss="sigmoid", optimizer="momentum", head=head)
    for kind in ("iso", "diag", "full"):
        dists = [random_dist(rng, 2, 4, kind=kind) for _ in range(3)]
        got = batched_population_trajectory(PreferenceBatch.from_dists(dists), beta=beta, lr=lr, chunk_size=2,
                                            executor=quick_compile, **kw)
        for i in range(3):
            want = dd.population_trajectory(dists[i], beta=beta[i], lr=lr[i], **kw)
            for name in POPULATION_METRICS:
                np.testing.assert_allclose(got.metrics[name][i], np.asarray(want.metrics[name]), atol=1e-10,
                                           err_msg=f"{kind} {i} {name}")
            np.testing.assert_allclose(got.delta[i], np.asarray(want.delta), atol=1e-10)
        np.testing.assert_allclose(got.delta_final, got.delta[:, -1])


def test_numpy_reference_of_the_crn_construction(x64):
    """An independent float64 NumPy construction: shared ε and uniforms, x_c = μ_c + σ_c ε, GD on δ."""
    c, n, d, steps, beta, lr = 4, 64, 5, 12, 0.8, 0.3
    delta_true = np.array([0.4, 1.0, 2.0, 3.0])
    sigma = np.array([0.5, 1.0, 1.5, 0.0])  # σ = 0: x = μ± exactly (the engine's σ = 0 branch)
    p = np.array([0.5, 0.3, 0.7, 0.5])
    mu = np.zeros((c, 1, d))
    mu[:, 0, 0] = delta_true / 2
    batch = PreferenceBatch.isotropic(mu, -mu, sigma[:, None], None, p[:, None])
    key = jax.random.key(3)
    got = batched_empirical_trajectory(batch, key, n=n, n_eval=8, beta=beta, lr=lr, steps=steps,
                                       record_every=steps, chunk_size=3)  # two chunks, the last one padded
    # the shared draws, rebuilt from the documented recipe (GaussianPreference.sample's keys)
    kb, ks, kx = jax.random.split(jax.random.split(key, 3)[0], 3)
    u = np.asarray(jax.random.uniform(ks, (n,)))
    z = np.asarray(jax.random.normal(kx, (n, d)))
    for i in range(c):
        s = np.where(u < p[i], 1.0, -1.0)
        mu = np.zeros((n, d))
        mu[:, 0] = s * delta_true[i] / 2  # μ± = ±(Δ/2) e₁
        x = mu + sigma[i] * z
        dl = np.zeros(d)
        for _ in range(steps):
            h = s * (x @ dl)
            g = ((-beta / (1.0 + np.exp(beta * h))) * s) @ x / n
            dl = dl - 2 * lr * g
        np.testing.assert_allclose(got.delta_final[i], dl, atol=1e-11)
        loss = np.mean(np.logaddexp(0.0, -beta * s * (x @ dl)))
        np.testing.assert_allclose(got.train["loss"][i, -1], loss, atol=1e-11)
    # common random numbers: the standardised noise of every configuration is the same ε
    x, s, _ = sample_batch(batch, jax.random.split(key, 3)[0], n)
    z_back = (np.asarray(x) - np.asarray(s)[:, :, None] * delta_true[:, None, None] / 2 * np.eye(d)[0])[:3] / sigma[:3, None, None]
    np.testing.assert_allclose(z_back, np.broadcast_to(z, z_back.shape), atol=1e-12)


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_sampling_moments(x64, rng, kind):
    """Labels, behaviours and class-conditional moments of the compact-root sampler (5-σ bounds)."""
    dists = [random_dist(rng, 2, 3, kind=kind) for _ in range(2)]
    batch = PreferenceBatch.from_dists(dists)
    n = 40_000
    x, s, beh = (np.asarray(v) for v in sample_batch(batch, jax.random.key(8), n, draws="independent"))
    for c, g in enumerate(dists):
        for k in range(2):
            sel = beh[c] == k
            w = float(g.weight[k])
            assert abs(sel.mean() - w) < 5 * np.sqrt(w * (1 - w) / n)
            p = float(g.p_pos[k])
            assert abs((s[c][sel] > 0).mean() - p) < 5 * np.sqrt(p * (1 - p) / sel.sum())
            for sign, mu, cov in ((1, g.mu_pos[k], g.cov_pos[k]), (-1, g.mu_neg[k], g.cov_neg[k])):
                xs = x[c][sel & (s[c] == sign)]
                m = len(xs)
                cov = np.asarray(cov)
                se_mean = np.sqrt(np.diag(cov) / m)
                assert np.all(np.abs(xs.mean(0) - np.asarray(mu)) < 5 * se_mean)
                # entrywise covariance: Var(x_i x_j) ≤ Σ_ii Σ_jj + Σ_ij² for Gaussians
                se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / m)
                assert np.all(np.abs(np.cov(xs.T) - cov) < 5 * se_cov + 1e-12)


def test_common_random_numbers_cut_variance_of_differences(x64):
    """Loss difference between two nearby configurations over 40 seeds: CRN vs independent draws.

    Pairs (Δ = 1.0, Δ = 1.1) share a key under CRN (independent mode with duplicated keys) and not
    otherwise. The variance ratio is ~10² here; we assert > 4 (an F(39, 39) ratio below 4 has
    probability < 1e-5 when the true ratio is 30 or more).
    """
    seeds = 40
    batch = PreferenceBatch.single(np.tile([1.0, 1.1], seeds), d=4, sigma=1.0)
    base = jax.random.split(jax.random.key(0), 2 * seeds)
    crn_keys = jnp.repeat(base[:seeds], 2)
    kw = dict(n=64, n_eval=256, beta=1.0, lr=0.2, steps=10, record_every=10, draws="independent",
              return_delta=False)
    diffs = {}
    for name, keys in (("crn", crn_keys), ("independent", base)):
        out = batched_empirical_trajectory(batch, keys, **kw)
        loss = out.eval["loss"][:, -1].reshape(seeds, 2)
        diffs[name] = loss[:, 1] - loss[:, 0]
    assert np.mean(diffs["crn"]) < 0  # the more distinguishable configuration ends with the lower loss
    assert np.var(diffs["independent"]) > 4 * np.var(diffs["crn"])


def test_batch_constructors_agree(x64, rng):
    mu = rng.normal(size=(3, 2, 4))
    iso = PreferenceBatch.isotropic(mu, -mu, np.array([0.5, 1.0, 2.0]), p_pos=0.3)
    via = PreferenceBatch.from_dists(iso.stacked())
    assert via.cov_kind == "isotropic"
    np.testing.assert_allclose(via.root_pos, iso.root_pos)
    g = iso.dist(2)
    np.testing.assert_allclose(np.asarray(g.cov_pos[1]), 4.0 * np.eye(4))
    diag = PreferenceBatch.diagonal(mu, -mu, np.array([0.5, 1.0, 1.5, 2.0]))
    np.testing.assert_allclose(np.asarray(diag.covariances()[0][0, 1]), np.diag([0.25, 1.0, 2.25, 4.0]))
    full = PreferenceBatch.from_dists(diag.stacked(), cov_kind="full")
    np.testing.assert_allclose(np.asarray(full.covariances()[0]), np.asarray(diag.covariances()[0]), atol=1e-12)
    single = PreferenceBatch.single([1.0, 2.0], d=3, sigma=[1.0, 0.5])
    np.testing.assert_allclose(np.asarray(single.dist(1).distinguishability), [2.0])
    assert single.take(slice(1, 2)).num_configs == 1


@pytest.mark.parametrize("call,match", [
    (lambda b: batched_empirical_trajectory(b, jax.random.key(0), n=8, beta=1.0, lr=0.1, steps=2, draws="bogus"),
     "draws"),
    (lambda b: batched_empirical_trajectory(b, jax.random.split(jax.random.key(0), 2), n=8, beta=1.0, lr=0.1,
                                            steps=2), "one key"),
    (lambda b: batched_empirical_trajectory(b, jax.random.key(0), n=8, beta=[1.0, -1.0], lr=0.1, steps=2), "beta"),
    (lambda b: batched_empirical_trajectory(b, jax.random.key(0), n=8, beta=[1.0, 2.0, 3.0], lr=0.1, steps=2),
     r"shape \(3,\)"),
    (lambda b: batched_empirical_trajectory(b, jax.random.key(0), n=8, beta=1.0, lr=0.1, steps=2, batch_size=9),
     "batch_size"),
    (lambda b: batched_population_trajectory(b, beta=1.0, lr=0.1, steps=3, record_every=2), "record_every"),
    (lambda b: batched_population_trajectory(b, beta=1.0, lr=0.1, steps=2, label_smoothing=0.1), "no effect"),
    (lambda b: batched_empirical_trajectory(b, jax.random.key(0), n=8, beta=1.0, lr=[0.1, 0.0], steps=2), "lr"),
    (lambda b: batched_empirical_trajectory(b.stacked(), jax.random.key(0), n=8, beta=1.0, lr=0.1, steps=2),
     "PreferenceBatch"),
    (lambda b: PreferenceBatch.from_dists(b.stacked().replace(cov_pos=b.stacked().cov_pos.at[:, :, 0, 1].set(0.1)
                                                              .at[:, :, 1, 0].set(0.1)), cov_kind="diagonal"),
     "not diagonal"),
    (lambda b: PreferenceBatch.isotropic(np.zeros((2, 3)), np.zeros((2, 3)), -1.0), "root_pos"),
    (lambda b: PreferenceBatch.isotropic(np.zeros((2, 1, 3)), np.zeros((2, 1, 3)), 1.0, weight=[0.5]), "weight"),
])
def test_bad_input_raises_value_error(call, match):
    batch = PreferenceBatch.single([1.0, 2.0], d=3)
    with pytest.raises(ValueError, match=match):
        call(batch)


def test_benchmark_contenders_do_the_same_work():
    """The PyTorch and NumPy loops of `dpo-sims bench`, fed the engine's samples, reach the engine's δ_T
    (float32: the bench's precision)."""
    from benchmarks import engines
    from benchmarks.suite import fit_exponent

    c, n, d, steps = 3, 64, 4, 10
    _, delta = engines.engine_run(c, n, d, steps, repeats=1, executor=quick_compile)
    batch = engines.make_batch(c, d)
    x, s, _ = sample_batch(batch, jax.random.split(jax.random.key(0), 3)[0], n)
    data = [(np.asarray(x[i]), np.asarray(s[i])) for i in range(c)]
    _, delta_np = engines.numpy_loop(c, n, d, steps, data=data)
    np.testing.assert_allclose(delta_np, np.asarray(delta), rtol=1e-4, atol=1e-5)
    if engines.torch_available():
        _, delta_torch = engines.torch_loop(c, n, d, steps, data=data, threads=1)
        np.testing.assert_allclose(delta_torch, np.asarray(delta), rtol=1e-4, atol=1e-5)
    assert fit_exponent([1, 2, 4, 8], [3.0, 6.0, 12.0, 24.0]) == pytest.approx(1.0)
    assert fit_exponent([10, 100], [1.0, 100.0]) == pytest.approx(2.0)


def test_bench_cli_rejects_missing_json_directory(tmp_path, capsys):
    from sims.cli import main

    assert main(["bench", "--quick", "--json", str(tmp_path / "no" / "such" / "bench.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--json" in err[0]
