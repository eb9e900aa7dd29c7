"""SGD, heavy-ball momentum and Adam against independent float64 NumPy recursions, both layers.

Population: IPO, whose population gradient ``∇L(δ) = 2(E[zzᵀ] δ − m̄/(2β))`` is linear, so the
reference is an exact recursion on moments written here from the distribution's parameters.
Empirical: full-batch DPO (sigmoid) on a fixed small dataset, gradient ``mean(−β σ(−β h) s x)``.
Both: the optimizer acts on ``W_a`` with gradient ``g`` (and on ``W_b`` with ``−g``), so
``δ ← δ + 2u`` (docs/theory.md §1). A wrong momentum (0.9 → 0.5), Nesterov, or other Adam
``b1/b2/eps`` move these trajectories far beyond the 1e-9 tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest

import dynamics as dd

MU, B1, B2, EPS = 0.9, 0.9, 0.999, 1e-8


def _ref_updates(opt, lr, grads_fn, d0, steps):
    """δ_t, t = 0..steps, of ``δ ← δ + 2u(g(δ))`` with the optimizer's textbook recursion (NumPy)."""
    delta = np.array(d0, float)
    out = [delta.copy()]
    v = np.zeros_like(delta)
    m = np.zeros_like(delta)
    s2 = np.zeros_like(delta)
    for t in range(1, steps + 1):
        g = grads_fn(delta)
        if opt == "sgd":
            u = -lr * g
        elif opt == "momentum":  # heavy ball, not Nesterov
            v = g + MU * v
            u = -lr * v
        else:  # Adam, bias-corrected, eps outside the root
            m = B1 * m + (1 - B1) * g
            s2 = B2 * s2 + (1 - B2) * g**2
            u = -lr * (m / (1 - B1**t)) / (np.sqrt(s2 / (1 - B2**t)) + EPS)
        delta = delta + 2.0 * u
        out.append(delta.copy())
    return np.stack(out)


def _moments(mp, mn, cp, cn, p, w):
    """``m̄ = E[z]`` and ``E[zzᵀ]`` of ``z = s x`` from the behaviours' parameters (NumPy float64)."""
    mbar = np.einsum("k,kd->d", w, p[:, None] * mp - (1 - p[:, None]) * mn)
    second = np.einsum("k,kij->ij", w, p[:, None, None] * (cp + np.einsum("ki,kj->kij", mp, mp))
                       + (1 - p[:, None, None]) * (cn + np.einsum("ki,kj->kij", mn, mn)))
    return mbar, second


@pytest.fixture
def population_case(rng):
    k, d = 2, 3
    mp, mn = rng.normal(size=(k, d)), rng.normal(size=(k, d))
    a = rng.normal(size=(2, k, d, d)) / np.sqrt(d)
    cp, cn = a[0] @ np.swapaxes(a[0], -1, -2) + 0.1 * np.eye(d), a[1] @ np.swapaxes(a[1], -1, -2) + 0.1 * np.eye(d)
    p, w = np.array([0.3, 0.8]), np.array([0.6, 0.4])
    return (mp, mn, cp, cn, p, w)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_population_optimizer_matches_numpy_recursion(x64, population_case, opt):
    mp, mn, cp, cn, p, w = population_case
    dist = dd.GaussianPreference.create(mp, mn, cp, cn, p, w)
    beta, lr, steps = 0.7, 0.03, 12
    d0 = np.array([0.2, -0.1, 0.05])
    head = dd.Head.create(np.zeros((2, 3)), np.stack([d0 / 2, -d0 / 2]))
    mbar, second = _moments(mp, mn, cp, cn, p, w)
    c = 1.0 / (2.0 * beta)
    ref = _ref_updates(opt, lr, lambda dl: 2.0 * (second @ dl - c * mbar), d0, steps)
    traj = dd.population_trajectory(dist, beta=beta, lr=lr, steps=steps, loss="ipo", optimizer=opt, head=head)
    np.testing.assert_allclose(np.asarray(traj.delta), ref, rtol=1e-10, atol=1e-12)
    loss = np.einsum("ti,ij,tj->t", ref, second, ref) - 2 * c * ref @ mbar + c**2
    np.testing.assert_allclose(np.asarray(traj.metrics["loss"]), loss, rtol=1e-10, atol=1e-12)


@pytest.fixture
def data_case(rng):
    n, d = 24, 3
    x = rng.normal(size=(n, d)) + np.array([0.8, -0.3, 0.0])
    s = np.where(rng.uniform(size=n) < 0.7, 1.0, -1.0)
    beh = (np.arange(n) % 2).astype(np.int32)
    return x, s, beh


