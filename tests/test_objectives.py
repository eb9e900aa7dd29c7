"""Objectives on log-probabilities (dynamics.losses.objective_loss, docs/theory.md §8).

Every objective against an independent float64 NumPy re-implementation written line by line from its
source (TRL's dpo_trainer.py ``_compute_loss`` at huggingface/trl@f2cd577, the legacy ``dpo_loss`` at
a68fb89 for cdpo / rpo, cpo_trainer.py, orpo_trainer.py, kto_trainer.py; the DPOP and β-DPO papers /
reference code), in values and in gradients (central finite differences of the NumPy code).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from dynamics import losses as L

BETA = 0.7


# ------------------------------------------------------------------ NumPy references (from the sources)
def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return special.expit(x)


def np_scores(chosen_logratios, rejected_logratios, hp):
    """TRL dpo_trainer.py: the f-divergence block that turns log-ratios into scores."""
    kind = hp.get("f_divergence_type", "reverse_kl")
    if kind == "reverse_kl":
        return chosen_logratios, rejected_logratios
    if kind == "forward_kl":
        return -np.exp(-chosen_logratios), -np.exp(-rejected_logratios)
    if kind == "js_divergence":
        return logsigmoid(chosen_logratios), logsigmoid(rejected_logratios)
    a = hp.get("f_alpha_divergence_coef", 0.5)
    if abs(a - 1.0) < 1e-6:
        return chosen_logratios, rejected_logratios
    coef = 1.0 / (a - 1.0)
    t_c = np.minimum((a - 1.0) * chosen_logratios, 80.0)
    t_r = np.minimum((a - 1.0) * rejected_logratios, 80.0)
    return np.exp(t_c) * coef, np.exp(t_r) * coef


def np_log1mexp(x):
    t = -0.6931471805599453
    return np.where(x < t, np.log1p(-np.exp(np.minimum(x, t))), np.log(-np.expm1(np.maximum(x, t))))


def np_nll(c, lengths):
    """F.cross_entropy over the chosen tokens of the batch: the token mean (single token: −c per pair)."""
    if lengths is None:
        return -c
    lc = np.broadcast_to(lengths[0], c.shape)
    return np.broadcast_to(-c.sum(-1, keepdims=True) / lc.sum(-1, keepdims=True), c.shape)


def np_objective(name, c, r, cr, rr, beta, hp, lengths=None):
    """Per-pair loss (pairs on the last axis), written from the source of each objective."""
    ls = hp.get("label_smoothing", 0.0)
    lc_len, lr_len = (1.0, 1.0) if lengths is None else lengths
    chosen_logratios, rejected_logratios = c - cr, r - rr
    chosen_scores, rejected_scores = np_scores(chosen_logratios, rejected_logratios, hp)
    delta_score = chosen_scores - rejected_scores
    if name == "sigmoid":
        return -logsigmoid(beta * delta_score)
    if name == "hinge":
        return np.maximum(0.0, 1 - beta * delta_score)
    if name == "ipo":
        ipo_delta = chosen_scores / np.maximum(lc_len, 1.0) - rejected_scores / np.maximum(lr_len, 1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        qw, log_qw, log_pw = sigmoid(beta * delta_score), logsigmoid(beta * delta_score), np.log1p(-ls)
        ql, log_ql, log_pl = sigmoid(-beta * delta_score), logsigmoid(-beta * delta_score), np.log(ls)
        return qw * (log_qw - log_pw) + ql * (log_ql - log_pl)
    if name == "nca_pair":
        cw, rw = beta * chosen_scores, beta * rejected_scores
        return -logsigmoid(cw) - 0.5 * logsigmoid(-cw) - 0.5 * logsigmoid(-rw)
    if name == "robust":
        clean = -(1 - ls) * logsigmoid(beta * delta_score)
        flipped = -ls * logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * ls)
    if name == "bco_pair":
        d = hp.get("bco_delta", 0.0)
        return -logsigmoid(beta * chosen_scores - d) - logsigmoid(-(beta * rejected_scores - d))
    if name == "sppo_hard":
        return (chosen_scores - 0.5 / beta) ** 2 + (rejected_scores + 0.5 / beta) ** 2
    if name == "aot":
        delta = np.sort(c - r, axis=-1) - np.sort(cr - rr, axis=-1)
        return -logsigmoid(beta * delta) * (1 - ls) - logsigmoid(-beta * delta) * ls
    if name == "aot_unpaired":
        delta = np.sort(chosen_logratios, axis=-1) - np.sort(rejected_logratios, axis=-1)
        return -logsigmoid(beta * delta) * (1 - ls) - logsigmoid(-beta * delta) * ls
    if name == "apo_zero":
        return (1 - sigmoid(beta * chosen_logratios)) + sigmoid(beta * rejected_logratios)
    if name == "apo_down":
        return sigmoid(beta * chosen_logratios) + (1 - sigmoid(beta * delta_score))
    if name == "discopop":
        logits = delta_score * beta
        mod = sigmoid(logits / hp.get("discopop_tau", 0.05))
        return -logsigmoid(logits) * (1 - mod) + np.exp(-logits) * mod
    if name == "sft":
        return np_nll(c, lengths)
    if name == "sigmoid_norm":
        delta = chosen_scores / np.maximum(lc_len, 1.0) - rejected_scores / np.maximum(lr_len, 1.0)
        return -logsigmoid(beta * delta)
    if name == "cdpo":  # legacy TRL 'sigmoid' with label_smoothing
        return -logsigmoid(beta * delta_score) * (1 - ls) - logsigmoid(-beta * delta_score) * ls
    if name == "rpo":  # legacy TRL: losses + rpo_alpha * nll_loss
        return -logsigmoid(beta * delta_score) + hp.get("rpo_alpha", 1.0) * np_nll(c, lengths)
    if name in ("cpo", "simpo"):
        if name == "simpo":  # average_log_prob=True
            c_, r_ = c / lc_len, r / lr_len
        else:
            c_, r_ = c, r
        alpha = hp.get("alpha", 0.0)
        if alpha != 0.0:
            cw, rw = (1 - np.exp(c_) ** (-alpha)) / alpha, (1 - np.exp(r_) ** (-alpha)) / alpha
            logits = cw - rw
        else:
            logits = c_ - r_
        if name == "simpo":
            logits = logits - hp.get("simpo_gamma", 0.5) / beta
        losses = -logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls
        return losses + hp.get("cpo_alpha", 1.0 if name == "cpo" else 0.0) * np_nll(c, lengths)
    if name == "orpo":
        c_, r_ = c / lc_len, r / lr_len
        log_odds = (c_ - r_) - (np_log1mexp(c_) - np_log1mexp(r_))
        return np_nll(c, lengths) - beta * logsigmoid(log_odds)
    if name in ("kto", "apo_zero_unpaired"):
        wd, wu = hp.get("desirable_weight", 1.0), hp.get("undesirable_weight", 1.0)
        if name == "kto":
            if hp.get("kto_kl") is not None:
                kl = max(hp["kto_kl"], 0.0)
            else:
                kl = np.maximum((hp["kl_logps"] - hp["ref_kl_logps"]).mean(-1, keepdims=True), 0.0)
            chosen_losses = 1 - sigmoid(beta * (chosen_logratios - kl))
            rejected_losses = 1 - sigmoid(beta * (kl - rejected_logratios))
        else:
            chosen_losses = 1 - sigmoid(beta * chosen_logratios)
            rejected_losses = sigmoid(beta * rejected_logratios)
        # TRL: cat(wd·chosen, wu·rejected).nanmean() over 2N examples = mean over pairs of half the sum
        return (wd * chosen_losses + wu * rejected_losses) / 2
    if name == "dpop":  # Smaug Eq. 3
        lam = hp.get("dpop_lambda", 50.0)
        logits = (c - r) - (cr - rr) - lam * np.maximum(0.0, cr - c)
        return -logsigmoid(beta * logits)
    if name == "beta_dpo":  # junkangwu/beta-DPO trainers.py preference_loss, mode_weight = 0 (no filtering)
        gap = (c - cr) - (r - rr)
        a_used = gap.mean(-1, keepdims=True) if hp.get("beta_dpo_margin") is None else hp["beta_dpo_margin"]
        beta_used = np.maximum(beta * (1 + hp.get("beta_dpo_alpha", 0.6) * (a_used - hp.get("beta_dpo_m0", 0.0))),
                               1e-3)
        return -logsigmoid(beta_used * gap)
    raise KeyError(name)


# --------------------------------------------------------------------------------------- fixtures
#: representative non-default hyper-parameters per objective (so that each one is exercised)
HP = {
    "exo_pair": {"label_smoothing": 0.05},
    "robust": {"label_smoothing": 0.2},
    "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1},
    "bco_pair": {"bco_delta": 0.3},
    "discopop": {"discopop_tau": 0.3},
    "cdpo": {"label_smoothing": 0.15},
    "rpo": {"rpo_alpha": 0.7},
    "cpo": {"label_smoothing": 0.1, "cpo_alpha": 0.6},
    "simpo": {"simpo_gamma": 0.8, "label_smoothing": 0.05, "cpo_alpha": 0.3},
    "kto": {"kto_kl": 0.2, "desirable_weight": 1.3, "undesirable_weight": 0.7},
    "apo_zero_unpaired": {"desirable_weight": 1.3, "undesirable_weight": 0.7},
    "dpop": {"dpop_lambda": 5.0},
    "beta_dpo": {"beta_dpo_alpha": 0.6, "beta_dpo_m0": 0.1},
}


def logps(seed, shape=(3, 7)):
    """Random negative log-probs (single-token answers have log π < 0), float64."""
    rng = np.random.default_rng(seed)
    return [-np.exp(rng.normal(-0.3, 0.8, size=shape)) for _ in range(4)]


def jax_loss(name, c, r, cr, rr, **kw):
    return np.asarray(L.objective_loss(name, c, r, cr, rr, beta=kw.pop("beta", BETA), **kw))


def assert_grad_matches(grads, f, arrays):
    """``grads`` (JAX) against central differences of the NumPy ``f``; round-off scales with max |f|."""
    atol = 2e-7 * max(1.0, float(np.max(np.abs(f(*arrays)))))
    for g, ref in zip(grads, fd_grad(f, arrays)):
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-6, atol=atol)


def fd_grad(f, arrays, step=1e-6):
    """Central differences of ``sum(f(*arrays))`` in every element of every array."""
    out = []
    for i, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [x.copy() for x in arrays]
            minus = [x.copy() for x in arrays]
            plus[i][idx] += step
            minus[i][idx] -= step
            g[idx] = (f(*plus).sum() - f(*minus).sum()) / (2 * step)
        out.append(g)
    return out


# ------------------------------------------------------------------------------------------- tests
def test_registry_covers_trl_and_flags_match_the_sources():
    trl = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # dpo_config.py loss_type
    assert L.TRL_DPO_LOSS_TYPES == trl
    assert set(trl) | {"cdpo", "rpo", "cpo", "simpo", "orpo", "kto", "dpop", "beta_dpo"} <= set(L.OBJECTIVE_NAMES)
    names = L.OBJECTIVE_NAMES
    assert {n for n in names if not L.get_objective(n).needs_reference} == {"sft", "cpo", "simpo", "orpo"}
    assert {n for n in names if L.get_objective(n).batch_level} == {"aot", "aot_unpaired", "kto", "beta_dpo"}
    margin = {n: L.get_objective(n).margin_loss for n in names if L.get_objective(n).margin_loss}
    assert margin == {"sigmoid": "sigmoid", "hinge": "hinge", "ipo": "ipo", "robust": "robust",
                      "sigmoid_norm": "sigmoid", "cdpo": "cdpo"}
    assert set(margin.values()) == set(L.LOSSES)  # every margin-only Loss record is reached
    for n in names:
        rec = L.get_objective(n)
        assert rec.name == n and rec.source
        if rec.trainer != "—":
            assert "huggingface/trl@" in rec.source, n
    assert L.get_objective("discopop").hparams["discopop_tau"] == 0.05  # dpo_config.py default
    assert L.get_objective("simpo").hparams["simpo_gamma"] == 0.5  # cpo_config.py default
    assert L.get_objective("cpo").hparams["cpo_alpha"] == 1.0
    with pytest.raises(ValueError, match="already registered"):
        L._register_objective(L.get_objective("sigmoid"))


@pytest.mark.parametrize("name", L.OBJECTIVE_NAMES)
def test_value_vs_numpy(x64, name):
    c, r, cr, rr = logps(1)
    hp = HP.get(name, {})
    np.testing.assert_allclose(jax_loss(name, c, r, cr, rr, **hp), np_objective(name, c, r, cr, rr, BETA, hp),
                               rtol=1e-12, atol=1e-13)
    # and at the defaults (exo_pair and kto have none that run: see the bad-input test)
    if name not in ("exo_pair", "kto"):
        np.testing.assert_allclose(jax_loss(name, c, r, cr, rr), np_objective(name, c, r, cr, rr, BETA, {}),
                                   rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", L.OBJECTIVE_NAMES)
def test_gradient_vs_finite_differences(x64, name):
    arrays = logps(2, shape=(2, 4))
    hp = dict(HP.get(name, {}))
    if name == "beta_dpo":  # the batch's β is detached: finite differences hold it at its value
        gap = (arrays[0] - arrays[2]) - (arrays[1] - arrays[3])
        frozen = {**hp, "beta_dpo_margin": gap.mean(-1, keepdims=True)}
    else:
        frozen = hp
    f_np = lambda *a: np_objective(name, *a, BETA, frozen)
    grads = jax.grad(lambda *a: jnp.sum(L.objective_loss(name, *a, beta=BETA, **hp)), argnums=(0, 1, 2, 3))(
        *map(jnp.asarray, arrays))
    assert_grad_matches(grads, f_np, arrays)


@pytest.mark.parametrize("kind,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                                       ("alpha_divergence", 1.0 + 1e-8), ("alpha_divergence", 1.8)])
def test_f_divergence_scores_vs_numpy(x64, kind, coef):
    arrays = [0.4 * a for a in logps(3, shape=(2, 5))]  # moderate log-ratios: exp(−ratio) stays O(1)
    hp = {"f_divergence_type": kind, "f_alpha_divergence_coef": coef}
    for name in ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_down",
                 "discopop", "sigmoid_norm", "cdpo", "rpo"):
        hpn = {**hp, **HP.get(name, {})}
        np.testing.assert_allclose(jax_loss(name, *arrays, **hpn), np_objective(name, *arrays, BETA, hpn),
                                   rtol=1e-11, atol=1e-12, err_msg=name)
        # a non-default f-divergence breaks margin-only-ness (α → 1 is reverse_kl again)
        expected = L.get_objective(name).margin_loss if coef == 1.0 + 1e-8 else None
        assert L.objective_margin_loss(name, f_divergence_type=kind, f_alpha_divergence_coef=coef) == expected
    for name in ("sigmoid", "nca_pair"):  # the scores' derivatives (shared by every objective above)
        grads = jax.grad(lambda *a: jnp.sum(L.objective_loss(name, *a, beta=BETA, **hp)), argnums=(0, 1, 2, 3))(
            *map(jnp.asarray, arrays))
        assert_grad_matches(grads, lambda *a: np_objective(name, *a, BETA, hp), arrays)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "simpo", "orpo", "sft", "rpo", "cpo"])
def test_sequence_lengths_vs_numpy(x64, name):
    c, r, cr, rr = (3.0 * a for a in logps(4))
    rng = np.random.default_rng(5)
    lengths = (rng.integers(1, 9, size=c.shape).astype(float), rng.integers(1, 9, size=c.shape).astype(float))
    hp = HP.get(name, {})
    got = np.asarray(L.objective_loss(name, c, r, cr, rr, beta=BETA, lengths=lengths, **hp))
    np.testing.assert_allclose(got, np_objective(name, c, r, cr, rr, BETA, hp, lengths), rtol=1e-12, atol=1e-13)
    if name in ("sft", "rpo", "cpo", "orpo"):  # TRL's token-mean NLL differs from the per-pair −c when lengths vary
        one = np.asarray(L.objective_loss(name, c, r, cr, rr, beta=BETA, **hp))
        assert np.max(np.abs(got - one)) > 1e-3
    # lengths all 1 = the default (for the NLL terms: TRL's token mean over the batch = the mean of −c)
    ones = np.asarray(L.objective_loss(name, c, r, cr, rr, beta=BETA, lengths=1, **hp))
    default = np.asarray(L.objective_loss(name, c, r, cr, rr, beta=BETA, **hp))
    np.testing.assert_allclose(ones.mean(-1), default.mean(-1), rtol=1e-13)
    if name in ("ipo", "sigmoid_norm"):
        np.testing.assert_allclose(ones, default, rtol=1e-13)
    if name in ("ipo", "sigmoid_norm"):
        assert L.objective_margin_loss(name, lengths=lengths) is None
        assert L.objective_margin_loss(name, lengths=1) == L.get_objective(name).margin_loss


@pytest.mark.parametrize("name", L.OBJECTIVE_NAMES)
def test_margin_only_flags(x64, name):
    """margin_loss objectives equal their Loss record's ℓ at h; margin_only ones depend on h alone."""
    c, r, cr, rr = logps(6)
    hp = HP.get(name, {})
    rec = L.get_objective(name)
    base = jax_loss(name, c, r, cr, rr, **hp)
    if rec.margin_loss is not None:
        h = (c - cr) - (r - rr)
        ls = hp.get("label_smoothing", 0.0)
        np.testing.assert_allclose(base, np.asarray(L.loss_fn(rec.margin_loss, h, BETA, ls)), rtol=1e-12, atol=1e-13)
    # two moves that keep h = (c − c_ref) − (r − r_ref) of every pair: shift c and c_ref together, or c and
    # r together, by a different amount t_i > 0 for each pair (keeping log-probs < 0)
    t = np.random.default_rng(60).uniform(0.1, 0.6, size=c.shape)
    moved = [jax_loss(name, c - t, r, cr - t, rr, **hp), jax_loss(name, c - t, r - t, cr, rr, **hp)]
    if rec.margin_only:
        for m in moved:
            np.testing.assert_allclose(m, base, rtol=1e-12, atol=1e-13)
    else:
        assert max(np.max(np.abs(m - base)) for m in moved) > 1e-4


