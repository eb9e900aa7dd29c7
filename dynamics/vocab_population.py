"""The exact population (N → ∞) layer of the V-token answer model (docs/theory.md §7).

Behaviour ``k`` answers with its own token pair ``(a_k, b_k)`` of a vocabulary of ``V``
tokens; the policy is ``π_W(y|x) = softmax(W x)_y`` with a frozen reference head ``W_ref``.
For a Gaussian component ``x ~ N(μ_c, S_c)`` (behaviour ``k``, label ``s``) any per-pair
objective ``f(log π_W(y_w|x), log π_W(y_l|x), log π_ref(y_w|x), log π_ref(y_l|x))`` depends on
``x`` only through the centred logits ``u = [P W; P W_ref] x`` (``P = I − 11ᵀ/V``; the
softmax is shift invariant), a Gaussian of rank ``r ≤ min(V − 1 + rank(P W_ref), d)``.

* Value: a tensor Gauss–Hermite cubature in the ``r``-dimensional image (:func:`cubature_rule`,
  error in docs/theory.md §7.4), on the eigendecomposition of the small ``2V×2V`` image
  covariance (not differentiated).
* Gradient: Stein's lemma,
  ``∇_W E[g(Wx, W_ref x)] = E[∇_z g] μᵀ + (E[∇_z∇_z g] W + E[∇_z∇_{z_ref} g] W_ref) S``,
  with the derivatives of ``g`` taken by autodiff at the nodes.
* Kinked objectives (:data:`KINKS`: ``dpop``'s ``max(0, log π_ref(y_w) − log π(y_w))``): a line rule split at
  the kink and the first-order gradient ``E[∇_z g xᵀ]`` (:func:`_kink_cubature`, docs/theory.md §7.4).
* Margin-only objectives (``dynamics.losses.objective_margin_loss`` not None) use the exact
  one-dimensional integrals of :mod:`dynamics.gaussian_integrals` instead
  (``h = δ_kᵀ z``, docs/theory.md §3.1), so ``V = 2`` with the paper's head reproduces
  :func:`dynamics.population_trajectory`.
* Batch-level objectives (``aot``, ``beta_dpo``, ``kto``): the batch statistic is replaced by its
  population value at the current head (docs/theory.md §8.5).
"""
from __future__ import annotations

import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_finite, check_int, check_positive, check_scalar
from ._train import check_schedule, make_optimizer, run_recorded
from .head import Head
from . import reduced

__all__ = ["vocab_population_trajectory", "vocab_population_objective", "vocab_population_gradient",
           "cubature_rule", "image_rank", "DEFAULT_ORDER", "BATCH_LIMITS", "AOT_PANELS", "KINKS", "StaticProblem"]

#: Gauss–Hermite points per dimension of the default tensor rule, by image rank ``r``
#: (``r`` beyond the table: 4); errors measured in docs/theory.md §7.4
DEFAULT_ORDER = {1: 96, 2: 64, 3: 24, 4: 12, 5: 9, 6: 7}
#: points per dimension of the rule for the displacement probability (an indicator) when V > 2
DISPLACEMENT_ORDER = {1: 512, 2: 192, 3: 48, 4: 16, 5: 10, 6: 7}


#: eigenvalues of the image covariance below this fraction of the largest are zero directions
_EIG_RTOL = 1e-10


# ----------------------------------------------------------------------------------- rules
def _gh(n: int):
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / math.sqrt(2.0 * math.pi)


def _order(table, r):
    return table.get(r, 4)


@functools.lru_cache(maxsize=None)
def cubature_rule(r: int, order: int | None = None):
    """Nodes ``(n, r)`` and weights ``(n,)`` of ``E[f(ξ)]``, ``ξ ~ N(0, I_r)`` (NumPy float64).

    The tensor product of ``order``-point Gauss–Hermite rules (exact for polynomials of
    degree ``2·order − 1`` in each variable), ``n = order^r``; ``order`` defaults to
    :data:`DEFAULT_ORDER`. (A Smolyak sparse rule was measured less accurate per node on the
    ridge-like integrands of DPO objectives: docs/theory.md §7.4.)

    Raises:
      ValueError: ``r < 1`` or ``order < 1``.
    """
    r = check_int("r", r)
    order = _order(DEFAULT_ORDER, r) if order is None else check_int("order", order)
    x, w = _gh(order)
    xs = np.meshgrid(*([x] * r), indexing="ij")
    ws = np.meshgrid(*([w] * r), indexing="ij")
    return np.stack([a.reshape(-1) for a in xs], axis=-1), np.prod(np.stack([a.reshape(-1) for a in ws]), axis=0)


def image_rank(w_ref, d: int) -> int:
    """Static rank bound ``r = min(V − 1 + rank(P W_ref), d)`` of the centred image of ``(W x, W_ref x)``.

    ``W_ref`` is frozen, so its centred row space is fixed; the trained head adds at most
    ``V − 1`` directions (docs/theory.md §7.2). ``w_ref (V, d)`` must be concrete.
    """
    w_ref = np.asarray(w_ref, dtype=np.float64)
    v = w_ref.shape[0]
    centred = w_ref - w_ref.mean(axis=0, keepdims=True)
    scale = max(np.abs(centred).max(), 1e-300)
    rank_ref = int(np.linalg.matrix_rank(centred / scale, tol=1e-10)) if np.any(centred) else 0
    return max(1, min(v - 1 + rank_ref, d))


# --------------------------------------------------------------------------- objectives
#: batch-level objectives whose N → ∞ limit the population layer defines (docs/theory.md §8.5)
BATCH_LIMITS = ("aot", "beta_dpo", "kto")


