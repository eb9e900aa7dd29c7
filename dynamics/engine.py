"""One entry point per layer over a batch of configurations, with interchangeable implementations.

:func:`trajectories` trains C last-layer heads (C configurations: distribution, head, β, η, ε,
label noise, loss weights) in the population (N → ∞) or the empirical (finite-sample) layer.
Like neural-tangents' ``implementation=`` switch, the implementations compute the same
trajectories and differ only in how:

* ``"vmap"`` — ``jax.vmap`` of the single-configuration core
  (:func:`dynamics.population_trajectory`, :func:`dynamics.empirical_trajectory`): any
  distribution pytree, every option; each configuration holds its own ``(n, d)`` data, so a step
  is memory bound.
* ``"factored"`` — the common-random-number GEMM engine (:mod:`dynamics.batched`): the pairs
  are kept as (component, shared noise ε) and the projections ``x·v`` of all configurations are
  one ``(n × d)·(d × C)`` GEMM (docs/performance.md). Gaussian and elliptical (Laplace,
  Student-t) draws are factored; the population layer accepts every distribution the core does
  (its ``components()``, else its ``gaussian_equivalent()``), with O(K d) margin variances for
  isotropic and diagonal covariances.
* ``"auto"`` (default) — factored wherever it applies, else vmap, with one
  :class:`FallbackWarning` line saying why.

Both share the per-pair and per-component maths (:mod:`dynamics.reduced`); only the projection
differs. Configuration ``c`` of either equals the core called on configuration ``c`` (to float
rounding; ``tests/test_engines.py`` checks every metric in float64).

The call works eagerly (concrete inputs: validated, chunked, NumPy outputs for "factored") and
under ``jax.jit`` / ``jax.vmap`` / ``shard_map`` (traced inputs, e.g. ``dpo-sims sweep``): then
inputs are not value-checked (the engines' in-graph checks still run) and ``cov_kind`` tells the
factored engine the covariance structure it cannot inspect. Source: docs/theory.md §1, §3, §5.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import batched as bt
from . import chunking
from ._checks import check_choice, check_int, is_concrete
from ._train import check_batch_size, check_schedule
from .distributions import GaussianPreference
from .empirical import EmpiricalTrajectory, empirical_trajectory
from .families import EllipticalPreference, GaussianMixturePreference
from .head import Head
from .losses import validate_loss
from .population import PopulationTrajectory, population_trajectory

__all__ = ["trajectories", "IMPLEMENTATIONS", "LAYERS", "FallbackWarning", "factored_support"]

IMPLEMENTATIONS = ("auto", "vmap", "factored")
LAYERS = ("population", "empirical")


class FallbackWarning(UserWarning):
    """``implementation="auto"`` could not use the factored engine and ran ``jax.vmap`` of the core."""


# --------------------------------------------------------------------------- what the batch is
def _num_configs(batch) -> int:
    if isinstance(batch, bt.PreferenceBatch):
        return batch.num_configs
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError(f"batch ({type(batch).__name__}) has no leading configuration axis; stack C distributions "
                         "(jax.tree.map(jnp.stack, *dists)) or pass a dynamics.batched.PreferenceBatch")
    return int(jnp.shape(leaves[0])[0])


def _kind(batch) -> str:
    if isinstance(batch, bt.PreferenceBatch):
        return "batch"
    if isinstance(batch, GaussianPreference):
        return "gaussian"
    if isinstance(batch, EllipticalPreference):
        return "elliptical"
    if isinstance(batch, GaussianMixturePreference):
        return "mixture"
    return "custom"


def factored_support(batch, layer: str, *, path: str = "reduced") -> str | None:
    """Why the factored engine cannot run ``batch`` in ``layer`` (one clause), or ``None`` when it can."""
    kind = _kind(batch)
    name = type(batch).__name__
    if layer == "empirical":
        if path == "full":
            return "path='full' trains the whole V×d head with autodiff; the factored engine trains the reduced head"
        if kind == "mixture":
            return "GaussianMixturePreference's draws (a sub-component per pair) are not factored"
        if kind == "custom":
            return f"{name} has no factored draw (only Gaussian and elliptical families have one)"
        return None
    if kind == "custom" and not (hasattr(batch, "components") or hasattr(batch, "gaussian_equivalent")):
        return f"{name} has neither components() nor gaussian_equivalent()"
    return None


# --------------------------------------------------------------------------- inputs
def _per_config(name, value, c, dtype, eager, *, positive=True):
    if eager:
        return bt._per_config(name, value, c, dtype, positive=positive)
    return jnp.broadcast_to(jnp.asarray(value, dtype), (c,))


def _per_behavior(name, value, c, k, dtype, eager):
    if value is None:
        return None
    if eager:
        holder = {}
        bt._interventions(holder, c, k, dtype, value if name == "label_noise" else None,
                          value if name == "loss_weight" else None)
        return holder[name]
    v = jnp.asarray(value, dtype)
    return jnp.broadcast_to(v, (c, k))


def _stacked_head(head, c, d, dtype):
    """``(w_ref, w0)`` as ``(C, V, d)`` arrays, ``a``, ``b`` and the head kind ("zero"/"ref"/"general")."""
    if head is None:
        w = jnp.zeros((c, 2, d), dtype)
        return w, w, 0, 1, "zero"
    if not isinstance(head, Head):
        raise ValueError(f"head must be a dynamics.Head (optionally with a leading (C,) axis), got {type(head).__name__}")
    w_ref, w0 = jnp.asarray(head.w_ref, dtype), jnp.asarray(head.w_init, dtype)
    if w_ref.ndim == 2:
        w_ref, w0 = jnp.broadcast_to(w_ref, (c,) + w_ref.shape), jnp.broadcast_to(w0, (c,) + w0.shape)
    if w_ref.ndim != 3 or w_ref.shape[0] != c or w_ref.shape[2] != d:
        raise ValueError(f"head.w_ref has shape {head.w_ref.shape}; expected (V, d) or (C, V, d) with C = {c}, d = {d}")
    kind = "general"
    if is_concrete((w_ref, w0)):
        kind = bt._head_arrays(head, c, d, dtype)[3]
    return w_ref, w0, head.a, head.b, kind


def _roots(cov, cov_kind):
    """Compact roots of stacked covariances ``(C, K, d, d)`` (traceable)."""
    if cov_kind == "isotropic":
        return jnp.sqrt(jnp.clip(cov[..., 0, 0], 0.0))
    if cov_kind == "diagonal":
        return jnp.sqrt(jnp.clip(jnp.diagonal(cov, axis1=-2, axis2=-1), 0.0))
    from .distributions import _psd_sqrt

    return _psd_sqrt(cov)


def _as_preference_batch(g: GaussianPreference, cov_kind, eager, dtype) -> bt.PreferenceBatch:
    """A stacked GaussianPreference as a PreferenceBatch (inspected when concrete, else ``cov_kind``)."""
    if eager:
        return bt.PreferenceBatch.from_dists(jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), g),
                                             cov_kind or "auto")
    cov_kind = cov_kind or "full"
    check_choice("cov_kind", cov_kind, bt.COV_KINDS)
    f = lambda a: jnp.asarray(a, dtype)
    return bt.PreferenceBatch(f(g.mu_pos), f(g.mu_neg), _roots(f(g.cov_pos), cov_kind), _roots(f(g.cov_neg), cov_kind),
                              f(g.p_pos), f(g.weight), cov_kind)


def _gaussian_of(batch, cov_kind, eager, dtype):
    """``(PreferenceBatch, mixing, nu)`` for a Gaussian or elliptical batch."""
    kind = _kind(batch)
    if kind == "batch":
        return batch, None, None
    if kind == "gaussian":
        return _as_preference_batch(batch, cov_kind, eager, dtype), None, None
    if kind == "elliptical":
        pb = _as_preference_batch(batch.base, cov_kind, eager, dtype)
        return pb, batch.family, (jnp.asarray(batch.nu, dtype) if batch.family == "student_t" else None)
    raise AssertionError(kind)


def _population_components(batch, cov_kind, eager, dtype):
    """Kernel components ``(dict, cov_kind)`` by the core's rule: ``components()``, else ``gaussian_equivalent()``."""
    kind = _kind(batch)
    if kind in ("batch", "gaussian", "elliptical"):
        pb, _, _ = _gaussian_of(batch, cov_kind, eager, dtype)
        cfg = bt._batch_cfg(pb, dtype) if eager else {n: getattr(pb, n) for n in
                                                       ("mu_pos", "mu_neg", "root_pos", "root_neg", "p_pos", "weight")}
        _, m_z, root, pi = bt._components(cfg, pb.cov_kind)
        c, k = pi.shape[0], pb.num_behaviors
        beh = jnp.broadcast_to(jnp.repeat(jnp.arange(k, dtype=jnp.int32), 2), (c, 2 * k))
        return {"m_z": m_z, "root": root, "pi": pi, "beh": beh}, pb.cov_kind
    if not hasattr(batch, "components"):
        g = jax.vmap(lambda dist: dist.gaussian_equivalent())(batch)
        return _population_components(g, None, eager, dtype)
    comps = jax.vmap(lambda dist: dist.components())(batch)
    return {"m_z": jnp.asarray(comps.mean, dtype), "root": jnp.asarray(comps.cov, dtype),
            "pi": jnp.asarray(comps.weight, dtype), "beh": jnp.asarray(comps.behavior, jnp.int32)}, "cov"


