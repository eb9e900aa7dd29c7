"""A trainable representation under the V-token head: ``x = A φ``, policy logits ``W A φ`` (both layers).

The model (docs/theory.md §10): ``φ ∈ R^{d_φ}`` is drawn from the preference distribution (any
``dynamics`` family), the embedding the head sees is ``x = A φ`` with a trainable ``A ∈ R^{d×d_φ}``
— full, or low rank ``A = A_0 + B C`` as LoRA (Hu et al. 2021) parametrises it (``B ∈ R^{d×r}`` zero
at the start, ``C ∈ R^{r×d_φ}`` small random) — and the ``V×d`` head ``W`` (:class:`dynamics.Head`,
its token pairs) is trained too. The reference policy is ``softmax(W_ref A_ref φ)``
(``head.w_ref`` and ``representation.a_ref``, by default the initial ``A``).

Every objective depends on ``(A, W)`` only through the effective φ-space head ``M = W A`` (V×d_φ)
and ``M_ref = W_ref A_ref``. The population layer evaluates the exact V-token population objective
and gradient ``∇_M`` of :mod:`dynamics.vocab_population` at ``M`` and pulls the gradient back by the
chain rule (``∇_W = ∇_M Aᵀ``, ``∇_A = Wᵀ ∇_M``; LoRA ``∇_B = Wᵀ ∇_M Cᵀ``, ``∇_C = Bᵀ Wᵀ ∇_M``),
so it is exact wherever that layer is; the empirical layer differentiates the sampled objective
with ``jax.grad`` through ``(A, W)``. Head and representation get their own learning rates
(``lr_head``, ``lr_adapter``; ``lr_adapter = 0`` is last-layer training on ``x = A_0 φ``).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ._checks import check_finite, check_int, check_positive, check_scalar, is_concrete
from ._train import check_batch_size, check_schedule, make_optimizer
from .head import Head
from .vocab import VocabTrajectory

__all__ = ["Representation", "RepresentationTrajectory", "representation_properties", "effective_heads",
           "representation_population_trajectory", "representation_empirical_trajectory", "PROPERTY_METRICS"]

#: the representation's per-behaviour properties added to the metrics (docs/theory.md §10, §2.3)
PROPERTY_METRICS = ("distinguishability", "cov_trace", "concentration")


@struct.dataclass
class Representation:
    """The trainable linear representation ``x = A φ`` (a pytree).

    Attributes:
      a_ref: ``(d, d_φ)`` the reference representation ``A_ref`` (frozen).
      a_init: ``(d, d_φ)`` full parametrisation: ``A`` at step 0; low rank: the frozen base ``A_0``.
      b_init: ``(d, r)`` LoRA's ``B`` at step 0 (``None``: full ``A``).
      c_init: ``(r, d_φ)`` LoRA's ``C`` at step 0 (``None``: full ``A``).

    Build with :meth:`create` (it validates). Source: docs/theory.md §10.1; Hu et al. 2021, "LoRA: Low-Rank
    Adaptation of Large Language Models" (arXiv:2106.09685) for the low-rank form and its initialisation.
    """

    a_ref: jax.Array
    a_init: jax.Array
    b_init: jax.Array | None = None
    c_init: jax.Array | None = None

    @classmethod
    def create(cls, a_init, a_ref=None, *, rank: int | None = None, key=None, b_init=None, c_init=None):
        """Validated constructor.

        Args:
          a_init: ``(d, d_φ)`` the initial ``A`` (full) or the frozen base ``A_0`` (``rank`` given).
          a_ref: ``(d, d_φ)`` reference ``A_ref``; default the initial effective ``A``
            (``A_0 + B_0 C_0``).
          rank: ``None`` (full ``A``) or LoRA's rank ``r`` in ``[1, min(d, d_φ)]``.
          key: PRNG key of LoRA's ``C_0`` when ``c_init`` is not given: ``C_0 ~ U(−1/√d_φ, 1/√d_φ)``
            entrywise (PyTorch's ``kaiming_uniform_(a=√5)``, LoRA's initialisation of its down-projection).
          b_init: ``(d, r)`` LoRA's ``B_0`` (default zeros, as LoRA). c_init: ``(r, d_φ)`` LoRA's ``C_0``.

        Raises:
          ValueError: a non-2-D or non-finite matrix, shapes that disagree, ``rank`` ≤ 0 or above
            ``min(d, d_φ)``, ``b_init`` / ``c_init`` without ``rank``, a missing ``key``.

        Source: docs/theory.md §10.1.
        """
        dtype = jnp.result_type(float)
        for name, value in (("a_init", a_init), ("a_ref", a_ref), ("b_init", b_init), ("c_init", c_init)):
            if value is not None:
                check_finite(name, value)
        a_init = jnp.asarray(a_init, dtype)
        if a_init.ndim != 2:
            raise ValueError(f"a_init has shape {a_init.shape}; expected (d, d_phi)")
        d, d_phi = a_init.shape
        if rank is None:
            if b_init is not None or c_init is not None:
                raise ValueError("b_init / c_init are LoRA factors; pass rank=r with them (or drop them for a full A)")
        else:
            rank = check_int("rank", rank)
            if rank > min(d, d_phi):
                raise ValueError(f"rank = {rank} exceeds min(d, d_phi) = {min(d, d_phi)}; pass 1 <= rank <= "
                                 f"{min(d, d_phi)} (that rank already reaches every A)")
            b_init = jnp.zeros((d, rank), dtype) if b_init is None else jnp.asarray(b_init, dtype)
            if c_init is None:
                if key is None:
                    raise ValueError("rank is set but neither c_init nor key is given; pass key=jax.random.key(...) "
                                     "to draw LoRA's C_0, or c_init (r, d_phi)")
                bound = 1.0 / np.sqrt(d_phi)
                c_init = jax.random.uniform(key, (rank, d_phi), dtype, -bound, bound)
            c_init = jnp.asarray(c_init, dtype)
            if b_init.shape != (d, rank):
                raise ValueError(f"b_init has shape {b_init.shape}; expected (d, r) = ({d}, {rank})")
            if c_init.shape != (rank, d_phi):
                raise ValueError(f"c_init has shape {c_init.shape}; expected (r, d_phi) = ({rank}, {d_phi})")
        rep = cls(a_init, a_init, b_init, c_init)
        a_ref = rep.effective(rep.init_params()) if a_ref is None else jnp.asarray(a_ref, dtype)
        if a_ref.shape != (d, d_phi):
            raise ValueError(f"a_ref has shape {a_ref.shape}; expected a_init's shape (d, d_phi) = ({d}, {d_phi})")
        return rep.replace(a_ref=a_ref)

    @property
    def dim(self) -> int:
        """d, the dimension of the embedding ``x = A φ`` the head reads."""
        return self.a_init.shape[-2]

    @property
    def phi_dim(self) -> int:
        """d_φ, the dimension of the distribution's ``φ``."""
        return self.a_init.shape[-1]

    @property
    def rank(self) -> int | None:
        """LoRA's rank r, or ``None`` for a full ``A``."""
        return None if self.c_init is None else self.c_init.shape[-2]

    def init_params(self) -> dict:
        """The trainable representation parameters at step 0: ``{"a": A_0}`` or ``{"b": B_0, "c": C_0}``."""
        if self.c_init is None:
            return {"a": self.a_init}
        return {"b": self.b_init, "c": self.c_init}

    def effective(self, params: dict):
        """The effective ``A (d, d_φ)`` of ``params``: ``params["a"]``, or ``A_0 + B C``."""
        if "a" in params:
            return params["a"]
        return self.a_init + params["b"] @ params["c"]