@pytest.mark.parametrize("name", L.OBJECTIVE_NAMES)
def test_batch_level_flag(x64, name):
    """A batch-level objective's loss at pair i moves when another pair j moves; a per-pair one does not."""
    c, r, cr, rr = logps(7, shape=(6,))
    hp = dict(HP.get(name, {}))
    if name == "kto":  # the batch statistic is the KL estimate of the mismatched completions
        rng = np.random.default_rng(8)
        hp = {"kl_logps": -np.exp(rng.normal(size=6)), "ref_kl_logps": -np.exp(rng.normal(size=6)) - 1.0}
    base = jax_loss(name, c, r, cr, rr, **hp)
    c2 = c.copy()
    c2[0] += 3.0  # pair 0 changes (by enough to change the sort order of aot's log-ratios)
    hp2 = dict(hp)
    if name == "kto":
        hp2["kl_logps"] = hp["kl_logps"].copy()
        hp2["kl_logps"][0] += 3.0
    moved = jax_loss(name, c2, r, cr, rr, **hp2)
    others = np.max(np.abs(np.sort(moved)[:-1] - np.sort(base)[:-1])) if name.startswith("aot") else \
        np.max(np.abs(moved[1:] - base[1:]))
    if L.get_objective(name).batch_level:
        assert others > 1e-6
    else:
        assert others == 0.0