def _objective_info(loss_type):
    """The objective names as a tuple; raises for unknown objectives and undefined batch limits."""
    from .losses import get_objective

    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError("loss_type is an empty list; pass a TRL loss_type name such as 'sigmoid'")
    recs = [get_objective(n) for n in names]
    for rec in recs:
        if rec.batch_level and rec.name not in BATCH_LIMITS:
            raise ValueError(f"loss_type {rec.name!r} is batch-level (it sorts two nonlinear log-ratios over the "
                             "batch); the population layer does not define its N → ∞ limit — use "
                             f"vocab_empirical_trajectory, or one of {list(BATCH_LIMITS)}")
    if "aot" in names and len(names) > 1:
        raise ValueError(f"loss_type {list(names)}: the population layer takes 'aot' (a quantile coupling) alone, "
                         "not in a list; pass loss_type='aot'")
    return names


def _margin_loss_name(names, hparams):
    """The margin-only :class:`dynamics.losses.Loss` of a single objective under ``hparams``, else ``None``."""
    from .losses import objective_margin_loss

    if len(names) != 1:
        return None
    return objective_margin_loss(names[0], **hparams)


def _per_node_objective(names, beta, loss_weights, hparams, v):
    """``g(u, chosen, rejected)`` with ``u = (z, z_ref) (2V,)``: the per-pair objective (scalar)."""
    from .losses import objective_loss

    lt = names[0] if len(names) == 1 else list(names)

    def g(u, chosen, rejected):
        lp = jax.nn.log_softmax(u[:v])
        lpr = jax.nn.log_softmax(u[v:])
        out = objective_loss(lt, lp[chosen][None], lp[rejected][None], lpr[chosen][None], lpr[rejected][None],
                             beta=beta, loss_weights=loss_weights, **hparams)
        return out[0]

    return g


# ------------------------------------------------------------------------- per component
def _pair_tokens(head, k):
    if hasattr(head, "token_pairs"):
        return jnp.asarray(head.token_pairs(k), dtype=jnp.int32)
    return jnp.tile(jnp.asarray([[head.a, head.b]], jnp.int32), (k, 1))


def _components(dist, pairs):
    """Components, the x-means ``s m_c (J, d)``, chosen/rejected tokens ``(J,)`` and the pairs ``(K, 2)``."""
    comps = dist.components()
    pairs = jnp.asarray(pairs, dtype=jnp.int32)
    ab = pairs[comps.behavior]
    pos = comps.sign > 0
    chosen = jnp.where(pos, ab[:, 0], ab[:, 1])
    rejected = jnp.where(pos, ab[:, 1], ab[:, 0])
    mean_x = comps.sign[:, None] * comps.mean
    return comps, mean_x, chosen, rejected, pairs


def _image_map(w, w2, mean_x, cov, r):
    """``(u_0 (2V,), root (2V, r), lift (d, r))``: the image ``u = u_0 + root ξ``, ``ξ ~ N(0, I_r)``, and ``E[x | ξ] = mean_x + lift ξ``.

    The centred image ``[P W; P W2] x`` is ``N(m, C)``; with ``C = Q Λ Qᵀ`` (top ``r`` eigenpairs,
    not differentiated) ``root = Q Λ^{1/2}``, ``u_0 = m`` plus the mean shift of the logits
    (``1ᵀ W μ / V``), and ``lift = S Bᵀ Q Λ^{-1/2}`` (``B = [P W; P W2]``; zero on null directions). All detached.
    """
    v = w.shape[0]
    centre = lambda a: a - jnp.mean(a, axis=0, keepdims=True)
    b = jax.lax.stop_gradient(jnp.concatenate([centre(w), centre(w2)], axis=0))  # (2V, d)
    m = b @ mean_x
    c = b @ cov @ b.T
    c = (c + c.T) / 2.0
    lam, q = jnp.linalg.eigh(c)
    lam, q = lam[-r:], q[:, -r:]
    # rounding leaves eigenvalues ~1e-16·λ_max in the null directions (e.g. W = W_0): zero them, or their
    # square roots (~1e-8·σ) would perturb nodes that should coincide
    lam = jnp.where(lam > _EIG_RTOL * lam[-1], lam, 0.0)
    root = q * jnp.sqrt(lam)  # (2V, r)
    inv_sqrt = jnp.where(lam > 0, 1.0 / jnp.sqrt(jnp.where(lam > 0, lam, 1.0)), 0.0)
    lift = cov @ b.T @ (q * inv_sqrt)  # (d, r)
    shift = jnp.concatenate([jnp.full((v,), jnp.mean(w @ mean_x)), jnp.full((v,), jnp.mean(w2 @ mean_x))])
    return jax.lax.stop_gradient((m + shift, root, lift))


def _image_nodes(w, w2, mean_x, cov, xi):
    """Logit nodes ``(n, V)`` of ``W x`` and ``(n, V)`` of ``W2 x`` for ``x ~ N(mean_x, cov)`` on the rule ``xi``.

    The nodes are ``u_0 + root ξ`` of :func:`_image_map`, so linear functions of the logits integrate exactly.
    """
    u0, root, _ = _image_map(w, w2, mean_x, cov, xi.shape[-1])
    return jax.lax.stop_gradient(u0 + xi @ root.T)


def _component_cubature(g, w, w_ref, mean_x, cov, chosen, rejected, xi, wt, *, need_grad=True):
    """``(E g, Stein gradient (V, d) or None)`` of one component (docs/theory.md §7.3).

    ``∇_W E[g(Wx, W_ref x)] = E[∇_z g] μᵀ + (E[∇_z∇_z g] W + E[∇_z∇_{z_ref} g] W_ref) S``;
    the derivatives of ``g`` are taken by autodiff at the nodes, never through the eigendecomposition.
    """
    v = w.shape[0]
    u = _image_nodes(w, w_ref, mean_x, cov, xi)
    gc = lambda uu: g(uu, chosen, rejected)
    e_val = wt @ jax.vmap(gc)(u)
    if not need_grad:
        return e_val, None
    e_grad = wt @ jax.vmap(jax.grad(gc))(u)  # (2V,)
    e_hess = jnp.einsum("n,nij->ij", wt, jax.vmap(jax.jacfwd(jax.grad(gc)))(u))  # (2V, 2V)
    hzz, hzr = e_hess[:v, :v], e_hess[:v, v:]
    return e_val, jnp.outer(e_grad[:v], mean_x) + (hzz @ w + hzr @ w_ref) @ cov


