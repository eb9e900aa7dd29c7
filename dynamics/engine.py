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
#: the models of :func:`trajectories`: the paper's margin engines or the vocabulary layers
MODELS = ("auto", "margin", "vocabulary")
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
    head.check_margin_only("the margin engine")
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
                 chunk_size: int | None = None, executor=None, model: str = "auto", loss_weights=None,
                 cubature_order: int | None = None, **hparams):
    """Trajectories of C configurations in one layer, by one implementation.

    Two models run here. The margin engines (the paper's reduced head, docs/theory.md §1, §3) take a
    ``loss`` of ``dynamics.LOSSES`` on a head with ``V = 2`` and no per-behaviour pairs. Any other
    objective of the registry (``dynamics.losses.OBJECTIVES``, a list of them, objective
    hyper-parameters such as ``rpo_alpha``/``f_divergence_type``/``loss_weights``), per-behaviour
    ``head.pairs``, a reference-free head, or ``model="vocabulary"`` (e.g. a margin loss on a
    ``V > 2`` head, which ``model="auto"`` keeps on the margin engine: its rows ``a``, ``b`` and the
    softmax over V, as before) runs the vocabulary layers
    (docs/theory.md §7, §8): :func:`dynamics.vocab_population_trajectory` /
    :func:`dynamics.vocab_empirical_trajectory` under ``jax.vmap`` over the C configurations
    (distribution, β, η, numeric hyper-parameters and per-configuration heads vmapped; one
    compilation per shape). ``implementation="auto"`` and ``"vmap"`` run it; ``"factored"`` is
    refused. The population layer's static cubature rank is read from a concrete head shared by all
    configurations (as the direct call); for a traced or per-configuration head whose ranks differ
    it is the bound ``min(V − 1 + V − 1, d)`` (same integrals, a finer rule).

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

      model: "auto" (above), "margin" (the paper's engines; refused, one line, for what they cannot
        run) or "vocabulary" (the vocabulary layers for any objective and head).
      loss_weights: vocabulary layers: the weights of a list ``loss`` (TRL semantics).
      cubature_order: vocabulary population layer: Gauss–Hermite points per dimension.
      **hparams: vocabulary layers: the objective's hyper-parameters (``rpo_alpha``, ``cpo_alpha``,
        ``simpo_gamma``, ``f_divergence_type``, …; ``dynamics.get_objective(name).hparams``):
        strings static, numbers scalars or ``(C,)``. ``label_smoothing`` is passed to the objectives
        that take it.

    Returns:
      :class:`PopulationTrajectory` or :class:`EmpiricalTrajectory` whose every leaf has a leading
      ``(C,)`` axis (``step (C, T)``; ``delta`` ``None`` when the factored engine ran with
      ``return_delta=False``). NumPy arrays from an eager factored run, JAX arrays otherwise.
      Vocabulary layers: a :class:`dynamics.VocabTrajectory` (population) or its ``(train, eval)``
      pair (empirical), every leaf with a leading ``(C,)`` axis (``metrics[m]`` ``(C, T, K)``,
      ``"probs"`` ``(C, T, K, V)``).

    Raises:
      ValueError: an unknown layer/implementation/loss (closest name suggested), a bad argument
        (named, as the core), ``implementation="factored"`` where it does not apply (the reason, one
        line), or, on the vocabulary path, ``label_noise``/``loss_weight``/``method="flow"`` (not
        defined there) and the vocabulary layers' own errors (e.g. a batch-level objective in the
        population layer).

    Source: docs/theory.md §1 (reduced head), §3 (population), §5 (interventions).
    """
    check_choice("layer", layer, LAYERS)
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    check_choice("model", model, MODELS)
    vocab_reason = _vocab_reason(loss, head, hparams, loss_weights, cubature_order)
    if model == "margin" and vocab_reason is not None:
        raise ValueError(f"model='margin' does not apply: {vocab_reason}; pass model='auto' or 'vocabulary'")
    if model == "vocabulary" and vocab_reason is None:
        vocab_reason = "model='vocabulary' was asked for"
    if vocab_reason is None:
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
    if eager and vocab_reason is None:
        bt._check_label_smoothing(loss, ls_c)
    if vocab_reason is not None:
        if implementation == "factored":
            raise ValueError(f"implementation='factored' does not apply: {vocab_reason}, which the vocabulary layers "
                             "run (the factored engine trains the reduced margin head only); pass implementation='vmap' "
                             "or 'auto'")
        for name, value in (("label_noise", label_noise), ("loss_weight", loss_weight)):
            if value is not None:
                raise ValueError(f"{name} is a margin-engine intervention; the vocabulary layers ({vocab_reason}) do "
                                 f"not define it: pass {name}=None")
        if layer == "population" and method != "gd":
            raise ValueError(f"method={method!r}: the vocabulary population layer ({vocab_reason}) runs discrete "
                             "steps only; pass method='gd'")
        return _vocab(batch, key, layer=layer, c=c, k=k, d=d, dtype=dtype, eager=eager, beta=beta_c,
                      lr=None if lr is None else lr_c, label_smoothing=ls_c, steps=steps, record_every=record_every,
                      loss=loss, optimizer=optimizer, head=head, n=n, n_eval=n_eval, batch_size=batch_size,
                      loss_weights=loss_weights, cubature_order=cubature_order, hparams=hparams)
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