@pytest.mark.parametrize("path", ["reduced", "full"])
@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_empirical_full_batch_optimizer_matches_numpy_recursion(x64, data_case, opt, path):
    import jax

    x, s, beh = data_case
    beta, lr, steps = 1.3, 0.05, 10
    d0 = np.array([0.1, 0.0, -0.2])
    head = dd.Head.create(np.zeros((2, 3)), np.stack([d0 / 2, -d0 / 2]))

    def grad(dl):
        h = s * (x @ dl)
        return np.mean((-beta / (1.0 + np.exp(beta * h)) * s)[:, None] * x, axis=0)

    ref = _ref_updates(opt, lr, grad, d0, steps)
    traj = dd.trajectory_on_data((x, s, beh), (x, s, beh), jax.random.key(0), num_behaviors=2, beta=beta, lr=lr,
                                 steps=steps, optimizer=opt, head=head, path=path)
    np.testing.assert_allclose(np.asarray(traj.delta), ref, rtol=1e-9, atol=1e-12)


def test_optimizer_constants_and_unknown_name():
    from dynamics import _train

    assert (_train.MOMENTUM, _train.ADAM_B1, _train.ADAM_B2, _train.ADAM_EPS) == (MU, B1, B2, EPS)
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        _train.make_optimizer("adamw", 0.1)


@pytest.mark.parametrize("steps", [7, 21])  # 3 epochs: order table precomputed; 7 epochs > 2d: per-step draw
def test_minibatch_sgd_follows_the_documented_epoch_order(x64, data_case, steps):
    """Batch t of epoch e = t // (n // B) is ``permutation(fold_in(key, e), n)[(t mod n//B)·B : +B]``."""
    import jax

    from dynamics import _train

    x, s, beh = data_case
    n, bsz, beta, lr = 24, 8, 1.3, 0.05
    key = jax.random.key(3)
    assert _train.epoch_orders_fit(n, bsz, steps, 3) is (steps == 7)
    delta = np.zeros(3)
    ref = [delta.copy()]
    for t in range(steps):
        e, j = divmod(t, n // bsz)
        idx = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))[j * bsz:(j + 1) * bsz]
        xb, sb = x[idx], s[idx]
        h = sb * (xb @ delta)
        delta = delta - 2 * lr * np.mean((-beta / (1.0 + np.exp(beta * h)) * sb)[:, None] * xb, axis=0)
        ref.append(delta.copy())
    traj = dd.trajectory_on_data((x, s, beh), (x, s, beh), key, num_behaviors=2, beta=beta, lr=lr, steps=steps,
                                 batch_size=bsz)
    np.testing.assert_allclose(np.asarray(traj.delta), np.stack(ref), rtol=1e-10, atol=1e-12)
    # C2's running sum of minibatch mean ‖x‖ is over the same batches
    norms = np.linalg.norm(x, axis=1)
    cum = sum(np.mean(norms[np.asarray(jax.random.permutation(jax.random.fold_in(key, t // 3), n))
                            [(t % 3) * bsz:(t % 3 + 1) * bsz]]) for t in range(steps))
    assert float(traj.cum_batch_mean_norm[-1]) == pytest.approx(cum, rel=1e-12)


def test_schedule_and_batch_checks():
    from dynamics import _train

    assert _train.check_schedule(10, 5, 0.1, "sgd") == (10, 5)
    assert _train.check_schedule(0, 1, 0.1, None) == (0, 1)
    with pytest.raises(ValueError, match="steps=10 is not a multiple of record_every=3"):
        _train.check_schedule(10, 3, 0.1, "sgd")
    with pytest.raises(ValueError, match="lr is required"):
        _train.check_schedule(10, 5, None, "adam")
    with pytest.raises(ValueError, match="lr must be > 0"):
        _train.check_schedule(10, 5, 0.0, "sgd")
    with pytest.raises(ValueError, match="lr must be a scalar"):
        _train.check_schedule(10, 5, np.ones(2), "sgd")
    import optax

    assert _train.check_schedule(4, 2, None, optax.sgd(0.1)) == (4, 2)
    with pytest.raises(ValueError, match="record_every must be >= 1"):
        _train.check_schedule(4, 0, 0.1, "sgd")
    assert _train.check_batch_size(None, 10) is None and _train.check_batch_size(10, 10) is None
    assert _train.check_batch_size(4, 10) == 4
    with pytest.raises(ValueError, match="batch_size=11 exceeds n=10"):
        _train.check_batch_size(11, 10)
    # segment means: NaN for an empty segment
    got = np.asarray(_train.segment_mean(np.array([1.0, 2.0, 4.0]), np.array([0, 0, 2]), 3))
    np.testing.assert_allclose(got[[0, 2]], [1.5, 4.0])
    assert np.isnan(got[1])