def _dims(batch):
    """``(K, d)`` of any stacked batch."""
    if isinstance(batch, bt.PreferenceBatch):
        return batch.num_behaviors, batch.dim
    one = jax.tree_util.tree_map(lambda a: a[0], batch)
    return one.num_behaviors, one.dim


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# --------------------------------------------------------------------------- the entry point
def trajectories(batch, key=None, *, layer: str = "population", implementation: str = "auto", beta, lr=None,
                 steps: int, loss: str = "sigmoid", label_smoothing=0.0, optimizer=None, record_every: int = 1,
                 head: Head | None = None, label_noise=None, loss_weight=None, method: str = "gd",
                 substeps: int = 4, n: int | None = None, n_eval: int = 2048, batch_size: int | None = None,
                 path: str = "reduced", cov_kind: str | None = None, return_delta: bool = True,
                 chunk_size: int | None = None, executor=None):
    """Trajectories of C configurations in one layer, by one implementation.

    Args:
      batch: the C distributions: a :class:`dynamics.batched.PreferenceBatch`, or any distribution
        pytree stacked along a leading ``(C,)`` axis (``GaussianPreference``,
        ``EllipticalPreference``, ``GaussianMixturePreference``, a custom one).
      key: empirical layer only. One PRNG key: every configuration uses it (common random
        numbers; configuration c equals ``empirical_trajectory(dist_c, key, …)``); or ``(C,)``
        keys: configuration c uses ``key[c]``.
      layer: "population" (N → ∞, :func:`dynamics.population_trajectory`) or "empirical"
        (:func:`dynamics.empirical_trajectory`).
      implementation: "auto" (factored where it applies, else vmap with one
        :class:`FallbackWarning` line), "vmap" or "factored" (refused with one ValueError line
        where it does not apply).
      beta, lr, label_smoothing: scalars or ``(C,)`` (β > 0, η > 0 unless ``optimizer`` is an optax
        transformation, ε for cdpo/robust).
      steps, record_every, loss, optimizer: as the core (static).
      head: ``None`` (zero head), a :class:`Head` shared by all configurations, or one with
        ``(C, V, d)`` weights.
      label_noise, loss_weight: ``None``, ``(K,)`` or ``(C, K)`` (docs/theory.md §5).
      method, substeps: population only: "gd" or "flow" (RK4).
      n, n_eval, batch_size, path: empirical only, as the core (``n`` required).
      cov_kind: the covariance structure when ``batch`` is traced ("isotropic", "diagonal",
        "full"); ignored (inspected) when concrete. Default "full" under tracing.
      return_delta: keep δ at every recorded step (factored; the vmap always keeps it).
      chunk_size, executor: factored, eager only: configurations per compiled chunk and the
        chunk runner (``sims.distributed.sharded_executor``), as :mod:`dynamics.batched`.

    Returns:
      :class:`PopulationTrajectory` or :class:`EmpiricalTrajectory` whose every leaf has a leading
      ``(C,)`` axis (``step (C, T)``; ``delta`` ``None`` when the factored engine ran with
      ``return_delta=False``). NumPy arrays from an eager factored run, JAX arrays otherwise.

    Raises:
      ValueError: an unknown layer/implementation, a bad argument (named, as the core), or
        ``implementation="factored"`` where it does not apply (the reason, one line).

    Source: docs/theory.md §1 (reduced head), §3 (population), §5 (interventions).
    """
    check_choice("layer", layer, LAYERS)
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    validate_loss(loss, None, 0.0)
    steps, record_every = check_schedule(steps, record_every, None if lr is None else 1.0, optimizer)
    c = _num_configs(batch)
    k, d = _dims(batch)
    dtype = np.dtype(jnp.result_type(float))
    eager = is_concrete((batch, head, beta, lr, label_smoothing, label_noise, loss_weight)) and (key is None or is_concrete(key))
    if layer == "population":
        check_choice("method", method, ("gd", "flow"))
        if method == "flow" and optimizer is not None:
            raise ValueError("method='flow' is plain gradient flow; pass optimizer=None")
        substeps = check_int("substeps", substeps)
    else:
        check_choice("path", path, ("reduced", "full"))
        if n is None:
            raise ValueError("the empirical layer needs n (training pairs per configuration); pass n=…")
        n, n_eval = check_int("n", n), check_int("n_eval", n_eval)
        batch_size = check_batch_size(batch_size, n)
        if key is None:
            raise ValueError("the empirical layer needs a PRNG key: pass key=jax.random.key(seed)")
        key = bt._typed_key(key)
        if key.ndim and key.shape != (c,):
            raise ValueError(f"key has shape {key.shape}; pass one key (common random numbers) or (C,) = ({c},) keys")
    # the per-configuration values, checked (eager) and broadcast to (C,) / (C, K)
    beta_c = _per_config("beta", beta, c, dtype, eager)
    lr_c = _per_config("lr", 0.0 if lr is None else lr, c, dtype, eager,
                       positive=lr is not None and not hasattr(optimizer, "update"))
    ls_c = _per_config("label_smoothing", label_smoothing, c, dtype, eager, positive=False)
    if eager:
        bt._check_label_smoothing(loss, ls_c)
    noise_c = _per_behavior("label_noise", label_noise, c, k, dtype, eager)
    lam_c = _per_behavior("loss_weight", loss_weight, c, k, dtype, eager)

    impl = implementation
    if impl != "vmap":
        reason = factored_support(batch, layer, path=path)
        if reason is not None and layer == "population" and _kind(batch) == "custom":
            raise ValueError(f"the population layer cannot run {type(batch).__name__}: {reason} "
                             "(docs/custom-distributions.md)")
        if reason is not None and impl == "factored":
            raise ValueError(f"implementation='factored' does not apply: {reason}; pass implementation='vmap' or 'auto'")
        if reason is not None:
            warnings.warn(f"implementation='auto' runs 'vmap': {reason}", FallbackWarning, stacklevel=2)
            impl = "vmap"
        else:
            impl = "factored"
    common = dict(c=c, k=k, d=d, dtype=dtype, eager=eager, beta=beta_c, lr=None if lr is None else lr_c,
                  label_smoothing=ls_c, noise=noise_c, lam=lam_c, steps=steps, record_every=record_every, loss=loss,
                  optimizer=optimizer, head=head)
    if impl == "vmap":
        if layer == "population":
            return _vmap_population(batch, method=method, substeps=substeps, **common)
        return _vmap_empirical(batch, key, n=n, n_eval=n_eval, batch_size=batch_size, path=path, **common)
    if layer == "population":
        return _factored_population(batch, method=method, substeps=substeps, cov_kind=cov_kind,
                                    return_delta=return_delta, chunk_size=chunk_size, executor=executor, **common)
    return _factored_empirical(batch, key, n=n, n_eval=n_eval, batch_size=batch_size, cov_kind=cov_kind,
                               return_delta=return_delta, chunk_size=chunk_size, executor=executor, **common)