# --------------------------------------------------------------------------- the vocabulary layers
def _vocab_reason(loss, head, hparams, loss_weights, cubature_order) -> str | None:
    """Why the call runs the vocabulary layers (one clause), or ``None`` for the margin engines."""
    from . import losses

    if isinstance(loss, (list, tuple)):
        for name in loss:
            losses.get_objective(name)  # unknown: the closest name suggested
        return f"loss={list(loss)} is a list of objectives"
    if not isinstance(loss, str):
        raise ValueError(f"loss must be an objective name or a list of names, got {loss!r}; pass e.g. loss='sigmoid'")
    if loss not in losses.LOSSES:
        losses.get_objective(loss)
        return f"loss={loss!r} is not a margin loss of the paper's engine"
    if head is not None and isinstance(head, Head):
        if head.w_ref is None:
            return "the head is reference-free (w_ref=None)"
        if head.pairs is not None and any(tuple(p) != (head.a, head.b) for p in head.pairs):
            return "the head has per-behaviour token pairs"
    given = sorted(n for n, v in hparams.items() if v is not None)
    if given:
        return f"objective hyper-parameters {given} were given"
    if loss_weights is not None:
        return "loss_weights was given"
    if cubature_order is not None:
        return "cubature_order was given"
    return None


def _vocab_heads(head, c, d, dtype, eager):
    """``(template, w_ref, w0, axis)``: the head's arrays (``w_ref`` ``None`` when reference-free), shared
    (axis ``None``, ``(V, d)``) or per configuration (axis 0, ``(C, V, d)``), and a :class:`Head` that
    carries the shapes, pairs and (when concrete and shared) the values for the static set-up."""
    if head is None:
        head = Head.zeros(d, dtype=dtype)
    if not isinstance(head, Head):
        raise ValueError(f"head must be a dynamics.Head (optionally with a leading (C,) axis), got {type(head).__name__}")
    as_array = (lambda a: np.asarray(a, dtype)) if is_concrete((head.w_ref, head.w_init)) else \
        (lambda a: jnp.asarray(a, dtype))  # a concrete head stays concrete under tracing (its ranks are read)
    w0 = as_array(head.w_init)
    w_ref = None if head.w_ref is None else as_array(head.w_ref)
    if w0.ndim == 2:
        if w0.shape[1] != d:
            raise ValueError(f"head has d = {w0.shape[1]} but the batch has d = {d}; they must match")
        return head, w_ref, w0, None
    if w0.ndim != 3 or w0.shape[0] != c or w0.shape[2] != d or (w_ref is not None and w_ref.shape != w0.shape):
        raise ValueError(f"head.w_init has shape {w0.shape}; expected (V, d) or (C, V, d) with C = {c}, d = {d}")
    return head, w_ref, w0, 0


def _rank_head(head, w_ref, w0, axis):
    """The head whose image ranks set the population rule: the shared concrete head itself; the first
    configuration when every configuration has its ranks; else a generic head (the rank bound)."""
    from .vocab_population import image_rank

    concrete = is_concrete((w_ref, w0))
    if axis is None and concrete:
        return head
    shape = w0.shape[-2:]
    if concrete:
        d = shape[1]
        ref = (lambda i: np.zeros(shape)) if w_ref is None else (lambda i: np.asarray(w_ref[i]))
        ranks = {(image_rank(ref(i), d), image_rank(np.asarray(w0[i]), d)) for i in range(w0.shape[0])}
        if len(ranks) == 1:
            return Head(None if w_ref is None else w_ref[0], w0[0], head.a, head.b, head.pairs)
    rng = np.random.default_rng(0)
    generic = lambda: rng.standard_normal(shape)
    return Head(None if w_ref is None else generic(), generic(), head.a, head.b, head.pairs)