#: the line rule across a kink (docs/theory.md §7.4): ``KINK_PANELS`` panels on ``t ∈ [−KINK_HALF_WIDTH, KINK_HALF_WIDTH]``,
#: each split in two at the kink (or its midpoint) with ``KINK_GL``-point Gauss–Legendre on each half
KINK_PANELS, KINK_HALF_WIDTH, KINK_GL = 16, 8.0, 8
#: bisection steps of a kink inside one panel (width 1 → float64 resolution)
_KINK_STEPS = 60

#: objectives whose per-pair integrand has a kink on one smooth surface of the image, with the kink's coordinate
#: ``κ(u, chosen)`` (the kink is ``κ = 0``): DPOP's ``max(0, log π_ref(y_w) − log π(y_w))``
KINKS = ("dpop",)


def _kink_coordinate(name, v):
    if name == "dpop":
        return lambda u, ch: jax.nn.log_softmax(u[:v])[ch] - jax.nn.log_softmax(u[v:])[ch]
    raise ValueError(f"no kink coordinate for loss_type {name!r}")  # pragma: no cover - internal


@functools.lru_cache(maxsize=None)
def _kink_rules(r: int, order: int | None):
    """The ``(r − 1)``-dim Gauss–Hermite rule across the lines and the Gauss–Legendre points on ``[−1, 1]``."""
    if r == 1:
        eta, eta_wt = np.zeros((1, 0)), np.ones(1)
    else:
        eta, eta_wt = cubature_rule(r - 1, _order(DEFAULT_ORDER, r) if order is None else order)
    return eta, eta_wt, *np.polynomial.legendre.leggauss(KINK_GL)


def _kink_cubature(g, kink, w, w2, mean_x, cov, chosen, rejected, r, order, *, need_grad=True):
    """``(E g, gradient (V, d) or None)`` of one component whose integrand has a kink on ``κ(u) = 0`` (docs/theory.md §7.4).

    In the whitened image ``ξ ~ N(0, I_r)`` the lines ``ξ = η + t e`` run along ``e ∝ ∇_ξ κ`` at the mean (the
    kink's normal there); across them an ``(r − 1)``-dim Gauss–Hermite rule in ``η``, along them ``KINK_PANELS``
    Gauss–Legendre panels, each split at its root of ``κ`` (bisection) when ``κ`` changes sign on it, so each piece
    is smooth. The gradient is the first-order form ``∇_W E g = E[∇_z g] μᵀ + E[∇_z g ξᵀ] liftᵀ``
    (``E[x | ξ] = μ + lift ξ``, :func:`_image_map`), which holds for a kinked ``g`` (the Hessian form of
    :func:`_component_cubature` misses the kink's Dirac term). One root per panel is resolved.
    """
    v = w.shape[0]
    dtype = w.dtype
    eta, eta_wt, xg, wg = (jnp.asarray(a, dtype) for a in _kink_rules(r, order))
    u0, root, lift = _image_map(w, w2, mean_x, cov, r)
    same = jnp.all(w == w2)  # identical heads: identical logits at every node (κ ≡ 0 exactly, as per pair)
    snap = lambda u: jnp.where(same, jnp.concatenate([u[..., :v], u[..., :v]], axis=-1), u)
    kc = lambda uu: kink(uu, chosen)
    normal = root.T @ jax.grad(kc)(snap(u0))
    size = jnp.sqrt(jnp.sum(normal**2))
    ok = size > 1e-12 * (1.0 + jnp.max(jnp.abs(root)))
    e = jnp.where(ok, normal / jnp.where(ok, size, 1.0), jnp.zeros((r,), dtype).at[-1].set(1.0))
    perp = jnp.linalg.qr(jnp.concatenate([e[:, None], jnp.eye(r, dtype=dtype)], axis=1))[0][:, 1:]  # (r, r − 1)
    base = eta @ perp.T  # (m, r)

    def kappa(t):  # t (m, ...) → κ on the lines
        xi = base.reshape((-1,) + (1,) * (t.ndim - 1) + (r,)) + t[..., None] * e
        return jnp.vectorize(kc, signature="(k)->()")(snap(u0 + xi @ root.T))

    edges = jnp.linspace(-KINK_HALF_WIDTH, KINK_HALF_WIDTH, KINK_PANELS + 1, dtype=dtype)
    k_edges = kappa(jnp.broadcast_to(edges, (base.shape[0], KINK_PANELS + 1)))
    lo, hi = jnp.broadcast_to(edges[:-1], k_edges[:, 1:].shape), jnp.broadcast_to(edges[1:], k_edges[:, 1:].shape)
    change = jnp.sign(k_edges[:, :-1]) * jnp.sign(k_edges[:, 1:]) < 0
    s_lo = jnp.sign(k_edges[:, :-1])

    def body(_, br):
        a, b = br
        mid = 0.5 * (a + b)
        left = jnp.sign(kappa(mid)) == s_lo
        return jnp.where(left, mid, a), jnp.where(left, b, mid)

    a, b = jax.lax.fori_loop(0, _KINK_STEPS, body, (lo, hi))
    split = jax.lax.stop_gradient(jnp.where(change, 0.5 * (a + b), 0.5 * (lo + hi)))
    ends = jnp.stack([jnp.stack([lo, split], -1), jnp.stack([split, hi], -1)], axis=-2)  # (m, P, 2, 2)
    half, centre = (ends[..., 1] - ends[..., 0]) / 2, (ends[..., 1] + ends[..., 0]) / 2
    t = centre[..., None] + half[..., None] * xg  # (m, P, 2, G)
    wt = half[..., None] * wg * jnp.exp(-0.5 * t**2)
    wt = eta_wt[:, None, None, None] * wt / jnp.sum(wt, axis=(1, 2, 3), keepdims=True)
    xi = (base[:, None, None, None, :] + t[..., None] * e).reshape(-1, r)
    wt = wt.reshape(-1)
    u = jax.lax.stop_gradient(snap(u0 + xi @ root.T))
    gc = lambda uu: g(uu, chosen, rejected)
    e_val = wt @ jax.vmap(gc)(u)
    if not need_grad:
        return e_val, None
    gz = jax.vmap(jax.grad(gc))(u)[:, :v]  # (n, V)
    return e_val, jnp.outer(wt @ gz, mean_x) + ((gz * wt[:, None]).T @ xi) @ lift.T


