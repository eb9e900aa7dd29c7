"""Preference losses ℓ(h) of the implicit reward margin h: one :class:`Loss` record per loss.

``h = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)`` (chosen minus
rejected, in nats). Names follow TRL's ``DPOTrainer(loss_type=...)``
(docs/theory.md §1.3):

=========  ==========================================================  =================
name       ℓ(h)                                                        source
=========  ==========================================================  =================
sigmoid    −log σ(β h)                                                 DPO (Rafailov et al. 2023)
cdpo       −(1−ε) log σ(β h) − ε log σ(−β h)                           conservative DPO
robust     [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1−2ε)                Chowdhury et al. 2024
hinge      max(0, 1 − β h)                                             SLiC (Zhao et al. 2023)
ipo        (h − 1/(2β))²                                               IPO (Azar et al. 2023)
=========  ==========================================================  =================

With ``g(x) = softplus(−x) = −log σ(x)`` and ``g(−x) = g(x) + x``, ``cdpo`` and
``robust`` are ``g(βh) + c·βh`` with ``c = ε`` and ``c = −ε/(1−2ε)``; their
expectations reuse the sigmoid quadrature (docs/theory.md §3.3).

Everything the package knows about a loss is its :class:`Loss` record in
:data:`REGISTRY`; :data:`LOSSES`, :func:`loss_fn`, :func:`loss_grad_fn`,
:func:`expected_loss_terms`, :func:`validate_loss`, :func:`uses_label_smoothing`
and the bounds in :mod:`dynamics.theory` all read it. A new loss is one record
(:func:`_register`, in this module) plus its tests (docs/guide.md, "Adding a loss").

**Objectives on log-probabilities** (docs/theory.md §8). :func:`objective_loss` computes, per pair,
every TRL ``DPOConfig.loss_type`` (``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``,
``robust``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``,
``discopop``, ``sft``, ``sigmoid_norm``; a list combined with ``loss_weights``; ``f_divergence_type``)
and the objectives of TRL's other trainers and papers (``cdpo``, ``rpo``, ``cpo``, ``simpo``, ``orpo``,
``kto``, ``apo_zero_unpaired``, ``dpop``, ``beta_dpo``) from the four sequence log-probs
log π(y_w|x), log π(y_l|x), log π_ref(y_w|x), log π_ref(y_l|x). Each is an :class:`Objective`
record in :data:`OBJECTIVES` (:func:`get_objective`); those that depend on ``h`` alone name their
:class:`Loss` record in ``margin_loss``.
"""
from __future__ import annotations

import dataclasses
import difflib
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_choice, check_in_range, check_positive, check_scalar, is_concrete
from .gaussian_integrals import normal_cdf, normal_pdf, sigmoid_family_expectations

__all__ = ["Loss", "REGISTRY", "LOSSES", "get_loss", "uses_label_smoothing", "check_label_smoothing",
           "loss_fn", "loss_grad_fn", "expected_loss_terms", "validate_loss",
           "Objective", "OBJECTIVES", "OBJECTIVE_NAMES", "TRL_DPO_LOSS_TYPES", "F_DIVERGENCES", "get_objective",
           "objective_loss", "objective_margin_loss", "beta_dpo_beta"]


@dataclasses.dataclass(frozen=True)
class Loss:
    """One preference loss ℓ(h) and everything the theory needs about it.

    Attributes:
      name: the ``loss`` string (static argument everywhere).
      value: ``(h, beta, label_smoothing) → ℓ(h)`` elementwise (nats; hinge/ipo: their own units).
      grad: ``(h, beta, label_smoothing) → ℓ'(h)``.
      expectations: ``(mu, sigma, beta, label_smoothing) → (E[ℓ(a)], E[ℓ'(a)], E[ℓ''(a)])`` for
        ``a ~ N(mu, sigma²)``; arguments are broadcast arrays of one float dtype.
      smoothed: whether the loss takes the label smoothing ε ∈ [0, 1/2) (else ε must be 0).
      lipschitz: ``(beta, label_smoothing) → sup_h |ℓ'(h)|`` (C2; +inf when unbounded).
      curvature: ``(beta, label_smoothing) → sup_h ℓ''(h)`` (C1 / C4 sandwich; +inf when unbounded).
      trl_loss_type: the name of ``trl.DPOConfig(loss_type=...)``.
      source: reference paper.
    """

    name: str
    value: Callable
    grad: Callable
    expectations: Callable
    smoothed: bool
    lipschitz: Callable
    curvature: Callable
    trl_loss_type: str
    source: str


#: every loss by name, in the order of :data:`LOSSES`
REGISTRY: dict[str, Loss] = {}
#: the loss names (TRL ``loss_type``), derived from :data:`REGISTRY`
LOSSES: tuple[str, ...] = ()


def _register(loss: Loss) -> Loss:
    """Add ``loss`` to :data:`REGISTRY` (and its name to :data:`LOSSES`); returns it.

    Call it in this module only: ``dynamics.LOSSES`` and the CLI choices are read at import.

    Raises:
      ValueError: a loss of that name is already registered.
    """
    global LOSSES
    if loss.name in REGISTRY:
        raise ValueError(f"loss {loss.name!r} is already registered; pick a new name")
    REGISTRY[loss.name] = loss
    LOSSES = tuple(REGISTRY)
    return loss


def get_loss(loss: str) -> Loss:
    """The :class:`Loss` record of ``loss``. Raises ``ValueError`` for an unknown name."""
    check_choice("loss", loss, REGISTRY)
    return REGISTRY[loss]


def uses_label_smoothing(loss: str) -> bool:
    """Whether ``loss`` takes the label smoothing ε (``cdpo``, ``robust``); ε must be 0 otherwise."""
    return get_loss(loss).smoothed