# --------------------------------------------------------------------------- vmap of the core
def _vmap_inputs(batch, head, c, d, dtype, beta, lr, label_smoothing, noise, lam):
    dists = batch.stacked() if isinstance(batch, bt.PreferenceBatch) else batch
    w_ref, w0, a, b, _ = _stacked_head(head, c, d, dtype)
    heads = Head(w_ref, w0, a, b)
    axes = lambda v: None if v is None else 0
    args = (dists, heads, beta, label_smoothing, lr, noise, lam)
    return args, (0, 0, 0, 0, axes(lr), axes(noise), axes(lam))


def _vmap_population(batch, *, c, k, d, dtype, eager, beta, lr, label_smoothing, noise, lam, steps, record_every, loss,
                     optimizer, head, method, substeps):
    args, axes = _vmap_inputs(batch, head, c, d, dtype, beta, lr, label_smoothing, noise, lam)

    def one(dist, h, b_, e_, l_, ln, lw):
        return population_trajectory(dist, beta=b_, lr=l_, label_smoothing=e_, steps=steps, loss=loss, optimizer=optimizer,
                                     record_every=record_every, head=h, method=method, substeps=substeps,
                                     label_noise=ln, loss_weight=lw)

    return jax.vmap(one, in_axes=axes)(*args)