def _vocab_hparams(loss, hparams, label_smoothing, c, eager):
    """``(static, traced, traced_axes)``: strings/bools/None static; numbers as scalars (shared) or ``(C,)``
    (vmapped); ``label_smoothing`` (``(C,)``) joins when one of the objectives takes it."""
    from . import losses

    names = [loss] if isinstance(loss, str) else list(loss)
    takes_ls = any("label_smoothing" in losses.get_objective(n).hparams for n in names)
    if "label_smoothing" in hparams:
        raise ValueError("label_smoothing is an argument of trajectories; pass label_smoothing=… (not as a "
                         "hyper-parameter keyword twice)")
    static, traced, axes = {}, {}, {}
    for name, value in hparams.items():
        if value is None or isinstance(value, (str, bool, np.bool_)):
            static[name] = value
            continue
        arr = jnp.asarray(value)
        if arr.ndim == 0:
            traced[name], axes[name] = arr, None
        elif arr.shape == (c,):
            traced[name], axes[name] = arr, 0
        else:
            raise ValueError(f"{name} has shape {arr.shape}; pass a scalar or one value per configuration ({c},)")
    if takes_ls:
        traced["label_smoothing"], axes["label_smoothing"] = label_smoothing, 0
    elif eager and np.any(np.asarray(label_smoothing) != 0):
        raise ValueError(f"label_smoothing has no effect with loss {loss!r}; pass label_smoothing=0 or an objective "
                         "that takes it (e.g. 'cdpo', 'robust', 'exo_pair', 'cpo', 'simpo')")
    return static, traced, axes


def _vocab(batch, key, *, layer, c, k, d, dtype, eager, beta, lr, label_smoothing, steps, record_every, loss,
           optimizer, head, n, n_eval, batch_size, loss_weights, cubature_order, hparams):
    """The vocabulary layers, ``jax.vmap`` over the C configurations (docs/theory.md §7, §8)."""
    from . import losses
    from . import vocab_population as vp
    from .population import as_default_float
    from .vocab import VocabTrajectory, vocab_empirical_trajectory

    dists = batch.stacked() if isinstance(batch, bt.PreferenceBatch) else batch
    template, w_ref, w0, h_axis = _vocab_heads(head, c, d, dtype, eager)
    static, traced, t_axes = _vocab_hparams(loss, hparams, label_smoothing, c, eager)
    lt = loss if isinstance(loss, str) else list(loss)
    if eager:  # every configuration's values, one line per bad field (the layers check configuration by configuration)
        z = jnp.zeros((c,), dtype)
        ref = (z, z) if template.w_ref is not None else (None, None)
        losses.objective_loss(lt, z, z, *ref, beta=beta, loss_weights=loss_weights, **static,
                              **{n_: jnp.broadcast_to(v, (c,)) for n_, v in traced.items()})
    lr_c = jnp.zeros((c,), dtype) if lr is None else lr
    ref_axis = None if w_ref is None else h_axis
    if layer == "population":
        if not (hasattr(dists, "components") or hasattr(dists, "gaussian_equivalent")):
            raise ValueError(f"the population layer cannot run {type(dists).__name__}: it has neither components() "
                             "nor gaussian_equivalent() (docs/custom-distributions.md)")
        dist0 = jax.tree_util.tree_map(lambda a: a[0], dists)
        hp0 = {n_: (v if t_axes[n_] is None else v[0]) for n_, v in traced.items()}
        rank_head = _rank_head(template, w_ref, w0, h_axis)
        with jax.ensure_compile_time_eval():  # under jit (the sweep) the head's token table stays concrete
            _, prob, _ = vp._prepare(dist0, rank_head, lt, beta[0], loss_weights, {**static, **hp0}, cubature_order)
        zeros_ref = w_ref is None

        def one_population(dist, wr, w_init, b_, l_, thp):
            if not hasattr(dist, "components") and hasattr(dist, "gaussian_equivalent"):
                dist = dist.gaussian_equivalent()
            dist = as_default_float(dist)
            dt = dist.components().mean.dtype
            w_init = w_init.astype(dt)
            wr = jnp.zeros_like(w_init) if zeros_ref else wr.astype(dt)
            step, metrics, loss_total, grad_norm, ws = vp._trajectory(
                prob, dist, wr, w_init, b_.astype(dt), l_.astype(dt), thp, optimizer=optimizer, steps=steps,
                record_every=record_every)
            comps = dist.components()
            weights = jax.ops.segment_sum(comps.weight, comps.behavior, dist.num_behaviors)
            return VocabTrajectory(steps=step, metrics=metrics, loss_total=loss_total, grad_norm=grad_norm,
                                   weights=weights, w=ws)

        return jax.vmap(one_population, in_axes=(0, ref_axis, h_axis, 0, 0, t_axes))(
            dists, w_ref, w0, beta, lr_c, traced)
    a, b, pairs = template.a, template.b, template.pairs

    def one_empirical(dist, wr, w_init, b_, l_, thp, kk):
        h = Head(wr, w_init, a, b, pairs)
        return vocab_empirical_trajectory(dist, kk, head=h, loss_type=lt, beta=b_, lr=None if lr is None else l_,
                                          steps=steps, n=n, n_eval=n_eval, optimizer=optimizer, batch_size=batch_size,
                                          record_every=record_every, loss_weights=loss_weights, **static, **thp)

    return jax.vmap(one_empirical, in_axes=(0, ref_axis, h_axis, 0, 0, t_axes, None if key.ndim == 0 else 0))(
        dists, w_ref, w0, beta, lr_c, traced, key)


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
