"""``dpo-sims study displacement``: why chosen log-probs fall during DPO, where the mass goes, and priority.

The question DPO users ask most — "why do ``logps/chosen`` and ``rewards/chosen`` fall during DPO?" —
answered in the answer-vocabulary model of docs/theory.md §7 (a ``V×d`` head, a frozen reference,
per-behaviour token pairs) with the objectives of docs/theory.md §8, population (N → ∞,
:func:`dynamics.vocab_population.vocab_population_trajectory`) beside empirical (N sampled pairs,
:func:`dynamics.vocab.vocab_empirical_trajectory`).

One model serves parts a, b and d: ``V = 3`` tokens (" Yes", " No", " Never"), ``d = 2``, two
balanced behaviours of the same spread ``σ²I`` and different distinguishability
``Δ_k = ‖μ_k⁺ − μ_k⁻‖`` (:meth:`dynamics.GaussianPreference.from_angles`), behaviour 0 answering
" Yes"/" No" and behaviour 1 " No"/" Never" on one shared head (``Head(pairs=...)``). Training is the
recipe of :func:`dynamics.vocab.sft_then_dpo`: SFT (cross-entropy on the chosen token) from
``W = 0``, then DPO from the SFT head with it as the reference. The SFT stage does not depend on the
DPO objective or β, so it runs once per layer and the DPO stage runs per objective, vmapped over β
(the two stages exactly as ``sft_then_dpo`` composes them).

* (a) does ``E log π(y_w|x)`` fall from the start of DPO to its end, for which objective and β, and
  does an SFT/NLL term (``rpo``, ``dpop``, ``cpo``) stop it (:func:`chosen_logp_change`);
* (b) where the probability mass goes: the ``probs`` metric per token and behaviour over both stages
  (:func:`mass_shift`), and Ren & Sutherland's one-step decomposition of ``Δ log π(y|x_o)``
  (:func:`dynamics.vocab.logp_change_decomposition`) split by the behaviour of the training pair;
* (c) multi-position responses: delegated to ``sims.squeezing.run_part_c(quick, out_dir)`` when
  that module exists (else recorded as ``"not available"``);
* (d) distinguishability priority under every objective: the step at which each behaviour's DPO loss
  has covered the fraction ``f`` of its own drop (:func:`learning_times`, the one threshold
  convention :func:`dynamics.theory.first_step_where`), and the ratio ``τ_weak / τ_strong``.

Writes ``DIR/displacement.json`` (every number), ``DIR/displacement.md`` (tables) and one figure per
part, ``DIR/displacement_a.png`` … Batch-level objectives (``get_objective(name).batch_level``) have
no population layer today: they are tried and, when the population layer raises, recorded in
``"skipped"`` with its message.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["PARTS", "TOKENS", "CONFIG", "config", "parse_parts", "build_model", "chosen_logp_change", "mass_shift",
           "learning_times", "max_abs_gap", "run_displacement"]

#: the study's parts (``--part a,b``)
PARTS = ("a", "b", "c", "d")
#: the answer tokens of the head, by row
TOKENS = (" Yes", " No", " Never")

#: the settings of the full run; ``"quick"`` holds the overrides of ``--quick``. Units: steps, nats.
CONFIG = {
    "d": 2,
    "sigma": 1.0,
    "distinguishability": [1.0, 2.5],  # behaviour 0 (" Yes"/" No") is the weak one, behaviour 1 (" No"/" Never")
    "angle_deg": 60.0,  # between the two preference directions (shared directions couple the behaviours)
    "pairs": [[0, 1], [1, 2]],
    "betas": [0.1, 1.0, 10.0],
    "sft_steps": 60,
    "sft_lr": 0.5,
    "dpo_steps": 120,
    "dpo_lr": 0.3,  # η at β ≤ 1; η / β above (the objectives' gradients in W scale with β)
    "lr_scale": {"ipo": 0.1, "dpop": 0.05},
    "hparams": {"exo_pair": {"label_smoothing": 1e-3}},  # TRL raises for exo_pair at ε = 0; 1e-3 as the EXO paper  # curvature in W that does not shrink with β (ipo) or is ×(1+λ)² (dpop)
    "record_every": 6,
    "n": 200_000,
    "n_eval": 2048,
    "seed": 0,
    "fraction": 0.5,
    "ren_batch": 512,
    "objectives": "all",  # every registered non-batch-level objective except "sft" (the SFT stage)
    "quick": {
        "sft_steps": 30,
        "dpo_steps": 60,
        "objectives": ["sigmoid", "kto"],  # kto: the skip of a batch-level objective
        "n": 20_000,  # quick: N = 2·10⁴ (the full run's max_abs_pop_emp_loss is at N = 2·10⁵)
    },
}


def _usage_error(msg):
    from .cli import UsageError

    return UsageError(msg)


def config(quick: bool = False) -> dict:
    """The study's settings (:data:`CONFIG` with ``--quick``'s overrides), objectives resolved to names."""
    from dynamics.losses import OBJECTIVE_NAMES

    cfg = {k: v for k, v in CONFIG.items() if k != "quick"}
    if quick:
        cfg.update(CONFIG["quick"])
    if cfg["objectives"] == "all":
        cfg["objectives"] = [n for n in OBJECTIVE_NAMES if n != "sft"]
    cfg["quick"] = bool(quick)
    return cfg


def parse_parts(parts, choices=PARTS) -> tuple:
    """``None`` (every part), ``"a,b"`` or a sequence of part names → a tuple in ``choices`` order
    (default this study's :data:`PARTS`; other studies pass theirs).

    Raises:
      UsageError: an unknown part (one line, naming the choices).
    """
    if parts is None:
        return tuple(choices)
    items = [str(p).strip().lower() for p in (parts.split(",") if isinstance(parts, str) else parts)]
    bad = [p for p in items if p not in choices]
    if bad or not items:
        raise _usage_error(f"--part {parts!r}: unknown part {bad[0] if bad else ''!r}; choose from {list(choices)} "
                           f"(comma-separated, e.g. --part {','.join(choices[:2])})")
    return tuple(p for p in choices if p in items)


def build_model(cfg: dict):
    """``(dist, head)``: the two-behaviour Gaussian of :data:`CONFIG` and the zero ``V×d`` head with its pairs."""
    import dynamics as dd

    dist = dd.GaussianPreference.from_angles(cfg["distinguishability"], angles_deg=cfg["angle_deg"], d=cfg["d"],
                                             sigma=cfg["sigma"], names=("yes_no", "no_never"))
    head = dd.Head.zeros(cfg["d"], vocab_size=len(TOKENS), pairs=[tuple(p) for p in cfg["pairs"]])
    return dist, head


# ============================================================================ analysis (pure NumPy)
def chosen_logp_change(traj) -> dict:
    """Change of ``E log π(y_w|x)`` from the first record of ``traj`` to its last (nats).

    Args:
      traj: a :class:`dynamics.vocab.VocabTrajectory` (leaves may carry leading vmapped axes ``(...)``).

    Returns:
      ``{"mean": (...), "per_behavior": (..., K)}``: the behaviour-weighted mean
      (``traj.mean("logps/chosen")``) and the per-behaviour change; < 0 is likelihood displacement.
    """
    mean = np.asarray(traj.mean("logps/chosen"))
    per = np.asarray(traj.metrics["logps/chosen"])
    return {"mean": mean[..., -1] - mean[..., 0], "per_behavior": per[..., -1, :] - per[..., 0, :]}


def mass_shift(probs) -> np.ndarray:
    """``probs (..., T, K, V)`` (the ``"probs"`` metric) → the change per behaviour and token, ``(..., K, V)``.

    Each row sums to 0 (probabilities stay normalised); > 0 marks where the mass went.
    """
    p = np.asarray(probs)
    return p[..., -1, :, :] - p[..., 0, :, :]


def learning_times(step, loss, fraction: float = 0.5):
    """Per behaviour, the first recorded step at which its loss has covered ``fraction`` of its own drop.

    Progress ``p_k(t) = (L_k(0) − L_k(t)) / (L_k(0) − L_k(T))`` (``T`` the last record);
    ``τ_k = dynamics.theory.first_step_where(p_k ≥ fraction, step)``; NaN when the loss did not fall.

    Args:
      step: ``(T,)`` recorded step numbers. loss: ``(..., T, K)`` per-behaviour loss (nats).
      fraction: in (0, 1].

    Returns:
      ``(..., K)`` float array of steps (NaN: never).

    Raises:
      ValueError: ``fraction`` outside (0, 1], or ``loss`` whose time axis does not match ``step``.
    """
    from dynamics.theory import first_step_where

    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction={fraction}; pass a fraction of the loss drop in (0, 1]")
    loss = np.asarray(loss, np.float64)
    step = np.asarray(step)
    if loss.ndim < 2 or loss.shape[-2] != step.shape[0]:
        raise ValueError(f"loss has shape {loss.shape}; expected (..., T={step.shape[0]}, K)")
    drop = loss[..., :1, :] - loss[..., -1:, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        progress = np.where(drop > 0, (loss[..., :1, :] - loss) / np.where(drop > 0, drop, 1.0), np.nan)
    cond = np.moveaxis(progress >= fraction, -2, -1)  # (..., K, T); NaN compares False
    return np.asarray(first_step_where(cond, step), np.float64)


def max_abs_gap(a, b) -> float:
    """``max |a − b|`` over every entry (NaN entries skipped; NaN when all are)."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(np.nanmax(diff)) if np.any(np.isfinite(diff)) else float("nan")


# ============================================================================ runs
def _lr(cfg, name, betas):
    return cfg["dpo_lr"] * cfg["lr_scale"].get(name, 1.0) / np.maximum(1.0, np.asarray(betas, np.float64))


def _np_traj(tr) -> dict:
    """The parts of a (vmapped) VocabTrajectory the study reads, as NumPy."""
    keys = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/accuracies", "loss", "displacement", "probs")
    steps = np.asarray(tr.steps)
    return {"steps": steps.reshape(-1, steps.shape[-1])[0],
            "loss_total": np.asarray(tr.loss_total), "logps_chosen_mean": np.asarray(tr.mean("logps/chosen")),
            "weights": np.asarray(tr.weights), "w": np.asarray(tr.w),
            **{k: np.asarray(tr.metrics[k]) for k in keys}}


def _sft_stage(dist, head, cfg, key):
    """The SFT stage of :func:`dynamics.vocab.sft_then_dpo` per layer: ``(pop, emp train)`` trajectories."""
    from dynamics.vocab import vocab_empirical_trajectory
    from dynamics.vocab_population import vocab_population_trajectory

    kw = dict(loss_type="sft", lr=cfg["sft_lr"], steps=cfg["sft_steps"], record_every=cfg["record_every"])
    pop = vocab_population_trajectory(dist, head=head, **kw)
    emp, _ = vocab_empirical_trajectory(dist, key, head=head, n=cfg["n"], n_eval=cfg["n_eval"], **kw)
    return pop, emp


def _dpo_stage(dist, head, cfg, key, name, layer):
    """The DPO stage of objective ``name`` from ``head`` (its reference is the SFT head), vmapped over β."""
    import jax
    import jax.numpy as jnp

    from dynamics.vocab import vocab_empirical_trajectory
    from dynamics.vocab_population import vocab_population_trajectory

    betas = jnp.asarray(cfg["betas"], jnp.result_type(float))
    lrs = jnp.asarray(_lr(cfg, name, cfg["betas"]), betas.dtype)
    kw = dict(loss_type=name, steps=cfg["dpo_steps"], record_every=cfg["record_every"], **cfg["hparams"].get(name, {}))
    if layer == "population":
        run = lambda b, lr: vocab_population_trajectory(dist, head=head, beta=b, lr=lr, **kw)
    else:
        run = lambda b, lr: vocab_empirical_trajectory(dist, key, head=head, beta=b, lr=lr, n=cfg["n"],
                                                       n_eval=cfg["n_eval"], **kw)[0]
    return jax.vmap(run)(betas, lrs)


def _ren(dist, head_sft, w_list, cfg, key, beta, lr):
    """Ren & Sutherland's decomposition of one SGD step of ``sigmoid`` at each head in ``w_list``.

    Observed prompts: each behaviour's mean ``μ_k⁺`` (chosen ``a_k``); every token ``y`` of V. The
    step's batch: ``ren_batch`` sampled pairs. Returns, per head, the first-order change of
    ``log π(y|x_o)`` split by the behaviour of the training pairs, and the exact one-step change.
    """
    import jax
    import jax.numpy as jnp

    from dynamics.vocab import logp_change_decomposition, sample_pairs

    x, s, beh = sample_pairs(dist, key, cfg["ren_batch"])
    k, v = dist.num_behaviors, len(TOKENS)
    mu = np.asarray(dist.mu_pos)
    x_obs = np.repeat(mu, v, axis=0)  # (K·V, d): prompt of behaviour k, every token
    y_obs = np.tile(np.arange(v), k)
    beh_np = np.asarray(beh)
    out = []
    for w in w_list:
        dec = logp_change_decomposition(head_sft, w, x_obs, y_obs, (x, s, beh), loss_type="sigmoid", beta=beta,
                                        lr=lr)
        terms = np.asarray(dec["terms"])
        w1 = jnp.asarray(w) - lr * dec["G"].T @ jnp.asarray(x, jnp.asarray(w).dtype)  # ∇_W L = Σ_u G_uᵀ x_u
        lp = lambda ww: np.asarray(jax.nn.log_softmax(jnp.asarray(x_obs, ww.dtype) @ ww.T, axis=-1))
        exact = (lp(w1) - lp(jnp.asarray(w)))[np.arange(k * v), y_obs]
        by_beh = np.stack([terms[:, beh_np == j].sum(axis=1) for j in range(k)], axis=-1)  # (K·V, K)
        out.append({"first_order": np.asarray(dec["first_order"]).reshape(k, v),
                    "from_behavior": by_beh.reshape(k, v, k), "exact": exact.reshape(k, v)})
    return out


# ============================================================================ the study
def run_displacement(out_dir, *, quick: bool = False, parts=None, log=None) -> dict:
    """Run the displacement study; print its key numbers; write ``displacement.json``/``.md`` and the figures.

    Args:
      out_dir: output folder (created). quick: the small config (:data:`CONFIG` ``"quick"``).
      parts: ``None`` (all of :data:`PARTS`), ``"a,b"`` or a sequence of part names.
      log: ``str → None`` progress sink (default: stderr).

    Returns:
      The result dict written to ``displacement.json``: ``max_abs_pop_emp_loss``
      (``{"per_objective": {name: max over β and steps of |L_pop − L_emp|}, "max": …, "n": N}``),
      ``chosen_logp_change`` (``{name: {"beta=…": population change of E log π(y_w|x) over DPO}}``),
      ``"a"``, ``"b"``, ``"c"``, ``"d"`` (the parts run), ``"skipped"`` (objectives without a
      population layer, with the reason), ``config``, ``seconds``.

    Raises:
      UsageError: an unknown part or an ``out_dir`` that is not a folder.

    Source: docs/theory.md §7.5 (SFT, likelihood displacement), §8 (objectives); Razin et al. 2025 and
    Ren & Sutherland 2025 (displacement, squeezing); Im & Li 2024 (priority, docs/theory.md §4.4).
    """
    import jax

    from dynamics.losses import get_objective

    parts = parse_parts(parts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise _usage_error(f"--out {out_dir} exists and is not a folder; pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    cfg = config(quick)
    dist, head = build_model(cfg)
    key = jax.random.key(cfg["seed"])
    res = {"parts": list(parts), "quick": cfg["quick"], "tokens": list(TOKENS)}
    runs, skipped = {}, {}
    if any(p in parts for p in "abd"):
        log("# displacement: SFT stage (population, empirical)")
        sft_pop, sft_emp = _sft_stage(dist, head, cfg, key)
        sft = {"population": _np_traj(sft_pop), "empirical": _np_traj(sft_emp)}
        heads = {"population": head.replace(w_ref=sft_pop.w[-1], w_init=sft_pop.w[-1]),
                 "empirical": head.replace(w_ref=sft_emp.w[-1], w_init=sft_emp.w[-1])}
        names = cfg["objectives"] if ("a" in parts or "d" in parts) else ["sigmoid"]
        for name in names:
            t1 = time.time()
            try:
                pop = _dpo_stage(dist, heads["population"], cfg, key, name, "population")
            except ValueError as err:
                if not get_objective(name).batch_level:
                    raise
                skipped[name] = str(err)
                log(f"#   {name}: skipped ({err})")
                continue
            emp = _dpo_stage(dist, heads["empirical"], cfg, key, name, "empirical")
            runs[name] = {"population": _np_traj(pop), "empirical": _np_traj(emp)}
            log(f"#   {name}: {time.time() - t1:.1f} s")
            (out / "displacement.partial.json").write_text(json.dumps(_clean(_summary(cfg, runs)), indent=1))
        res.update(_summary(cfg, runs))
        res["skipped"] = skipped
        if "a" in parts:
            res["a"] = _part_a(cfg, runs, sft, out / "displacement_a.png")
        if "b" in parts:
            res["b"] = _part_b(cfg, dist, heads["population"], runs, sft, key, out / "displacement_b.png")
        if "d" in parts:
            res["d"] = _part_d(cfg, runs, out / "displacement_d.png")
    if "c" in parts:
        res["c"] = _part_c(quick, out, log)
    res["config"] = cfg
    res["seconds"] = round(time.time() - t0, 1)
    cmd = f"dpo-sims study displacement{' --quick' if quick else ''} --out {out_dir}"
    res["command"] = cmd
    md = _markdown(res, cmd)
    (out / "displacement.md").write_text(md)
    (out / "displacement.json").write_text(json.dumps(_clean(res), indent=1, allow_nan=False))
    (out / "displacement.partial.json").unlink(missing_ok=True)  # the per-objective checkpoint of a long run
    for line in _headline(res):
        print(line)
    print(f"# displacement: wrote {out / 'displacement.json'}, {out / 'displacement.md'} and "
          f"{sum((out / f'displacement_{p}.png').exists() for p in parts)} figure(s) in {res['seconds']} s")
    return res


def _beta_key(b):
    return f"beta={b:g}"


def _summary(cfg, runs) -> dict:
    """The two top-level keys: ``max_abs_pop_emp_loss`` and ``chosen_logp_change`` (population)."""
    gaps = {n: max_abs_gap(r["population"]["loss_total"], r["empirical"]["loss_total"]) for n, r in runs.items()}
    change = {}
    for n, r in runs.items():
        c = r["population"]["logps_chosen_mean"]
        change[n] = {_beta_key(b): float(c[i, -1] - c[i, 0]) for i, b in enumerate(cfg["betas"])}
    finite = [g for g in gaps.values() if math.isfinite(g)]
    return {"max_abs_pop_emp_loss": {"per_objective": gaps, "max": max(finite) if finite else float("nan"),
                                     "n": cfg["n"], "V": len(TOKENS), "over": "every recorded DPO step and β"},
            "chosen_logp_change": change}


def _part_a(cfg, runs, sft, path) -> dict:
    betas = cfg["betas"]
    rows = {}
    for n, r in runs.items():
        pop, emp = r["population"], r["empirical"]
        cp = pop["logps_chosen_mean"][:, -1] - pop["logps_chosen_mean"][:, 0]
        ce = emp["logps_chosen_mean"][:, -1] - emp["logps_chosen_mean"][:, 0]
        per = pop["logps/chosen"][:, -1, :] - pop["logps/chosen"][:, 0, :]
        rows[n] = {_beta_key(b): {"population": float(cp[i]), "empirical": float(ce[i]),
                                  "per_behavior_population": per[i].tolist(), "falls": bool(cp[i] < 0),
                                  "rewards_chosen_end": pop["rewards/chosen"][i, -1].tolist(),
                                  "displacement_end": pop["displacement"][i, -1].tolist(),
                                  "lr": float(_lr(cfg, n, [b])[0])}
                   for i, b in enumerate(betas)}
    falls = {_beta_key(b): sorted(n for n in rows if rows[n][_beta_key(b)]["falls"]) for b in betas}
    nll = {}
    if "sigmoid" in rows:
        for n in ("rpo", "dpop", "cpo"):
            if n in rows:
                nll[n] = {bk: {"change": rows[n][bk]["population"], "sigmoid": rows["sigmoid"][bk]["population"],
                               "stops_the_fall": bool(rows["sigmoid"][bk]["falls"] and not rows[n][bk]["falls"])}
                          for bk in rows[n]}
    sft_change = float(sft["population"]["logps_chosen_mean"][-1] - sft["population"]["logps_chosen_mean"][0])
    _figure_a(cfg, runs, sft, path)
    return {"per_objective": rows, "falls_for": falls, "nll_term": nll, "sft_chosen_logp_change": sft_change,
            "sft_final_chosen_logp": float(sft["population"]["logps_chosen_mean"][-1]), "figure": path.name}


def _part_b(cfg, dist, head_sft, runs, sft, key, path) -> dict:
    import jax

    i1 = cfg["betas"].index(1.0) if 1.0 in cfg["betas"] else 0
    beta = cfg["betas"][i1]
    shifts = {}
    for n, r in runs.items():
        ms = mass_shift(r["population"]["probs"][i1])
        shifts[n] = {f"behavior{k}": dict(zip(TOKENS, ms[k].tolist())) for k in range(ms.shape[0])}
    sig = runs["sigmoid"]["population"]
    sft_shift = mass_shift(sft["population"]["probs"])
    lr = float(_lr(cfg, "sigmoid", [beta])[0])
    ren = _ren(dist, head_sft, [np.asarray(head_sft.w_init), sig["w"][i1, -1]], cfg, jax.random.fold_in(key, 1),
               beta, lr)
    ren_out = {}
    for label, rr in zip(("dpo_start", "dpo_end"), ren):
        ren_out[label] = {
            f"x_obs=mu{k}+": {tok: {"first_order": float(rr["first_order"][k, y]), "exact": float(rr["exact"][k, y]),
                                    **{f"from_behavior{j}": float(rr["from_behavior"][k, y, j])
                                       for j in range(rr["from_behavior"].shape[-1])}}
                              for y, tok in enumerate(TOKENS)}
            for k in range(rr["first_order"].shape[0])}
    _figure_b(cfg, runs, sft, ren, beta, i1, path)
    return {"beta": beta, "mass_shift_dpo": shifts,
            "mass_shift_sft": {f"behavior{k}": dict(zip(TOKENS, sft_shift[k].tolist()))
                               for k in range(sft_shift.shape[0])},
            "probs_end_dpo_sigmoid": {f"behavior{k}": dict(zip(TOKENS, sig["probs"][i1, -1, k].tolist()))
                                      for k in range(sig["probs"].shape[2])},
            "ren_decomposition": {"loss_type": "sigmoid", "beta": beta, "lr": lr, "batch": cfg["ren_batch"],
                                  "observed": "x_o = μ_k⁺ (behaviour k's mean prompt with chosen a_k), every token y",
                                  **ren_out},
            "figure": path.name}


def _part_c(quick, out, log):
    if importlib.util.find_spec("sims.squeezing") is None:
        log("# displacement (c): the module sims.squeezing is not available; part c recorded as 'not available'")
        return "not available"
    mod = importlib.import_module("sims.squeezing")
    return mod.run_part_c(quick, out)


def _part_d(cfg, runs, path) -> dict:
    rows = {}
    weak, strong = int(np.argmin(cfg["distinguishability"])), int(np.argmax(cfg["distinguishability"]))
    for n, r in runs.items():
        row = {}
        for layer in ("population", "empirical"):
            tr = r[layer]
            tau = learning_times(tr["steps"], tr["loss"], cfg["fraction"])  # (B, K)
            row[layer] = {_beta_key(b): {"tau": tau[i].tolist(), "ratio_weak_over_strong":
                                         float(tau[i, weak] / tau[i, strong]),
                                         "strong_first": bool(tau[i, strong] < tau[i, weak])}
                          for i, b in enumerate(cfg["betas"])}
        rows[n] = row
    _figure_d(cfg, runs, rows, path)
    strong_first = {_beta_key(b): sorted(n for n in rows if rows[n]["population"][_beta_key(b)]["strong_first"])
                    for b in cfg["betas"]}
    return {"per_objective": rows, "strong_first_for": strong_first, "weak": weak, "strong": strong,
            "criterion": f"first recorded step with a fraction {cfg['fraction']} of the behaviour's own DPO "
                         "loss drop (dynamics.theory.first_step_where)", "figure": path.name}


# ============================================================================ figures and text
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _two_stage_steps(cfg, sft, tr):
    return np.concatenate([sft["steps"], cfg["sft_steps"] + tr["steps"]])


def _figure_a(cfg, runs, sft, path):
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    i1 = cfg["betas"].index(1.0) if 1.0 in cfg["betas"] else 0
    show = [n for n in ("sigmoid", "ipo", "hinge", "rpo", "dpop", "cpo", "simpo", "apo_zero") if n in runs]
    for j, n in enumerate(show):
        pop, emp = runs[n]["population"], runs[n]["empirical"]
        t = cfg["sft_steps"] + pop["steps"]
        line, = ax.plot(t, pop["logps_chosen_mean"][i1], lw=1.6, label=n)
        ax.plot(t[::4], emp["logps_chosen_mean"][i1][::4], "o", ms=3, color=line.get_color())
    ax.plot(sft["population"]["steps"], sft["population"]["logps_chosen_mean"], "k-", lw=1.6, label="SFT stage")
    ax.axvline(cfg["sft_steps"], color="0.6", ls=":")
    ax.set_xlabel("step (SFT, then DPO)")
    ax.set_ylabel("E log π(y_w|x) (nats)")
    ax.set_title(f"chosen log-prob, β = {cfg['betas'][i1]:g} (lines: population, dots: N = {cfg['n']:,})")
    ax.legend(fontsize=7, ncol=2)
    logp = {n: r["population"]["logps_chosen_mean"] for n, r in runs.items()}
    _bars_by_beta(bx, cfg["betas"], {n: [v[i, -1] - v[i, 0] for i in range(len(cfg["betas"]))] for n, v in logp.items()},
                  0.0, "Δ E log π(y_w|x) over DPO (population, nats); < 0: displacement")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars_by_beta(ax, betas, values, line_at, xlabel):
    """Horizontal bars, one group per objective (``values[name][i]`` at ``betas[i]``), a rule at ``line_at``."""
    names = list(values)
    y = np.arange(len(names))
    hgt = 0.8 / len(betas)
    for i, b in enumerate(betas):
        ax.barh(y + (i - (len(betas) - 1) / 2) * hgt, [values[n][i] for n in names], height=hgt, label=f"β = {b:g}")
    ax.axvline(line_at, color="k", lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)


def _figure_b(cfg, runs, sft, ren, beta, i1, path):
    plt = _plt()
    k = sft["population"]["probs"].shape[1]
    fig, axes = plt.subplots(1, k + 1, figsize=(5 * (k + 1), 4.5))
    pop, emp = runs["sigmoid"]["population"], runs["sigmoid"]["empirical"]
    t = _two_stage_steps(cfg, sft["population"], pop)
    for kk in range(k):
        ax = axes[kk]
        for v, tok in enumerate(TOKENS):
            p = np.concatenate([sft["population"]["probs"][:, kk, v], pop["probs"][i1, :, kk, v]])
            pe = np.concatenate([sft["empirical"]["probs"][:, kk, v], emp["probs"][i1, :, kk, v]])
            line, = ax.plot(t, p, lw=1.6, label=f"π({tok.strip()})")
            ax.plot(t[::4], pe[::4], "o", ms=3, color=line.get_color())
        a, b = cfg["pairs"][kk]
        ax.axvline(cfg["sft_steps"], color="0.6", ls=":")
        ax.set_title(f"behaviour {kk} ({TOKENS[a].strip()}/{TOKENS[b].strip()}), Δ = "
                     f"{cfg['distinguishability'][kk]:g}: E π(y|x)")
        ax.set_xlabel("step (SFT, then DPO sigmoid)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    ax = axes[-1]
    rr = ren[0]
    labels, width = [], 0.38
    xs = np.arange(k * len(TOKENS))
    fb = rr["from_behavior"].reshape(k * len(TOKENS), k)
    bottom_pos = np.zeros(len(xs))
    bottom_neg = np.zeros(len(xs))
    for j in range(k):
        vals = fb[:, j]
        base = np.where(vals >= 0, bottom_pos, bottom_neg)
        ax.bar(xs, vals, width, bottom=base, label=f"from behaviour-{j} pairs")
        bottom_pos += np.where(vals >= 0, vals, 0)
        bottom_neg += np.where(vals < 0, vals, 0)
    ax.plot(xs, rr["exact"].reshape(-1), "k*", ms=8, label="exact one-step change")
    for kk in range(k):
        labels += [f"μ{kk}⁺:{tok.strip()}" for tok in TOKENS]
    ax.set_xticks(xs, labels, rotation=45, fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(f"Ren–Sutherland: Δ log π(y|x_o), first DPO step (β = {beta:g})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figure_d(cfg, runs, rows, path):
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    i1 = cfg["betas"].index(1.0) if 1.0 in cfg["betas"] else 0
    pop = runs["sigmoid"]["population"] if "sigmoid" in runs else next(iter(runs.values()))["population"]
    loss = pop["loss"][i1]
    for kk in range(loss.shape[1]):
        prog = (loss[0, kk] - loss[:, kk]) / (loss[0, kk] - loss[-1, kk])
        ax.plot(pop["steps"], prog, label=f"behaviour {kk} (Δ = {cfg['distinguishability'][kk]:g})")
    ax.axhline(cfg["fraction"], color="0.5", ls=":")
    ax.set_xlabel("DPO step")
    ax.set_ylabel("fraction of the behaviour's own loss drop")
    ax.set_title(f"sigmoid, β = {cfg['betas'][i1]:g} (population)")
    ax.legend(fontsize=8)
    _bars_by_beta(bx, cfg["betas"],
                  {n: [r["population"][_beta_key(b)]["ratio_weak_over_strong"] for b in cfg["betas"]]
                   for n, r in rows.items()},
                  1.0, "τ_weak / τ_strong (population); > 1: the more distinguishable behaviour first")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}g}"


def _headline(res):
    lines = []
    if "max_abs_pop_emp_loss" in res:
        lines.append(f"# displacement: max |L_pop − L_emp| (N = {res['max_abs_pop_emp_loss']['n']:,}) = "
                     f"{_fmt(res['max_abs_pop_emp_loss']['max'])} nats")
    if "a" in res:
        for bk, names in res["a"]["falls_for"].items():
            lines.append(f"# displacement (a) chosen log-prob falls at {bk} for: {', '.join(names) or 'none'}")
    if "d" in res:
        for bk, names in res["d"]["strong_first_for"].items():
            lines.append(f"# displacement (d) strong behaviour first at {bk} for: {', '.join(names) or 'none'}")
    if "c" in res:
        lines.append(f"# displacement (c): {res['c'] if isinstance(res['c'], str) else 'done'}")
    return lines


def _markdown(res, cmd) -> str:
    cfg = res["config"]
    out = ["## Likelihood displacement, where the mass goes, priority (dpo-sims study displacement)", ""]
    if "chosen_logp_change" in res:
        betas = cfg["betas"]
        out += ["### (a) change of E log π(y_w|x) over DPO (population / empirical, nats)", "",
                "| objective | " + " | ".join(f"β = {b:g}" for b in betas) + " | max abs L_pop − L_emp |",
                "|---|" + "---|" * (len(betas) + 1)]
        for n, row in res.get("a", {}).get("per_objective", {}).items():
            cells = [f"{_fmt(row[_beta_key(b)]['population'])} / {_fmt(row[_beta_key(b)]['empirical'])}"
                     for b in betas]
            out.append(f"| {n} | " + " | ".join(cells) +
                       f" | {_fmt(res['max_abs_pop_emp_loss']['per_objective'][n], 2)} |")
        out.append("")
    if "d" in res:
        betas = cfg["betas"]
        out += ["### (d) priority: τ_weak / τ_strong (population / empirical)", "",
                "| objective | " + " | ".join(f"β = {b:g}" for b in betas) + " |", "|---|" + "---|" * len(betas)]
        for n, row in res["d"]["per_objective"].items():
            cells = [f"{_fmt(row['population'][_beta_key(b)]['ratio_weak_over_strong'])} / "
                     f"{_fmt(row['empirical'][_beta_key(b)]['ratio_weak_over_strong'])}" for b in betas]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    if res.get("skipped"):
        out += ["Skipped (no population layer): " + ", ".join(sorted(res["skipped"])), ""]
    if "c" in res:
        out += [f"(c) multi-position responses: {res['c'] if isinstance(res['c'], str) else 'see the json'}", ""]
    out.append(f"Command: `{cmd}` ({res['seconds']} s).")
    return "\n".join(out) + "\n"


def _clean(o):
    """JSON-safe: NumPy → Python, NaN/inf → None."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o
