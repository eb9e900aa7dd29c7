"""Empirical layer: reduced δ path vs full V×d head vs an independent NumPy trainer."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dynamics as dd
from conftest import random_dist


def _head(rng, d, v=5):
    w_ref = rng.normal(size=(v, d)) * 0.3
    w0 = w_ref + rng.normal(size=(v, d)) * 0.1  # start away from the reference
    return dd.Head.create(w_ref, w0, a=3, b=1)


@pytest.mark.parametrize("loss,optimizer", list(itertools.product(dd.LOSSES, ["sgd", "momentum", "adam"])))
def test_full_head_equals_reduced(x64, rng, loss, optimizer):
    dist = random_dist(rng, k=2, d=4)
    head = _head(rng, 4)
    label_smoothing = 0.1 if loss in ("cdpo", "robust") else 0.0  # ε only exists for the smoothed losses
    kw = dict(n=96, n_eval=64, beta=0.9, lr=0.05, steps=12, record_every=3, loss=loss, label_smoothing=label_smoothing,
              optimizer=optimizer, batch_size=32, head=head)
    red = dd.empirical_trajectory(dist, jax.random.key(5), path="reduced", **kw)
    full = dd.empirical_trajectory(dist, jax.random.key(5), path="full", **kw)
    np.testing.assert_allclose(np.asarray(red.delta), np.asarray(full.delta), atol=1e-10)
    np.testing.assert_allclose(np.asarray(red.weights), np.asarray(full.weights), atol=1e-10)
    for split in ("train", "eval"):
        for name in dd.METRICS:
            np.testing.assert_allclose(np.asarray(getattr(red, split)[name]),
                                       np.asarray(getattr(full, split)[name]), atol=1e-9, err_msg=f"{split}/{name}")
    assert float(jnp.max(jnp.abs(red.delta[-1] - red.delta[0]))) > 1e-3  # it moved


def _numpy_dpo_gd(x, s, w_ref, w0, a, b, beta, lr, steps):
    """Independent float64 NumPy DPO trainer on the full head (sigmoid loss, full batch)."""
    def logsoftmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    yw = np.where(s > 0, a, b)
    yl = np.where(s > 0, b, a)
    idx = np.arange(len(s))
    lref = logsoftmax(x @ w_ref.T)
    w = w0.copy()
    losses = []
    for t in range(steps + 1):
        lp = logsoftmax(x @ w.T)
        h = (lp[idx, yw] - lref[idx, yw]) - (lp[idx, yl] - lref[idx, yl])
        losses.append(np.mean(np.logaddexp(0, -beta * h)))
        if t == steps:
            break
        # dL/dh = -β σ(-βh); dh/dW through the log-softmax rows yw, yl
        dh = -beta / (1 + np.exp(beta * h)) / len(s)
        p = np.exp(lp)
        onehot_w = np.eye(w.shape[0])[yw]
        onehot_l = np.eye(w.shape[0])[yl]
        grad = ((onehot_w - p) - (onehot_l - p)).T @ (dh[:, None] * x)
        w = w - lr * grad
    return np.array(losses), w


def test_against_independent_numpy(x64, rng):
    dist = random_dist(rng, k=2, d=3)
    head = _head(rng, 3, v=4)
    traj = dd.empirical_trajectory(dist, jax.random.key(2), n=200, n_eval=10, beta=1.4, lr=0.3, steps=25,
                                   head=head)
    x, s, _ = dist.sample(jax.random.split(jax.random.key(2), 3)[0], 200)
    losses, w = _numpy_dpo_gd(np.asarray(x), np.asarray(s), np.asarray(head.w_ref), np.asarray(head.w_init),
                              head.a, head.b, 1.4, 0.3, 25)
    np.testing.assert_allclose(np.asarray(traj.train["loss"]), losses, atol=1e-12)
    np.testing.assert_allclose(np.asarray(traj.weights), w, atol=1e-12)


def test_first_step_is_eta_beta_zbar(x64, rng):
    dist = random_dist(rng, k=3, d=5)
    eta, beta, n = 0.2, 0.7, 333
    traj = dd.empirical_trajectory(dist, jax.random.key(9), n=n, beta=beta, lr=eta, steps=1)
    x, s, _ = dist.sample(jax.random.split(jax.random.key(9), 3)[0], n)
    zbar = np.mean(np.asarray(s)[:, None] * np.asarray(x), axis=0)
    np.testing.assert_allclose(np.asarray(traj.delta[1]), eta * beta * zbar, atol=1e-14)


def test_c2_bound_and_batch_norms(x64, rng):
    dist = random_dist(rng, k=2, d=6)
    eta, beta = 0.5, 2.0
    full = dd.empirical_trajectory(dist, jax.random.key(1), n=128, beta=beta, lr=eta, steps=40)
    x, _, _ = dist.sample(jax.random.split(jax.random.key(1), 3)[0], 128)
    mean_norm = float(np.mean(np.linalg.norm(np.asarray(x), axis=1)))
    np.testing.assert_allclose(np.asarray(full.cum_batch_mean_norm), mean_norm * np.arange(41), rtol=1e-12)
    for traj in (full, dd.empirical_trajectory(dist, jax.random.key(1), n=128, beta=beta, lr=eta, steps=40,
                                               batch_size=16)):
        bound = np.sqrt(2) * eta * beta * np.asarray(traj.cum_batch_mean_norm)
        change = np.asarray(traj.train["weight_change"])
        assert np.all(change <= bound + 1e-12)
    # step 1 from δ = 0: |ℓ'(0)| = β/2, so the full-batch ratio is exactly ‖z̄‖ / (2 mean‖x‖)
    zbar = np.mean(np.asarray(dist.sample(jax.random.split(jax.random.key(1), 3)[0], 128)[1])[:, None] * np.asarray(x), 0)
    ratio = float(full.train["weight_change"][1]) / (np.sqrt(2) * eta * beta * mean_norm)
    assert abs(ratio - np.linalg.norm(zbar) / (2 * mean_norm)) < 1e-12


def test_minibatch_epochs_visit_every_pair(x64, rng):
    """With batch 16 of n = 64, 4 steps are one epoch: IPO's linear update lets us check the visits."""
    dist = random_dist(rng, k=1, d=2)
    n, b = 64, 16
    traj = dd.empirical_trajectory(dist, jax.random.key(4), n=n, beta=1.0, lr=1e-9, steps=4, batch_size=b,
                                   loss="ipo")
    # at δ ≈ 0, ℓ'(h) ≈ −1 (c = 1/2): the epoch's total update is 2·lr·(1/B) Σ_i z_i over all n pairs
    x, s, _ = dist.sample(jax.random.split(jax.random.key(4), 3)[0], n)
    z_sum = np.sum(np.asarray(s)[:, None] * np.asarray(x), axis=0)
    np.testing.assert_allclose(np.asarray(traj.delta[-1]), 2 * 1e-9 * z_sum / b, rtol=1e-6)