def test_loss_type_list_is_the_weighted_sum(x64):
    c, r, cr, rr = logps(9)
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # MPO
    ref = sum(w * np_objective(n, c, r, cr, rr, BETA, {}) for n, w in zip(names, weights))
    np.testing.assert_allclose(jax_loss(names, c, r, cr, rr, loss_weights=weights), ref, rtol=1e-12)
    # TRL's default weights are 1.0; shared hyper-parameters reach the objectives that take them
    ref = np_objective("robust", c, r, cr, rr, BETA, {"label_smoothing": 0.1}) + \
        np_objective("ipo", c, r, cr, rr, BETA, {})
    np.testing.assert_allclose(jax_loss(("robust", "ipo"), c, r, cr, rr, label_smoothing=0.1), ref, rtol=1e-12)


def test_batch_statistics_are_detached(x64):
    """KTO's z_ref and β-DPO's β carry no gradient (as ``.detach()`` in the sources)."""
    c, r, cr, rr = map(jnp.asarray, logps(10, shape=(5,)))
    kl, ref_kl = jnp.asarray(logps(11, shape=(5,))[0]), jnp.asarray(logps(12, shape=(5,))[0]) - 2.0
    g = jax.grad(lambda k: jnp.sum(L.objective_loss("kto", c, r, cr, rr, beta=BETA, kl_logps=k,
                                                    ref_kl_logps=ref_kl)))(kl)
    assert np.all(np.asarray(g) == 0.0)
    # KTO with the mismatched-completion estimate = KTO with z_ref given
    z = max(float(jnp.mean(kl - ref_kl)), 0.0)
    np.testing.assert_allclose(np.asarray(L.objective_loss("kto", c, r, cr, rr, beta=BETA, kl_logps=kl,
                                                           ref_kl_logps=ref_kl)),
                               np_objective("kto", *map(np.asarray, (c, r, cr, rr)), BETA, {"kto_kl": z}),
                               rtol=1e-12)


