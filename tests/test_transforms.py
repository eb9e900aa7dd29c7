"""dynamics.transforms: the label flip, κ separation and preference directions, against independent
float64 NumPy references (docs/theory.md §4.5, docs/sweeps.md)."""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from dynamics import theory as th
from dynamics import transforms as tf
from sims import sweep as sw

BETA, LR, STEPS, OFFSET = 1.5, 0.4, 30, 0.8


def _unit_mbar(mp, mn, p, w):
    """m̄/‖m̄‖ of the unflipped distribution, m̄ = Σ ω_k (p_k μ_k⁺ − (1 − p_k) μ_k⁻)."""
    m = np.einsum("k,kd->d", w, p[:, None] * mp - (1 - p[:, None]) * mn)
    return m / np.linalg.norm(m)


def _asymmetric():
    """K = 2, d = 3, off-centre classes with unequal covariances, p = (0.3, 0.8) (NumPy float64)."""
    rng = np.random.default_rng(7)
    mp = rng.normal(size=(2, 3)) + np.array([1.0, 0.5, 0.0])
    mn = rng.normal(size=(2, 3)) + np.array([0.7, -0.2, 0.3])
    a = rng.normal(size=(2, 2, 3, 3)) / np.sqrt(3)
    cp = a[0] @ np.swapaxes(a[0], -1, -2) + 0.2 * np.eye(3)
    cn = a[1] @ np.swapaxes(a[1], -1, -2) + 0.2 * np.eye(3)
    return mp, mn, cp, cn, np.array([0.3, 0.8]), np.array([0.45, 0.55])


def _np_dpo_population_loss(comps, beta, lr, steps, delta0):
    """Population DPO (sigmoid) GD ``δ ← δ − 2η∇L`` from ``delta0`` on z-components ``(π, m, S)``; loss per step.

    ``E f(a)``, ``a = δᵀz ~ N(δᵀm, δᵀSδ)`` by 120-node Gauss–Hermite; ``∇L = Σ π (m E ℓ'(a) + S δ E ℓ''(a))``.
    """
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()
    pi, m, s = comps
    delta = np.array(delta0, float)
    out = []
    for t in range(steps + 1):
        mu = m @ delta
        sd = np.sqrt(np.einsum("i,cij,j->c", delta, s, delta))
        a = mu[:, None] + sd[:, None] * x[None]
        sig = 1.0 / (1.0 + np.exp(beta * a))  # σ(−βa)
        out.append(float(np.sum(pi * (np.logaddexp(0.0, -beta * a) @ w))))
        if t == steps:
            break
        e1 = (-beta * sig) @ w
        e2 = (beta**2 * sig * (1 - sig)) @ w
        grad = np.einsum("c,cd->d", pi * e1, m) + np.einsum("c,cij,j->i", pi * e2, s, delta)
        delta = delta - 2.0 * lr * grad
    return np.array(out)


def _z_components(mp, mn, cp, cn, p, w, sign=1.0):
    """Components of ``sign · z``, ``z = s x``: (ω p, μ⁺, Σ⁺) and (ω(1 − p), −μ⁻, Σ⁻)."""
    pi = np.concatenate([w * p, w * (1 - p)])
    m = sign * np.concatenate([mp, -mn])
    return pi, m, np.concatenate([cp, cn])


def test_flip_is_z_to_minus_z_through_sweep_and_theory(x64):
    mp, mn, cp, cn, p, w = _asymmetric()
    fd = dd.GaussianPreference.create(mp, mn, cp, cn, p, w)
    d0 = OFFSET * _unit_mbar(mp, mn, p, w)  # δ_0 ≠ 0: from δ = 0 the runs on z and −z have equal losses
    ref = _np_dpo_population_loss(_z_components(mp, mn, cp, cn, p, w, sign=-1.0), BETA, LR, STEPS, d0)
    # the old sweep flip (swap the classes, keep p) and no flip are far from it: this test tells them apart
    wrong = _np_dpo_population_loss(_z_components(mn, mp, cn, cp, p, w), BETA, LR, STEPS, d0)
    same = _np_dpo_population_loss(_z_components(mp, mn, cp, cn, p, w), BETA, LR, STEPS, d0)
    assert np.max(np.abs(wrong - ref)) > 1e-2 and np.max(np.abs(same - ref)) > 1e-2

    swept, head = jax.jit(partial(sw.build_distribution, file_dist=fd))(
        dict(kappa=1.0, aligned_head_norm=0.0, init_offset=OFFSET, flip_labels=True))
    np.testing.assert_allclose(np.asarray(head.delta_init), d0, rtol=1e-12)
    for dist in (swept, th.c5_flip_labels(fd), tf.flip_labels(fd), tf.flip_labels(fd, jnp.asarray(True))):
        traj = dd.population_trajectory(dist, beta=BETA, lr=LR, steps=STEPS, head=head)
        np.testing.assert_allclose(np.asarray(traj.metrics["loss"]), ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(swept.p_pos), 1 - p, rtol=1e-12)
    # not flipping is the identity, with a Python or a traced flag
    for same in (tf.flip_labels(fd, False), tf.flip_labels(fd, jnp.asarray(False))):
        for name in ("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos"):
            np.testing.assert_array_equal(np.asarray(getattr(same, name)), np.asarray(getattr(fd, name)))