def effective_heads(head: Head, representation: Representation, params: dict | None = None):
    """The φ-space heads ``(M_ref, M) = (W_ref A_ref, W A)``, shapes ``(V, d_φ)`` (``M_ref`` is ``None`` for a
    reference-free head). ``params``: ``{"w": W, "a": A}`` or ``{"w", "b", "c"}``; default the initial
    ``(W_0, A_0)``. Source: docs/theory.md §10."""
    rep = representation
    if params is None:
        params = dict(rep.init_params(), w=head.w_init)
    m = params["w"] @ rep.effective(params)
    m_ref = None if head.w_ref is None else head.w_ref @ rep.a_ref
    return m_ref, m


def _class_moments(dist):
    """The Gaussian with the class-conditional moments of ``φ`` (``dist`` itself, else its ``gaussian_equivalent``),
    or ``None`` for a distribution that offers neither."""
    from .distributions import GaussianPreference

    if isinstance(dist, GaussianPreference):
        return dist
    if hasattr(dist, "gaussian_equivalent"):
        return dist.gaussian_equivalent()
    return None


def representation_properties(dist, a) -> dict:
    """Per-behaviour properties of the learned embedding ``x = A φ`` (docs/theory.md §10, §2.3).

    ``x | (k, s = ±1)`` has mean ``A μ_k^±`` and covariance ``A Σ_k^± Aᵀ`` (the class moments of ``φ``:
    the distribution's own, or its ``gaussian_equivalent()``); the properties are those of
    :class:`dynamics.GaussianPreference` of these moments, the definitions of
    :func:`dynamics.behavior_properties`.

    Args:
      dist: a ``GaussianPreference`` (or a family with ``gaussian_equivalent()``) on ``φ``, dimension d_φ.
      a: ``(d, d_φ)`` the representation.

    Returns:
      dict of ``(K,)`` arrays: ``"distinguishability"`` ``‖A(μ_k⁺ − μ_k⁻)‖``, ``"cov_trace"``
      ``max(tr AΣ_k⁺Aᵀ, tr AΣ_k⁻Aᵀ)`` and ``"concentration"`` ``max(‖AΣ_k⁺Aᵀ‖_op, ‖AΣ_k⁻Aᵀ‖_op)``.

    Raises:
      ValueError: a distribution without class moments, or ``a`` whose columns differ from d_φ.
    """
    g = _class_moments(dist)
    if g is None:
        raise ValueError(f"{type(dist).__name__} has no class moments (neither a GaussianPreference nor "
                         "gaussian_equivalent()); representation properties need them")
    a = jnp.asarray(a, g.mu_pos.dtype)
    if a.ndim != 2 or a.shape[1] != g.dim:
        raise ValueError(f"a has shape {a.shape}; expected (d, d_phi) with d_phi = {g.dim} (the distribution's d)")
    mapped = g.replace(mu_pos=g.mu_pos @ a.T, mu_neg=g.mu_neg @ a.T,
                       cov_pos=jnp.einsum("ij,kjl,ml->kim", a, g.cov_pos, a),
                       cov_neg=jnp.einsum("ij,kjl,ml->kim", a, g.cov_neg, a))
    return {"distinguishability": mapped.distinguishability, "cov_trace": mapped.trace,
            "concentration": mapped.concentration}