def test_jit_and_vmap_over_beta(x64):
    c, r, cr, rr = map(jnp.asarray, logps(13))
    f = jax.jit(lambda b: L.objective_loss(["sigmoid", "sft"], c, r, cr, rr, beta=b, loss_weights=[1.0, 0.5]))
    betas = jnp.array([0.2, 1.5])
    got = jax.vmap(f)(betas)
    for i, b in enumerate([0.2, 1.5]):
        ref = np_objective("sigmoid", *map(np.asarray, (c, r, cr, rr)), b, {}) + 0.5 * -np.asarray(c)
        np.testing.assert_allclose(np.asarray(got[i]), ref, rtol=1e-12)


def test_bad_input_one_line_errors():
    c, r, cr, rr = logps(14)

    def err(match, *args, **kw):
        with pytest.raises(ValueError, match=match) as e:
            L.objective_loss(*args, **kw)
        assert "\n" not in str(e.value)

    err(r"unknown loss_type 'sigmod' \(did you mean 'sigmoid'\?\)", "sigmod", c, r, cr, rr, beta=1.0)
    with pytest.raises(ValueError, match=r"unknown loss_type 'kot' \(did you mean 'kto'\?\)"):
        L.get_objective("kot")
    err(r"loss_weights has 2 entries for 3 loss types .*pass one weight per loss_type",
        ["sigmoid", "bco_pair", "sft"], c, r, cr, rr, beta=1.0, loss_weights=[1.0, 1.0])
    err(r"ref_chosen_logps is None but loss_type \['sigmoid'\] needs the reference policy's log-probs; pass",
        ["sigmoid", "sft"], c, r, None, rr, beta=1.0)
    err(r"ref_rejected_logps is None", "ipo", c, r, cr, None, beta=1.0)
    err(r"beta must be > 0, got 0.0; pass a value > 0", "sigmoid", c, r, cr, rr, beta=0.0)
    err(r"beta must be > 0, got -0.5", "simpo", c, r, None, None, beta=-0.5)
    err(r"label_smoothing=0.1 has no effect with loss_type \['sigmoid'\]; it is used by .*'robust'.* drop it",
        "sigmoid", c, r, cr, rr, beta=1.0, label_smoothing=0.1)
    err(r"unknown hyper-parameter 'simpo_gama' \(did you mean 'simpo_gamma'\?\)", "simpo", c, r, None, None,
        beta=1.0, simpo_gama=1.0)
    err(r"label_smoothing must lie in \[0.0, 0.5\)", "robust", c, r, cr, rr, beta=1.0, label_smoothing=0.5)
    err(r"label_smoothing must be > 0 with loss_type 'exo_pair'.*pass label_smoothing=1e-3", "exo_pair",
        c, r, cr, rr, beta=1.0)
    err(r"unknown f_divergence_type 'kl'.*choose one of", "sigmoid", c, r, cr, rr, beta=1.0, f_divergence_type="kl")
    err(r"loss_type 'kto' needs its KL reference point: pass kto_kl=", "kto", c, r, cr, rr, beta=1.0)
    err(r"lengths \(chosen\) must be token counts >= 1", "ipo", c, r, cr, rr, beta=1.0, lengths=0.0)
    err(r"loss_type must be a name or a non-empty list", [], c, r, cr, rr, beta=1.0)
    # reference-free objectives run without the reference log-probs; default-valued extras are accepted
    for n in ("sft", "cpo", "simpo", "orpo"):
        L.objective_loss(n, c, r, beta=1.0, label_smoothing=0.0, f_divergence_type="reverse_kl")