def test_scale_separation_vs_numpy(x64):
    mp, mn, cp, cn, p, w = _asymmetric()
    fd = dd.GaussianPreference.create(mp, mn, cp, cn, p, w)
    kappa = 1.7
    out = tf.scale_separation(fd, kappa)
    mid, half = (mp + mn) / 2, (mp - mn) / 2
    np.testing.assert_allclose(np.asarray(out.mu_pos), mid + kappa * half, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out.mu_neg), mid - kappa * half, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.mu_pos - out.mu_neg), axis=1),
                               kappa * np.linalg.norm(mp - mn, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(out.cov_neg), np.asarray(fd.cov_neg))
    np.testing.assert_allclose(np.asarray(th.c5_scale_separation(fd, kappa).mu_pos), mid + kappa * half, rtol=1e-12)
    with pytest.raises(ValueError, match="kappa must be > 0"):
        tf.scale_separation(fd, 0.0)


def test_angle_cosines_and_directions_vs_numpy(x64):
    cos = np.asarray(tf.angle_cosines(60.0, 3, unit="degrees"))
    np.testing.assert_allclose(cos, np.where(np.eye(3, dtype=bool), 1.0, 0.5), rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(tf.angle_cosines(90.0, 2, unit="degrees")), np.eye(2))  # exact 0
    np.testing.assert_array_equal(np.asarray(tf.angle_cosines(math.pi / 2, 2, unit="radians")), np.eye(2))
    ang = np.array([[0, 0.3, 1.2], [0.3, 0, 1.0], [1.2, 1.0, 0]])
    g = np.asarray(tf.angle_cosines(ang, 3, unit="radians"))
    np.testing.assert_allclose(g, np.where(np.eye(3, dtype=bool), 1.0, np.cos(ang)), rtol=1e-13)
    delta = np.array([1.0, 2.0, 0.5])
    b = np.asarray(tf.preference_directions(delta, g, 5))
    np.testing.assert_allclose(b[:, :3], delta[:, None] * np.linalg.cholesky(g), rtol=1e-12, atol=1e-14)
    assert not b[:, 3:].any() and b[0, 1] == 0 and b[0, 2] == 0 and b[1, 2] == 0  # e₁, then the e₁–e₂ plane
    # singular Gram (two identical directions): clipped, still realises it
    b2 = np.asarray(tf.preference_directions([1.0, 1.0], np.ones((2, 2)), 2))
    np.testing.assert_allclose(b2, [[1.0, 0.0], [1.0, 0.0]], atol=1e-14)
    with pytest.raises(ValueError, match="d=2 is smaller than K=3"):
        tf.preference_directions(delta, g, 2)


@pytest.mark.parametrize("bad,unit,match", [(90.0, "radians", r"angles=90 is outside \[0, π\]; it is in radians"),
                                           (-0.1, "radians", "outside"), (200.0, "degrees", r"outside \[0, 180\]")])
def test_wrong_angle_unit_is_refused(bad, unit, match):
    with pytest.raises(ValueError, match=match):
        tf.check_angles("angles", bad, unit)
    if unit == "radians":
        with pytest.raises(ValueError, match="angles"):
            dd.GaussianPreference.from_angles([1.0, 1.0], bad, d=2)
    with pytest.raises(ValueError, match="unit must be one of"):
        tf.angle_cosines(1.0, 2, unit="turns")