def test_minibatch_order_table_equals_per_step_permutation(monkeypatch):
    """The per-epoch order table gives epoch e's permutation(fold_in(key, e)) sliced per step, as the
    table-free path (used past PERM_TABLE_MAX) does; every epoch visits distinct pairs."""
    from dynamics import _train

    key, n, b, steps = jax.random.key(3), 10, 3, 7  # 3 steps per epoch (one pair dropped), 3 epochs
    table = _train.epoch_orders(key, n, b, steps, d=2)
    assert table.shape == (3, n)
    for t in range(steps):
        idx = np.asarray(_train.minibatch_index(t, key, table, n, b))
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, t // 3), n))
        np.testing.assert_array_equal(idx, perm[(t % 3) * b:(t % 3 + 1) * b])
        np.testing.assert_array_equal(idx, _train.minibatch_index(t, key, None, n, b))
    for e in range(3):
        assert len(set(np.asarray(table[e][:9]).tolist())) == 9
    assert _train.epoch_orders_fit(n, b, steps, 2, copies=_train.PERM_TABLE_MAX // 30)
    assert not _train.epoch_orders_fit(n, b, steps, 2, copies=_train.PERM_TABLE_MAX // 30 + 1)
    # at most twice the embeddings' n·d entries: 3 epochs need d ≥ 2
    assert _train.epoch_orders(key, n, b, steps, d=1) is None
    monkeypatch.setattr(_train, "PERM_TABLE_MAX", 29)
    assert _train.epoch_orders(key, n, b, steps, d=2) is None


@pytest.mark.slow
def test_custom_optax_and_vmap_over_keys(rng):
    dist = random_dist(rng, k=2, d=3)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    f = lambda k: dd.empirical_trajectory(dist, k, n=64, n_eval=32, beta=1.0, steps=5, optimizer=opt)
    out = jax.vmap(f)(jax.random.split(jax.random.key(0), 3))
    assert out.train["loss"].shape == (3, 6)
    single = f(jax.random.split(jax.random.key(0), 3)[1])
    np.testing.assert_allclose(np.asarray(out.train["loss"][1]), np.asarray(single.train["loss"]), rtol=1e-5)


def test_metric_relations(rng):
    dist = random_dist(rng, k=2, d=4)
    t = dd.empirical_trajectory(dist, jax.random.key(3), n=256, beta=0.5, lr=0.2, steps=10, head=_head(rng, 4))
    for split in (t.train, t.eval):
        np.testing.assert_allclose(np.asarray(split["rewards_chosen"] - split["rewards_rejected"]),
                                   np.asarray(split["rewards_margin"]), atol=1e-5)
    # zero reference head: h = 0 at step 0 (no pair counted as won) and π ordering = reward ordering
    z = dd.empirical_trajectory(dist, jax.random.key(3), n=256, beta=0.5, lr=0.2, steps=10)
    assert float(z.train["reward_accuracy"][0]) == 0.0
    np.testing.assert_array_equal(np.asarray(z.train["policy_accuracy"]), np.asarray(z.train["reward_accuracy"]))
    # a non-zero reference: the policy ordering includes u_ref = W_ref,a − W_ref,b
    assert not np.array_equal(np.asarray(t.train["policy_accuracy"]), np.asarray(t.train["reward_accuracy"]))


def test_trajectory_on_data_bad_labels():
    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="labels"):
        dd.trajectory_on_data((x, jnp.array([1.0, 0.0, 1.0, -1.0]), jnp.zeros(4, int)),
                              (x, jnp.ones(4), jnp.zeros(4, int)), jax.random.key(0),
                              num_behaviors=1, beta=1.0, lr=0.1, steps=1)