def _vmap_empirical(batch, key, *, c, k, d, dtype, eager, beta, lr, label_smoothing, noise, lam, steps, record_every, loss,
                    optimizer, head, n, n_eval, batch_size, path):
    args, axes = _vmap_inputs(batch, head, c, d, dtype, beta, lr, label_smoothing, noise, lam)

    def one(dist, h, b_, e_, l_, ln, lw, kk):
        return empirical_trajectory(dist, kk, n=n, n_eval=n_eval, beta=b_, lr=l_, label_smoothing=e_, steps=steps, loss=loss,
                                    batch_size=batch_size, optimizer=optimizer, record_every=record_every, head=h,
                                    path=path, label_noise=ln, loss_weight=lw)

    return jax.vmap(one, in_axes=axes + (None if key.ndim == 0 else 0,))(*args, key)


# --------------------------------------------------------------------------- the factored engine
def _steps(c, steps, record_every, eager):
    step = np.arange(0, steps + 1, record_every)
    return np.broadcast_to(step, (c,) + step.shape) if eager else jnp.broadcast_to(jnp.asarray(step), (c,) + step.shape)


def _factored_population(batch, *, c, k, d, dtype, eager, beta, lr, label_smoothing, noise, lam, steps, record_every, loss,
                         optimizer, head, method, substeps, cov_kind, return_delta, chunk_size, executor):
    comps, kind = _population_components(batch, cov_kind, eager, dtype)
    w_ref, w0, a, b, _ = _stacked_head(head, c, d, dtype)
    u_ref = w_ref[:, a] - w_ref[:, b]
    d0 = w0[:, a] - w0[:, b] - u_ref
    lr = jnp.zeros((c,), dtype) if lr is None else lr
    statics = dict(k=k, steps=steps, record_every=record_every, loss=loss, optimizer=optimizer, cov_kind=kind,
                   return_delta=bool(return_delta), method=method, substeps=substeps,
                   label_noise=noise is not None, loss_weight=lam is not None)
    cfg = {"beta": beta, "lr": lr, "label_smoothing": label_smoothing, "d0": d0, "u_ref": u_ref, **comps}
    if noise is not None:
        cfg["label_noise"] = noise
    if lam is not None:
        cfg["loss_weight"] = lam
    if eager:
        cfg = _np(cfg)
        if chunk_size is None:
            j = cfg["pi"].shape[1]
            per = chunking.population_bytes_per_config(d=d, num_components=j, num_behaviors=k,
                                                       records=steps // record_every + 1,
                                                       full_cov=kind in ("full", "cov"), itemsize=dtype.itemsize)
            chunk_size = chunking.configs_per_chunk(c, per, cap=chunking.MAX_POPULATION_CHUNK)
        fn = bt._compiled(bt._population_kernel, tuple(sorted(statics.items())), executor)
        out = bt._run_chunks(fn, cfg, {}, c, min(check_int("chunk_size", chunk_size), c),
                             getattr(executor, "chunk_multiple", 1))
    else:
        out = bt._population_kernel(cfg, {}, **statics)
    return PopulationTrajectory(step=_steps(c, steps, record_every, eager), metrics=out["metrics"],
                                delta=out.get("delta"), diverged=out["diverged"])