def _margin_terms(margin, w, w_ref, comps, pairs, beta, label_smoothing):
    """Exact margin-only value per component ``(J,)`` and gradient ``(J, V, d)`` (docs/theory.md §3.1, §7.3).

    ``h = δ_kᵀ z`` with ``δ_k = (W − W_ref)_{a_k} − (W − W_ref)_{b_k}`` and ``z = s x``, so
    ``∇_W E ℓ(h) = (e_{a_k} − e_{b_k}) (m_c E ℓ'(h) + S_c δ_k E ℓ''(h))ᵀ``.
    """
    from .losses import expected_loss_terms

    v = w.shape[0]
    dw = w - w_ref
    ab = pairs[comps.behavior]  # (J, 2)
    delta = dw[ab[:, 0]] - dw[ab[:, 1]]  # (J, d)
    mu = jnp.einsum("ci,ci->c", delta, comps.mean)
    sigma = reduced.safe_sqrt(jnp.einsum("ci,cij,cj->c", delta, comps.cov, delta))
    e_l, e_l1, e_l2 = expected_loss_terms(margin, mu, sigma, beta, label_smoothing)
    g = comps.mean * e_l1[:, None] + jnp.einsum("cij,cj->ci", comps.cov, delta) * e_l2[:, None]
    rows = jax.nn.one_hot(ab[:, 0], v, dtype=w.dtype) - jax.nn.one_hot(ab[:, 1], v, dtype=w.dtype)
    return e_l, jnp.einsum("cv,ci->cvi", rows, g)


# ---------------------------------------------------------------- batch-level limits (docs/theory.md §8.5)
def _margin_mean(w, w_ref, comps, pairs):
    """``E h`` over the whole mixture, exact (``h = δ_kᵀ z`` is linear), detached: β-DPO's batch mean."""
    dw = w - w_ref
    ab = pairs[comps.behavior]
    delta = dw[ab[:, 0]] - dw[ab[:, 1]]
    return jax.lax.stop_gradient(jnp.sum(comps.weight * jnp.einsum("ci,ci->c", delta, comps.mean)))


def _kto_mismatched_kl(prob, w, w_ref, comps, mean_x, pairs):
    """KTO's ``KL̂`` limit ``E[log π(y'|x) − log π_ref(y'|x)]``, ``y' ⊥ x``, detached (docs/theory.md §8.5).

    ``x`` from the mixture, ``y'`` from the completions' marginal ``q_t = Σ_c π_c (1[a_c = t] + 1[b_c = t]) / 2``
    (TRL's KL batch pairs each prompt with another example's completion, chosen or rejected alike); the
    per-component expectations on the rule of the image of ``(W x, W_ref x)``.
    """
    v, dtype = w.shape[0], w.dtype
    ab = pairs[comps.behavior]
    q = 0.5 * jnp.einsum("c,cv->v", comps.weight,
                         jax.nn.one_hot(ab[:, 0], v, dtype=dtype) + jax.nn.one_hot(ab[:, 1], v, dtype=dtype))
    xi, wt = _rule(prob.r_met, prob.order, dtype)

    def one(mx, cv):
        u = _image_nodes(w, w_ref, mx, cv, xi)
        return wt @ (jax.nn.log_softmax(u[:, :v], axis=-1) - jax.nn.log_softmax(u[:, v:], axis=-1))

    per_c = jax.vmap(one)(mean_x, comps.cov)  # (J, V)
    return jax.lax.stop_gradient(jnp.einsum("c,cv,v->", comps.weight, per_c, q))


def _mixture_log_cdf_sf(t, weight, mu, sigma):
    """``(log F(t), log(1 − F(t)))`` of the mixture ``Σ_c π_c N(mu_c, σ_c²)`` at ``t (...,)`` (σ_c > 0)."""
    from jax.scipy.special import log_ndtr, logsumexp

    lw = jnp.where(weight > 0, jnp.log(jnp.where(weight > 0, weight, 1.0)), -jnp.inf)
    zt = (t[..., None] - mu) / sigma
    return logsumexp(lw + log_ndtr(zt), axis=-1), logsumexp(lw + log_ndtr(-zt), axis=-1)


#: bisection steps of the mixture quantile (the bracket of 100 σ shrinks to float64 resolution by ~60)
_QUANTILE_STEPS = 80


