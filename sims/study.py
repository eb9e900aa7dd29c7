"""``dpo-sims study``: answers to the questions the paper leaves open (docs/theory.md §5).

Im & Li, "Understanding the Learning Dynamics of Alignment with Human
Feedback", ICML 2024 (arXiv:2403.18742); model and claims in docs/theory.md. As
``dpo-sims reproduce``, a study is a built-in sweep config plus an analysis: Q1, Q3
and Q5 run ``sims/configs/study_<name>.toml`` (its ``[study]`` table holds the
analysis settings, ``[study.quick]`` the overrides of ``--quick``) through
:func:`sims.sweep.run_sweep` into ``DIR/store/<NAME>[_<part>].zarr`` (the reduced
heads δ_t stored, ``record_head``) and analyse the stored dataset. Q2 (loss and
sampling weights computed per geometry) and Q4 (random rotations) have runs the
sweep's cartesian grid cannot express; they keep an embedded config
(:data:`CONFIG_TOML`) and call the population (N → ∞) and empirical layers
vmapped over their configurations. Every study prints its key numbers and writes
``DIR/NAME.md`` (a findings section), ``DIR/NAME.png`` and ``DIR/NAME.json``:

* ``Q1`` objectives — does priority persist under IPO, hinge, cDPO, robust DPO?
* ``Q2`` re-weighting — which per-behaviour loss or sampling weights equalise
  time-to-learn, and at what cost to the other behaviour?
* ``Q3`` generalisation — training vs held-out accuracy against Δ, N, d.
* ``Q4`` optimizer — does Adam remove the priority effect?
* ``Q5`` Gaussian equivalence — the gap between the moment-matched Gaussian
  prediction and the empirical dynamics for Laplace, Student-t and mixtures.

``dpo-sims study displacement`` (likelihood displacement in the answer-vocabulary model, its own
module :mod:`sims.displacement`, parts chosen with ``--part``) and ``dpo-sims study representation``
(a trainable representation ``x = A φ``, :mod:`sims.representation_study`, parts 1–4) are dispatched
from :func:`run`; they are not part of ``all``.

Time-to-learn (:func:`time_to_learn`, docs/findings.md): for behaviour ``k``
the progress measure is its mean reward margin on a fresh pair,
``M_k(t) = E[β h | k] = β δ_tᵀ m_k`` (nats; TRL ``rewards/margins`` restricted to
the behaviour, exact for the trained head); ``τ_k`` is the first step, linearly
interpolated between recorded steps, at which ``M_k`` has covered the fraction
``f = 1/2`` of the way from ``M_k(0) = 0`` to its final value (the mean over the
last 10% of the records). The priority ratio is ``τ_weak / τ_strong``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np

from .cli import UsageError

__all__ = [
    "STUDIES", "SWEEP_STUDIES", "CONFIG_TOML", "study_config", "time_to_learn", "behavior_margin", "converged",
    "equal_rate_weights", "reweightings", "ipo_time_to_learn", "run_study", "register",
]

STUDIES = ("Q1", "Q2", "Q3", "Q4", "Q5")
#: studies with a module of their own (not in "all"): name → module (``sims.displacement.run_displacement``)
EXTRA_STUDIES = {"displacement": "sims.displacement", "representation": "sims.representation_study"}

CONFIG_TOML = r'''
# Embedded study configs. Units: steps (optimizer steps), nats (losses, margins).
# Distinguishability Δ_k = ‖μ_k⁺ − μ_k⁻‖; behaviour 0 is the less distinguishable ("weak").

[Q2]
title = "Re-weighting: which weights equalise time-to-learn, and at what cost?"
d = 8
sigma = 1.0
beta = 1.0
loss = "sigmoid"
distinguishability = [1.0, 2.5]
angles_deg = [90.0, 75.0, 60.0]
weightings = ["uniform", "inv_delta", "inv_delta_sq", "inv_projection", "equal_rate", "sampling"]
projection_clip = 0.1             # 1/(m_kᵀm̄) uses max(m_kᵀm̄, clip · max_j m_jᵀm̄)
lr = 0.05
steps = 600
record_every = 2
n = 512
n_eval = 2048
seeds = 8
fraction = 0.5

[Q2.quick]
angles_deg = [90.0, 60.0]
steps = 240
lr = 0.125
seeds = 4

[Q4]
title = "Optimizer: does Adam remove the priority effect?"
d = 8
sigma = 1.0
beta = 1.0
loss = "sigmoid"
distinguishability_weak = 1.0
distinguishability_strong = [1.0, 1.5, 2.0, 2.5, 3.0]
rotations = 8                     # random orthogonal rotations besides the axis-aligned geometry
rotation_seed = 7
optimizers = ["sgd", "momentum", "adam"]
lr = { sgd = 0.05, momentum = 0.005, adam = 0.01 }
steps = 600
record_every = 2
n = 512
n_eval = 512
seeds = 4
fraction = 0.5
headline = 2.5

[Q4.quick]
distinguishability_strong = [1.0, 2.5]
rotations = 1
steps = 240
lr = { sgd = 0.125, momentum = 0.0125, adam = 0.025 }
seeds = 2

'''


# ============================================================================ config
def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


#: studies whose runs are built-in sweep configs ``sims/configs/study_<name>.toml`` (run by ``run_sweep``)
SWEEP_STUDIES = ("Q1", "Q3", "Q5")


def study_config(name: str, quick: bool = False) -> dict:
    """The settings of study ``name`` as one flat dict (``--quick`` overrides applied).

    Q1, Q3 and Q5 (:data:`SWEEP_STUDIES`) read the built-in sweep config
    ``sims/configs/study_<name>.toml``: its ``[base]`` fields, its ``[grid]`` axes, ``seeds`` and
    its ``[study]`` analysis settings flattened into one dict, plus the study's aliases
    (``distinguishability_weak``/``_strong`` for Q1; ``dims``/``d_max`` for Q3 and Q5), ``quick``
    and ``sweep`` (the sweep part of the TOML, the input of :func:`sims.sweep.parse_config`).
    Q2 and Q4 read :data:`CONFIG_TOML`.

    Raises:
      UsageError: unknown study name (lists the valid ones).
    """
    name = _canonical(name)
    if name not in SWEEP_STUDIES:
        data = tomllib.loads(CONFIG_TOML)[name]
        over = data.pop("quick", {})
        return _merge(data, over) if quick else data
    data, settings = _study_data(name, quick)
    flat = {k: v for k, v in data.get("base", {}).items()}
    flat.update(data.get("grid", {}))
    flat.update(settings)
    flat["seeds"] = data.get("seeds", 1)
    if name == "Q1":
        flat["distinguishability_weak"] = data["base"]["distinguishability"][0]
        flat["distinguishability_strong"] = data["grid"]["distinguishability_1"]
    else:
        flat["dims"] = list(data["grid"]["d"])
        flat["d_max"] = max(flat["dims"])
    flat["quick"] = bool(quick)
    flat["sweep"] = data
    return flat


def _canonical(name: str) -> str:
    up = str(name).upper()
    if up not in STUDIES:
        raise UsageError(f"unknown study {name!r}; choose one of {list(STUDIES) + list(EXTRA_STUDIES)} or 'all'")
    return up


# ============================================================================ sweep configs and stores
def _study_data(name: str, quick: bool = False) -> tuple[dict, dict]:
    """The built-in sweep config ``sims/configs/study_<name>.toml`` as ``(sweep data, [study] settings)``.

    ``quick`` applies ``[study.quick]``: its ``seeds``/``base``/``grid`` entries override the sweep
    part, its ``study`` table the settings. Raises UsageError for an unknown study.
    """
    from .sweep import read_builtin

    name = _canonical(name)
    data = tomllib.loads(read_builtin(f"study_{name.lower()}"))
    settings = data.pop("study", {})
    over = settings.pop("quick", {})
    if quick:
        settings = _merge(settings, over.get("study", {}))
        data = _merge(data, {k: v for k, v in over.items() if k != "study"})
    return data, settings


def _sweep_config(name: str, data: dict, tag: str = "", quick: bool = False, **base):
    """Parse ``data`` (a study's sweep part) with ``base`` overrides into a :class:`sims.sweep.SweepConfig`."""
    from .sweep import parse_config

    data = _merge(data, {"base": base}) if base else data
    if tag:
        data = _merge(data, {"name": f"{data.get('name', 'study')}_{tag}"})
    return parse_config(data, source=f"builtin:study_{name.lower()}{' (quick)' if quick else ''}"
                        + (f" [{tag}]" if tag else ""))


def _run_store(cfg, out: Path, tag: str, log):
    """``run_sweep`` ``cfg`` into ``out/store/<tag>.zarr`` (resumed when it holds this config) and load it.

    Returns the loaded ``xarray.Dataset``.
    """
    from .reproduce import _prepare_store_path
    from .store import open_results
    from .sweep import run_sweep

    store = out / "store" / f"{tag}.zarr"
    res = run_sweep(cfg, store, overwrite=_prepare_store_path(store, cfg), progress=False, log=lambda m: None)
    if res.interrupted:
        raise KeyboardInterrupt
    return open_results(store).load()


class _Traj:
    """Stored runs of one sweep as the trajectories' layout, the grid flattened to one axis ``G`` (C order).

    ``pop``: ``step (G, T)``, ``delta (G, T, d)``, ``metrics[name] (G, T[, K])``, ``diverged (G,)``;
    ``emp``: ``delta (G, S, T, d)``, ``train``/``eval[name] (G, S, T[, K])``, ``diverged (G, S)``
    (the layouts of ``jax.vmap`` of ``population_trajectory`` / of ``empirical_trajectory`` over seeds).
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _trajectories(ds, cfg, d: int | None = None):
    """``(pop, emp)`` (:class:`_Traj`) from a loaded study store; ``d`` slices the stored heads."""
    from .sweep import dim_name

    gdims = tuple(dim_name(a) for a in cfg.grid)
    g = int(np.prod([ds.sizes[k] for k in gdims], dtype=np.int64)) if gdims else 1
    flat = lambda v: np.asarray(v.values).reshape((g,) + v.shape[len(gdims):])
    cut = (lambda a: a[..., :d]) if d is not None else (lambda a: a)
    step = np.broadcast_to(ds["step"].values, (g, ds.sizes["step"]))
    pop = emp = None
    if "population_loss" in ds:
        pop = _Traj(step=step, delta=cut(flat(ds["population_delta"])) if "population_delta" in ds else None,
                    metrics={k[len("population_"):]: flat(ds[k]) for k in ds.data_vars
                             if k.startswith("population_") and k not in ("population_delta", "population_diverged")},
                    diverged=flat(ds["population_diverged"]))
    if "loss" in ds and "seed" in ds["loss"].dims:
        names = [k for k in ds.data_vars if "split" in ds[k].dims]
        emp = _Traj(step=step, delta=cut(flat(ds["delta"])) if "delta" in ds else None,
                    train={k: flat(ds[k].sel(split="train")) for k in names},
                    eval={k: flat(ds[k].sel(split="eval")) for k in names}, diverged=flat(ds["diverged"]))
    return pop, emp


def _grid_distributions(cfg):
    """The Gaussian of every grid configuration (C order), stacked: ``(G, K, d)`` (one ``d``)."""
    from .sweep import build_distribution, configuration_fields

    rows = [configuration_fields(cfg, i) for i in np.ndindex(*cfg.shape)] if cfg.grid else [configuration_fields(cfg, ())]
    return _stack([build_distribution(r, d=r["d"])[0] for r in rows])


# ============================================================================ measures
def time_to_learn(step, progress, *, fraction: float = 0.5, start=None, final=None, tail: float = 0.1):
    """First step at which a progress measure covers ``fraction`` of its way from start to final.

    ``p(t) = (v(t) − start) / (final − start)``; the result is the first recorded
    step ``t_i`` with ``p(t_i) ≥ fraction``, linearly interpolated between
    ``t_{i−1}`` and ``t_i`` (so it is a float number of steps).

    Args:
      step: ``(T,)`` recorded steps (increasing).
      progress: ``(..., T)`` values of the measure (e.g. a behaviour's mean reward
        margin, nats) at those steps.
      fraction: ``f`` in (0, 1].
      start: ``(...)`` start values; default ``progress[..., 0]``.
      final: ``(...)`` final values; default the mean over the last
        ``max(1, ceil(tail · T))`` records (robust to SGD noise).
      tail: fraction of the records averaged for the default ``final``.

    Returns:
      ``(...)`` float steps; NaN where ``final − start ≤ 0`` (nothing learned)
      or the fraction is never reached.

    Raises:
      ValueError: ``fraction`` outside (0, 1], ``tail`` outside (0, 1], or shapes
      that disagree.

    Source: docs/findings.md (definition of time-to-learn).
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}; pass e.g. 0.5")
    if not 0.0 < float(tail) <= 1.0:
        raise ValueError(f"tail must lie in (0, 1], got {tail}; pass e.g. 0.1")
    v = np.asarray(progress, dtype=float)
    step = np.asarray(step, dtype=float)
    if step.ndim != 1 or v.shape[-1:] != step.shape:
        raise ValueError(f"progress has shape {v.shape}; its last axis must match step {step.shape}")
    t = v.shape[-1]
    s0 = v[..., 0] if start is None else np.broadcast_to(np.asarray(start, float), v.shape[:-1])
    if final is None:
        final = v[..., -max(1, math.ceil(tail * t)):].mean(axis=-1)
    span = np.broadcast_to(np.asarray(final, float), v.shape[:-1]) - s0
    ok = np.isfinite(span) & (span > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = (v - s0[..., None]) / np.where(ok, span, 1.0)[..., None]
    hit = frac >= fraction
    idx = np.argmax(hit, axis=-1)
    prev = np.maximum(idx - 1, 0)
    f1 = np.take_along_axis(frac, idx[..., None], -1)[..., 0]
    f0 = np.take_along_axis(frac, prev[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where((idx > 0) & (f1 > f0), (fraction - f0) / (f1 - f0), 1.0)
    tau = step[prev] + np.clip(w, 0.0, 1.0) * (step[idx] - step[prev])
    return np.where(ok & hit.any(axis=-1), tau, np.nan)


def behavior_margin(delta, behavior_mean, beta):
    """Mean reward margin per behaviour on a fresh pair, ``E[β h | k] = β δᵀ m_k`` (nats).

    Args:
      delta: ``(..., T, d)`` reduced heads δ_t. behavior_mean: ``(..., K, d)`` m_k
        (the mean of ``z = s x`` given k; any family, clean labels). beta: β.

    Returns:
      ``(..., T, K)``. Source: docs/theory.md §1.2 (h = s δᵀx) and §2.2 (m_k).
    """
    return beta * np.einsum("...td,...kd->...tk", np.asarray(delta, float), np.asarray(behavior_mean, float))


def converged(progress, tail: float = 0.1, tol: float = 0.02):
    """True where the last ``tail`` of a trajectory moved by ≤ ``tol`` of its total change.

    ``progress (..., T)`` → bool ``(...)``: ``|v(T) − v(T − tail·T)| ≤ tol·|v(T) − v(0)|``.
    """
    v = np.asarray(progress, float)
    t = v.shape[-1]
    i = max(0, t - 1 - max(1, math.ceil(tail * t)))
    return np.abs(v[..., -1] - v[..., i]) <= tol * np.abs(v[..., -1] - v[..., 0])


def ipo_time_to_learn(curvature, lr, fraction: float = 0.5):
    """Closed-form IPO time-to-learn along an eigen-direction of ``E[z zᵀ]`` (steps).

    IPO's population loss ``E[(δᵀz − 1/(2β))²]`` is quadratic with Hessian ``2H``,
    ``H = E[z zᵀ]``; population GD on W, ``δ ← δ − 4η(Hδ − m̄/(2β))``, from δ = 0
    gives ``δ_tᵀv = (1 − (1 − 4ηh)^t) δ*ᵀv`` along an eigenvector ``v`` with
    eigenvalue ``h``. For behaviours whose ``m_k`` are eigenvectors (orthogonal
    ``m_k``, isotropic ``σ²I``: ``h_k = σ² + ω_k‖m_k‖²``) the mean margin
    ``β δ_tᵀm_k`` reaches ``fraction`` of its limit at
    ``τ_k = log(1 − f) / log(1 − 4η h_k)`` (flow limit ``−log(1 − f)/(4η h_k)``).
    Label noise rescales m̄ only, so it leaves τ unchanged.

    Args: curvature ``h`` (array, > 0), lr η (4ηh < 1), fraction f in (0, 1).
    Returns: τ with the shape of ``h`` (float steps).
    Raises: ValueError when ``4ηh ≥ 1`` (the monotone regime is left) or f ∉ (0, 1).
    Source: docs/theory.md §1.3 (IPO loss), §3.1 (population GD); docs/findings.md Q1.
    """
    h = np.asarray(curvature, float)
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    if np.any(4 * lr * h >= 1) or np.any(h <= 0):
        raise ValueError(f"need 0 < 4·lr·h < 1, got lr={lr} and h={h}; lower lr")
    return np.log(1.0 - fraction) / np.log(1.0 - 4.0 * lr * h)


def equal_rate_weights(behavior_mean, weight):
    """Loss weights λ with equal initial per-behaviour learning rates (C4), ``(K,)``.

    Under DPO gradient flow at δ = 0 with per-behaviour loss weights λ,
    ``dL_k/dτ = −(β²/2) m_kᵀ m̄_λ`` with ``m̄_λ = Σ_j ω_j λ_j m_j`` (docs/theory.md §5.2,
    the weights scale each behaviour's share of the gradient). λ solves
    ``G Ω λ = c·1`` (``G = M Mᵀ``, ``Ω = diag(ω)``) in the non-negative least-squares
    sense (``scipy.optimize.nnls``), normalised to ``Σ_k ω_k λ_k = 1``. When the
    exact solution has a negative entry (e.g. two behaviours with
    ``cos∠(b_1, b_2) > Δ_1/Δ_2``: the strong behaviour's gradient projects onto the
    weak one more than the weak one's own) no non-negative weighting equalises the
    rates, and the NNLS solution is the closest one.

    Args:
      behavior_mean: ``(K, d)`` m_k. weight: ``(K,)`` ω_k > 0.

    Returns:
      ``(lam (K,), exact: bool)`` — ``exact`` when the rates agree to 1e-6 relative.

    Raises:
      ValueError: shapes that disagree or non-positive weights.
    """
    from scipy.optimize import nnls

    m = np.asarray(behavior_mean, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if m.ndim != 2 or w.shape != (m.shape[0],):
        raise ValueError(f"behavior_mean {m.shape} must be (K, d) and weight {w.shape} must be (K,)")
    if np.any(w <= 0):
        raise ValueError(f"weight must be > 0, got {w}; pass positive behaviour weights")
    a = (m @ m.T) * w[None, :]
    lam, _ = nnls(a, np.ones(m.shape[0]))
    if not np.any(lam > 0):
        raise ValueError("no non-negative weighting gives positive learning rates; check behavior_mean")
    lam = lam / np.sum(w * lam)
    rates = m @ (m.T @ (w * lam))
    exact = bool(np.all(np.abs(rates - rates.mean()) <= 1e-6 * np.abs(rates).max()))
    return lam, exact


def reweightings(behavior_mean, weight, distinguishability, names, *, projection_clip: float = 0.1):
    """Per-behaviour loss weights and sampling weights of each Q2 re-weighting.

    Every loss weighting is normalised to ``Σ_k ω_k λ_k = 1`` (the overall step
    size is unchanged at δ = 0 along m̄ when all m_k are equal).

    * ``uniform``: λ = 1.
    * ``inv_delta``: λ_k ∝ 1/Δ_k. ``inv_delta_sq``: λ_k ∝ 1/Δ_k².
    * ``inv_projection``: λ_k ∝ 1/max(m_kᵀm̄, clip · max_j m_jᵀm̄) (m̄ unweighted).
    * ``equal_rate``: :func:`equal_rate_weights` (equal m_kᵀm̄_λ, C4).
    * ``sampling``: loss weights 1, behaviour sampling weights ω'_k ∝ ω_k λ_k of
      ``equal_rate`` (the same population objective; a different sample).

    Returns:
      dict name → ``(loss_weight (K,), sampling_weight (K,), exact_equal_rate: bool)``.

    Raises:
      ValueError: an unknown weighting name.
    """
    m = np.asarray(behavior_mean, np.float64)
    w = np.asarray(weight, np.float64)
    dist = np.asarray(distinguishability, np.float64)
    norm = lambda lam: lam / np.sum(w * lam)
    lam_eq, exact = equal_rate_weights(m, w)
    proj = m @ (w @ m)
    out = {}
    for name in names:
        if name == "uniform":
            out[name] = (np.ones_like(w), w, False)
        elif name == "inv_delta":
            out[name] = (norm(1.0 / dist), w, False)
        elif name == "inv_delta_sq":
            out[name] = (norm(1.0 / dist**2), w, False)
        elif name == "inv_projection":
            out[name] = (norm(1.0 / np.maximum(proj, projection_clip * proj.max())), w, False)
        elif name == "equal_rate":
            out[name] = (lam_eq, w, exact)
        elif name == "sampling":
            ws = w * lam_eq
            out[name] = (np.ones_like(w), ws / ws.sum(), exact)
        else:
            raise ValueError(f"unknown weighting {name!r}; choose from uniform, inv_delta, inv_delta_sq, "
                             "inv_projection, equal_rate, sampling")
    return out


# ============================================================================ helpers
def _stack(trees):
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _np(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    v = float(v)
    if not math.isfinite(v):
        return "never"
    return f"{v:.{digits}g}"


def _pm(mean, sd, digits: int = 3) -> str:
    if not math.isfinite(float(mean)):
        return "never"
    return f"{_fmt(mean, digits)} ± {_fmt(sd, 2)}"


def _mean_sd(a, axis):
    a = np.asarray(a, float)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis), np.nanstd(a, axis=axis)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _two_behaviours(weak, strong, *, d, sigma, angle_deg=90.0, rotation=None, weight=None):
    """Balanced two-behaviour Gaussian (``μ_k± = ±b_k/2``, ``Σ = σ²I``), optionally rotated by ``rotation (d, d)``."""
    import dynamics as dd

    dist = dd.GaussianPreference.from_angles([weak, strong], math.radians(angle_deg), d=d, sigma=sigma,
                                             weight=weight)
    if rotation is not None:
        q = np.asarray(rotation, np.float64)
        dist = dd.GaussianPreference.create(np.asarray(dist.mu_pos) @ q.T, np.asarray(dist.mu_neg) @ q.T,
                                            np.asarray(dist.cov_pos), np.asarray(dist.cov_neg),
                                            np.asarray(dist.p_pos), np.asarray(dist.weight))
    return dist


def _random_rotation(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))[None, :]


def _priority_runs(dists, cfg, *, loss, lr, label_smoothing=0.0, optimizer=None, label_noise=None, loss_weight=None,
                   seeds: int, key_seed: int = 0):
    """Population and empirical trajectories vmapped over stacked configurations (and seeds).

    ``dists``: stacked distribution (leading axis G); ``label_noise``/``loss_weight``:
    ``(G, K)`` or None. Returns ``(pop, emp)`` as NumPy pytrees: pop leaves
    ``(G, T, ...)``, emp leaves ``(G, S, T, ...)``.
    """
    import jax
    import jax.numpy as jnp

    import dynamics as dd

    g = jax.tree_util.tree_leaves(dists)[0].shape[0]
    k = dists.mu_pos.shape[-2]
    ln = jnp.zeros((g, k)) if label_noise is None else jnp.asarray(label_noise, jnp.float32)
    lw = jnp.ones((g, k)) if loss_weight is None else jnp.asarray(loss_weight, jnp.float32)
    common = dict(beta=cfg["beta"], lr=lr, steps=cfg["steps"], loss=loss, label_smoothing=label_smoothing, optimizer=optimizer,
                  record_every=cfg["record_every"])
    pop = jax.vmap(lambda dist, a, b: dd.population_trajectory(dist, label_noise=a, loss_weight=b, **common))(
        dists, ln, lw)
    keys = jax.random.split(jax.random.key(key_seed), seeds)
    emp_fn = lambda dist, a, b, key: dd.empirical_trajectory(dist, key, n=cfg["n"], n_eval=cfg["n_eval"],
                                                             label_noise=a, loss_weight=b, **common)
    emp = jax.vmap(jax.vmap(emp_fn, in_axes=(None, None, None, 0)), in_axes=(0, 0, 0, None))(dists, ln, lw, keys)
    return _np(pop), _np(emp)


def _margins(pop, emp, m, beta):
    """Per-behaviour mean reward margins: pop ``(G, T, K)``, emp ``(G, S, T, K)``."""
    pm = behavior_margin(pop.delta, m, beta)
    em = behavior_margin(emp.delta, m[:, None], beta)
    return pm, em


def _tau(step, margins, fraction):
    """τ per behaviour from margins ``(..., T, K)`` → ``(..., K)``."""
    return time_to_learn(step, np.moveaxis(margins, -1, -2), fraction=fraction)


# ============================================================================ Q1
def run_q1(cfg, out: Path, log) -> dict:
    """Q1: time-to-learn ratio (weak / strong) per loss, population and empirical.

    One sweep per loss (``builtin:study_q1`` with that loss's η = ``lr[loss] · lr_scale`` and,
    for cdpo/robust, its label smoothing) into ``out/store/Q1_<loss>.zarr``; τ from the stored heads.
    """
    import dynamics as dd

    weak, strongs, noises = cfg["distinguishability_weak"], cfg["distinguishability_strong"], cfg["label_noise"]
    grid = [(s, r) for r in noises for s in strongs]  # the sweep's grid (label_noise, distinguishability_1), C order
    dists = _grid_distributions(_sweep_config("Q1", cfg["sweep"], quick=cfg["quick"]))
    m = np.asarray(dists.behavior_mean, np.float64)
    mbar = np.einsum("gk,gkd->gd", np.asarray(dists.weight, np.float64), m)
    proj = np.einsum("gkd,gd->gk", m, mbar)
    gaps = np.array([float(dd.priority_gap(np.asarray(dists.preference_direction[i]))[1, 0]) for i in range(len(grid))])
    res = {"grid": [{"distinguishability": [weak, s], "label_noise": r} for s, r in grid], "losses": {},
           "priority_gap_strong_weak": gaps.tolist(), "rate_ratio_c4": (proj[:, 1] / proj[:, 0]).tolist()}
    # IPO closed form (orthogonal m_k, isotropic σ²I): h_k = σ² + ω_k‖m_k‖²
    curv = cfg["sigma"] ** 2 + np.asarray(dists.weight, np.float64) * np.sum(m**2, axis=-1)  # (G, K)
    if "ipo" in cfg["losses"]:
        tau_ipo = ipo_time_to_learn(curv, cfg["lr"]["ipo"] * cfg["lr_scale"], cfg["fraction"])
        res["ipo_closed_form_ratio"] = (tau_ipo[:, 0] / tau_ipo[:, 1]).tolist()
    res["curvature_ratio_flow"] = (curv[:, 1] / curv[:, 0]).tolist()
    curves = {}
    for loss in cfg["losses"]:
        label_smoothing = cfg["label_smoothing"] if dd.losses.uses_label_smoothing(loss) else 0.0
        lr = cfg["lr"][loss] * cfg["lr_scale"]
        t0 = time.time()
        scfg = _sweep_config("Q1", cfg["sweep"], loss, quick=cfg["quick"], loss=loss, lr=lr,
                             label_smoothing=label_smoothing)
        pop, emp = _trajectories(_run_store(scfg, out, f"Q1_{loss}", log), scfg)
        step = pop.step[0]
        pm, em = _margins(pop, emp, m, cfg["beta"])
        tp, te = _tau(step, pm, cfg["fraction"]), _tau(step, em, cfg["fraction"])  # (G, K), (G, S, K)
        rp = tp[:, 0] / tp[:, 1]
        re_mean, re_sd = _mean_sd(te[..., 0] / te[..., 1], axis=1)
        conv = converged(np.moveaxis(pm, -1, -2)).all(-1)
        res["losses"][loss] = {
            "lr": lr, "label_smoothing": label_smoothing, "tau_population": tp.tolist(), "ratio_population": rp.tolist(),
            "ratio_empirical_mean": re_mean.tolist(), "ratio_empirical_sd": re_sd.tolist(),
            "tau_empirical_mean": np.nanmean(te, axis=1).tolist(),
            "population_converged": conv.tolist(),
            "final_reward_accuracy_population": pop.metrics["behavior_reward_accuracy"][:, -1].tolist(),
            "final_reward_accuracy_heldout": np.nanmean(emp.eval["behavior_reward_accuracy"][:, :, -1], 1).tolist(),
            "diverged": int(np.sum(pop.diverged) + np.sum(emp.diverged)),
        }
        curves[loss] = (step, pm)
        log(f"  Q1 {loss}: {time.time() - t0:.1f} s")
    res["gap_sign"] = gap_sign_agreement(cfg)
    log(f"  Q1 random pairs: {res['gap_sign']['seconds']} s")
    # ---- print + markdown
    head = cfg["headline"]
    rows, lines = [], []
    for loss, r in res["losses"].items():
        for i, (s, rr) in enumerate(grid):
            rows.append([loss, f"{rr:g}", f"{s / weak:g}", _fmt(r["tau_population"][i][0]), _fmt(r["tau_population"][i][1]),
                         _fmt(r["ratio_population"][i]), _pm(r["ratio_empirical_mean"][i], r["ratio_empirical_sd"][i]),
                         "yes" if r["population_converged"][i] else "no"])
    header = ["loss", "flip rate", "Δ_s/Δ_w", "τ_weak pop", "τ_strong pop", "ratio pop", "ratio emp (mean ± sd)",
              "converged"]
    table = _table(header, rows)
    hl = [(loss, r) for loss, r in res["losses"].items()]
    idx_h = [i for i, (s, rr) in enumerate(grid) if s == head and rr == 0.0]
    res["headline"] = {}
    if idx_h:
        i = idx_h[0]
        res["headline"] = {loss: {"population": r["ratio_population"][i], "empirical": r["ratio_empirical_mean"][i],
                                  "empirical_sd": r["ratio_empirical_sd"][i]} for loss, r in hl}
    _q1_figure(cfg, grid, res, curves, out / "Q1.png")
    print(f"## Q1 — {cfg['title']}")
    print(f"# two orthogonal balanced behaviours, Δ_w = {weak}, d = {cfg['d']}, σ = {cfg['sigma']}, β = {cfg['beta']}, "
          f"GD, n = {cfg['n']}, {cfg['seeds']} seeds; τ = steps to half the final per-behaviour reward margin")
    print(table)
    ref = [[f"{s / weak:g}", f"{res['rate_ratio_c4'][i]:.3g}", f"{res['curvature_ratio_flow'][i]:.4g}",
            _fmt(res.get("ipo_closed_form_ratio", [np.nan] * len(grid))[i], 4),
            _fmt(res["losses"].get("ipo", {}).get("ratio_population", [np.nan] * len(grid))[i], 4)]
           for i, (s, rr) in enumerate(grid) if rr == noises[0]]
    ref_table = _table(["Δ_s/Δ_w", "C4 initial-rate ratio m_sᵀm̄ / m_wᵀm̄", "curvature ratio h_s/h_w",
                        "IPO closed form τ ratio", "IPO measured (pop)"], ref)
    print(ref_table)
    gs = res["gap_sign"]
    gap_line = (f"C4 check on {gs['pairs']} random pairs (Δ_k ∈ [0.5, 3], angle ∈ [30°, 150°], population sigmoid): "
                f"the behaviour with the positive priority gap has the smaller τ in {gs['agree']}/{gs['pairs']} pairs "
                f"({gs['never']} pairs where the other behaviour is never learned count as agreeing); "
                + ", ".join(f"|gap| {k}: {v[0]}/{v[1]}" for k, v in gs["by_gap"].items()) + ".")
    print("# " + gap_line)
    acc_line = ("final exact reward accuracy weak / strong (pop, flip rate 0), by Δ_s/Δ_w = "
                + ", ".join(f"{s / weak:g}" for s, rr in grid if rr == noises[0]) + ": " + "; ".join(
                    f"{loss} " + ", ".join(f"{100 * a[0]:.1f}/{100 * a[1]:.1f}" for (s, rr), a in
                                           zip(grid, r["final_reward_accuracy_population"]) if rr == noises[0])
                    for loss, r in res["losses"].items()))
    print("# " + acc_line)
    if res["headline"]:
        print(f"# headline (Δ_s/Δ_w = {head / weak:g}, clean labels): " + "; ".join(
            f"{loss} {v['population']:.3g} (pop) / {v['empirical']:.3g} (emp)" for loss, v in res["headline"].items()))
    lines += [f"## Q1 — {cfg['title']}", "",
              f"Two orthogonal, balanced, equally weighted behaviours share one head: Δ_weak = {weak}, Δ_strong swept, "
              f"σ = {cfg['sigma']}, d = {cfg['d']}, β = {cfg['beta']}, full-batch GD (per-loss η: "
              + ", ".join(f"{k} {v['lr']:g}" for k, v in res["losses"].items())
              + f"), {cfg['steps']} steps, n = {cfg['n']} pairs, {cfg['seeds']} seeds; cDPO and robust use ε = {cfg['label_smoothing']}. "
              "τ_k: first step at which behaviour k's mean reward margin β δᵀm_k reaches half its final value. "
              "Ratio = τ_weak / τ_strong (> 1: the more distinguishable behaviour is learned first).", "",
              table, "",
              "References: C4's initial-rate ratio, the curvature ratio h_s/h_w with h_k = σ² + ω_k‖m_k‖² (the flow-limit "
              "τ ratio of IPO), and IPO's closed-form discrete-GD τ ratio log(1 − 4ηh_w)⁻¹ / log(1 − 4ηh_s)⁻¹:", "",
              ref_table, "", gap_line, "", "Final " + acc_line[len("final "):] + ".", "", "![Q1](Q1.png)", ""]
    res["markdown"] = "\n".join(lines)
    return res


def gap_sign_agreement(cfg) -> dict:
    """C4 check: does the sign of ``gap_01`` predict which behaviour has the smaller τ?

    Random pairs ``Δ_k ~ U[0.5, 3]``, angle ``~ U[30°, 150°]`` (seeded), isotropic σ, population
    sigmoid GD with Q1's η and steps; τ as in :func:`time_to_learn` with NaN (never learned) read
    as +∞. Returns counts overall and by |gap| bin.
    """
    import jax

    import dynamics as dd

    t0 = time.time()
    rng = np.random.default_rng(cfg["random_pairs_seed"])
    pairs = [(*rng.uniform(0.5, 3.0, 2), rng.uniform(30.0, 150.0)) for _ in range(cfg["random_pairs"])]
    dists = _stack([_two_behaviours(a, b, d=cfg["random_pairs_d"], sigma=cfg["sigma"], angle_deg=g) for a, b, g in pairs])
    lr = cfg["lr"]["sigmoid"] * cfg["lr_scale"]
    tr = _np(jax.vmap(lambda dist: dd.population_trajectory(dist, beta=cfg["beta"], lr=lr, steps=cfg["steps"],
                                                            record_every=cfg["record_every"]))(dists))
    margins = behavior_margin(tr.delta, np.asarray(dists.behavior_mean), cfg["beta"])
    tau = np.nan_to_num(_tau(tr.step[0], margins, cfg["fraction"]), nan=np.inf)
    gap = np.array([float(dd.priority_gap(np.asarray(dists.preference_direction[i]))[0, 1]) for i in range(len(pairs))])
    agree = np.sign(gap) == np.sign(tau[:, 1] - tau[:, 0])
    bins = [(0.0, 0.05), (0.05, 0.2), (0.2, np.inf)]
    by = {}
    for lo, hi in bins:
        sel = (np.abs(gap) >= lo) & (np.abs(gap) < hi)
        by[f"[{lo:g}, {hi:g})"] = (int(agree[sel].sum()), int(sel.sum()))
    return {"pairs": len(pairs), "agree": int(agree.sum()), "never": int(np.isinf(tau).any(-1).sum()),
            "by_gap": by, "seconds": round(time.time() - t0, 1)}


def _q1_figure(cfg, grid, res, curves, path):
    plt = _plt()
    noises = cfg["label_noise"]
    weak = cfg["distinguishability_weak"]
    fig, axes = plt.subplots(1, len(noises) + 1, figsize=(4.0 * (len(noises) + 1), 3.3))
    colors = dict(zip(cfg["losses"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, rr in zip(axes, noises):
        idx = [i for i, (s, r) in enumerate(grid) if r == rr]
        x = np.array([grid[i][0] / weak for i in idx])
        for loss, r in res["losses"].items():
            ax.plot(x, np.array(r["ratio_population"])[idx], "-", color=colors[loss], label=f"{loss}")
            ax.errorbar(x, np.array(r["ratio_empirical_mean"])[idx], np.array(r["ratio_empirical_sd"])[idx],
                        fmt="o", ms=3, color=colors[loss], capsize=2)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("Δ_strong / Δ_weak")
        ax.set_ylabel("τ_weak / τ_strong")
        ax.set_title(f"flip rate {rr:g} (line pop, dots emp)", fontsize=9)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    step, pm = curves.get("sigmoid", next(iter(curves.values())))
    i = min(range(len(grid)), key=lambda j: (grid[j][1] != 0.0, abs(grid[j][0] - cfg["headline"])))
    for k, name in enumerate(["weak", "strong"]):
        v = pm[i, :, k]
        ax.plot(step, v / v[-max(1, len(v) // 10):].mean(), label=f"{name} (Δ={[weak, grid[i][0]][k]:g})")
    ax.axhline(cfg["fraction"], color="grey", lw=0.5, ls="--")
    ax.set_xlim(0, step[-1] / 3)
    ax.set_xlabel("step")
    ax.set_ylabel("margin / final margin")
    ax.set_title("sigmoid, population: definition of τ", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ Q2
def run_q2(cfg, out: Path, log) -> dict:
    """Q2: re-weightings of the weak behaviour — τ ratio, and the cost to the strong behaviour."""
    import jax
    import jax.numpy as jnp

    import dynamics as dd

    weak, strong = cfg["distinguishability"]
    names = cfg["weightings"]
    grid, dists, lws, exact, lam_rows, base = [], [], [], [], [], []
    for angle in cfg["angles_deg"]:
        dist = _two_behaviours(weak, strong, d=cfg["d"], sigma=cfg["sigma"], angle_deg=angle)
        ws = reweightings(np.asarray(dist.behavior_mean), np.asarray(dist.weight), np.asarray(dist.distinguishability),
                          names, projection_clip=cfg["projection_clip"])
        for name in names:
            lw, sw, ex = ws[name]
            grid.append((angle, name))
            dists.append(dist.replace(weight=jnp.asarray(sw, dist.weight.dtype)))
            lws.append(lw)
            exact.append(ex)
            lam_rows.append((lw * sw / np.asarray(dist.weight)).tolist())  # effective λ (loss × sampling)
            base.append(dist)
    dists_s, base_s = _stack(dists), _stack(base)
    m = np.asarray(base_s.behavior_mean, np.float64)
    t0 = time.time()
    pop, emp = _priority_runs(dists_s, cfg, loss=cfg["loss"], lr=cfg["lr"], loss_weight=np.array(lws, np.float32),
                              seeds=cfg["seeds"])
    log(f"  Q2 runs: {time.time() - t0:.1f} s")
    step = pop.step[0]
    pm, em = _margins(pop, emp, m, cfg["beta"])
    tp, te = _tau(step, pm, cfg["fraction"]), _tau(step, em, cfg["fraction"])
    # exact accuracy of the final heads on the clean, equally weighted distribution
    acc_fn = lambda dist, delta: dd.gaussian_accuracy(dist, delta)[1]
    pop_acc = np.asarray(jax.vmap(acc_fn)(base_s, jnp.asarray(pop.delta[:, -1])))  # (G, K)
    emp_acc = np.asarray(jax.vmap(jax.vmap(acc_fn, (None, 0)))(base_s, jnp.asarray(emp.delta[:, :, -1])))  # (G,S,K)
    te_mean, _ = _mean_sd(te, axis=1)
    re_mean, re_sd = _mean_sd(te[..., 0] / te[..., 1], axis=1)
    ea_mean, ea_sd = _mean_sd(emp_acc, axis=1)
    rows, res_rows = [], []
    for i, (angle, name) in enumerate(grid):
        u = grid.index((angle, "uniform")) if (angle, "uniform") in grid else i
        r = {
            "angle_deg": angle, "weighting": name, "loss_weight": lws[i].tolist(), "effective_lambda": lam_rows[i],
            "equal_rate_exact": exact[i], "tau_population": tp[i].tolist(), "ratio_population": float(tp[i, 0] / tp[i, 1]),
            "tau_empirical_mean": te_mean[i].tolist(), "ratio_empirical_mean": float(re_mean[i]),
            "ratio_empirical_sd": float(re_sd[i]), "accuracy_population": pop_acc[i].tolist(),
            "accuracy_heldout_exact_mean": ea_mean[i].tolist(), "accuracy_heldout_exact_sd": ea_sd[i].tolist(),
            "strong_tau_cost_population": float(tp[i, 1] / tp[u, 1]),
            "strong_accuracy_cost_population": float(pop_acc[u, 1] - pop_acc[i, 1]),
            "weak_accuracy_gain_population": float(pop_acc[i, 0] - pop_acc[u, 0]),
            "strong_accuracy_cost_empirical": float(ea_mean[u, 1] - ea_mean[i, 1]),
            "weak_accuracy_gain_empirical": float(ea_mean[i, 0] - ea_mean[u, 0]),
        }
        res_rows.append(r)
        rows.append([f"{angle:g}°", name, " / ".join(f"{v:.2f}" for v in r["effective_lambda"]),
                     _fmt(r["ratio_population"]), _pm(r["ratio_empirical_mean"], r["ratio_empirical_sd"]),
                     f"{r['strong_tau_cost_population']:.2f}×",
                     f"{pop_acc[i, 0]:.3f} / {pop_acc[i, 1]:.3f}",
                     f"{ea_mean[i, 0]:.3f} / {ea_mean[i, 1]:.3f}",
                     f"{100 * r['weak_accuracy_gain_population']:+.1f} / {-100 * r['strong_accuracy_cost_population']:+.1f}"])
    # population identity: sampling re-weighting == equal_rate loss weights (same objective)
    ident = []
    for angle in cfg["angles_deg"]:
        if (angle, "sampling") in grid and (angle, "equal_rate") in grid:
            a, b = grid.index((angle, "sampling")), grid.index((angle, "equal_rate"))
            ident.append(float(np.max(np.abs(pop.delta[a] - pop.delta[b]))))
    header = ["angle", "weighting", "λ_weak / λ_strong", "τ ratio pop", "τ ratio emp", "τ_strong vs uniform (pop)",
              "acc weak / strong (pop)", "acc weak / strong (emp, held-out)", "Δacc weak / strong vs uniform (pop, points)"]
    table = _table(header, rows)
    res = {"rows": res_rows, "sampling_equals_equal_rate_population_max_abs_delta": ident}
    _q2_figure(cfg, grid, res_rows, out / "Q2.png")
    print(f"## Q2 — {cfg['title']}")
    print(f"# Δ = {weak} (weak) and {strong} (strong), angle between preference directions swept, {cfg['loss']}, "
          f"GD η = {cfg['lr']}, n = {cfg['n']}, {cfg['seeds']} seeds; accuracy = exact reward accuracy of the final head")
    print(table)
    if ident:
        print(f"# population: sampling re-weighting vs equal_rate loss weights, max |δ difference| = {max(ident):.2g}")
    res["markdown"] = "\n".join([
        f"## Q2 — {cfg['title']}", "",
        f"Two balanced, equally weighted behaviours, Δ_weak = {weak}, Δ_strong = {strong}, σ = {cfg['sigma']}, "
        f"d = {cfg['d']}, angle between b_weak and b_strong swept; {cfg['loss']} loss, β = {cfg['beta']}, full-batch GD "
        f"η = {cfg['lr']}, {cfg['steps']} steps, n = {cfg['n']}, {cfg['seeds']} seeds. Loss weights normalised to "
        "Σ_k ω_k λ_k = 1; `sampling` keeps λ = 1 and samples behaviours with ω'_k ∝ ω_k λ_k(equal_rate). "
        "λ column: effective per-behaviour weight (loss weight × sampling ratio). Accuracies: exact reward accuracy "
        "of the final head on the clean, equally weighted distribution (population head; empirical heads, mean over seeds).",
        "", table, "",
        (f"Population check: `sampling` and `equal_rate` give the same population trajectory "
         f"(max |δ difference| = {max(ident):.2g}); they differ only through the finite sample." if ident else ""),
        "", "![Q2](Q2.png)", ""])
    return res


def _q2_figure(cfg, grid, rows, path):
    plt = _plt()
    angles, names = cfg["angles_deg"], cfg["weightings"]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    width = 0.8 / len(angles)
    x = np.arange(len(names))
    for j, angle in enumerate(angles):
        rs = [next(r for r in rows if r["angle_deg"] == angle and r["weighting"] == n) for n in names]
        axes[0].bar(x + j * width, [r["ratio_population"] for r in rs], width, label=f"{angle:g}°")
        axes[0].errorbar(x + j * width, [r["ratio_empirical_mean"] for r in rs], [r["ratio_empirical_sd"] for r in rs],
                         fmt="k.", ms=3, capsize=2)
        line, = axes[1].plot([r["accuracy_population"][0] for r in rs], [r["accuracy_population"][1] for r in rs], "-",
                             lw=0.8, label=f"{angle:g}°")
        for r, mk in zip(rs, "os^Dvx*"):
            axes[1].plot(r["accuracy_population"][0], r["accuracy_population"][1], mk, color=line.get_color(), ms=5,
                         mfc="none", label=r["weighting"] if j == 0 else None)
    axes[0].axhline(1.0, color="grey", lw=0.5)
    axes[0].set_xticks(x + width * (len(angles) - 1) / 2, names, rotation=30, fontsize=7)
    axes[0].set_ylabel("τ_weak / τ_strong (bars pop, dots emp)")
    axes[0].legend(fontsize=7, title="angle", title_fontsize=7)
    axes[1].set_xlabel("final accuracy, weak behaviour (pop)")
    axes[1].set_ylabel("final accuracy, strong behaviour (pop)")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ Q3
def run_q3(cfg, out: Path, log) -> dict:
    """Q3: training vs held-out accuracy against Δ, N, d (empirical), population as reference.

    Runs ``builtin:study_q3`` (grid Δ × d × N, heads stored) into ``out/store/Q3.zarr``; the held-out
    accuracy of each stored head is exact (``dd.gaussian_accuracy``).
    """
    import jax
    import jax.numpy as jnp

    import dynamics as dd

    scfg = _sweep_config("Q3", cfg["sweep"], quick=cfg["quick"])
    t0 = time.time()
    ds = _run_store(scfg, out, "Q3", log)
    log(f"  Q3 runs: {time.time() - t0:.1f} s")
    acc_fn = jax.jit(jax.vmap(lambda dist, delta: dd.gaussian_accuracy(dist, delta)[0], (None, 0)))
    from scipy.stats import norm

    res_rows = []
    for n in cfg["n"]:
        for dl in cfg["distinguishability"]:
            for d in cfg["dims"]:
                cell = ds.sel(n=n, distinguishability=dl, d=d)
                dist = dd.GaussianPreference.single(dl, d=d, sigma=cfg["sigma"])
                heads = np.asarray(cell["delta"].values[..., :d])  # (S, T, d)
                exact = np.asarray(acc_fn(dist, jnp.asarray(heads.reshape(-1, d)))).reshape(heads.shape[:2])
                train = cell["reward_accuracy"].sel(split="train").values[:, -1]
                mc = cell["reward_accuracy"].sel(split="eval").values[:, -1]
                held, best = exact[:, -1], exact.max(axis=-1)
                bayes = float(norm.cdf(dl / (2 * cfg["sigma"])))
                res_rows.append({
                    "distinguishability": dl, "d": d, "n": n, "d_over_n": d / n,
                    "train_accuracy": float(train.mean()), "heldout_accuracy": float(held.mean()),
                    "heldout_accuracy_mc": float(mc.mean()),
                    "population_accuracy": float(cell["population_reward_accuracy"].values[-1]), "bayes_accuracy": bayes,
                    "gap": float((train - held).mean()), "gap_sd": float((train - held).std()),
                    "heldout_deficit": float(bayes - held.mean()),
                    "early_stopping_gain": float((best - held).mean())})
    # pivot tables: gap and held-out deficit, rows (d, n), columns Δ
    deltas = cfg["distinguishability"]
    piv = lambda key, scale=100.0: [[f"{d}", f"{n}", f"{d / n:.3g}"] + [
        f"{scale * next(r[key] for r in res_rows if r['d'] == d and r['n'] == n and r['distinguishability'] == dl):.1f}"
        for dl in deltas] for d in cfg["dims"] for n in cfg["n"]]
    head = ["d", "N", "d/N"] + [f"Δ={dl:g}" for dl in deltas]
    t_gap = _table(head, piv("gap"))
    t_def = _table(head, piv("heldout_deficit"))
    t_tr = _table(head, piv("train_accuracy"))
    ref = "Population (N → ∞) accuracy = Bayes accuracy Φ(Δ/2σ): " + ", ".join(
        f"Δ={dl:g}: {100 * norm.cdf(dl / (2 * cfg['sigma'])):.1f}%" for dl in deltas)
    # a single-number summary: least-squares slope of log gap on log d/N, per Δ
    slopes = {}
    for dl in deltas:
        rr = [r for r in res_rows if r["distinguishability"] == dl and r["gap"] > 0]
        if len(rr) >= 3:
            slopes[dl] = float(np.polyfit(np.log([r["d_over_n"] for r in rr]), np.log([r["gap"] for r in rr]), 1)[0])
    res = {"rows": res_rows, "log_gap_vs_log_d_over_n_slope": slopes}
    _q3_figure(cfg, res_rows, out / "Q3.png")
    print(f"## Q3 — {cfg['title']}")
    print(f"# one balanced behaviour, σ = {cfg['sigma']}, {cfg['loss']} β = {cfg['beta']}, full-batch GD η = {cfg['lr']}, "
          f"{cfg['steps']} steps, {cfg['seeds']} seeds; held-out accuracy exact for the trained head")
    print("# generalisation gap = training − held-out reward accuracy (points)")
    print(t_gap)
    print("# held-out deficit = population (Bayes) − held-out accuracy (points)")
    print(t_def)
    print("# training accuracy (%)")
    print(t_tr)
    print("# " + ref)
    print("# slope of log(gap) vs log(d/N): " + ", ".join(f"Δ={k:g}: {v:.2f}" for k, v in slopes.items()))
    res["markdown"] = "\n".join([
        f"## Q3 — {cfg['title']}", "",
        f"One balanced behaviour (μ± = ±Δ/2 e₁, Σ = σ² I_d, σ = {cfg['sigma']}), {cfg['loss']} loss, β = {cfg['beta']}, "
        f"full-batch GD η = {cfg['lr']}, {cfg['steps']} steps, {cfg['seeds']} seeds per cell. Training accuracy on the N "
        "training pairs; held-out accuracy exact for the trained head (Σ_c π_c Φ(δᵀm_c/√(δᵀS_cδ)), no sampling noise). "
        f"{ref}.", "",
        "Generalisation gap, training − held-out accuracy (percentage points, mean over seeds):", "", t_gap, "",
        "Held-out deficit, population − held-out accuracy (points):", "", t_def, "",
        "Training accuracy (%):", "", t_tr, "",
        "Least-squares slope of log(gap) against log(d/N): " + ", ".join(f"Δ={k:g}: {v:.2f}" for k, v in slopes.items()) + ".",
        "", "![Q3](Q3.png)", ""])
    return res


def _q3_figure(cfg, rows, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4))
    for dl in cfg["distinguishability"]:
        rr = sorted((r for r in rows if r["distinguishability"] == dl), key=lambda r: r["d_over_n"])
        x = [r["d_over_n"] for r in rr]
        axes[0].plot(x, [100 * r["gap"] for r in rr], "o", ms=3, label=f"Δ={dl:g}")
        axes[1].plot(x, [100 * r["heldout_deficit"] for r in rr], "o", ms=3, label=f"Δ={dl:g}")
    for ax, lab in zip(axes, ["train − held-out accuracy (points)", "population − held-out accuracy (points)"]):
        ax.set_xscale("log")
        ax.set_xlabel("d / N")
        ax.set_ylabel(lab)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ Q4
def run_q4(cfg, out: Path, log) -> dict:
    """Q4: τ ratio for SGD vs momentum vs Adam, axis-aligned and rotated geometries."""
    weak = cfg["distinguishability_weak"]
    rng = np.random.default_rng(cfg["rotation_seed"])
    rots = [None] + [_random_rotation(rng, cfg["d"]) for _ in range(cfg["rotations"])]
    grid = [(s, g) for g in range(len(rots)) for s in cfg["distinguishability_strong"]]
    dists = _stack([_two_behaviours(weak, s, d=cfg["d"], sigma=cfg["sigma"], rotation=rots[g]) for s, g in grid])
    m = np.asarray(dists.behavior_mean, np.float64)
    res = {"grid": [{"distinguishability": [weak, s], "geometry": "axis-aligned" if g == 0 else f"rotation {g}"}
                    for s, g in grid], "optimizers": {}}
    for opt in cfg["optimizers"]:
        t0 = time.time()
        pop, emp = _priority_runs(dists, cfg, loss=cfg["loss"], lr=cfg["lr"][opt], optimizer=opt, seeds=cfg["seeds"])
        step = pop.step[0]
        pm, em = _margins(pop, emp, m, cfg["beta"])
        tp, te = _tau(step, pm, cfg["fraction"]), _tau(step, em, cfg["fraction"])
        res["optimizers"][opt] = {
            "lr": cfg["lr"][opt], "tau_population": tp.tolist(), "ratio_population": (tp[:, 0] / tp[:, 1]).tolist(),
            "ratio_empirical": (te[..., 0] / te[..., 1]).tolist(),
            "population_converged": converged(np.moveaxis(pm, -1, -2)).all(-1).tolist(),
            "final_reward_accuracy_population": pop.metrics["behavior_reward_accuracy"][:, -1].tolist(),
            "diverged": int(np.sum(pop.diverged) + np.sum(emp.diverged)),
        }
        log(f"  Q4 {opt}: {time.time() - t0:.1f} s")
    rows = []
    summary = {}
    for opt, r in res["optimizers"].items():
        rp = np.array(r["ratio_population"])
        re = np.array(r["ratio_empirical"])  # (G, S)
        for s in cfg["distinguishability_strong"]:
            ia = [i for i, (ss, g) in enumerate(grid) if ss == s and g == 0]
            ir = [i for i, (ss, g) in enumerate(grid) if ss == s and g > 0]
            a_pop, a_emp = rp[ia].mean(), _mean_sd(re[ia].ravel(), 0)
            r_pop = rp[ir].mean() if ir else np.nan
            r_emp = _mean_sd(re[ir].ravel(), 0) if ir else (np.nan, np.nan)
            summary[(opt, s)] = (a_pop, a_emp[0], r_pop, r_emp[0], rp[ir].min() if ir else np.nan,
                                 rp[ir].max() if ir else np.nan, int(np.sum(rp[ir] > 1.0)) if ir else 0)
            r_rng = f" [{rp[ir].min():.3g}, {rp[ir].max():.3g}]" if ir else ""
            rows.append([opt, f"{s / weak:g}", _fmt(a_pop), _pm(*a_emp), _fmt(r_pop) + r_rng, _pm(*r_emp),
                         "yes" if all(np.array(r["population_converged"])[ia + ir]) else "no"])
    header = ["optimizer", "Δ_s/Δ_w", "ratio pop, axis-aligned", "ratio emp, axis-aligned",
              f"ratio pop, rotated (mean [min, max] of {len(rots) - 1})", "ratio emp, rotated", "converged"]
    table = _table(header, rows)
    strong_first = {opt: sum(v[6] for (o, s), v in summary.items() if o == opt and s != weak) for opt in cfg["optimizers"]}
    n_rot = (len(rots) - 1) * sum(1 for s in cfg["distinguishability_strong"] if s != weak)
    first_line = ("rotated geometries where the more distinguishable behaviour is learned first (pop, Δ_s > Δ_w): "
                  + ", ".join(f"{o} {c}/{n_rot}" for o, c in strong_first.items()))
    res["strong_first_rotated"] = {"counts": strong_first, "of": n_rot}
    res["summary"] = [{"optimizer": o, "strong": s, "aligned_population": v[0], "aligned_empirical": v[1],
                       "rotated_population": v[2], "rotated_empirical": v[3], "rotated_population_min": v[4],
                       "rotated_population_max": v[5], "rotated_strong_first": v[6], "rotations": len(rots) - 1}
                      for (o, s), v in summary.items()]
    _q4_figure(cfg, res["summary"], out / "Q4.png")
    print(f"## Q4 — {cfg['title']}")
    print(f"# two orthogonal balanced behaviours, Δ_w = {weak}, d = {cfg['d']}, {cfg['loss']} β = {cfg['beta']}, "
          f"full batch, lr " + ", ".join(f"{k} {v:g}" for k, v in cfg["lr"].items()) + f", n = {cfg['n']}, {cfg['seeds']} seeds")
    print(table)
    print("# " + first_line)
    res["markdown"] = "\n".join([
        f"## Q4 — {cfg['title']}", "",
        f"Two orthogonal, balanced behaviours, Δ_weak = {weak}, Δ_strong swept, σ = {cfg['sigma']}, d = {cfg['d']}, "
        f"{cfg['loss']} β = {cfg['beta']}, full batch, {cfg['steps']} steps, learning rates "
        + ", ".join(f"{k} {v:g}" for k, v in cfg["lr"].items())
        + " (momentum 0.9; Adam β₁ = 0.9, β₂ = 0.999), n = " + f"{cfg['n']}, {cfg['seeds']} seeds. "
        "Axis-aligned: b_k = Δ_k e_k (preference directions along coordinate axes); rotated: the same "
        f"distribution under {len(rots) - 1} random orthogonal rotations (isotropic covariance unchanged). "
        "τ as in Q1 (half the final mean reward margin).", "", table, "", first_line + ".", "", "![Q4](Q4.png)", ""])
    return res


def _q4_figure(cfg, summary, path):
    plt = _plt()
    weak = cfg["distinguishability_weak"]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True)
    for opt in cfg["optimizers"]:
        rr = [r for r in summary if r["optimizer"] == opt]
        x = [r["strong"] / weak for r in rr]
        for ax, key in zip(axes, ["aligned", "rotated"]):
            line, = ax.plot(x, [r[f"{key}_population"] for r in rr], "-", label=opt)
            ax.plot(x, [r[f"{key}_empirical"] for r in rr], "o", ms=3, color=line.get_color())
        axes[1].fill_between(x, [r["rotated_population_min"] for r in rr], [r["rotated_population_max"] for r in rr],
                             color=line.get_color(), alpha=0.15, lw=0)
    for ax, title in zip(axes, ["axis-aligned preference directions", "randomly rotated: mean, band min–max"]):
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("Δ_strong / Δ_weak")
        ax.set_title(title + " (line pop, dots emp)", fontsize=9)
    axes[0].set_ylabel("τ_weak / τ_strong")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ Q5
def _q5_runs(cfg, out: Path, log) -> dict:
    """Q5's sweeps, one per family: label → (SweepConfig, loaded store). Student-t sweeps ν as its first axis."""
    runs = {}
    for fam in cfg["families"]:
        data = _merge(cfg["sweep"], {"base": {"family": fam}})
        if fam == "student_t":
            data["grid"] = {"nu": list(cfg["nu"]), **data["grid"]}
        if fam == "mixture":
            data["base"]["mixture_spread"] = cfg["mixture_spread"]
        t0 = time.time()
        scfg = _sweep_config("Q5", data, fam, quick=cfg["quick"])
        runs[fam] = (scfg, _run_store(scfg, out, f"Q5_{fam}", log))
        log(f"  Q5 {fam}: {time.time() - t0:.1f} s")
    return runs


def _q5_cells(cfg, label):
    """The (ν, d) cells of a family in the order of its rows: ``[{"nu": ν, "d": d} | {"d": d}]``."""
    if label == "student_t":
        return [{"nu": nu, "d": d} for nu in cfg["nu"] for d in cfg["dims"]]
    return [{"d": d} for d in cfg["dims"]]


def run_q5(cfg, out: Path, log) -> dict:
    """Q5: Gaussian-equivalence error of Laplace, Student-t and mixture families vs the Gaussian baseline.

    One sweep per family (``builtin:study_q5`` with ``family`` set; Student-t with a ``nu`` axis) into
    ``out/store/Q5_<family>.zarr``. The prediction is the Gaussian sweep's population layer (every
    family has the same moment-matched Gaussian), the mixture's population layer its exact dynamics.
    """
    import jax

    from .sweep import build_distribution, build_family, configuration_fields

    runs = _q5_runs(cfg, out, log)
    if "gaussian" not in runs:
        raise UsageError("study Q5: families must include 'gaussian' (the baseline and the prediction)")
    gds = runs["gaussian"][1].isel(n=0)  # the population layer does not depend on N
    step = gds["step"].values
    pred = _Traj(step=np.broadcast_to(step, (len(cfg["dims"]), len(step))),
                 metrics={k: np.stack([gds[f"population_{k}"].sel(d=d).values for d in cfg["dims"]])
                          for k in ("loss", "reward_accuracy")},
                 delta=[gds["population_delta"].sel(d=d).values[..., :d] for d in cfg["dims"]])
    # the mixture's moment matching, from the sweep's own builders: max |Σ_equivalent − Σ_Gaussian|
    check = 0.0
    if "mixture" in runs:
        scfg = runs["mixture"][0]
        for i, d in enumerate(scfg.grid["d"]):
            f = configuration_fields(scfg, [0, i])
            g, _ = build_distribution(f, d=d)
            mix = build_family("mixture", g, f)
            check = max(check, float(np.max(np.abs(np.asarray(mix.gaussian_equivalent().cov_pos) - np.asarray(g.cov_pos)))))
    d_index = {d: i for i, d in enumerate(cfg["dims"])}
    rows = []
    traj = {}
    for n in cfg["n"]:
        for label in cfg["families"]:
            ds = runs[label][1].sel(n=n)
            div = int(np.sum(ds["diverged"].values))
            for g in _q5_cells(cfg, label):
                j = d_index[g["d"]]
                cell = ds.sel(**g)
                d = g["d"]
                lp, ap = pred.metrics["loss"][j], pred.metrics["reward_accuracy"][j]  # (T,)
                le = cell["loss"].sel(split="eval").values  # (S, T)
                ae = cell["reward_accuracy"].sel(split="eval").values
                dp, de = pred.delta[j][1:], cell["delta"].values[:, 1:, :d]  # (T-1, d), (S, T-1, d)
                head_err = np.linalg.norm(de - dp, axis=-1) / np.linalg.norm(dp, axis=-1)
                row = {"family": label, "nu": g.get("nu"), "d": d, "n": n,
                       "loss_gap": float(np.abs(le - lp).max(-1).mean()),
                       "loss_bias": float(np.abs(le.mean(0) - lp).max()),
                       "accuracy_gap": float(np.abs(ae - ap).max(-1).mean()),
                       "head_error": float(head_err.max(-1).mean()),
                       "final_loss_empirical": float(le[:, -1].mean()), "final_loss_predicted": float(lp[-1]),
                       "diverged": div}
                if label == "mixture":
                    exact = cell["population_loss"].values
                    row["loss_gap_exact_components"] = float(np.abs(le - exact).max(-1).mean())
                rows.append(row)
                if n == cfg["n"][0] and d == cfg["dims"][min(1, len(cfg["dims"]) - 1)]:
                    traj[(label, g.get("nu"))] = le.mean(0)
    for r in rows:
        base = next(b for b in rows if b["family"] == "gaussian" and b["d"] == r["d"] and b["n"] == r["n"])
        r["loss_gap_excess"] = r["loss_gap"] - base["loss_gap"]
        r["accuracy_gap_excess"] = r["accuracy_gap"] - base["accuracy_gap"]
        r["head_error_excess"] = r["head_error"] - base["head_error"]
    static = _q5_static_accuracy(cfg, runs)
    static_line = ("accuracy of the Bayes direction e₁ (no training): moment-matched Gaussian "
                   f"{100 * static['gaussian_formula']:.1f}%; " + ", ".join(
                       f"{k} {100 * v:.1f}%" for k, v in static["family"].items()))
    lab = lambda r: r["family"] + (f" ν={r['nu']:g}" if r["nu"] is not None else "")
    trows = [[lab(r), r["d"], r["n"], f"{1000 * r['loss_gap']:.1f}", f"{1000 * r['loss_gap_excess']:+.1f}",
              f"{1000 * r['loss_bias']:.1f}", f"{100 * r['accuracy_gap']:.2f}", f"{100 * r['accuracy_gap_excess']:+.2f}",
              f"{100 * r['head_error']:.1f}", f"{100 * r['head_error_excess']:+.1f}"]
             for r in rows]
    header = ["family", "d", "N", "loss gap (mnats)", "excess over Gaussian", "systematic loss gap (mnats)",
              "accuracy gap (points)", "excess", "head error (%)", "excess"]
    table = _table(header, trows)
    mx = [r for r in rows if r["family"] == "mixture"]
    res = {"rows": rows, "mixture_equivalent_cov_max_abs_error": check, "static_accuracy": static,
           "step": pred.step[0].tolist(), "prediction_loss": pred.metrics["loss"].tolist()}
    _q5_figure(cfg, rows, traj, pred, out / "Q5.png")
    print(f"## Q5 — {cfg['title']}")
    print(f"# one balanced behaviour Δ = {cfg['distinguishability']}, σ = {cfg['sigma']}, all families share the same "
          f"moment-matched Gaussian; {cfg['loss']} β = {cfg['beta']}, GD η = {cfg['lr']}, {cfg['steps']} steps, "
          f"{cfg['seeds']} seeds, held-out n_eval = {cfg['n_eval']}")
    print("# loss gap = max over steps of |held-out loss − Gaussian-predicted population loss|, mean over seeds;"
          " systematic = the same for the seed-mean trajectory")
    print(table)
    print("# " + static_line)
    if mx:
        print("# mixture against its exact components (not the Gaussian equivalent): loss gap (mnats) "
              + ", ".join(f"d={r['d']} N={r['n']}: {1000 * r['loss_gap_exact_components']:.1f}" for r in mx))
    res["markdown"] = "\n".join([
        f"## Q5 — {cfg['title']}", "",
        f"One balanced behaviour, Δ = {cfg['distinguishability']}, σ = {cfg['sigma']}; families with the same first two "
        "moments (so one moment-matched Gaussian for all): Gaussian (baseline), multivariate Laplace, Student-t "
        f"(ν ∈ {cfg['nu']}), and a two-Gaussian mixture per class split along the preference direction "
        f"(offsets ±{cfg['mixture_spread']}σ, mixture_spread). Prediction: population layer on `gaussian_equivalent()`. "
        f"{cfg['loss']} β = {cfg['beta']}, full-batch GD η = {cfg['lr']}, {cfg['steps']} steps, {cfg['seeds']} seeds, "
        f"held-out loss on {cfg['n_eval']} fresh pairs. Loss gap: max over recorded steps of |held-out loss − "
        "predicted loss| (millinats), mean over seeds; excess: minus the Gaussian baseline's gap at the same d and N "
        "(its own finite-N and Monte-Carlo gap); systematic: the same sup-gap of the seed-averaged trajectory; "
        "accuracy gap: the same for the held-out reward accuracy; head error: max over steps t ≥ 1 of "
        "‖δ̂_t − δ_t‖/‖δ_t‖ between the empirically trained and the predicted head (no evaluation noise).", "",
        table, "", "Static part: " + static_line + " (Student-t and Laplace by Monte Carlo, "
        f"{cfg['static_samples']} pairs; the mixture exact).", "",
        ("Mixture against its exact components (the population layer's exact mixture dynamics): loss gap "
         + ", ".join(f"d={r['d']} N={r['n']}: {1000 * r['loss_gap_exact_components']:.1f} mnats" for r in mx) + "."
         if mx else ""),
        "", "![Q5](Q5.png)", ""])
    return res


def _q5_static_accuracy(cfg, runs) -> dict:
    """Reward accuracy of the Bayes direction δ ∝ e₁ for each family (no training), vs ``Φ(Δ/2σ)``.

    This is the part of the accuracy gap that is not dynamics: the moment-matched
    Gaussian mispredicts the accuracy even at the right head. Laplace / Student-t by
    Monte Carlo (``static_samples`` pairs), the mixture exactly (its components). The laws
    are built by the sweep's own builders at the first ``d`` of the grid (an analysis-time
    computation: a fixed head, no trajectory).
    """
    import jax
    import jax.numpy as jnp
    from scipy.stats import norm

    import dynamics as dd

    from .sweep import build_distribution, build_family, configuration_fields

    d0 = cfg["dims"][0]
    e1 = jnp.zeros(d0).at[0].set(1.0)
    out = {}
    key = jax.random.key(17)
    for label in cfg["families"]:
        if label == "gaussian":
            continue
        scfg = runs[label][0]
        for g in _q5_cells(cfg, label):
            if g["d"] != d0:
                continue
            index = [list(scfg.grid[a]).index(g[a] if a in g else scfg.grid[a][0]) for a in scfg.grid]
            f = configuration_fields(scfg, index)
            one = build_family(label, build_distribution(f, d=d0)[0], f)
            name = label + (f" ν={g['nu']:g}" if "nu" in g else "")
            if label == "mixture":
                out[name] = float(dd.gaussian_accuracy(one, e1)[0])
            else:
                x, s, _ = one.sample(key, cfg["static_samples"])
                out[name] = float(jnp.mean(s * x[:, 0] > 0))
    return {"gaussian_formula": float(norm.cdf(cfg["distinguishability"] / (2 * cfg["sigma"]))), "family": out}


def _q5_figure(cfg, rows, traj, pred, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    n0 = cfg["n"][-1]  # the largest N: the finite-N baseline gap is smallest there
    for d in cfg["dims"]:
        tr = sorted((r for r in rows if r["family"] == "student_t" and r["d"] == d and r["n"] == n0), key=lambda r: r["nu"])
        line, = axes[0].plot([r["nu"] for r in tr], [1000 * r["loss_gap"] for r in tr], "-o", ms=3, label=f"Student-t d={d}")
        for fam, mk in (("gaussian", "--"), ("laplace", ":"), ("mixture", "-.")):
            b = next(r for r in rows if r["family"] == fam and r["d"] == d and r["n"] == n0)
            axes[0].axhline(1000 * b["loss_gap"], ls=mk, color=line.get_color(), lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xticks(cfg["nu"], [f"{v:g}" for v in cfg["nu"]])
    axes[0].minorticks_off()
    axes[0].set_xlabel("ν (Student-t)")
    axes[0].set_ylabel(f"loss gap, mnats (N={n0})")
    axes[0].set_title("lines: -- Gaussian, : Laplace, -. mixture", fontsize=8)
    axes[0].legend(fontsize=7)
    dsel = cfg["dims"][min(1, len(cfg["dims"]) - 1)]
    j = cfg["dims"].index(dsel)
    step = pred.step[0]
    axes[1].plot(step, pred.metrics["loss"][j], "k-", lw=2, label="Gaussian prediction")
    for (fam, nu), le in traj.items():
        axes[1].plot(step, le, lw=1, label=fam + (f" ν={nu:g}" if nu is not None else ""))
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("held-out loss (nats)")
    axes[1].set_title(f"d={dsel}, N={cfg['n'][0]}, mean over seeds", fontsize=8)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ driver
_RUNNERS = {"Q1": "run_q1", "Q2": "run_q2", "Q3": "run_q3", "Q4": "run_q4", "Q5": "run_q5"}


def run_study(name: str, out_dir, *, quick: bool = False, log=None) -> dict:
    """Run one study, print its key numbers, write ``NAME.md``, ``NAME.png``, ``NAME.json`` to ``out_dir``.

    Returns the study's result dict (also written as JSON, with ``seconds``).
    Raises UsageError for an unknown study.
    """
    name = _canonical(name)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg = study_config(name, quick)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = globals()[_RUNNERS[name]](cfg, out, log)
    res["seconds"] = round(time.time() - t0, 1)
    res["quick"] = bool(quick)
    res["config"] = cfg
    cmd = f"dpo-sims study {name}{' --quick' if quick else ''} --out {out_dir}"
    md = res.pop("markdown") + f"\nCommand: `{cmd}` ({res['seconds']} s).\n"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=_json_default))
    print(f"# {name}: wrote {out / (name + '.md')}, {out / (name + '.png')}, {out / (name + '.json')} "
          f"in {res['seconds']} s")
    res["markdown"] = md
    return res


def _json_default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "study",
        help="studies beyond the paper: objectives, re-weighting, generalisation, optimizer, Gaussian equivalence",
        description="Run one of the embedded studies (Q1 objectives, Q2 re-weighting, Q3 generalisation, "
        "Q4 optimizer, Q5 Gaussian equivalence) or all of them; print the key numbers and write a "
        "findings section (NAME.md), a figure (NAME.png) and the numbers (NAME.json) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("name", help="Q1, Q2, Q3, Q4, Q5, displacement, representation or all (Q1–Q5)")
    p.add_argument("--quick", action="store_true", help="small configs (about a minute each on 2 CPU cores)")
    p.add_argument("--out", default="study-results", help="output folder")
    p.add_argument("--part", default=None,
                   help="displacement: comma-separated parts among a,b,c,d; representation: among 1,2,3,4 (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    """``dpo-sims study NAME|all [--quick] [--out DIR] [--part a,b]``: 0 on success; bad input raises UsageError
    (exit 2). ``displacement`` runs :func:`sims.displacement.run_displacement`."""
    if str(args.name).lower() == "displacement":
        from .displacement import run_displacement

        run_displacement(args.out, quick=args.quick, parts=getattr(args, "part", None))  # checks --part, --out
        return 0
    if str(args.name).lower() == "representation":
        from .representation_study import run_representation

        run_representation(args.out, quick=args.quick, parts=getattr(args, "part", None))  # checks --part, --out
        return 0
    if getattr(args, "part", None) is not None:
        raise UsageError(f"--part applies to the displacement study only (and representation); drop it for study "
                         f"{args.name}")
    names = list(STUDIES) if str(args.name).lower() == "all" else [_canonical(args.name)]
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder; pass a folder path")
    sections = []
    for name in names:
        sections.append(run_study(name, args.out, quick=args.quick)["markdown"])
    if len(names) > 1:
        path = Path(args.out) / "all.md"
        path.write_text("# Study findings (dpo-sims study all)\n\n" + "\n".join(sections))
        print(f"# wrote {path}")
    return 0
