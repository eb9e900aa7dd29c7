"""Every implementation of ``dynamics.trajectories`` against the single-configuration core, in float64.

ONE parametrised test runs implementation × layer × loss (full product) and crosses optimizers,
head kinds (zero head included), covariance kinds and features (label noise, loss weights,
gradient flow, minibatches, independent keys, Laplace / Student-t / mixture families) with the
losses so that each of them appears for every implementation and layer (checked below). Every
metric of every configuration — accuracies, log-probs, rewards, δ, the final head, the norm sum and
the divergence flag — must equal ``dynamics.population_trajectory`` / ``empirical_trajectory``
called on that configuration alone (an independent code path for the projections).

Budget: the core reference of a case is computed once and shared by the three implementations;
each case compiles one program per implementation (tiny d, n and steps).
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dd
from conftest import random_dist
from dynamics import engine

C, K, D = 2, 2, 3
STEPS, EVERY = 4, 2
N, N_EVAL = 24, 16

# (loss, optimizer, head kind, covariance kind, features) per layer; the product with the
# implementations is taken below
POPULATION = [
    ("sigmoid", "sgd", "zero", "iso", ("label_noise", "loss_weight")),
    ("cdpo", "momentum", "ref", "full", ("mixture",)),
    ("robust", "adam", "general", "diag", ("laplace", "label_noise")),
    ("hinge", "sgd", "general", "iso", ("flow",)),
    ("ipo", "adam", "zero3", "full", ("loss_weight", "mixture")),
]
EMPIRICAL = [
    ("sigmoid", "adam", "zero", "iso", ("label_noise", "student_t")),
    ("cdpo", "sgd", "ref", "diag", ("loss_weight", "independent")),
    ("robust", "momentum", "general", "full", ("laplace", "minibatch")),
    ("hinge", "adam", "general", "iso", ("mixture",)),
    ("ipo", "sgd", "zero3", "iso", ("label_noise", "loss_weight", "minibatch")),
]
CASES = [(impl, layer) + case for layer, cases in (("population", POPULATION), ("empirical", EMPIRICAL))
         for case in cases for impl in dd.engine.IMPLEMENTATIONS]


def test_the_cases_cover_every_option():
    for layer, cases, features in (("population", POPULATION, {"label_noise", "loss_weight", "flow", "mixture",
                                                                 "laplace"}),
                                   ("empirical", EMPIRICAL, {"label_noise", "loss_weight", "mixture", "laplace",
                                                             "student_t", "minibatch", "independent"})):
        assert {c[0] for c in cases} == set(dd.LOSSES), layer
        assert {c[1] for c in cases} == {"sgd", "momentum", "adam"}, layer
        assert {c[2] for c in cases} >= {"zero", "ref", "general"}, layer
        assert {f for c in cases for f in c[4]} == features, layer


def _inputs(layer, loss, optimizer, head_kind, cov, features):
    rng = np.random.default_rng(zlib.crc32(repr((layer, loss, head_kind, cov, features)).encode()))
    gaussians = [random_dist(rng, K, D, kind=cov) for _ in range(C)]
    if "mixture" in features:
        dists = [dd.GaussianMixturePreference.from_gaussian(g, 0.6) for g in gaussians]
    elif "laplace" in features:
        dists = [dd.EllipticalPreference.create(g, "laplace") for g in gaussians]
    elif "student_t" in features:
        dists = [dd.EllipticalPreference.create(g, "student_t", nu) for g, nu in zip(gaussians, (4.5, 9.0))]
    else:
        dists = gaussians
    if head_kind.startswith("zero"):
        heads = [None if head_kind == "zero" else dd.Head.zeros(D, 3)] * C
    else:
        w_ref = rng.normal(size=(C, 3, D)) * 0.4
        w0 = w_ref if head_kind == "ref" else w_ref + rng.normal(size=(C, 3, D)) * 0.3
        heads = [dd.Head.create(w_ref[i], w0[i], a=2, b=0) for i in range(C)]
    kw = dict(beta=np.array([0.7, 1.6]), lr=np.array([0.15, 0.3]) if optimizer == "sgd" else np.array([0.05, 0.1]),
              label_smoothing=np.array([0.1, 0.2]) if loss in ("cdpo", "robust") else np.zeros(C), steps=STEPS,
              record_every=EVERY, loss=loss, optimizer=None if optimizer == "sgd" else optimizer)
    if "label_noise" in features:
        kw["label_noise"] = np.array([[0.1, 0.3], [0.25, 0.0]])
    if "loss_weight" in features:
        kw["loss_weight"] = np.array([[1.0, 2.5], [0.5, 1.0]])
    if "flow" in features:
        kw["method"] = "flow"
    if layer == "empirical":
        kw.update(n=N, n_eval=N_EVAL, batch_size=8 if "minibatch" in features else None)
    return dists, heads, kw


def _one(kw, i):
    """Configuration i's arguments for the core."""
    out = {}
    for name, v in kw.items():
        out[name] = v[i] if name in ("beta", "lr", "label_smoothing", "label_noise", "loss_weight") else v
    return out


_REFERENCE: dict = {}