def test_from_angles_equals_sweep_basis_and_adam_runs_agree():
    """At 60° from_angles and the sweep build the SAME basis (they disagreed: eigen vs Cholesky basis)."""
    delta, sigma = [1.0, 1.5], [0.8, 0.8]
    mine = dd.GaussianPreference.from_angles(delta, angles_deg=60.0, d=3, sigma=0.8)
    rad = dd.GaussianPreference.from_angles(delta, math.radians(60.0), d=3, sigma=0.8)
    swept, head = sw.build_distribution(dict(distinguishability=delta, sigma=sigma, p=[0.5, 0.5], angle=60.0,
                                             kappa=1.0, aligned_head_norm=0.0, flip_labels=False), d=3)
    b_ref = np.array([[1.0, 0.0, 0.0], [1.5 * 0.5, 1.5 * math.sqrt(3) / 2, 0.0]])  # Cholesky of [[1, ½], [½, 1]]
    for dist in (mine, rad, swept):
        np.testing.assert_allclose(np.asarray(dist.mu_pos - dist.mu_neg), b_ref, rtol=1e-6, atol=1e-7)
    runs = [dd.population_trajectory(dist, beta=1.0, lr=0.05, steps=20, optimizer="adam", record_every=20).delta[-1]
            for dist in (mine, swept)]
    np.testing.assert_allclose(np.asarray(runs[0]), np.asarray(runs[1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        dd.GaussianPreference.from_angles(delta, 1.0, angles_deg=60.0, d=3)


# ------------------------------------------------------------------ fast value checks (they kill the mutants of
# transforms.py that the trajectory tests above would also kill, in milliseconds; see the mutation run)
def test_flip_labels_swaps_classes_and_p_field_by_field(x64):
    mp, mn, cp, cn, p, w = _asymmetric()
    fd = dd.GaussianPreference.create(mp, mn, cp, cn, p, w)
    for flag in (True, np.bool_(True), jnp.asarray(True)):
        out = tf.flip_labels(fd, flag)
        for got, want in ((out.mu_pos, mn), (out.mu_neg, mp), (out.cov_pos, cn), (out.cov_neg, cp),
                          (out.p_pos, 1 - p), (out.weight, w)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-15)
    for flag in (True, False):  # a traced flag under jit (jnp.where), a Python one inside jit (static)
        traced = jax.jit(lambda dist, f: tf.flip_labels(dist, f))(fd, flag)
        static = jax.jit(lambda dist: tf.flip_labels(dist, flag))(fd)
        want = (mn, mp, cn, cp, 1 - p) if flag else (mp, mn, cp, cn, p)
        for out in (traced, static, tf.flip_labels(fd, jnp.asarray(flag))):
            for name, w_ in zip(("mu_pos", "mu_neg", "cov_pos", "cov_neg", "p_pos"), want):
                np.testing.assert_allclose(np.asarray(getattr(out, name)), w_, atol=1e-15, err_msg=name)
    twice = tf.flip_labels(tf.flip_labels(fd), jnp.asarray(True))
    np.testing.assert_allclose(np.asarray(twice.p_pos), p, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(twice.mu_pos), mp)


def test_scale_separation_keeps_everything_but_the_means(x64):
    mp, mn, cp, cn, p, w = _asymmetric()
    fd = dd.GaussianPreference.create(mp, mn, cp, cn, p, w)
    out = jax.jit(lambda dist, k: tf.scale_separation(dist, k))(fd, 0.25)  # a traced κ
    np.testing.assert_allclose(np.asarray(out.mu_pos), (mp + mn) / 2 + 0.25 * (mp - mn) / 2, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out.mu_neg), (mp + mn) / 2 - 0.25 * (mp - mn) / 2, rtol=1e-12)
    for got, want in ((out.cov_pos, cp), (out.cov_neg, cn), (out.p_pos, p), (out.weight, w)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="kappa must be > 0"):
        tf.scale_separation(fd, -1.0)


def test_angle_cosines_at_the_ends_and_the_diagonal(x64):
    np.testing.assert_array_equal(np.asarray(tf.angle_cosines(0.0, 3, unit="degrees")), np.ones((3, 3)))
    np.testing.assert_array_equal(np.asarray(tf.angle_cosines(180.0, 2, unit="degrees")), [[1.0, -1.0], [-1.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(tf.angle_cosines(math.pi, 2, unit="radians")), [[1.0, -1.0], [-1.0, 1.0]])
    ang = np.array([[30.0, 120.0], [120.0, 45.0]])  # a diagonal that is not 0: ignored, the diagonal is 1
    np.testing.assert_allclose(np.asarray(tf.angle_cosines(ang, 2, unit="degrees")), [[1.0, -0.5], [-0.5, 1.0]],
                               rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(np.asarray(tf.angle_cosines(1.0, 2, unit="radians"))[0, 1], math.cos(1.0), rtol=1e-14)
    with pytest.raises(ValueError, match=r"angles has shape \(3,\); expected a scalar or \(K, K\) = \(2, 2\)"):
        tf.angle_cosines(np.array([1.0, 2.0, 3.0]), 2, unit="degrees")


def test_check_angles_boundaries():
    for ok, unit in ((0.0, "degrees"), (180.0, "degrees"), (math.pi, "radians"), (0.0, "radians")):
        tf.check_angles("a", ok, unit)
    tf.check_angles("a", np.array([[400.0, 90.0], [90.0, -3.0]]), "degrees")  # the diagonal is ignored
    for bad, unit in ((180.0 * (1 + 1e-9), "degrees"), (-1e-9, "degrees"), (math.pi * (1 + 1e-9), "radians")):
        with pytest.raises(ValueError, match="is outside"):
            tf.check_angles("a", bad, unit)
    with pytest.raises(ValueError, match="is outside"):
        tf.check_angles("a", np.array([[0.0, 190.0], [190.0, 0.0]]), "degrees")
    with pytest.raises(ValueError, match=r"a=190 is outside \[0, 180\]; it is in degrees"):
        tf.check_angles("a", np.array([10.0, 190.0]), "degrees")  # not square: every entry counts
    with pytest.raises(ValueError, match="contains NaN or inf"):
        tf.check_angles("a", np.nan, "degrees")
    with pytest.raises(ValueError, match="contains NaN or inf"):
        tf.check_angles("a", np.array([10.0, np.nan]), "degrees")  # one non-finite entry is enough
    with pytest.raises(ValueError, match="a=190 is outside"):  # 2-D but not square: no diagonal to drop
        tf.check_angles("a", np.array([[10.0, 190.0, 5.0], [1.0, 2.0, 3.0]]), "degrees")
    tf.check_angles("a", 180.0 * (1 + 1e-12), "degrees")  # the stated tolerance: up to 180 (1 + 1e-12)
    # the message names the first value outside [0, 180 (1 + 1e-12)], not an edge value inside it
    with pytest.raises(ValueError, match=r"^a=190 is outside"):
        tf.check_angles("a", np.array([0.0, 0.5, 180.0, 180.0 * (1 + 1e-12), 190.0]), "degrees")


def test_cholesky_psd_vs_numpy_and_on_a_singular_matrix(x64):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 4))
    g = a @ a.T + 0.1 * np.eye(4)
    lower = np.asarray(tf.cholesky_psd(jnp.asarray(g)))
    np.testing.assert_allclose(lower, np.linalg.cholesky(g), rtol=1e-11, atol=1e-13)
    sing = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 4.0]])  # rank 2: a zero pivot
    lower = np.asarray(tf.cholesky_psd(jnp.asarray(sing)))
    np.testing.assert_allclose(lower, [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], atol=1e-15)
    np.testing.assert_allclose(lower @ lower.T, sing, atol=1e-15)
    # a pivot that rounding (or a slightly indefinite input) makes <= 0 is clipped: its column below is 0
    near = np.array([[1.0, 1.0, 0.5], [1.0, 1.0, 0.3], [0.5, 0.3, 1.0]])
    lower = np.asarray(tf.cholesky_psd(jnp.asarray(near)))
    assert lower[1, 1] == 0.0 and lower[2, 1] == 0.0
    np.testing.assert_allclose(lower[:, 0], [1.0, 1.0, 0.5], atol=1e-15)
    np.testing.assert_allclose(lower[2, 2], math.sqrt(1.0 - 0.25), rtol=1e-14)


def test_preference_directions_single_behaviour_and_shapes(x64):
    np.testing.assert_array_equal(np.asarray(tf.preference_directions(2.5, np.ones((1, 1)), 3)), [[2.5, 0.0, 0.0]])
    b = np.asarray(tf.preference_directions([3.0, 4.0], np.array([[1.0, 0.6], [0.6, 1.0]]), 2))
    np.testing.assert_allclose(b, [[3.0, 0.0], [4.0 * 0.6, 4.0 * 0.8]], rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match=r"cosines has shape \(3, 3\); expected \(K, K\) = \(2, 2\)"):
        tf.preference_directions([1.0, 1.0], np.eye(3), 4)