def check_label_smoothing(loss: str, label_smoothing) -> None:
    """ε ∈ [0, 1/2) for a smoothed loss, ε = 0 for any other (arrays allowed; tracers skipped).

    Raises:
      ValueError: naming ``label_smoothing``, its value and the fix.
    """
    if uses_label_smoothing(loss):
        check_in_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    elif is_concrete(label_smoothing) and np.any(np.asarray(label_smoothing) != 0.0):
        smoothed = " and ".join(repr(n) for n, r in REGISTRY.items() if r.smoothed)
        raise ValueError(f"label_smoothing={np.asarray(label_smoothing).tolist()} has no effect with loss={loss!r}; "
                         "it is the label "
                         f"smoothing of {smoothed} — pass label_smoothing=0 or choose one of those losses")


def validate_loss(loss: str, beta=None, label_smoothing=0.0) -> str:
    """Check a loss name, scalar β > 0 and scalar ε (:func:`check_label_smoothing`); returns ``loss``.

    Raises:
      ValueError: naming the field and the fix.
    """
    check_choice("loss", loss, LOSSES)
    if beta is not None:
        check_scalar("beta", beta)
        check_positive("beta", beta)
    check_scalar("label_smoothing", label_smoothing)
    check_label_smoothing(loss, label_smoothing)
    return loss


def loss_fn(loss: str, h, beta, label_smoothing=0.0):
    """Pointwise loss ℓ(h) in nats (hinge/ipo: their own units).

    Args:
      loss: one of ``LOSSES``.
      h: reward margin(s) (chosen minus rejected log-ratio), any shape.
      beta: β > 0, broadcastable with ``h``.
      label_smoothing: label-smoothing ε ∈ [0, 1/2) for ``cdpo`` / ``robust``.

    Raises:
      ValueError: unknown loss name.
    """
    return get_loss(loss).value(h, beta, label_smoothing)


def loss_grad_fn(loss: str, h, beta, label_smoothing=0.0):
    """Derivative ℓ'(h) (the per-pair weight of ``s x`` in the gradient); arguments as :func:`loss_fn`."""
    return get_loss(loss).grad(h, beta, label_smoothing)


def expected_loss_terms(loss: str, mu, sigma, beta, label_smoothing=0.0):
    """``(E[ℓ(a)], E[ℓ'(a)], E[ℓ''(a)])`` for ``a ~ N(mu, sigma²)``.

    Closed forms for ``hinge`` (ℓ'' is a point mass β·δ(a − 1/β), so
    ``E[ℓ''] = β φ(z)/σ`` with ``z = (1/β − μ)/σ``) and ``ipo``; the
    sigmoid family uses :func:`sigmoid_family_expectations` (error ≤ 1e-9 in
    float64 for β·σ up to 200, tested against ``scipy.integrate.quad``).

    Args:
      loss: one of ``LOSSES``.
      mu, sigma: mean and standard deviation of ``a`` (broadcastable, σ ≥ 0).
      beta: β > 0. label_smoothing: ε for ``cdpo`` / ``robust``.

    Returns:
      Three arrays of the broadcast shape. Source: docs/theory.md §3.1–3.3.
    """
    rec = get_loss(loss)
    mu, sigma, beta = jnp.broadcast_arrays(*map(jnp.asarray, (mu, sigma, beta)))
    dtype = jnp.result_type(mu, sigma, beta, float)
    return rec.expectations(mu.astype(dtype), sigma.astype(dtype), beta.astype(dtype), label_smoothing)


# The records' callables are module-level functions (bound with ``functools.partial``), so they run
# — and can be tested, and mutation-tested — at call time, not only when the registry is built.

# ------------------------------------------------------------------ the sigmoid family
# ℓ(h) = softplus(−βh) + c(ε)·βh; c = 0 (sigmoid), ε (cdpo), −ε/(1 − 2ε) (robust)
def _coef_sigmoid(label_smoothing):
    return 0.0


def _coef_cdpo(label_smoothing):
    return label_smoothing


def _coef_robust(label_smoothing):
    return -label_smoothing / (1.0 - 2.0 * label_smoothing)


def _family_value(coef, h, beta, label_smoothing):
    return jax.nn.softplus(-beta * h) + coef(label_smoothing) * beta * h


def _family_grad(coef, h, beta, label_smoothing):
    return -beta * jax.nn.sigmoid(-beta * h) + coef(label_smoothing) * beta


def _family_expectations(coef, mu, sigma, beta, label_smoothing):
    e_sp, e_sg, e_ss = sigmoid_family_expectations(mu, sigma, beta)
    c = coef(label_smoothing)
    return e_sp + c * beta * mu, -beta * e_sg + c * beta, beta**2 * e_ss


def _family_curvature(beta, label_smoothing):
    return beta**2 / 4.0


def _lipschitz_beta(beta, label_smoothing):
    return beta


def _lipschitz_cdpo(beta, label_smoothing):
    return beta * (1.0 - label_smoothing)


def _lipschitz_robust(beta, label_smoothing):
    return beta * (1.0 - label_smoothing) / (1.0 - 2.0 * label_smoothing)


def _unbounded(beta, label_smoothing):
    return jnp.full_like(beta, jnp.inf)


for _name, _coef, _lip, _trl, _src in (
        ("sigmoid", _coef_sigmoid, _lipschitz_beta, "sigmoid", "DPO, Rafailov et al. 2023"),
        ("cdpo", _coef_cdpo, _lipschitz_cdpo, "sigmoid", "conservative DPO (TRL label_smoothing), Mitchell 2023"),
        ("robust", _coef_robust, _lipschitz_robust, "robust", "robust DPO, Chowdhury et al. 2024")):
    _register(Loss(name=_name, value=partial(_family_value, _coef), grad=partial(_family_grad, _coef),
                   expectations=partial(_family_expectations, _coef), smoothed=_name != "sigmoid",
                   lipschitz=_lip, curvature=_family_curvature, trl_loss_type=_trl, source=_src))
del _name, _coef, _lip, _trl, _src


# ------------------------------------------------------------------------------ hinge
def _hinge_value(h, beta, label_smoothing):
    return jax.nn.relu(1.0 - beta * h)