def _reference(layer, case, dists, heads, kw, keys):
    """The core on each configuration alone (computed once per case, shared by the implementations)."""
    if case not in _REFERENCE:
        if layer == "population":
            _REFERENCE[case] = [dd.population_trajectory(dists[i], head=heads[i], **_one(kw, i)) for i in range(C)]
        else:
            _REFERENCE[case] = [dd.empirical_trajectory(dists[i], keys[i], head=heads[i], **_one(kw, i))
                                for i in range(C)]
    return _REFERENCE[case]


def _stack(dists, heads):
    batch = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *dists)
    if heads[0] is None:
        return batch, None
    return batch, dd.Head(jnp.stack([h.w_ref for h in heads]), jnp.stack([h.w_init for h in heads]),
                          heads[0].a, heads[0].b)


def _close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-10, err_msg=what)


@pytest.mark.parametrize("impl,layer,loss,optimizer,head_kind,cov,features", CASES)
def test_implementation_equals_core(x64, impl, layer, loss, optimizer, head_kind, cov, features):
    dists, heads, kw = _inputs(layer, loss, optimizer, head_kind, cov, features)
    batch, head = _stack(dists, heads)
    key = jax.random.key(7)
    keys = jax.random.split(key, C) if "independent" in features else [key] * C
    call_key = keys if "independent" in features else key
    case = (layer, loss, optimizer, head_kind, cov, features)
    reason = engine.factored_support(batch, layer)
    args = (batch,) if layer == "population" else (batch, call_key)
    if impl == "factored" and reason is not None:
        with pytest.raises(ValueError, match="does not apply: GaussianMixturePreference"):
            dd.trajectories(*args, layer=layer, implementation=impl, head=head, **kw)
        return
    if impl == "auto" and reason is not None:
        with pytest.warns(dd.FallbackWarning, match="runs 'vmap'"):
            got = dd.trajectories(*args, layer=layer, implementation=impl, head=head, **kw)
    else:
        got = dd.trajectories(*args, layer=layer, implementation=impl, head=head, **kw)
    want = _reference(layer, case, dists, heads, kw, keys)
    for i, w in enumerate(want):
        tag = f"{impl} {layer} {loss} config {i}"
        groups = {"metrics": (got.metrics, w.metrics)} if layer == "population" else \
            {"train": (got.train, w.train), "eval": (got.eval, w.eval)}
        for split, (g, r) in groups.items():
            assert set(g) == set(r), f"{tag}: {split} metrics {sorted(g)} != {sorted(r)}"
            for name in r:
                _close(np.asarray(g[name])[i], r[name], f"{tag} {split}/{name}")
        _close(np.asarray(got.delta)[i], w.delta, f"{tag} delta")
        _close(np.asarray(got.step)[i], w.step, f"{tag} step")
        assert bool(np.asarray(got.diverged)[i]) == bool(w.diverged), tag
        if layer == "empirical":
            _close(np.asarray(got.weights)[i], w.weights, f"{tag} weights")
            _close(np.asarray(got.cum_batch_mean_norm)[i], w.cum_batch_mean_norm, f"{tag} cum_batch_mean_norm")
    moved = np.abs(np.asarray(want[0].delta)[-1] - np.asarray(want[0].delta)[0]).max()
    assert moved > 1e-3, "the case must train (else δ-dependent mistakes go unseen)"
    if layer == "empirical":  # the margins must take both signs, or |margin| would pass for the margin
        acc = np.asarray(want[0].train["policy_accuracy"])[1:]  # step 0 of a zero head: every margin is 0
        assert np.all((acc > 0) & (acc < 1)), acc


def test_traced_call_equals_eager(x64):
    """Under jax.jit (as dpo-sims sweep calls it) the factored engine gives the eager result."""
    dists, heads, kw = _inputs("empirical", "sigmoid", "adam", "general", "iso", ("label_noise",))
    batch, head = _stack(dists, heads)
    key = jax.random.key(3)
    eager = dd.trajectories(batch, key, layer="empirical", implementation="factored", head=head, **kw)
    traced = jax.jit(lambda b, h, k: dd.trajectories(b, k, layer="empirical", implementation="factored", head=h,
                                                     cov_kind="isotropic", **kw))(batch, head, key)
    for name in eager.train:
        _close(traced.train[name], eager.train[name], name)
    _close(traced.cum_batch_mean_norm, eager.cum_batch_mean_norm, "cum_batch_mean_norm")


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer="both"), "unknown layer"),
    (dict(implementation="gemm"), "unknown implementation"),
    (dict(layer="empirical", n=8), "needs a PRNG key"),
    (dict(layer="empirical"), "needs n"),
    (dict(label_noise=np.array([0.1, 0.2, 0.3])), "label_noise has shape"),
    (dict(beta=np.array([1.0, -1.0])), "beta must be > 0"),
])
def test_bad_input_is_one_value_error(kwargs, match):
    batch = dd.batched.PreferenceBatch.single([1.0, 2.0], d=3)
    call = dict(beta=1.0, lr=0.1, steps=2)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match) as err:
        dd.trajectories(batch, **call)
    assert "\n" not in str(err.value)