class RepresentationTrajectory(NamedTuple):
    """The result of either representation layer (a pytree).

    Attributes:
      steps: ``(T,)`` recorded step indices.
      metrics: dict of per-behaviour ``(T, K)`` expectations: every key of
        :class:`dynamics.vocab.VocabTrajectory` (``per_pair_metrics``' TRL names, ``"loss"``,
        ``"displacement"``; ``"probs"`` ``(T, K, V)``), plus :data:`PROPERTY_METRICS` of the recorded
        ``A`` (:func:`representation_properties`; absent for a distribution without class moments).
      loss_total: ``(T,)`` the objective that is optimised (nats).
      grad_norm: ``(T,)`` Euclidean norm of the gradient in all trained parameters (``W`` and ``A``, or
        ``W``, ``B`` and ``C``), whatever their learning rates.
      weights: ``(K,)`` behaviour weights (as :class:`dynamics.vocab.VocabTrajectory`).
      w: ``(T, V, d)`` the head at the recorded steps. a: ``(T, d, d_φ)`` the effective ``A``.
      params: the final parameters, ``{"w": W, "a": A}`` or ``{"w": W, "b": B, "c": C}``.

    :meth:`mean` is :meth:`dynamics.vocab.VocabTrajectory.mean`. Source: docs/theory.md §10.2.
    """

    steps: jax.Array
    metrics: dict
    loss_total: jax.Array
    grad_norm: jax.Array
    weights: jax.Array
    w: jax.Array
    a: jax.Array
    params: dict

    mean = VocabTrajectory.mean


# ---------------------------------------------------------------------------------------------- checks
def _check_inputs(head, representation, dist_dim, lr_head, lr_adapter, optimizer):
    import optax

    if not isinstance(representation, Representation):
        raise ValueError(f"representation must be a dynamics.Representation, got {type(representation).__name__}; "
                         "build it with Representation.create(a_init, ...)")
    if not isinstance(head, Head):
        raise ValueError(f"head must be a dynamics.Head, got {type(head).__name__}; build it with Head.create")
    if head.dim != representation.dim:
        raise ValueError(f"head has d = {head.dim} but the representation maps to d = {representation.dim} "
                         "(a_init is (d, d_phi)); they must match")
    if dist_dim is not None and representation.phi_dim != dist_dim:
        raise ValueError(f"the representation reads d_phi = {representation.phi_dim} but the distribution has "
                         f"d = {dist_dim}; pass a_init of shape (d, {dist_dim})")
    if isinstance(optimizer, optax.GradientTransformation):
        return
    for name, value in (("lr_head", lr_head), ("lr_adapter", lr_adapter)):
        if value is None:
            raise ValueError(f"{name} is required unless optimizer is an optax.GradientTransformation")
        check_scalar(name, value)
        check_positive(name, value, allow_zero=True)
    if is_concrete((lr_head, lr_adapter)) and float(lr_head) == 0.0 and float(lr_adapter) == 0.0:
        raise ValueError("lr_head and lr_adapter are both 0 (nothing is trained); pass lr_head > 0 or lr_adapter > 0")