def _hinge_grad(h, beta, label_smoothing):
    h = jnp.asarray(h)
    return -beta * (beta * h < 1.0).astype(jnp.result_type(h, float))


def _hinge_expectations(mu, sigma, beta, label_smoothing):
    pos = sigma > 0  # σ = 0: point values (double `where` keeps autodiff finite)
    sig = jnp.where(pos, sigma, 1.0)
    c = 1.0 / beta
    z = (c - mu) / sig
    e_l = beta * ((c - mu) * normal_cdf(z) + sig * normal_pdf(z))
    below = (mu < c).astype(mu.dtype)
    return (jnp.where(pos, e_l, jax.nn.relu(1.0 - beta * mu)),
            jnp.where(pos, -beta * normal_cdf(z), -beta * below),
            jnp.where(pos, beta * normal_pdf(z) / sig, 0.0))


_register(Loss(name="hinge", value=_hinge_value, grad=_hinge_grad, expectations=_hinge_expectations,
               smoothed=False, lipschitz=_lipschitz_beta, curvature=_unbounded, trl_loss_type="hinge",
               source="SLiC, Zhao et al. 2023"))


# -------------------------------------------------------------------------------- ipo
def _ipo_value(h, beta, label_smoothing):
    return (h - 1.0 / (2.0 * beta)) ** 2


def _ipo_grad(h, beta, label_smoothing):
    return 2.0 * (h - 1.0 / (2.0 * beta))


def _ipo_expectations(mu, sigma, beta, label_smoothing):
    c = 1.0 / (2.0 * beta)
    return (mu - c) ** 2 + sigma**2, 2.0 * (mu - c), jnp.full_like(mu, 2.0)


def _ipo_curvature(beta, label_smoothing):
    return jnp.full_like(beta, 2.0)


_register(Loss(name="ipo", value=_ipo_value, grad=_ipo_grad, expectations=_ipo_expectations, smoothed=False,
               lipschitz=_unbounded, curvature=_ipo_curvature, trl_loss_type="ipo", source="IPO, Azar et al. 2023"))


# ======================================================================================================
# Objectives on log-probabilities (docs/theory.md §8): TRL's ``DPOConfig.loss_type`` list and the
# objectives of TRL's CPO / ORPO / KTO trainers, DPOP (Smaug), RPO and β-DPO, as functions of the four
# sequence log-probs log π(y_w|x), log π(y_l|x), log π_ref(y_w|x), log π_ref(y_l|x).
# ======================================================================================================
#: TRL commit the formulas were read from (trl/trainer/dpo_trainer.py ``_compute_loss``, dpo_config.py,
#: kto_trainer.py, experimental/cpo/cpo_trainer.py, experimental/orpo/orpo_trainer.py)
TRL_COMMIT = "f2cd57710ae345ea6428ae95363267fcf38a3dc8"
#: the last TRL commit before "Refactor DPO (#3906)" (label-smoothed sigmoid = cDPO, ``rpo_alpha``,
#: ``bco_pair``'s running mean), trl/trainer/dpo_trainer.py ``dpo_loss``
TRL_LEGACY_COMMIT = "a68fb896f008f58a3d37abf11ae665357b7c679a"
_TRL = f"huggingface/trl@{TRL_COMMIT[:12]}"
_TRL_LEGACY = f"huggingface/trl@{TRL_LEGACY_COMMIT[:12]}"