def _factored_empirical(batch, key, *, c, k, d, dtype, eager, beta, lr, label_smoothing, noise, lam, steps, record_every, loss,
                        optimizer, head, n, n_eval, batch_size, cov_kind, return_delta, chunk_size, executor):
    pb, mixing, nu = _gaussian_of(batch, cov_kind, eager, dtype)
    if eager:  # the chunked, validated driver (NumPy in and out)
        traj = bt.batched_empirical_trajectory(
            pb, key, n=n, n_eval=n_eval, beta=beta, lr=lr, steps=steps, loss=loss, label_smoothing=label_smoothing, batch_size=batch_size,
            optimizer=optimizer, record_every=record_every, head=head,
            draws="common" if key.ndim == 0 else "independent", chunk_size=chunk_size, return_delta=return_delta,
            executor=executor, label_noise=noise, loss_weight=lam, mixing=mixing,
            nu=None if nu is None else np.asarray(nu))
        out = {"train": traj.train, "eval": traj.eval, "delta": traj.delta, "delta_final": traj.delta_final,
               "diverged": traj.diverged, "cum_batch_mean_norm": traj.cum_batch_mean_norm}
        w_ref, w0, a, b, _ = _stacked_head(head, c, d, dtype)
        w_ref, w0 = np.asarray(w_ref), np.asarray(w0)
    else:
        w_ref, w0, a, b, head_kind = _stacked_head(head, c, d, dtype)
        u_ref = w_ref[:, a] - w_ref[:, b]
        vocab = w0.shape[1]
        empty = jnp.zeros((c, vocab, 0), dtype)
        cfg = {name: getattr(pb, name) for name in ("mu_pos", "mu_neg", "root_pos", "root_neg", "p_pos", "weight")}
        cfg.update(beta=beta, lr=jnp.zeros((c,), dtype) if lr is None else lr, label_smoothing=label_smoothing,
                   d0=w0[:, a] - w0[:, b] - u_ref, w0=w0 if head_kind == "general" else empty,
                   w_ref=w_ref if head_kind != "zero" else empty)
        shared = {}
        if key.ndim == 0:
            shared["key"] = jax.random.key_data(key)
        else:
            cfg["key"] = jax.random.key_data(key)
        if noise is not None:
            cfg["label_noise"] = noise
        if lam is not None:
            cfg["loss_weight"] = lam
        if nu is not None:
            cfg["nu"] = jnp.broadcast_to(nu, (c,))
        out = bt._empirical_kernel(
            cfg, shared, n=n, n_eval=n_eval, steps=steps, record_every=record_every, batch_size=batch_size, loss=loss,
            optimizer=optimizer, draws="common" if key.ndim == 0 else "independent", cov_kind=pb.cov_kind,
            shared_root=False, head_kind=head_kind, nonzero_scale=pb.cov_kind != "isotropic", a=a, b=b,
            return_delta=bool(return_delta), label_noise=noise is not None, loss_weight=lam is not None,
            mixing=mixing)
    half = (out["delta_final"] - (w0[:, a] - w0[:, b] - (w_ref[:, a] - w_ref[:, b]))) / 2.0
    if eager:
        weights = np.array(w0)
        weights[:, a] += half
        weights[:, b] -= half
    else:
        weights = w0.at[:, a].add(half).at[:, b].add(-half)
    return EmpiricalTrajectory(step=_steps(c, steps, record_every, eager), train=out["train"], eval=out["eval"],
                               delta=out.get("delta"), weights=weights,
                               cum_batch_mean_norm=out["cum_batch_mean_norm"], diverged=out["diverged"])