def _schedule(steps, record_every, optimizer):
    return check_schedule(steps, record_every, 1.0, optimizer)  # the two learning rates are checked apart


def _optimizer(optimizer, lr_head, lr_adapter, params):
    """One optax transformation over ``params``: ``optimizer`` per group (``"w"``: ``lr_head``; the rest:
    ``lr_adapter``), via ``optax.multi_transform``; an optax transformation is used as is."""
    import optax

    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    labels = {name: "head" if name == "w" else "adapter" for name in params}
    return optax.multi_transform({"head": make_optimizer(optimizer, lr_head),
                                  "adapter": make_optimizer(optimizer, lr_adapter)}, labels)


def _traced_rates(lr_head, lr_adapter, dtype, optimizer):
    from .vocab import _traced_lr

    return (_traced_lr("lr_head", 0.0 if lr_head is None else lr_head, dtype, optimizer, allow_zero=True),
            _traced_lr("lr_adapter", 0.0 if lr_adapter is None else lr_adapter, dtype, optimizer, allow_zero=True))


def _with_properties(metrics, dist, a_rec):
    if _class_moments(dist) is None:
        return metrics
    props = jax.vmap(lambda a: representation_properties(dist, a))(a_rec)
    return dict(metrics, **props)


# ---------------------------------------------------------------------------------------------- population layer
def representation_population_trajectory(dist, *, head: Head, representation: Representation, loss_type="sigmoid",
                                         beta=1.0, lr_head=0.1, lr_adapter=0.1, steps: int = 100, optimizer=None,
                                         record_every: int = 1, loss_weights=None, cubature_order=None, **hparams):
    """Population (N → ∞) training of the head ``W`` and the representation ``A`` (or LoRA's ``B, C``).

    At every step the exact V-token population objective and its gradient ``∇_M`` at the effective head
    ``M = W A`` (:mod:`dynamics.vocab_population`, reference ``M_ref = W_ref A_ref``) are pulled back to
    the parameters by the chain rule (``jax.vjp`` of ``(W, A) ↦ W A``), then the optimizer steps each
    group at its own rate.

    Args:
      dist: a preference distribution on ``φ`` (d_φ) with ``components()`` (``GaussianPreference``,
        ``GaussianMixturePreference``) or ``gaussian_equivalent()`` (elliptical: its Gaussian equivalent).
      head: :class:`dynamics.Head` ``(V, d)``: ``W_ref`` (or ``None``), ``W_0``, token pairs.
      representation: :class:`Representation` ``(d, d_φ)``: ``A_ref``, ``A_0`` (and LoRA's ``B_0, C_0``).
      loss_type, beta, loss_weights, cubature_order, hparams: the objective, as
        :func:`dynamics.vocab_population_trajectory`.
      lr_head, lr_adapter: learning rates ≥ 0 of ``W`` and of ``A`` (or ``B, C``) (not both 0;
        ``lr_adapter = 0`` freezes the representation). Ignored for an optax transformation, which
        then updates every parameter.
      steps, record_every: static schedule (``record_every | steps``).
      optimizer: ``None``/"sgd", "momentum", "adam" (:func:`dynamics._train.make_optimizer`, one per
        group via ``optax.multi_transform``) or an ``optax.GradientTransformation``.

    Returns:
      :class:`RepresentationTrajectory` (``T = steps // record_every + 1``); ``grad_norm`` is that of the
      gradient in all parameters.

    Raises:
      ValueError: shapes of head, representation and distribution that disagree, a negative learning
        rate (or both 0), and every error of :func:`dynamics.vocab_population_trajectory`.

    Source: docs/theory.md §10 (reduction, pull-back), §7 (population layer).
    """
    from . import vocab_population as vp

    _check_inputs(head, representation, getattr(dist, "dim", None), lr_head, lr_adapter, optimizer)
    steps, record_every = _schedule(steps, record_every, optimizer)
    m_ref, m0 = effective_heads(head, representation)
    phi_head = Head.create(m_ref, m0, head.a, head.b, pairs=head.pairs)
    dist, prob, thp = vp._prepare(dist, phi_head, loss_type, beta, loss_weights, hparams, cubature_order)
    dtype = dist.components().mean.dtype
    rep = jax.tree_util.tree_map(lambda v: v.astype(dtype), representation)
    params0 = dict(rep.init_params(), w=head.w_init.astype(dtype))
    step, metrics, loss_total, grad_norm, ws, a_rec, final = _population(
        prob, dist, rep, vp._ref_or_zeros(phi_head, dtype), m0.astype(dtype), params0, jnp.asarray(beta, dtype),
        *_traced_rates(lr_head, lr_adapter, dtype, optimizer), thp, optimizer=optimizer, steps=steps,
        record_every=record_every)
    comps = dist.components()
    weights = jax.ops.segment_sum(comps.weight, comps.behavior, dist.num_behaviors)
    return RepresentationTrajectory(steps=step, metrics=_with_properties(metrics, dist, a_rec), loss_total=loss_total,
                                    grad_norm=grad_norm, weights=weights, w=ws, a=a_rec, params=final)