def _mixture_transport(a, law_a, law_b):
    """The monotone map ``T = Q_B ∘ F_A`` at ``a (...,)``, for mixtures ``law = (π, μ, σ)`` (docs/theory.md §8.5).

    Matched in the log of the smaller tail (``log F`` below the median, ``log(1 − F)`` above), so tail nodes
    keep their relative accuracy; ``Q_B`` by bisection on ``[min μ − 50σ, max μ + 50σ]`` (error ≤ float64
    resolution of ``t``).
    """
    lf, ls = _mixture_log_cdf_sf(a, *law_a)
    lower = lf <= ls
    target = jnp.where(lower, lf, ls)
    wb, mb, sb = law_b
    lo = jnp.full(a.shape, jnp.min(mb - 50.0 * sb))
    hi = jnp.full(a.shape, jnp.max(mb + 50.0 * sb))

    def body(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        bf, bs = _mixture_log_cdf_sf(mid, wb, mb, sb)
        root_above = jnp.where(lower, bf < target, bs > target)
        return jnp.where(root_above, mid, lo), jnp.where(root_above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _QUANTILE_STEPS, body, (lo, hi))
    return 0.5 * (lo + hi)


#: panels of the composite 8-point Gauss–Legendre rule on ``ξ ∈ [−12, 12]`` of ``aot``'s 1-D expectations
#: (per component, along ``c − r``); error in docs/theory.md §8.5
AOT_PANELS = 128


@functools.lru_cache(maxsize=None)
def _aot_rule(panels: int):
    """Nodes and weights ``(n,)`` of ``E f(ξ)``, ``ξ ~ N(0, 1)``: composite 8-point Gauss–Legendre on [−12, 12].

    ``T = Q_B ∘ F_A`` varies on the scale of the narrowest component of ``B``, where a global Gauss–Hermite
    rule converges slowly; panels of width ``24/panels`` resolve it (the tails beyond 12 carry 4e-33).
    """
    x, w = np.polynomial.legendre.leggauss(8)
    edges = np.linspace(-12.0, 12.0, panels + 1)
    half, mid = np.diff(edges) / 2, (edges[1:] + edges[:-1]) / 2
    nodes = (mid[:, None] + half[:, None] * x).reshape(-1)
    weights = (half[:, None] * w).reshape(-1) * np.exp(-0.5 * nodes**2) / math.sqrt(2.0 * math.pi)
    return nodes, weights / weights.sum()


def _aot_terms(w, w_ref, comps, mean_x, chosen, rejected, beta, label_smoothing, panels):
    """``aot``'s quantile coupling: value per component ``(J,)`` and gradient ``(J, V, d)`` (docs/theory.md §8.5).

    ``A = c − r = (W_w − W_l) x`` and ``B = c_ref − r_ref`` are Gaussian per component, so ``F_A``, ``F_B`` are
    mixture CDFs; the batch mean of the sorted pairing converges to ``E ℓ(β(A − T(A)))``, ``T = Q_B ∘ F_A``
    (= ``∫₀¹ ℓ(β(Q_A(u) − Q_B(u))) du``). TRL differentiates through the sort with the ranks fixed, whose limit
    is ``∇ = E[β ℓ'(β(A − T(A))) ∇A]`` (quantile sensitivity); with ``E[x | A] = m + S δ (A − μ)/σ²`` it is
    ``(e_w − e_l)(m E φ + S δ E[φ ξ]/σ)ᵀ`` on the 1-D rule ``A = μ + σ ξ`` (:func:`_aot_rule`; ``panels``
    = ``cubature_order`` or :data:`AOT_PANELS`).
    """
    from .losses import _smoothed_sigmoid

    d_a = w[chosen] - w[rejected]  # (J, d)
    d_b = w_ref[chosen] - w_ref[rejected]
    mu_a, mu_b = jnp.einsum("ci,ci->c", d_a, mean_x), jnp.einsum("ci,ci->c", d_b, mean_x)
    var_a = jnp.einsum("ci,cij,cj->c", d_a, comps.cov, d_a)
    var_b = jnp.einsum("ci,cij,cj->c", d_b, comps.cov, d_b)
    # a point mass (e.g. W = 0) is given a spread ~1e-9 of the logit scale: ties are then broken at random,
    # the limit of jnp.sort's order among tied values (independent of x)
    tiny = 1e-9 * (1.0 + jnp.max(jnp.sqrt(jnp.maximum(jnp.concatenate([var_a, var_b]), 0.0)))
                   + jnp.max(jnp.abs(jnp.concatenate([mu_a, mu_b]))))
    sd_a = jnp.sqrt(jnp.maximum(var_a, 0.0) + tiny**2)
    sd_b = jnp.sqrt(jnp.maximum(var_b, 0.0) + tiny**2)
    xi, gw = _aot_rule(panels)
    xi, gw = jnp.asarray(xi, w.dtype), jnp.asarray(gw, w.dtype)
    a = mu_a[:, None] + sd_a[:, None] * xi  # (J, n)
    law_a = jax.lax.stop_gradient((comps.weight, mu_a, sd_a))
    law_b = jax.lax.stop_gradient((comps.weight, mu_b, sd_b))
    t = jax.lax.stop_gradient(_mixture_transport(jax.lax.stop_gradient(a), law_a, law_b))
    u = beta * (a - t)
    vals = _smoothed_sigmoid(u, label_smoothing) @ gw
    phi = beta * jax.grad(lambda uu: jnp.sum(_smoothed_sigmoid(uu, label_smoothing)))(u)
    gx = mean_x * (phi @ gw)[:, None] + jnp.einsum("cij,cj->ci", comps.cov, d_a) * (((phi * xi) @ gw) / sd_a)[:, None]
    v = w.shape[0]
    rows = jax.nn.one_hot(chosen, v, dtype=w.dtype) - jax.nn.one_hot(rejected, v, dtype=w.dtype)
    return vals, jax.lax.stop_gradient(jnp.einsum("cv,ci->cvi", rows, gx))


class StaticProblem:
    """A record of hashable fields, usable as a ``jax.jit`` static argument (one compile per distinct record).

    ``StaticProblem(a=1, b=(2, 3))`` sets the attributes ``a``, ``b``; two records are equal (and hash
    alike) when they are of the same class and every field is equal. Every value must be hashable
    (tuples, not lists or arrays): ``TypeError`` from ``hash`` otherwise. Subclass it per layer.
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self._key = tuple(sorted(kw.items()))

    def __hash__(self):
        return hash((type(self), self._key))

    def __eq__(self, other):
        return type(other) is type(self) and self._key == other._key


class _Problem(StaticProblem):
    """Static description of one population objective (hashable: a jit static argument).

    ``r_obj`` is the image rank the objective sees (``V − 1`` alone when it needs no reference),
    ``r_met`` that of ``(W x, W_ref x)`` for the metrics, ``r_disp`` that of ``(W x, W_0 x)``.
    """


def _split_hparams(hparams):
    """Numeric hyper-parameters (traced) and the rest (static, e.g. ``f_divergence_type``)."""
    traced, static = {}, {}
    for name, value in hparams.items():
        if isinstance(value, (bool, str)) or value is None:
            static[name] = value
        else:
            check_scalar(name, value)
            check_finite(name, value)
            traced[name] = value
    return traced, tuple(sorted(static.items()))


def _rule(r, order, dtype):
    xi, wt = cubature_rule(r, order)
    return jnp.asarray(xi, dtype), jnp.asarray(wt, dtype)


def _objective_and_grad(prob: _Problem, dist, w, w_ref, beta, thp, *, need_grad=True):
    """``(L_total, ∇_W L_total (V, d) or None, per-component values (J,))``."""
    from .losses import uses_label_smoothing

    from .losses import beta_dpo_beta, get_objective

    comps, mean_x, chosen, rejected, pairs = _components(dist, prob.pairs)
    hparams = dict(prob.static_hp, **thp)
    # batch statistics → their population values at the current head, detached (docs/theory.md §8.5)
    if "beta_dpo" in prob.names and hparams.get("beta_dpo_margin") is None:
        hparams["beta_dpo_margin"] = _margin_mean(w, w_ref, comps, pairs)
    if "kto" in prob.names and hparams.get("kto_kl") is None:
        hparams["kto_kl"] = _kto_mismatched_kl(prob, w, w_ref, comps, mean_x, pairs)
    if prob.names == ("aot",):
        vals, grads = _aot_terms(w, w_ref, comps, mean_x, chosen, rejected, beta,
                                 hparams.get("label_smoothing", 0.0), prob.order or AOT_PANELS)
    elif prob.names == ("beta_dpo",):  # sigmoid at the batch β: margin-only, exact
        vals, grads = _margin_terms("sigmoid", w, w_ref, comps, pairs,
                                    beta_dpo_beta(beta, hparams["beta_dpo_margin"],
                                                  {**get_objective("beta_dpo").hparams, **hparams}), 0.0)
    elif prob.margin is not None:
        ls = hparams.get("label_smoothing", 0.0) if uses_label_smoothing(prob.margin) else 0.0  # cdpo, robust
        vals, grads = _margin_terms(prob.margin, w, w_ref, comps, pairs, beta, ls)
    else:
        g = _per_node_objective(prob.names, beta, prob.loss_weights, hparams, w.shape[0])
        w2 = w_ref if prob.needs_reference else jnp.zeros_like(w_ref)  # unused reference: r = V − 1
        kinked = [n for n in prob.names if n in KINKS]
        if len(kinked) == 1:  # split the lines across the kink (docs/theory.md §7.4)
            kink = _kink_coordinate(kinked[0], w.shape[0])
            vals, grads = jax.vmap(lambda mx, cv, ch, rj: _kink_cubature(
                g, kink, w, w2, mx, cv, ch, rj, prob.r_obj, prob.order, need_grad=need_grad))(
                mean_x, comps.cov, chosen, rejected)
        else:
            xi, wt = _rule(prob.r_obj, prob.order, w.dtype)
            vals, grads = jax.vmap(lambda mx, cv, ch, rj: _component_cubature(
                g, w, w2, mx, cv, ch, rj, xi, wt, need_grad=need_grad))(mean_x, comps.cov, chosen, rejected)
    total = jnp.sum(comps.weight * vals)
    grad = None if grads is None else jnp.einsum("c,cvi->vi", comps.weight, grads)
    return total, grad, vals


# ---------------------------------------------------------------------------- public API
def _prepare(dist, head, loss_type, beta, loss_weights, hparams, cubature_order):
    from .losses import get_objective, objective_loss
    from .population import as_default_float

    if head is None or not isinstance(head, Head):
        raise ValueError("head must be a dynamics.Head; pass head=dynamics.Head.zeros(d, vocab_size=V) "
                         "or Head.create(w_ref, w_init, ...)")
    if hasattr(dist, "validate"):
        dist = dist.validate()
    if not hasattr(dist, "components") and hasattr(dist, "gaussian_equivalent"):
        dist = dist.gaussian_equivalent()
    dist = as_default_float(dist)
    if head.dim != dist.dim:
        raise ValueError(f"head has d = {head.dim} but the distribution has d = {dist.dim}; they must match")
    check_scalar("beta", beta)
    check_positive("beta", beta)
    names = _objective_info(loss_type)
    if "kto" in names and (hparams.get("kl_logps") is not None or hparams.get("ref_kl_logps") is not None):
        raise ValueError("kl_logps / ref_kl_logps are per-pair batch arrays; the population layer computes KTO's "
                         "z_ref itself (docs/theory.md §8.5) — drop them, or pass kto_kl= (a number)")
    thp, static_hp = _split_hparams(hparams)
    lw = None if loss_weights is None else tuple(float(x) for x in np.asarray(loss_weights).reshape(-1))
    z = jnp.zeros((1,), jnp.result_type(float))
    if "kto" in names:
        hp_check = {**hparams, "kto_kl": 0.0} if hparams.get("kto_kl") is None else hparams
    else:
        hp_check = hparams
    objective_loss(names[0] if len(names) == 1 else list(names), z, z, z, z, beta=beta, loss_weights=lw,
                   **hp_check)  # one-line errors: loss_weights length, hyper-parameters (names, ranges, no effect)
    margin = _margin_loss_name(names, hparams)
    if cubature_order is not None:
        cubature_order = check_int("cubature_order", cubature_order)
    needs_ref = any(get_objective(n).needs_reference for n in names)
    has_ref = head.w_ref is not None
    if needs_ref and not has_ref:
        needy = next(n for n in names if get_objective(n).needs_reference)
        raise ValueError(f"loss_type {needy!r} needs a reference policy but head has no w_ref; pass "
                         "Head.create(w_ref, w_init) or a reference-free loss_type (e.g. 'sft')")
    pairs = tuple(map(tuple, np.asarray(_pair_tokens(head, dist.num_behaviors)).tolist()))
    d, v = head.dim, head.w_init.shape[0]
    r_met = image_rank(_ref_or_zeros(head), d)
    r_obj = r_met if needs_ref else max(1, min(v - 1, d))
    r_disp = image_rank(head.w_init, d)
    prob = _Problem(names=names, margin=margin, loss_weights=lw, static_hp=static_hp, pairs=pairs,
                    needs_reference=needs_ref, has_reference=has_ref, r_obj=r_obj, r_met=r_met, r_disp=r_disp, order=cubature_order,
                    disp_order=_order(DISPLACEMENT_ORDER, r_disp))
    return dist, prob, thp


def _ref_or_zeros(head, dtype=None):
    """``W_ref``, or zeros for a reference-free head (its reference log-probs are never used)."""
    w_ref = jnp.zeros_like(head.w_init) if head.w_ref is None else head.w_ref
    return w_ref if dtype is None else w_ref.astype(dtype)


def vocab_population_objective(dist, w, *, head, loss_type="sigmoid", beta=1.0, loss_weights=None,
                               cubature_order=None, **hparams):
    """Population objective at the head ``w (V, d)``: ``(L_total (), per-behaviour (K,))``.

    ``L_total = Σ_c π_c E_c[f]`` over the mixture components (nats for the log-sigmoid
    family; docs/theory.md §7.3); per behaviour the conditional mean. Exact (1-D integrals)
    for margin-only objectives, else the tensor Gauss–Hermite cubature of :func:`cubature_rule`
    (``cubature_order`` points per dimension; error in docs/theory.md §7.4); ``dpop`` (:data:`KINKS`) on lines
    split at its kink (``cubature_order`` then sets the rule across the lines).

    Batch-level objectives: their population limits (docs/theory.md §8.5), as in
    :func:`vocab_population_trajectory`.

    Raises:
      ValueError: unknown ``loss_type`` or ``aot_unpaired``, β ≤ 0, a head whose ``d`` differs.
    """
    dist, prob, thp = _prepare(dist, head, loss_type, beta, loss_weights, hparams, cubature_order)
    w = _check_w(w, head, dist)
    total, vals = _jit_value(prob, dist, w, _ref_or_zeros(head, w.dtype), beta, thp)
    comps = dist.components()
    return total, reduced.per_behavior(comps.weight, vals, comps.behavior, dist.num_behaviors)


def vocab_population_gradient(dist, w, *, head, loss_type="sigmoid", beta=1.0, loss_weights=None,
                              cubature_order=None, **hparams):
    """Stein-form population gradient ``∇_W L_total``, shape ``(V, d)`` (docs/theory.md §7.3).

    Same arguments and errors as :func:`vocab_population_objective`.
    """
    dist, prob, thp = _prepare(dist, head, loss_type, beta, loss_weights, hparams, cubature_order)
    w = _check_w(w, head, dist)
    return _jit_grad(prob, dist, w, _ref_or_zeros(head, w.dtype), beta, thp)


def _check_w(w, head, dist):
    check_finite("w", w)
    w = jnp.asarray(w, dist.components().mean.dtype)
    if w.shape != head.w_init.shape:
        raise ValueError(f"w has shape {w.shape}; expected the head's shape (V, d) = {head.w_init.shape}")
    return w


@partial(jax.jit, static_argnums=(0,))
def _jit_value(prob, dist, w, w_ref, beta, thp):
    total, _, vals = _objective_and_grad(prob, dist, w, w_ref, jnp.asarray(beta, w.dtype), thp, need_grad=False)
    return total, vals


@partial(jax.jit, static_argnums=(0,))
def _jit_grad(prob, dist, w, w_ref, beta, thp):
    return _objective_and_grad(prob, dist, w, w_ref, jnp.asarray(beta, w.dtype), thp)[1]


def _per_behavior_v(weight, values, behavior, k):
    """Component values ``(J, ...)`` → per-behaviour conditional means ``(k, ...)``."""
    expand = lambda a: a.reshape((-1,) + (1,) * (values.ndim - 1))
    return jax.ops.segment_sum(expand(weight) * values, behavior, k) / expand(jax.ops.segment_sum(weight, behavior, k))


def _metrics(prob, dist, w, w_ref, w0, beta, thp):
    """Per-behaviour expectations of every metric at the head ``w`` (docs/theory.md §7.6).

    Returns ``(metrics dict of (K,) / (K, V), L_total, ‖∇_W L‖_F)``.
    """
    from .vocab import per_pair_metrics

    comps, mean_x, chosen, rejected, pairs = _components(dist, prob.pairs)
    v = w.shape[0]
    total, grad, vals = _objective_and_grad(prob, dist, w, w_ref, beta, thp)
    xi, wt = _rule(prob.r_met, prob.order, w.dtype)

    def comp_metrics(mx, cv, ch, rj):
        u = _image_nodes(w, w_ref, mx, cv, xi)
        n = u.shape[0]
        ref_logits = u[:, v:] if prob.has_reference else None
        m = per_pair_metrics(u[:, :v], ref_logits, jnp.full((n,), ch), jnp.full((n,), rj), beta=beta)
        return {key: jnp.tensordot(wt, val, axes=(0, 0)) for key, val in m.items()}

    per_c = jax.vmap(comp_metrics)(mean_x, comps.cov, chosen, rejected)
    # exact: the margin h = δ_kᵀ z is linear in x, so P(margin > 0) = Φ(E h / sd h) and E[βh] = β δ_kᵀ m_c
    dw = w - w_ref
    ab = pairs[comps.behavior]
    delta = dw[ab[:, 0]] - dw[ab[:, 1]]
    mu = jnp.einsum("ci,ci->c", delta, comps.mean)
    sd = reduced.safe_sqrt(jnp.einsum("ci,cij,cj->c", delta, comps.cov, delta))
    per_c["rewards/accuracies"] = reduced.prob_positive(mu, sd)
    per_c["rewards/margins"] = beta * mu
    per_c["loss"] = vals
    per_c["displacement"] = _displacement(prob, comps, mean_x, chosen, pairs, w, w0)
    metrics = {key: _per_behavior_v(comps.weight, val, comps.behavior, dist.num_behaviors)
               for key, val in per_c.items()}
    return metrics, total, reduced.safe_sqrt(jnp.sum(grad**2))


def _displacement(prob, comps, mean_x, chosen, pairs, w, w0):
    """``P(log π_W(y_w|x) < log π_{W_0}(y_w|x))`` per component ``(J,)`` (docs/theory.md §7.5).

    ``V = 2``: ``log π(y_w)`` increases with ``z_{y_w} − z_{y_l}``, so the event is the half-space
    ``ε_kᵀ z < 0`` with ``ε_k = (W − W_0)_{a_k} − (W − W_0)_{b_k}``: exact. ``V > 2``: the
    indicator on the tensor rule of :data:`DISPLACEMENT_ORDER` in the image of ``(W x, W_0 x)``.
    """
    v = w.shape[0]
    if v == 2:
        dw = w - w0
        ab = pairs[comps.behavior]
        e_k = dw[ab[:, 0]] - dw[ab[:, 1]]
        mu = jnp.einsum("ci,ci->c", e_k, comps.mean)
        sd = reduced.safe_sqrt(jnp.einsum("ci,cij,cj->c", e_k, comps.cov, e_k))
        return reduced.prob_positive(-mu, sd)
    xi, wt = _rule(prob.r_disp, prob.disp_order, w.dtype)

    def one(mx, cv, ch):
        u = _image_nodes(w, w0, mx, cv, xi)
        lp = jax.nn.log_softmax(u[:, :v], axis=-1)[:, ch]
        lp0 = jax.nn.log_softmax(u[:, v:], axis=-1)[:, ch]
        tol = 1e-12 * (1.0 + jnp.abs(lp0))  # rounding when W = W_0 is not displacement
        return wt @ (lp < lp0 - tol).astype(w.dtype)

    return jax.vmap(one)(mean_x, comps.cov, chosen)


def vocab_population_trajectory(dist, *, head, loss_type="sigmoid", beta=1.0, lr=0.1, steps=100, optimizer=None,
                                record_every=1, loss_weights=None, cubature_order=None, **hparams):
    """Population (N → ∞) training of the full head ``W (V, d)`` on a TRL objective.

    Args:
      dist: a preference distribution (``GaussianPreference`` or any with ``components()``;
        elliptical families via their Gaussian equivalent), K behaviours, dimension d.
      head: :class:`dynamics.Head` (``W_ref``, ``W_0``, per-behaviour token pairs ``pairs``).
      loss_type: a TRL ``loss_type`` name (``dynamics.losses.get_objective``), ``"sft"`` for the
        SFT stage (``−log π(y_w|x)``), or a list combined with ``loss_weights``.
      beta: β > 0. lr: η > 0 on ``W`` (per step). steps, record_every: static schedule.
      optimizer: ``None`` (GD), "sgd", "momentum", "adam" or an ``optax.GradientTransformation``,
        applied to the exact population gradient in ``W``.
      cubature_order: Gauss–Hermite points per dimension (default :data:`DEFAULT_ORDER`).
      **hparams: the objective's hyper-parameters (``label_smoothing``, ``rpo_alpha``, …).

    Returns:
      :class:`dynamics.vocab.VocabTrajectory` with ``T = steps // record_every + 1`` records:
      per-behaviour expectations ``(T, K)`` of every ``per_pair_metrics`` key (``"probs"``:
      ``(T, K, V)``), ``"loss"`` and ``"displacement"`` (the probability that the chosen
      log-prob is below its step-0 value), ``loss_total``, ``grad_norm`` (Frobenius norm of
      ``∇_W L``), ``weights`` and the heads ``w (T, V, d)``.

    Batch-level objectives (:data:`BATCH_LIMITS`: ``aot``, ``beta_dpo``, ``kto``) use their N → ∞ limits at
    every step (docs/theory.md §8.5): ``aot`` the quantile coupling of ``c − r`` and ``c_ref − r_ref``,
    ``beta_dpo`` the batch β at ``E h``, ``kto`` (without ``kto_kl``) ``z_ref`` from mismatched completions.

    Raises:
      ValueError: ``aot_unpaired`` (its limit is not defined here), ``aot`` in a list, ``kl_logps`` for
        ``kto``, an unknown ``loss_type`` (closest name suggested), β ≤ 0, bad schedule or head.

    Source: docs/theory.md §7.
    """
    from .vocab import VocabTrajectory

    steps, record_every = check_schedule(steps, record_every, lr, optimizer)
    dist, prob, thp = _prepare(dist, head, loss_type, beta, loss_weights, hparams, cubature_order)
    dtype = dist.components().mean.dtype
    out = _trajectory(prob, dist, _ref_or_zeros(head, dtype), head.w_init.astype(dtype), jnp.asarray(beta, dtype),
                      jnp.asarray(0.0 if lr is None else lr, dtype), thp, optimizer=optimizer, steps=steps,
                      record_every=record_every)
    step, metrics, loss_total, grad_norm, ws = out
    comps = dist.components()
    weights = jax.ops.segment_sum(comps.weight, comps.behavior, dist.num_behaviors)
    return VocabTrajectory(steps=step, metrics=metrics, loss_total=loss_total, grad_norm=grad_norm,
                           weights=weights, w=ws)


@partial(jax.jit, static_argnums=(0,), static_argnames=("optimizer", "steps", "record_every"))
def _trajectory(prob, dist, w_ref, w0, beta, lr, thp, *, optimizer, steps, record_every):
    import optax

    opt = make_optimizer(optimizer, lr)

    def step_fn(carry):
        t, w, state = carry
        _, grad, _ = _objective_and_grad(prob, dist, w, w_ref, beta, thp)
        updates, state = opt.update(grad, state, w)
        return t + 1, optax.apply_updates(w, updates), state

    def record(carry):
        t, w, _ = carry
        metrics, total, gnorm = _metrics(prob, dist, w, w_ref, w0, beta, thp)
        return t, metrics, total, gnorm, w

    _, recs = run_recorded(step_fn, record, (jnp.int32(0), w0, opt.init(w0)), steps, record_every)
    return recs