#: TRL's ``DPOConfig.f_divergence_type`` values
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_SCORES = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective on the four sequence log-probs (docs/theory.md §8).

    Attributes:
      name: the ``loss_type`` string (TRL's name where TRL has one).
      fn: ``(chosen, rejected, ref_chosen, ref_rejected, beta, hp, lengths) → per-pair loss`` with
        ``hp`` the full hyper-parameter dict and ``lengths`` ``(chosen_len, rejected_len)`` (``None`` =
        single-token answers); the pairs are on the last axis.
      needs_reference: whether it reads the reference policy's log-probs.
      batch_level: whether a pair's loss depends on other pairs of the batch (sorting, a batch mean,
        a KL reference point): its population limit needs the rule of docs/theory.md §8.3.
      margin_loss: the :class:`Loss` record it equals at its default hyper-parameters and single-token
        answers (a function of the margin ``h = (c − c_ref) − (r − r_ref)`` only), else ``None``.
      margin_only: depends on the four log-probs only through ``h`` (also true of ``exo_pair`` and
        ``discopop``, which have no :class:`Loss` record: a 1-D integral, docs/theory.md §8.2).
      hparams: the hyper-parameters it takes and their defaults (TRL's defaults where TRL has them).
      trainer: the TRL trainer (``"DPOTrainer"``, ``"CPOTrainer"``, ...) or ``"—"``.
      source: file and commit (or paper) the formula was read from.
    """

    name: str
    fn: Callable
    needs_reference: bool
    batch_level: bool
    margin_loss: str | None
    margin_only: bool
    hparams: dict
    trainer: str
    source: str


#: every objective by name
OBJECTIVES: dict[str, Objective] = {}


def _register_objective(obj: Objective) -> Objective:
    """Add ``obj`` to :data:`OBJECTIVES` (call in this module only). Raises ValueError on a duplicate name."""
    if obj.name in OBJECTIVES:
        raise ValueError(f"objective {obj.name!r} is already registered; pick a new name")
    if obj.margin_loss is not None and obj.margin_loss not in REGISTRY:
        raise ValueError(f"objective {obj.name!r}: margin_loss {obj.margin_loss!r} is not a Loss record")
    OBJECTIVES[obj.name] = obj
    return obj


def get_objective(name: str) -> Objective:
    """The :class:`Objective` record of ``name`` (a TRL ``loss_type`` or one of the other trainers' names).

    Raises:
      ValueError: unknown name (one line, the closest name suggested).
    """
    check_choice("loss_type", name, OBJECTIVES)
    return OBJECTIVES[name]


# ------------------------------------------------------------------------------------------- helpers
def _log_sigmoid(x):
    return jax.nn.log_sigmoid(x)


def _scores(chosen_logratios, rejected_logratios, hp):
    """TRL's f-divergence scores of the two log-ratios (dpo_trainer.py, ``f_divergence_type``)."""
    kind = hp["f_divergence_type"]
    if kind == "reverse_kl":
        return chosen_logratios, rejected_logratios
    if kind == "forward_kl":  # f'(t) = 1 − 1/t, constant dropped
        return -jnp.exp(-chosen_logratios), -jnp.exp(-rejected_logratios)
    if kind == "js_divergence":  # f'(t) = log(2t/(t + 1)), log 2 dropped
        return _log_sigmoid(chosen_logratios), _log_sigmoid(rejected_logratios)
    # alpha_divergence: f'(t) = (t^(α−1) − 1)/(α − 1), constant dropped; α → 1 is reverse_kl
    a = jnp.asarray(hp["f_alpha_divergence_coef"], dtype=jnp.result_type(chosen_logratios, float))
    near_one = jnp.abs(a - 1.0) < 1e-6
    am1 = jnp.where(near_one, 1.0, a - 1.0)  # double `where`: finite in the unused branch

    def one(lr):
        return jnp.where(near_one, lr, jnp.exp(jnp.minimum(am1 * lr, 80.0)) / am1)

    return one(chosen_logratios), one(rejected_logratios)


def _per_token(x, length):
    return x if length is None else x / length


def _nll(chosen, lengths):
    """TRL's NLL of the chosen completions: ``F.cross_entropy`` over all chosen tokens of the batch.

    Single-token answers (``lengths`` None): ``−log π(y_w|x)`` per pair (its batch mean is TRL's value).
    With lengths: the batch's token mean ``−Σ c / Σ len`` (over the last axis) broadcast to every pair.
    """
    if lengths is None:
        return -chosen
    lc = jnp.broadcast_to(lengths[0], chosen.shape)
    return jnp.broadcast_to(-jnp.sum(chosen, -1, keepdims=True) / jnp.sum(lc, -1, keepdims=True), chosen.shape)


def _smoothed_sigmoid(z, eps):
    """``−(1−ε) log σ(z) − ε log σ(−z)`` (TRL's label-smoothed sigmoid)."""
    return -(1.0 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)


def _log1mexp(x):
    """``log(1 − exp(x))`` for x < 0, branching at −log 2 as TRL's orpo_trainer.py ``log1mexp``.

    ``x`` is first capped at ``−eps`` of its dtype: a log-prob that rounds to 0 (``p = 1`` to working
    precision, common in float32 at the tails of the population cubature) would give ``log 0 = −inf``
    and a NaN gradient; the cap keeps the value finite (``log eps``) with a zero gradient there, and
    changes nothing where ``1 − p`` is representable.
    """
    x = jnp.asarray(x)
    x = jnp.minimum(x, -jnp.finfo(jnp.result_type(x, float)).eps)
    t = -0.6931471805599453
    xs_lo = jnp.where(x < t, x, t)  # double `where`: each branch sees only its own range
    xs_hi = jnp.where(x < t, t, x)
    return jnp.where(x < t, jnp.log1p(-jnp.exp(xs_lo)), jnp.log(-jnp.expm1(xs_hi)))


def _alphapo(logp, alpha):
    """AlphaPO reward ``(1 − p^(−α))/α`` of ``p = exp(logp)`` (cpo_trainer.py; α = 0: ``logp``)."""
    alpha = jnp.asarray(alpha, dtype=jnp.result_type(logp, float))
    zero = alpha == 0.0
    a = jnp.where(zero, 1.0, alpha)
    return jnp.where(zero, logp, (1.0 - jnp.exp(-a * logp)) / a)


def _ratios(c, r, cr, rr, hp, lengths):
    """``(chosen_logratios, rejected_logratios, chosen_scores, rejected_scores, delta_score)``."""
    lc, lr = c - cr, r - rr
    sc, sr = _scores(lc, lr, hp)
    return lc, lr, sc, sr, sc - sr


# ----------------------------------------------------------------------------- DPOTrainer (TRL HEAD)
def _obj_sigmoid(c, r, cr, rr, beta, hp, lengths):
    *_, delta = _ratios(c, r, cr, rr, hp, lengths)
    return -_log_sigmoid(beta * delta)


def _obj_hinge(c, r, cr, rr, beta, hp, lengths):
    *_, delta = _ratios(c, r, cr, rr, hp, lengths)
    return jax.nn.relu(1.0 - beta * delta)


def _obj_ipo(c, r, cr, rr, beta, hp, lengths):
    _, _, sc, sr, _ = _ratios(c, r, cr, rr, hp, lengths)
    lc_len, lr_len = (None, None) if lengths is None else lengths
    delta = _per_token(sc, lc_len) - _per_token(sr, lr_len)
    return (delta - 1.0 / (2.0 * beta)) ** 2


def _obj_exo_pair(c, r, cr, rr, beta, hp, lengths):
    *_, delta = _ratios(c, r, cr, rr, hp, lengths)
    eps = hp["label_smoothing"]
    z = beta * delta
    qw, ql = jax.nn.sigmoid(z), jax.nn.sigmoid(-z)
    return qw * (_log_sigmoid(z) - jnp.log1p(-eps)) + ql * (_log_sigmoid(-z) - jnp.log(eps))


def _obj_nca_pair(c, r, cr, rr, beta, hp, lengths):
    _, _, sc, sr, _ = _ratios(c, r, cr, rr, hp, lengths)
    rc, rj = beta * sc, beta * sr
    return -_log_sigmoid(rc) - 0.5 * _log_sigmoid(-rc) - 0.5 * _log_sigmoid(-rj)


def _obj_robust(c, r, cr, rr, beta, hp, lengths):
    *_, delta = _ratios(c, r, cr, rr, hp, lengths)
    eps = hp["label_smoothing"]
    clean = -(1.0 - eps) * _log_sigmoid(beta * delta)
    flipped = -eps * _log_sigmoid(-beta * delta)
    return (clean - flipped) / (1.0 - 2.0 * eps)


def _obj_bco_pair(c, r, cr, rr, beta, hp, lengths):
    _, _, sc, sr, _ = _ratios(c, r, cr, rr, hp, lengths)
    delta = jax.lax.stop_gradient(jnp.asarray(hp["bco_delta"], dtype=jnp.result_type(sc, float)))
    return -_log_sigmoid(beta * sc - delta) - _log_sigmoid(-(beta * sr - delta))


def _obj_sppo_hard(c, r, cr, rr, beta, hp, lengths):
    _, _, sc, sr, _ = _ratios(c, r, cr, rr, hp, lengths)
    return (sc - 0.5 / beta) ** 2 + (sr + 0.5 / beta) ** 2


def _obj_aot(c, r, cr, rr, beta, hp, lengths):
    delta = jnp.sort(c - r, axis=-1) - jnp.sort(cr - rr, axis=-1)
    return _smoothed_sigmoid(beta * delta, hp["label_smoothing"])


def _obj_aot_unpaired(c, r, cr, rr, beta, hp, lengths):
    delta = jnp.sort(c - cr, axis=-1) - jnp.sort(r - rr, axis=-1)
    return _smoothed_sigmoid(beta * delta, hp["label_smoothing"])


def _obj_apo_zero(c, r, cr, rr, beta, hp, lengths):
    return 1.0 - jax.nn.sigmoid(beta * (c - cr)) + jax.nn.sigmoid(beta * (r - rr))


def _obj_apo_down(c, r, cr, rr, beta, hp, lengths):
    lc, _, _, _, delta = _ratios(c, r, cr, rr, hp, lengths)
    return jax.nn.sigmoid(beta * lc) + 1.0 - jax.nn.sigmoid(beta * delta)


def _obj_discopop(c, r, cr, rr, beta, hp, lengths):
    *_, delta = _ratios(c, r, cr, rr, hp, lengths)
    logits = beta * delta
    mod = jax.nn.sigmoid(logits / hp["discopop_tau"])
    return -_log_sigmoid(logits) * (1.0 - mod) + jnp.exp(-logits) * mod


def _obj_sft(c, r, cr, rr, beta, hp, lengths):
    return _nll(c, lengths)


def _obj_sigmoid_norm(c, r, cr, rr, beta, hp, lengths):
    _, _, sc, sr, _ = _ratios(c, r, cr, rr, hp, lengths)
    lc_len, lr_len = (None, None) if lengths is None else lengths
    return -_log_sigmoid(beta * (_per_token(sc, lc_len) - _per_token(sr, lr_len)))


# ------------------------------------------------------------------------- legacy DPOTrainer names
def _obj_cdpo(c, r, cr, rr, beta, hp, lengths):
    *_, delta = _ratios(c, r, cr, rr, hp, lengths)
    return _smoothed_sigmoid(beta * delta, hp["label_smoothing"])


def _obj_rpo(c, r, cr, rr, beta, hp, lengths):
    return _obj_sigmoid(c, r, cr, rr, beta, hp, lengths) + hp["rpo_alpha"] * _nll(c, lengths)


# ------------------------------------------------------------------------------ CPO / SimPO / ORPO
def _obj_cpo(c, r, cr, rr, beta, hp, lengths):
    logits = _alphapo(c, hp["alpha"]) - _alphapo(r, hp["alpha"])
    return _smoothed_sigmoid(beta * logits, hp["label_smoothing"]) + hp["cpo_alpha"] * _nll(c, lengths)


def _obj_simpo(c, r, cr, rr, beta, hp, lengths):
    lc_len, lr_len = (None, None) if lengths is None else lengths
    ca, ra = _per_token(c, lc_len), _per_token(r, lr_len)  # average_log_prob=True
    logits = _alphapo(ca, hp["alpha"]) - _alphapo(ra, hp["alpha"]) - hp["simpo_gamma"] / beta
    return _smoothed_sigmoid(beta * logits, hp["label_smoothing"]) + hp["cpo_alpha"] * _nll(c, lengths)


def _obj_orpo(c, r, cr, rr, beta, hp, lengths):
    lc_len, lr_len = (None, None) if lengths is None else lengths
    ca, ra = _per_token(c, lc_len), _per_token(r, lr_len)  # average_log_prob=True
    log_odds = (ca - ra) - (_log1mexp(ca) - _log1mexp(ra))
    return _nll(c, lengths) - beta * _log_sigmoid(log_odds)


# -------------------------------------------------------------------------------------------- KTO
def _kto_reference_point(c, hp):
    """KTO's z_ref = max(KL estimate, 0), detached (kto_trainer.py ``_compute_loss``)."""
    dtype = jnp.result_type(c, float)
    if hp.get("kto_kl") is not None:
        z = jnp.asarray(hp["kto_kl"], dtype=dtype)
    else:
        z = jnp.mean(jnp.asarray(hp["kl_logps"], dtype) - jnp.asarray(hp["ref_kl_logps"], dtype), -1, keepdims=True)
    return jax.lax.stop_gradient(jnp.maximum(z, 0.0))


def _obj_kto(c, r, cr, rr, beta, hp, lengths):
    z = _kto_reference_point(c, hp)
    chosen = 1.0 - jax.nn.sigmoid(beta * ((c - cr) - z))
    rejected = 1.0 - jax.nn.sigmoid(beta * (z - (r - rr)))
    return 0.5 * (hp["desirable_weight"] * chosen + hp["undesirable_weight"] * rejected)


def _obj_apo_zero_unpaired(c, r, cr, rr, beta, hp, lengths):
    chosen = 1.0 - jax.nn.sigmoid(beta * (c - cr))
    rejected = jax.nn.sigmoid(beta * (r - rr))
    return 0.5 * (hp["desirable_weight"] * chosen + hp["undesirable_weight"] * rejected)


# ----------------------------------------------------------------------------------- DPOP and β-DPO
def _obj_dpop(c, r, cr, rr, beta, hp, lengths):
    h = (c - cr) - (r - rr)
    return -_log_sigmoid(beta * (h - hp["dpop_lambda"] * jax.nn.relu(cr - c)))


def beta_dpo_beta(beta, margin_mean, hp):
    """β-DPO's batch β: ``max(β (1 + a (M − M₀)), 10⁻³)``, detached (``M`` the batch mean of ``h``).

    ``hp`` holds ``beta_dpo_alpha`` (a) and ``beta_dpo_m0`` (M₀); the population layer passes ``M = E h``
    (docs/theory.md §8.3). Source: junkangwu/beta-DPO trainers.py ``preference_loss``.
    """
    beta_used = jnp.maximum(beta * (1.0 + hp["beta_dpo_alpha"] * (margin_mean - hp["beta_dpo_m0"])), 1e-3)
    return jax.lax.stop_gradient(beta_used)


def _obj_beta_dpo(c, r, cr, rr, beta, hp, lengths):
    h = (c - cr) - (r - rr)
    m = hp["beta_dpo_margin"]
    m = jnp.mean(h, -1, keepdims=True) if m is None else jnp.asarray(m, dtype=jnp.result_type(h, float))
    return -_log_sigmoid(beta_dpo_beta(beta, m, hp) * h)


_DPO_SRC = f"{_TRL} trl/trainer/dpo_trainer.py (DPOTrainer._compute_loss), trl/trainer/dpo_config.py"
_LS = {"label_smoothing": 0.0}
for _o in (
        # name, fn, needs_ref, batch_level, margin_loss, margin_only, hparams, trainer, source
        ("sigmoid", _obj_sigmoid, True, False, "sigmoid", True, _SCORES, "DPOTrainer", "DPO, Rafailov et al. 2023"),
        ("hinge", _obj_hinge, True, False, "hinge", True, _SCORES, "DPOTrainer", "SLiC, Zhao et al. 2023"),
        ("ipo", _obj_ipo, True, False, "ipo", True, _SCORES, "DPOTrainer", "IPO, Azar et al. 2023, Eq. 17"),
        ("exo_pair", _obj_exo_pair, True, False, None, True, {**_SCORES, **_LS}, "DPOTrainer",
         "EXO, Ji et al. 2024, Eq. 16"),
        ("nca_pair", _obj_nca_pair, True, False, None, False, _SCORES, "DPOTrainer", "NCA, Chen et al. 2024"),
        ("robust", _obj_robust, True, False, "robust", True, {**_SCORES, **_LS}, "DPOTrainer",
         "robust DPO, Chowdhury et al. 2024"),
        ("bco_pair", _obj_bco_pair, True, False, None, False, {**_SCORES, "bco_delta": 0.0}, "DPOTrainer",
         "BCO, Jung et al. 2024"),
        ("sppo_hard", _obj_sppo_hard, True, False, None, False, _SCORES, "DPOTrainer",
         "SPPO (hard labels), Wu et al. 2024"),
        ("aot", _obj_aot, True, True, None, False, _LS, "DPOTrainer", "AOT, Melnyk et al. 2024"),
        ("aot_unpaired", _obj_aot_unpaired, True, True, None, False, _LS, "DPOTrainer", "AOT, Melnyk et al. 2024"),
        ("apo_zero", _obj_apo_zero, True, False, None, False, {}, "DPOTrainer",
         "APO, D'Oosterlinck et al. 2024, Eq. 7"),
        ("apo_down", _obj_apo_down, True, False, None, False, _SCORES, "DPOTrainer",
         "APO, D'Oosterlinck et al. 2024, Eq. 8"),
        ("discopop", _obj_discopop, True, False, None, True, {**_SCORES, "discopop_tau": 0.05}, "DPOTrainer",
         "DiscoPOP, Chris Lu et al. 2024, Eq. 5"),
        ("sft", _obj_sft, False, False, None, False, {}, "DPOTrainer", "negative log-likelihood of the chosen"),
        ("sigmoid_norm", _obj_sigmoid_norm, True, False, "sigmoid", True, _SCORES, "DPOTrainer",
         "length-normalised DPO"),
        ("cdpo", _obj_cdpo, True, False, "cdpo", True, {**_SCORES, **_LS}, "DPOTrainer (legacy)",
         f"conservative DPO, Mitchell 2023; {_TRL_LEGACY} trl/trainer/dpo_trainer.py dpo_loss ('sigmoid' with "
         "label_smoothing)"),
        ("rpo", _obj_rpo, True, False, None, False, {**_SCORES, "rpo_alpha": 1.0}, "DPOTrainer (legacy)",
         f"RPO, Pang et al. 2024; {_TRL_LEGACY} trl/trainer/dpo_trainer.py get_batch_loss_metrics (rpo_alpha)"),
        ("cpo", _obj_cpo, False, False, None, False, {**_LS, "cpo_alpha": 1.0, "alpha": 0.0}, "CPOTrainer",
         f"CPO, Xu et al. 2024, Eq. 3; {_TRL} trl/experimental/cpo/cpo_trainer.py (cpo_loss, loss_type='sigmoid')"),
        ("simpo", _obj_simpo, False, False, None, False,
         {**_LS, "simpo_gamma": 0.5, "cpo_alpha": 0.0, "alpha": 0.0}, "CPOTrainer",
         f"SimPO, Meng et al. 2024; {_TRL} trl/experimental/cpo/cpo_trainer.py (cpo_loss, loss_type='simpo')"),
        ("orpo", _obj_orpo, False, False, None, False, {}, "ORPOTrainer",
         f"ORPO, Hong et al. 2024, Eqs. 4, 7; {_TRL} trl/experimental/orpo/orpo_trainer.py (odds_ratio_loss)"),
        ("kto", _obj_kto, True, True, None, False,
         {"desirable_weight": 1.0, "undesirable_weight": 1.0, "kto_kl": None, "kl_logps": None,
          "ref_kl_logps": None}, "KTOTrainer",
         f"KTO, Ethayarajh et al. 2024; {_TRL} trl/trainer/kto_trainer.py (_compute_loss, loss_type='kto')"),
        ("apo_zero_unpaired", _obj_apo_zero_unpaired, True, False, None, False,
         {"desirable_weight": 1.0, "undesirable_weight": 1.0}, "KTOTrainer",
         f"APO, D'Oosterlinck et al. 2024; {_TRL} trl/trainer/kto_trainer.py (loss_type='apo_zero_unpaired')"),
        ("dpop", _obj_dpop, True, False, None, False, {"dpop_lambda": 50.0}, "—",
         "DPOP (Smaug), Pal et al. 2024, arXiv:2402.13228, Eq. 3"),
        ("beta_dpo", _obj_beta_dpo, True, True, None, True,
         {"beta_dpo_alpha": 0.6, "beta_dpo_m0": 0.0, "beta_dpo_margin": None}, "—",
         "β-DPO, Wu et al. 2024, arXiv:2407.08639; junkangwu/beta-DPO@1629047374915 trainers.py preference_loss")):
    _name, _fn, _ref, _batch, _margin, _monly, _hp, _trainer, _src = _o
    if _trainer == "DPOTrainer":
        _src = f"{_src}; {_DPO_SRC}"
    _register_objective(Objective(name=_name, fn=_fn, needs_reference=_ref, batch_level=_batch, margin_loss=_margin,
                                  margin_only=_monly, hparams=dict(_hp), trainer=_trainer, source=_src))
del _o, _name, _fn, _ref, _batch, _margin, _monly, _hp, _trainer, _src

#: TRL's ``DPOConfig.loss_type`` values (all registered; the other objectives come from other trainers)
TRL_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
#: every objective name, in registration order
OBJECTIVE_NAMES: tuple[str, ...] = tuple(OBJECTIVES)


# --------------------------------------------------------------------------------- public entry point
def _as_names(loss_type) -> list[str]:
    if isinstance(loss_type, str):
        return [loss_type]
    if isinstance(loss_type, (list, tuple)) and loss_type and all(isinstance(n, str) for n in loss_type):
        return list(loss_type)
    raise ValueError(f"loss_type must be a name or a non-empty list of names, got {loss_type!r}; "
                     "pass e.g. loss_type='sigmoid' or ['sigmoid', 'bco_pair', 'sft']")


def _equals_default(value, default) -> bool:
    if isinstance(value, str) or isinstance(default, str) or default is None:
        return value == default
    return is_concrete(value) and np.ndim(value) == 0 and float(value) == float(default)


def _check_hparams(names, recs, hparams) -> None:
    """Every hyper-parameter is taken by one of the objectives in use (or is None / that default)."""
    taken = set().union(*(r.hparams for r in recs))
    for key, value in hparams.items():
        if key in taken:
            continue
        users = [n for n, o in OBJECTIVES.items() if key in o.hparams]
        if not users:
            every = sorted(set().union(*(o.hparams for o in OBJECTIVES.values())))
            close = difflib.get_close_matches(key, every, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown hyper-parameter {key!r}{hint} for loss_type {names}; the objectives take "
                             f"{every}")
        if value is None or not is_concrete(value) or all(_equals_default(value, OBJECTIVES[n].hparams[key])
                                                          for n in users):
            continue  # a default (or traced, checked before tracing) value is harmless
        raise ValueError(f"{key}={value!r} has no effect with loss_type {names}; it is used by {users} — drop it "
                         "or choose one of those")


def _check_values(name, hp) -> None:
    """Concrete-value checks of one objective's hyper-parameters (tracers are skipped)."""
    if "f_divergence_type" in hp:
        check_choice("f_divergence_type", hp["f_divergence_type"], F_DIVERGENCES)
    if "label_smoothing" in hp:
        eps = hp["label_smoothing"]
        if name == "exo_pair":
            check_in_range("label_smoothing", eps, 0.0, 1.0, hi_open=True)
            if is_concrete(eps) and np.any(np.asarray(eps) == 0.0):
                raise ValueError("label_smoothing must be > 0 with loss_type 'exo_pair' (TRL raises; the EXO paper "
                                 "recommends 1e-3); pass label_smoothing=1e-3")
        else:
            check_in_range("label_smoothing", eps, 0.0, 0.5, hi_open=True)
    for key in ("discopop_tau",):
        if key in hp:
            check_positive(key, hp[key])
    for key in ("rpo_alpha", "cpo_alpha", "desirable_weight", "undesirable_weight", "dpop_lambda", "simpo_gamma"):
        if key in hp:
            check_positive(key, hp[key], allow_zero=True)
    if name == "kto" and hp.get("kto_kl") is None and (hp.get("kl_logps") is None or hp.get("ref_kl_logps") is None):
        raise ValueError("loss_type 'kto' needs its KL reference point: pass kto_kl= (z_ref, e.g. the batch mean "
                         "of KL(π‖π_ref)) or kl_logps= and ref_kl_logps= (mismatched completions, as TRL's "
                         "KTOTrainer)")


def _lengths(lengths, shape):
    if lengths is None:
        return None
    if isinstance(lengths, tuple):
        if len(lengths) != 2:
            raise ValueError(f"lengths must be one array or a pair (chosen_lengths, rejected_lengths), got a tuple "
                             f"of {len(lengths)}; pass lengths=(chosen_lengths, rejected_lengths)")
        lc, lr = lengths
    else:
        lc = lr = lengths
    out = []
    for side, val in (("chosen", lc), ("rejected", lr)):
        if is_concrete(val):
            arr = np.asarray(val)
            if np.any(~np.isfinite(arr)) or np.any(arr < 1):
                raise ValueError(f"lengths ({side}) must be token counts >= 1, got {np.asarray(val).tolist()}; "
                                 "pass lengths >= 1 (None = single-token answers)")
        out.append(jnp.broadcast_to(jnp.asarray(val, dtype=jnp.result_type(float)), shape))
    return tuple(out)


def objective_loss(loss_type, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                   beta, loss_weights=None, lengths=None, **hparams):
    """Per-pair objective of TRL's ``loss_type`` (or a list combined with ``loss_weights``), docs/theory.md §8.

    TRL's scalar loss is the mean of the result over the pairs (``Σ_j w_j · mean_pairs(ℓ_j)``).

    Args:
      loss_type: a name in :data:`OBJECTIVE_NAMES` (TRL's ``DPOConfig.loss_type`` values, ``cdpo``, ``rpo``,
        ``cpo``, ``simpo``, ``orpo``, ``kto``, ``apo_zero_unpaired``, ``dpop``, ``beta_dpo``) or a list of names.
      chosen_logps, rejected_logps: policy sequence log-probs log π(y_w|x), log π(y_l|x) in nats, shape
        ``(..., N)`` (N pairs on the last axis; batch-level objectives use that axis as the batch).
      ref_chosen_logps, ref_rejected_logps: the reference policy's, same shape; ``None`` only for objectives
        with ``needs_reference=False`` (``sft``, ``cpo``, ``simpo``, ``orpo``).
      beta: β > 0 (ORPO: its λ, as TRL's ``ORPOConfig.beta``; IPO: τ).
      loss_weights: one weight per name (TRL: default 1.0 each); e.g. MPO =
        ``['sigmoid', 'bco_pair', 'sft']`` with ``[0.8, 0.2, 1.0]``.
      lengths: completion lengths in tokens for ``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo`` (per-token
        averages) and the token-mean NLL of ``sft`` / ``rpo`` / ``cpo`` / ``simpo`` / ``orpo``: one array
        broadcast to ``(..., N)`` or ``(chosen_lengths, rejected_lengths)``; default ``None`` = 1
        (single-token answers, the package's model).
      **hparams: the objectives' hyper-parameters (:attr:`Objective.hparams` lists them with their defaults):
        ``label_smoothing``, ``f_divergence_type`` (``reverse_kl``, ``forward_kl``, ``js_divergence``,
        ``alpha_divergence``), ``f_alpha_divergence_coef``, ``discopop_tau``, ``bco_delta``, ``rpo_alpha``,
        ``cpo_alpha``, ``simpo_gamma``, ``alpha`` (AlphaPO), ``desirable_weight``, ``undesirable_weight``,
        ``kto_kl`` / ``kl_logps`` + ``ref_kl_logps`` (KTO's reference point), ``dpop_lambda``,
        ``beta_dpo_alpha``, ``beta_dpo_m0``, ``beta_dpo_margin``.

    Returns:
      The per-pair loss, shape ``(..., N)`` (the broadcast shape of the inputs); JAX, differentiable
      (batch statistics — KTO's z_ref, β-DPO's β — are detached, as in the sources).

    Raises:
      ValueError: unknown name (closest suggested), ``loss_weights`` length mismatch, missing reference
        log-probs, β ≤ 0, a hyper-parameter out of range or without effect — one line naming the field and fix.
    """
    names = _as_names(loss_type)
    recs = [get_objective(n) for n in names]
    if loss_weights is None:
        weights = [1.0] * len(names)
    else:
        weights = list(np.atleast_1d(loss_weights)) if is_concrete(loss_weights) else list(loss_weights)
        if len(weights) != len(names):
            raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} loss types {names}; pass one "
                             "weight per loss_type (TRL's DPOConfig.loss_weights)")
    check_positive("beta", beta)
    need = [n for n, r in zip(names, recs) if r.needs_reference]
    if need and (ref_chosen_logps is None or ref_rejected_logps is None):
        missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
        raise ValueError(f"{missing} is None but loss_type {need} needs the reference policy's log-probs; pass "
                         "ref_chosen_logps and ref_rejected_logps, or use a reference-free objective (sft, cpo, "
                         "simpo, orpo)")
    _check_hparams(names, recs, hparams)
    arrays = [chosen_logps, rejected_logps]
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        arrays += [ref_chosen_logps, ref_rejected_logps]
    dtype = jnp.result_type(*arrays, float)
    arrays = jnp.broadcast_arrays(*[jnp.asarray(a, dtype=dtype) for a in arrays])
    if len(arrays) == 2:
        arrays += [jnp.zeros_like(arrays[0])] * 2  # unused by reference-free objectives
    c, r, cr, rr = arrays
    if c.ndim == 0:
        raise ValueError("chosen_logps must have the pairs on a last axis, got a scalar; pass shape (..., N)")
    lens = _lengths(lengths, c.shape)
    total = jnp.zeros_like(c)
    for name, rec, wt in zip(names, recs, weights):
        hp = {**rec.hparams, **{k: v for k, v in hparams.items() if k in rec.hparams}}
        _check_values(name, hp)
        total = total + wt * rec.fn(c, r, cr, rr, beta, hp, lens)
    return total


def objective_margin_loss(loss_type: str, *, lengths=None, **hparams) -> str | None:
    """The :class:`Loss` record ``loss_type`` reduces to under these hyper-parameters, else ``None``.

    The record's :attr:`Objective.margin_loss` holds at ``f_divergence_type='reverse_kl'`` (or
    ``alpha_divergence`` with coefficient 1) and single-token answers (``lengths`` None or all 1 for the
    per-token objectives); then the population layer uses the exact 1-D integrals of docs/theory.md §3.
    """
    rec = get_objective(loss_type)
    if rec.margin_loss is None:
        return None
    kind = hparams.get("f_divergence_type", "reverse_kl")
    if kind != "reverse_kl" and not (kind == "alpha_divergence"
                                     and abs(float(hparams.get("f_alpha_divergence_coef", 0.5)) - 1.0) < 1e-6):
        return None
    if lengths is not None and loss_type in ("ipo", "sigmoid_norm"):
        flat = np.concatenate([np.ravel(x) for x in (lengths if isinstance(lengths, tuple) else (lengths,))])
        if not np.all(flat == 1):
            return None
    return rec.margin_loss