@partial(jax.jit, static_argnums=(0,), static_argnames=("optimizer", "steps", "record_every"))
def _population(prob, dist, rep, m_ref, m0, params0, beta, lr_head, lr_adapter, thp, *, optimizer, steps,
                record_every):
    import optax

    from . import vocab_population as vp
    from .vocab import _run_recorded_once

    opt = _optimizer(optimizer, lr_head, lr_adapter, params0)
    m_of = lambda p: p["w"] @ rep.effective(p)

    def grad(p):
        m, pull = jax.vjp(m_of, p)
        _, g_m, _ = vp._objective_and_grad(prob, dist, m, m_ref, beta, thp)
        return pull(g_m)[0]

    def step_fn(carry):
        t, p, state = carry
        updates, state = opt.update(grad(p), state, p)
        return t + 1, optax.apply_updates(p, updates), state

    def record(carry):
        from .vocab import _tree_norm

        t, p, _ = carry
        metrics, total, _ = vp._metrics(prob, dist, m_of(p), m_ref, m0, beta, thp)
        return t, metrics, total, _tree_norm(grad(p)), p["w"], rep.effective(p)

    (_, final, _), recs = _run_recorded_once(step_fn, record, (jnp.int32(0), params0, opt.init(params0)), steps,
                                             record_every)
    return (*recs, final)