def test_aot_population_limit_is_the_quantile_coupling(x64):
    """docs/theory.md §8.3: the batch mean of ``aot`` → ∫₀¹ ℓ(β d(u)) du with d the difference of quantiles.

    With c − r ~ N(μ₁, s₁²) and c_ref − r_ref ~ N(μ₂, s₂²), d(u) = μ₁ − μ₂ + (s₁ − s₂) Φ⁻¹(u) (scipy quad),
    whereas pairing the draws as they come would give E ℓ(β(A − B)) with A − B ~ N(μ₁ − μ₂, s₁² + s₂²).
    """
    from scipy import integrate, stats

    mu1, s1, mu2, s2, ls, n = 0.4, 1.5, -0.2, 0.6, 0.1, 200_000
    rng = np.random.default_rng(15)
    a, b = rng.normal(mu1, s1, n), rng.normal(mu2, s2, n)
    zero = np.zeros(n)
    batch_mean = float(np.mean(L.objective_loss("aot", a, zero, b, zero, beta=BETA, label_smoothing=ls)))
    ell = lambda x: -(1 - ls) * logsigmoid(BETA * x) - ls * logsigmoid(-BETA * x)
    coupled = integrate.quad(lambda u: ell(mu1 - mu2 + (s1 - s2) * stats.norm.ppf(u)), 0, 1, limit=200)[0]
    independent = integrate.quad(lambda x: ell(x) * stats.norm.pdf(x, mu1 - mu2, np.hypot(s1, s2)),
                                 -40, 40, limit=200)[0]
    assert abs(batch_mean - coupled) < 5e-3
    assert abs(independent - coupled) > 0.05  # the coupling matters (0.09 here, 18× the tolerance)


def test_orpo_is_finite_when_a_log_prob_rounds_to_zero():
    """float32: a chosen log-prob of exactly 0 (p = 1 to working precision, met at the tails of the
    population cubature from an SFT head) made log(1 − p) = −inf and the gradient NaN; the cap at −eps
    keeps both finite, and a representable point is unchanged (value vs NumPy in float64 terms)."""
    c = jnp.asarray([0.0, -0.3], jnp.float32)
    r = jnp.asarray([-2.0, -1.1], jnp.float32)
    f = lambda c: jnp.sum(L.objective_loss("orpo", c, r, beta=0.5))
    val, grad = jax.value_and_grad(f)(c)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))
    lo = lambda a: np.log(-np.expm1(a))
    z = (-0.3 - -1.1) - (lo(-0.3) - lo(-1.1))
    want = 0.3 - 0.5 * -np.log1p(np.exp(-z))
    got = float(L.objective_loss("orpo", c, r, beta=0.5)[1])
    np.testing.assert_allclose(got, want, rtol=1e-6)
