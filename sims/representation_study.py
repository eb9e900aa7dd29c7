"""``dpo-sims study representation``: what a trainable representation ``x = A φ`` changes (docs/theory.md §10).

The engine is :mod:`dynamics.representation` (population: exact V-token layer pulled back through
``M = W A``; empirical: ``jax.grad`` through ``(W, A)``). One model serves parts 1, 2 and 4:
``φ ~`` :meth:`dynamics.GaussianPreference.from_angles` (``d_φ = d``, ``σ`` shared), ``A_0 = I``,
``V = 2`` with the shared token pair ``(0, 1)`` (the paper's margin model), ``W_ref = W_0`` small random.

1. alignment by DPO (sigmoid, head and ``A`` trained): distinguishability, concentration and trace of
   the law of ``A φ`` against steps (population; empirical dots at ``N``);
2. endogenous C5: flipped-label DPO (the head's pair reversed, reference = the model it starts from)
   from the base model and from models aligned for several steps, at several β; steps until the
   policy's original-label accuracy falls below 1/2 (:func:`crossing_step`) and the misalignment loss
   after a fixed number of steps; beside it the same run with ``A`` frozen at the aligned ``A`` and the
   frozen-embedding surrogate :func:`dynamics.theory.c5_misalignment` at ``κ`` = the learned
   distinguishability ratio (:func:`kappa_of`);
3. displacement through shared features (``V = 3``: " Yes", " No", " Never"): "No over Never" trained,
   ``E π(Yes|x)`` with ``lr_adapter = 0`` and ``> 0``;
4. priority in depth: ``K = 3`` behaviours of different distinguishability, per-behaviour loss and the
   learning times of :func:`sims.displacement.learning_times` with ``A`` trained and frozen, against the
   order the paper predicts (more distinguishable first; :func:`dynamics.priority_gap`).

Writes ``DIR/representation.json``, ``DIR/representation.md`` and ``DIR/representation_<part>.png``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .displacement import _clean, _plt, learning_times, max_abs_gap, parse_parts as _parse_parts

__all__ = ["PARTS", "CONFIG", "config", "parse_parts", "crossing_step", "kappa_of", "predicted_order",
           "run_representation"]

PARTS = ("1", "2", "3", "4")
TOKENS3 = (" Yes", " No", " Never")

#: the full run's settings; ``"quick"`` holds ``--quick``'s overrides. Units: steps, nats.
CONFIG = {
    "d": 4,
    "sigma": 0.8,
    "distinguishability": [1.0, 0.6],
    "angle_deg": 60.0,
    "w0_scale": 0.1,
    "beta": 1.0,
    "lr": 0.1,  # lr_head = lr_adapter (GD) of alignment (part 1) and of part 4
    "align_steps": 200,
    "record_every": 10,
    "misalign_from": [0, 50, 100, 200],  # alignment steps of the models misaligned (0: the base model)
    "misalign_betas": [0.2, 1.0],
    "misalign_steps": 200,
    "misalign_lr": 0.5,
    "fine_record_every": 1,  # parts 2 and 4 (steps until flip, learning times)
    "p3_d": 2,
    "p3_distinguishability": 2.0,
    "p3_steps": 100,
    "p3_lr": 0.5,
    "p3_lr_adapter": 0.5,
    "p4_distinguishability": [0.5, 1.0, 2.0],
    "p4_steps": 200,
    "fraction": 0.5,
    "n": 200_000,
    "n_eval": 2048,
    "seed": 0,
    "quick": {
        "align_steps": 60,
        "record_every": 5,
        "misalign_from": [0, 20, 60],
        "misalign_steps": 60,
        "p3_steps": 40,
        "p4_steps": 60,
        "n": 20_000,  # quick: N = 2·10⁴ (the full run: 2·10⁵)
    },
}


def _usage_error(msg):
    from .cli import UsageError

    return UsageError(msg)


def config(quick: bool = False) -> dict:
    """The study's settings: :data:`CONFIG` with ``--quick``'s overrides when ``quick``."""
    cfg = {k: v for k, v in CONFIG.items() if k != "quick"}
    if quick:
        cfg.update(CONFIG["quick"])
    cfg["quick"] = bool(quick)
    return cfg


def parse_parts(parts) -> tuple:
    """``None`` (every part), ``"1,2"`` or a sequence → a tuple in :data:`PARTS` order.

    Raises:
      UsageError: an unknown part (one line, naming the choices).
    """
    return _parse_parts(parts, PARTS)


# ============================================================================ analysis (pure NumPy)
def crossing_step(step, curve, threshold: float = 0.5):
    """First recorded step where ``curve < threshold`` (NaN: never), linear interpolation not applied.

    Args:
      step: ``(T,)`` recorded steps. curve: ``(..., T)`` (e.g. the policy's original-label accuracy).
      threshold: scalar.

    Returns:
      ``(...)`` float array — :func:`dynamics.theory.first_step_below`, the package's one convention.

    Raises:
      ValueError: ``curve``'s last axis does not match ``step``.

    Source: docs/theory.md §4.5 (steps until the policy's accuracy falls below 1/2).
    """
    from dynamics.theory import first_step_below

    curve = np.asarray(curve, np.float64)
    if curve.shape[-1] != np.shape(step)[0]:
        raise ValueError(f"curve has shape {curve.shape}; expected (..., T={np.shape(step)[0]})")
    return np.asarray(first_step_below(curve, threshold, np.asarray(step)), np.float64)


def kappa_of(before, after, weights=None) -> float:
    """The C5 separation scale ``κ`` that the learned embedding reaches: ``Σ_k ω_k Δ_k(after)/Δ_k(before)``.

    κ-scaling (:func:`dynamics.theory.c5_scale_separation`) multiplies every distinguishability by one κ
    and keeps the covariances; a learned ``A`` scales each behaviour by its own ratio and changes the
    covariances too, so this weighted mean ratio is the surrogate's κ, not an exact map.

    Raises:
      ValueError: shapes that differ or a distinguishability ≤ 0 before.

    Source: docs/theory.md §4.5, §10.2.
    """
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"before {before.shape} and after {after.shape} must be the same (K,) shape")
    if np.any(before <= 0):
        raise ValueError("distinguishability before must be > 0 for every behaviour")
    w = np.full(before.shape, 1.0 / before.size) if weights is None else np.asarray(weights, np.float64)
    return float(np.sum(w * after / before) / np.sum(w))


def predicted_order(distinguishability) -> list:
    """Behaviours in the order the paper predicts they are learned: most distinguishable first."""
    return [int(i) for i in np.argsort(-np.asarray(distinguishability, np.float64), kind="stable")]


def observed_order(tau) -> list:
    """Behaviours sorted by learning time (NaN, never learned, last)."""
    tau = np.asarray(tau, np.float64)
    return [int(i) for i in np.argsort(np.where(np.isnan(tau), np.inf, tau), kind="stable")]


# ============================================================================ model
def _model(cfg, distinguishability, vocab_size=2, pairs=None, d=None):
    """``(dist, head, rep)``: φ ~ ``from_angles`` (dimension ``d``, default ``cfg["d"]``), ``W_ref = W_0`` of
    scale ``w0_scale`` (seed ``cfg["seed"]``), ``A_0 = I`` (``A_ref = A_0``)."""
    import jax
    import jax.numpy as jnp

    import dynamics as dd

    d = cfg["d"] if d is None else d
    dist = dd.GaussianPreference.from_angles(distinguishability, angles_deg=cfg["angle_deg"], d=d, sigma=cfg["sigma"])
    dtype = jnp.result_type(float)
    w0 = cfg["w0_scale"] * jax.random.normal(jax.random.key(cfg["seed"]), (vocab_size, d), dtype)
    head = dd.Head.create(w0, w0, pairs=pairs)
    rep = dd.Representation.create(jnp.eye(d, dtype=dtype))
    return dist, head, rep


def _pop(dist, head, rep, *, steps, record_every, beta, lr_head, lr_adapter):
    from dynamics.representation import representation_population_trajectory

    return representation_population_trajectory(dist, head=head, representation=rep, loss_type="sigmoid", beta=beta,
                                                lr_head=lr_head, lr_adapter=lr_adapter, steps=steps,
                                                record_every=record_every)


def _props(tr):
    return {k: np.asarray(tr.metrics[k]) for k in ("distinguishability", "concentration", "cov_trace")}


def _original_accuracy(dist, tr):
    """``(T,)`` policy accuracy on the original labels of ``dist`` (pair (0, 1)) of each recorded ``M = W A``."""
    import jax
    import jax.numpy as jnp

    from dynamics.population import gaussian_accuracy

    m = jnp.einsum("tvd,tde->tve", tr.w, tr.a)
    return np.asarray(jax.vmap(lambda mm: gaussian_accuracy(dist, mm[0] - mm[1])[0])(m))


# ============================================================================ parts
def _part1(cfg, key):
    from dynamics.representation import representation_empirical_trajectory

    dist, head, rep = _model(cfg, cfg["distinguishability"])
    kw = dict(steps=cfg["align_steps"], record_every=cfg["record_every"], beta=cfg["beta"])
    pop = _pop(dist, head, rep, lr_head=cfg["lr"], lr_adapter=cfg["lr"], **kw)
    emp, _ = representation_empirical_trajectory(dist, key, head=head, representation=rep, loss_type="sigmoid",
                                                 beta=cfg["beta"], lr_head=cfg["lr"], lr_adapter=cfg["lr"],
                                                 steps=cfg["align_steps"], record_every=cfg["record_every"],
                                                 n=cfg["n"], n_eval=cfg["n_eval"])
    pp, pe = _props(pop), _props(emp)
    res = {"steps": np.asarray(pop.steps), "population": pp, "empirical": pe,
           "loss_population": np.asarray(pop.loss_total), "loss_empirical": np.asarray(emp.loss_total),
           "accuracy_population": _original_accuracy(dist, pop),
           "max_abs_pop_emp_loss": {"max": max_abs_gap(pop.loss_total, emp.loss_total), "n": cfg["n"],
                                    "over": "every recorded alignment step"},
           "max_abs_pop_emp_distinguishability": max_abs_gap(pp["distinguishability"], pe["distinguishability"])}
    return res, (dist, head, rep, pop)


def _misalign(dist, w, a, cfg, beta, lr_adapter):
    import dynamics as dd

    head = dd.Head.create(w, w, pairs=((1, 0),) * dist.num_behaviors)  # the pair reversed: flipped labels
    rep = dd.Representation.create(a)  # reference = the model it starts from
    tr = _pop(dist, head, rep, steps=cfg["misalign_steps"], record_every=cfg["fine_record_every"], beta=beta,
              lr_head=cfg["misalign_lr"], lr_adapter=lr_adapter)
    acc = _original_accuracy(dist, tr)
    return {"steps_until_flip": float(crossing_step(np.asarray(tr.steps), acc)),
            "loss_end": float(np.asarray(tr.loss_total)[-1]), "loss": np.asarray(tr.loss_total),
            "original_accuracy": acc, "steps": np.asarray(tr.steps)}


def _part2(cfg, p1, model):
    from dynamics.theory import c5_misalignment

    dist, _, _, pop = model
    steps = list(np.asarray(pop.steps))
    d0 = p1["population"]["distinguishability"][0]
    weights = np.asarray(pop.weights)
    rows = {}
    for s in cfg["misalign_from"]:
        i = steps.index(s)
        w, a = pop.w[i], pop.a[i]
        kappa = kappa_of(d0, p1["population"]["distinguishability"][i], weights)
        row = {"kappa": kappa, "distinguishability": p1["population"]["distinguishability"][i].tolist(),
               "aligned_accuracy": float(p1["accuracy_population"][i])}
        for b in cfg["misalign_betas"]:
            bk = f"beta={b:g}"
            row[bk] = {"trainable_A": _misalign(dist, w, a, cfg, b, cfg["misalign_lr"]),
                       "frozen_A": _misalign(dist, w, a, cfg, b, 0.0)}
            if s > 0:
                sur = c5_misalignment(dist, kappa, beta=b, lr=cfg["misalign_lr"], steps=cfg["misalign_steps"],
                                      align_steps=int(s), align_lr=cfg["lr"], align_beta=cfg["beta"])
                row[bk]["kappa_surrogate"] = {"steps_until_flip": float(sur.steps_until_flip),
                                              "loss_end": float(np.asarray(sur.loss)[-1]),
                                              "loss": np.asarray(sur.loss)}
        rows[f"align_steps={s}"] = row
    base, last = rows[f"align_steps={cfg['misalign_from'][0]}"], rows[f"align_steps={cfg['misalign_from'][-1]}"]
    summary = {f"beta={b:g}": {"base": base[f"beta={b:g}"]["trainable_A"]["steps_until_flip"],
                               "aligned": last[f"beta={b:g}"]["trainable_A"]["steps_until_flip"]}
               for b in cfg["misalign_betas"]}
    return {"per_alignment": rows, "steps_until_flip": summary,
            "note": "kappa surrogate: c5_misalignment on the law of A_0 phi with every distinguishability x kappa "
                    "(covariances kept) and a head aligned from W = 0; the learned A also changes the covariances "
                    "and the head starts from W_0, so the surrogate does not map exactly: frozen_A (misalignment "
                    "from the aligned (W, A) with lr_adapter = 0) is the clean comparison"}


def _part3(cfg):
    dist, head, rep = _model(cfg, [cfg["p3_distinguishability"]], vocab_size=3, pairs=((1, 2),), d=cfg["p3_d"])
    out = {}
    for label, lra in (("lr_adapter=0", 0.0), (f"lr_adapter={cfg['p3_lr_adapter']:g}", cfg["p3_lr_adapter"])):
        tr = _pop(dist, head, rep, steps=cfg["p3_steps"], record_every=cfg["record_every"], beta=cfg["beta"],
                  lr_head=cfg["p3_lr"], lr_adapter=lra)
        probs = np.asarray(tr.metrics["probs"])[:, 0, :]  # (T, V)
        out[label] = {"steps": np.asarray(tr.steps), "probs": probs, "p_yes_start": float(probs[0, 0]),
                      "p_yes_end": float(probs[-1, 0]), "p_yes_change": float(probs[-1, 0] - probs[0, 0]),
                      "w_yes_change": float(np.linalg.norm(np.asarray(tr.w)[-1, 0] - np.asarray(tr.w)[0, 0]))}
    return {"tokens": list(TOKENS3), "runs": out}


def _part4(cfg):
    import dynamics as dd

    delta = cfg["p4_distinguishability"]
    dist, head, rep = _model(cfg, delta)
    gap = np.asarray(dd.priority_gap(dist.preference_direction))
    out = {"distinguishability": delta, "priority_gap": gap, "predicted_order": predicted_order(delta)}
    for label, lra in (("trainable_A", cfg["lr"]), ("frozen_A", 0.0)):
        tr = _pop(dist, head, rep, steps=cfg["p4_steps"], record_every=cfg["fine_record_every"], beta=cfg["beta"],
                  lr_head=cfg["lr"], lr_adapter=lra)
        loss = np.asarray(tr.metrics["loss"])
        tau = learning_times(np.asarray(tr.steps), loss, cfg["fraction"])
        order = observed_order(tau)
        out[label] = {"steps": np.asarray(tr.steps), "loss": loss, "learning_times": tau, "observed_order": order,
                      "loss_drop": loss[0] - loss[-1], "loss_min_step": np.asarray(tr.steps)[np.argmin(loss, axis=0)],
                      "order_as_predicted": order == out["predicted_order"],
                      "distinguishability_end": np.asarray(tr.metrics["distinguishability"])[-1]}
    return out


# ============================================================================ figures
def _fig1(cfg, r, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    t = r["steps"]
    for ax, name in zip(axes, ("distinguishability", "concentration", "cov_trace")):
        for k in range(r["population"][name].shape[1]):
            line, = ax.plot(t, r["population"][name][:, k], label=f"behaviour {k} (population)")
            ax.plot(t, r["empirical"][name][:, k], "o", ms=3, color=line.get_color())
        ax.set_title(f"{name} of x = Aφ (dots: empirical, N = {cfg['n']:,})")
        ax.set_xlabel("alignment step (sigmoid, W and A trained)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig2(cfg, r, path):
    plt = _plt()
    betas = cfg["misalign_betas"]
    fig, axes = plt.subplots(1, len(betas), figsize=(6 * len(betas), 4), squeeze=False)
    for ax, b in zip(axes[0], betas):
        bk = f"beta={b:g}"
        for s, row in r["per_alignment"].items():
            line, = ax.plot(row[bk]["trainable_A"]["steps"], row[bk]["trainable_A"]["original_accuracy"],
                            label=f"{s} (κ = {row['kappa']:.2f})")
            ax.plot(row[bk]["frozen_A"]["steps"], row[bk]["frozen_A"]["original_accuracy"], ls="--",
                    color=line.get_color())
        ax.axhline(0.5, color="0.5", ls=":")
        ax.set_title(f"misalignment β = {b:g}: original-label policy accuracy (dashed: A frozen)")
        ax.set_xlabel("misalignment step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig3(cfg, r, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, run), ls in zip(r["runs"].items(), ("--", "-")):
        for v, tok in enumerate(TOKENS3):
            ax.plot(run["steps"], run["probs"][:, v], ls=ls, color=f"C{v}", label=f"π({tok.strip()}), {label}")
    ax.set_title('train " No" over " Never" (population): E π(y|x)')
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig4(cfg, r, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, label in zip(axes, ("trainable_A", "frozen_A")):
        run = r[label]
        for k, dk in enumerate(r["distinguishability"]):
            ax.plot(run["steps"], run["loss"][:, k], label=f"behaviour {k} (Δ = {dk:g}), τ = {run['learning_times'][k]:g}")
        ax.set_title(f"per-behaviour loss, {label} (population)")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ the study
def run_representation(out_dir, *, quick: bool = False, parts=None, log=None) -> dict:
    """Run the representation study; print its key numbers; write ``representation.json``/``.md`` and figures.

    Args:
      out_dir: output folder (created). quick: the small config (:data:`CONFIG` ``"quick"``).
      parts: ``None`` (all of :data:`PARTS`), ``"1,2"`` or a sequence of part names.
      log: ``str → None`` progress sink (default: stderr).

    Returns:
      The dict written to ``representation.json``: ``distinguishability_before`` / ``_after`` (``(K,)``,
      part 1, population), ``misalign_steps_base`` / ``misalign_steps_aligned`` (``{"beta=…": steps}``,
      NaN → null: never within the run), ``max_abs_pop_emp_loss`` (``{"max", "n"}``), ``"1"`` … ``"4"``
      (the parts run), ``config``, ``seconds``, ``command``.

    Raises:
      UsageError: an unknown part or an ``out_dir`` that is not a folder.

    Source: docs/theory.md §10 (model), §4.5 (C5), §4.4 (priority); Im & Li 2024.
    """
    import jax

    parts = parse_parts(parts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise _usage_error(f"--out {out_dir} exists and is not a folder; pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    cfg = config(quick)
    key = jax.random.key(cfg["seed"])
    res = {"parts": list(parts), "quick": cfg["quick"]}
    if "1" in parts or "2" in parts:
        log("# representation (1): alignment, population and empirical")
        p1, model = _part1(cfg, key)
        res["distinguishability_before"] = p1["population"]["distinguishability"][0]
        res["distinguishability_after"] = p1["population"]["distinguishability"][-1]
        res["max_abs_pop_emp_loss"] = p1["max_abs_pop_emp_loss"]
        if "1" in parts:
            res["1"] = p1
            _fig1(cfg, p1, out / "representation_1.png")
        if "2" in parts:
            log("# representation (2): misalignment from the base and aligned models")
            p2 = _part2(cfg, p1, model)
            res["2"] = p2
            res["misalign_steps_base"] = {bk: v["base"] for bk, v in p2["steps_until_flip"].items()}
            res["misalign_steps_aligned"] = {bk: v["aligned"] for bk, v in p2["steps_until_flip"].items()}
            _fig2(cfg, p2, out / "representation_2.png")
    if "3" in parts:
        log("# representation (3): displacement through shared features")
        res["3"] = _part3(cfg)
        _fig3(cfg, res["3"], out / "representation_3.png")
    if "4" in parts:
        log("# representation (4): priority with a trainable A")
        res["4"] = _part4(cfg)
        _fig4(cfg, res["4"], out / "representation_4.png")
    res["config"] = cfg
    res["seconds"] = round(time.time() - t0, 1)
    cmd = f"dpo-sims study representation{' --quick' if quick else ''} --out {out_dir}"
    res["command"] = cmd
    clean = _clean(res)
    (out / "representation.json").write_text(json.dumps(clean, indent=1, allow_nan=False))
    (out / "representation.md").write_text(_markdown(clean, cmd))
    for line in _headline(clean):
        print(line)
    print(f"# representation: wrote {out / 'representation.json'}, {out / 'representation.md'} in {res['seconds']} s")
    return clean


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, list):
        return ", ".join(_fmt(x, digits) for x in v)
    return f"{v:.{digits}g}"


def _headline(res):
    lines = []
    if "distinguishability_before" in res:
        lines.append(f"# representation (1) distinguishability {_fmt(res['distinguishability_before'])} -> "
                     f"{_fmt(res['distinguishability_after'])}; max |L_pop - L_emp| (N = "
                     f"{res['max_abs_pop_emp_loss']['n']:,}) = {_fmt(res['max_abs_pop_emp_loss']['max'])}")
    if "misalign_steps_base" in res:
        for bk in res["misalign_steps_base"]:
            lines.append(f"# representation (2) {bk}: steps until flip base {_fmt(res['misalign_steps_base'][bk])}, "
                         f"aligned {_fmt(res['misalign_steps_aligned'][bk])}")
    if "3" in res:
        for label, run in res["3"]["runs"].items():
            lines.append(f"# representation (3) {label}: pi(Yes) {run['p_yes_start']:.4f} -> {run['p_yes_end']:.4f}")
    if "4" in res:
        for label in ("trainable_A", "frozen_A"):
            lines.append(f"# representation (4) {label}: order {res['4'][label]['observed_order']} (predicted "
                         f"{res['4']['predicted_order']})")
    return lines


def _markdown(res, cmd) -> str:
    cfg = res["config"]
    out = ["## A trainable representation (dpo-sims study representation)", ""]
    if "1" in res:
        p = res["1"]["population"]
        out += ["### (1) alignment: properties of x = Aφ (population; start → end)", "",
                "| behaviour | distinguishability | concentration | cov_trace |", "|---|---|---|---|"]
        for k in range(len(res["distinguishability_before"])):
            out.append(f"| {k} | {_fmt(p['distinguishability'][0][k])} → {_fmt(p['distinguishability'][-1][k])} | "
                       f"{_fmt(p['concentration'][0][k])} → {_fmt(p['concentration'][-1][k])} | "
                       f"{_fmt(p['cov_trace'][0][k])} → {_fmt(p['cov_trace'][-1][k])} |")
        out += ["", f"max |L_pop − L_emp| over the run: {_fmt(res['max_abs_pop_emp_loss']['max'])} nats "
                f"(N = {res['max_abs_pop_emp_loss']['n']:,}).", ""]
    if "2" in res:
        out += ["### (2) misalignment: steps until the original-label policy accuracy < 1/2 / loss after "
                f"{cfg['misalign_steps']} steps", "",
                "| from | κ | β | trainable A | frozen A | κ surrogate |", "|---|---|---|---|---|---|"]
        for s, row in res["2"]["per_alignment"].items():
            for b in cfg["misalign_betas"]:
                r = row[f"beta={b:g}"]
                cells = [f"{_fmt(r[m]['steps_until_flip'])} / {_fmt(r[m]['loss_end'])}" if m in r else "—"
                         for m in ("trainable_A", "frozen_A", "kappa_surrogate")]
                out.append(f"| {s} | {_fmt(row['kappa'])} | {b:g} | " + " | ".join(cells) + " |")
        out += ["", "— in a step column: no flip within the run. " + res["2"]["note"] + ".", ""]
    if "3" in res:
        out += ['### (3) train " No" over " Never": E π(" Yes"|x) start → end (population)', ""]
        for label, run in res["3"]["runs"].items():
            out.append(f"- {label}: {run['p_yes_start']:.4f} → {run['p_yes_end']:.4f} "
                       f"(‖ΔW_Yes‖ = {run['w_yes_change']:.2g})")
        out.append("")
    if "4" in res:
        r = res["4"]
        out += ["### (4) priority with K = 3 (population)", "",
                f"Distinguishability {r['distinguishability']}; predicted order {r['predicted_order']}.", "",
                "| run | learning times τ_k | loss drop L_k(0) − L_k(T) (nats) | step of min L_k | order | as predicted |",
                "|---|---|---|---|---|---|"]
        for label in ("trainable_A", "frozen_A"):
            out.append(f"| {label} | {_fmt(r[label]['learning_times'])} | {_fmt(r[label]['loss_drop'])} | "
                       f"{_fmt(r[label]['loss_min_step'])} | {r[label]['observed_order']} | "
                       f"{r[label]['order_as_predicted']} |")
        out.append("")
    out.append(f"Command: `{cmd}` ({res['seconds']} s).")
    return "\n".join(out) + "\n"