# ---------------------------------------------------------------------------------------------- empirical layer
def representation_empirical_trajectory(dist, key, *, head: Head, representation: Representation,
                                        loss_type="sigmoid", beta=1.0, lr_head=0.1, lr_adapter=0.1, steps: int = 100,
                                        n: int = 1024, n_eval: int = 2048, optimizer=None,
                                        batch_size: int | None = None, record_every: int = 1, loss_weights=None,
                                        **hparams):
    """Train ``W`` and ``A`` (or LoRA's ``B, C``) on ``n`` sampled pairs; metrics on them and on ``n_eval`` more.

    Each step computes the logits ``φ @ (W A)ᵀ`` and ``φ @ (W_ref A_ref)ᵀ`` of every (mini)batch pair, the
    per-pair objective (:func:`dynamics.losses.objective_loss`), its batch mean, ``jax.grad`` through
    ``(W, A)`` and the optimizer step (each group at its rate) — the loop of
    :func:`dynamics.vocab_empirical_trajectory` with the parameters ``(W, A)``.

    Args:
      dist: a preference distribution on ``φ`` with ``sample(key, n)`` (any ``dynamics`` family).
      key: PRNG key, split as :func:`dynamics.vocab_empirical_trajectory` does (same pairs, same order).
      head, representation, lr_head, lr_adapter, optimizer: as
        :func:`representation_population_trajectory`.
      loss_type, beta, steps, n, n_eval, batch_size, record_every, loss_weights, hparams: as
        :func:`dynamics.vocab_empirical_trajectory`.

    Returns:
      ``(train, eval)`` :class:`RepresentationTrajectory`; both carry the same ``w``, ``a``, ``params``
      and the same :data:`PROPERTY_METRICS` (of the law of ``A φ``, not of the sample).

    Raises:
      ValueError: as :func:`representation_population_trajectory` and
        :func:`dynamics.vocab_empirical_trajectory`.

    Source: docs/theory.md §10; TRL ``DPOTrainer`` (metrics).
    """
    from .empirical import check_sample
    from .population import as_default_float
    from .vocab import _split_hparams, _static_loss_type, _validate_objective, sample_pairs

    n = check_int("n", n)
    n_eval = check_int("n_eval", n_eval)
    _check_inputs(head, representation, getattr(dist, "dim", None), lr_head, lr_adapter, optimizer)
    loss_type = _static_loss_type(loss_type)
    _validate_objective(loss_type, beta, loss_weights, hparams, head.w_ref is not None)
    steps, record_every = _schedule(steps, record_every, optimizer)
    batch_size = check_batch_size(batch_size, n)
    if hasattr(dist, "validate") and is_concrete(dist):
        dist = dist.validate()
    dist = as_default_float(dist)
    k = dist.num_behaviors
    table = head.token_pairs(k)
    key_train, key_eval, key_batch = jax.random.split(key, 3)
    d_phi = representation.phi_dim
    train = check_sample(sample_pairs(dist, key_train, n), n, "sample(key, n)", dim=d_phi)
    held_out = check_sample(sample_pairs(dist, key_eval, n_eval), n_eval, "sample(key, n_eval)", dim=d_phi)
    traced, static = _split_hparams(hparams)
    dtype = jnp.result_type(float)
    lw = None if loss_weights is None else jnp.asarray(loss_weights, dtype)
    rep = jax.tree_util.tree_map(lambda v: v.astype(dtype), representation)
    w_ref = None if head.w_ref is None else head.w_ref.astype(dtype)
    params0 = dict(rep.init_params(), w=head.w_init.astype(dtype))
    out = _empirical(train, held_out, table, key_batch, rep, w_ref, params0, beta,
                     *_traced_rates(lr_head, lr_adapter, dtype, optimizer), lw, traced, loss_type=loss_type,
                     static_hparams=static, num_behaviors=k, optimizer=optimizer, steps=steps,
                     record_every=record_every, batch_size=batch_size)
    results = []
    for traj, (w_rec, a_rec), final in out:
        results.append(RepresentationTrajectory(steps=traj.steps, metrics=_with_properties(traj.metrics, dist, a_rec),
                                                loss_total=traj.loss_total, grad_norm=traj.grad_norm,
                                                weights=traj.weights, w=w_rec, a=a_rec, params=final))
    return tuple(results)


@partial(jax.jit, static_argnames=("loss_type", "static_hparams", "num_behaviors", "optimizer", "steps",
                                   "record_every", "batch_size"))
def _empirical(train, held_out, table, key, rep, w_ref, params0, beta, lr_head, lr_adapter, loss_weights, hparams, *,
               loss_type, static_hparams, num_behaviors, optimizer, steps, record_every, batch_size):
    from .vocab import _PAIR_FIELDS, _fit, _pair_fns, _prep_split, _traced_beta, _vocab_results

    dtype = jnp.result_type(train[0].dtype, float)
    beta = _traced_beta(beta, dtype)
    m_of = lambda p: p["w"] @ rep.effective(p)
    m_ref = None if w_ref is None else w_ref @ rep.a_ref
    m0 = m_of(params0)
    data = {name: _prep_split(split, table, m_ref, m0, dtype) for name, split in (("train", train), ("eval", held_out))}
    head_loss, head_metrics = _pair_fns(loss_type, static_hparams, beta, loss_weights, hparams, dtype)
    pair_loss = lambda p, *args: head_loss(m_of(p), *args)
    pair_metrics = lambda p, dd: head_metrics(m_of(p), dd)
    opt = _optimizer(optimizer, lr_head, lr_adapter, params0)
    step_idx, recs, (w_rec, a_rec), final = _fit(
        params0, opt, data, _PAIR_FIELDS, pair_loss, pair_metrics, key=key, num_behaviors=num_behaviors, steps=steps,
        record_every=record_every, batch_size=batch_size, dim=data["train"]["x"].shape[1],
        recorded=lambda p: (p["w"], rep.effective(p)))
    return tuple((traj, (w_rec, a_rec), final)
                 for traj in _vocab_results(data, step_idx, recs, w_rec, num_behaviors, dtype))
