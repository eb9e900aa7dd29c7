"""Interventions and distribution families as sweep axes, and a custom family through the sweep.

Every check compares the stored sweep to an independent computation: direct core calls
(``dynamics.population_trajectory`` / ``dynamics.empirical_trajectory``) on distributions built
here by hand, or closed forms (C1 scaled by 1 − 2ρ under label noise; Φ(Δ/2σ) for an initial head
offset along m̄; accuracy 1/2 for a behaviour whose loss weight is 0; m_kᵀm̄ = ω_k Δ_k²/4).

Budget (2 shared cores): about a minute.
"""
from __future__ import annotations

import json
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from flax import struct

import dynamics as dd
from sims import sweep as sw
from sims.cli import UsageError, main

RTOL, ATOL = 2e-5, 2e-6  # vmapped + fast-compiled vs direct float32 calls
PHI = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _cfg(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _run(tmp_path, text, **kw):
    cfg = sw.load_config(_cfg(tmp_path, text))
    res = sw.run_sweep(cfg, tmp_path / "res.zarr", progress=False, **kw)
    return cfg, xr.open_zarr(res.path).load()


# ----------------------------------------------------------------------------- a custom family
@struct.dataclass
class TwoScalePreference:
    """x = μ + √W (x_g − μ), W ∈ {1 − a, 1 + a} with probability 1/2 each: E[W] = 1, so Cov(x) = Σ.

    A scale mixture with the Gaussian's first two moments (heavier tails as a → 1).
    """

    base: dd.GaussianPreference
    spread: jax.Array

    num_behaviors = property(lambda self: self.base.num_behaviors)
    dim = property(lambda self: self.base.dim)

    def sample(self, key, n):
        kg, kw = jax.random.split(key)
        x, s, beh = self.base.sample(kg, n)
        center = jnp.where((s > 0)[:, None], self.base.mu_pos[beh], self.base.mu_neg[beh])
        w = 1.0 + self.spread * jnp.where(jax.random.bernoulli(kw, 0.5, (n,)), 1.0, -1.0)
        return center + jnp.sqrt(w)[:, None] * (x - center), s, beh

    def gaussian_equivalent(self):
        return self.base


sw.register_family("two_scale", lambda g, p: TwoScalePreference(g, p["scale_spread"]),
                   params={"scale_spread": {"default": 0.5, "low": 0.0, "high": 1.0, "high_open": True}},
                   help="test: Gaussian scale mixture", replace=True)

CUSTOM = """
    seeds = 2
    seed = 3
    [base]
    family = "two_scale"
    d = 3
    n = 96
    n_eval = 128
    steps = 12
    record_every = 4
    lr = 0.2
    beta = 1.5
    [grid]
    scale_spread = [0.0, 0.6, 0.95]
    distinguishability = [0.5, 2.0]
"""


@pytest.mark.slow
def test_custom_family_is_vmapped_through_a_sweep(tmp_path):
    """A user-defined family: its parameter is a grid axis, vmapped; each stored run equals a direct call."""
    cfg, ds = _run(tmp_path, CUSTOM)
    assert cfg.base["family"] == "two_scale" and "scale_spread" in cfg.base and "nu" not in cfg.base
    assert ds.sizes["scale_spread"] == 3 and ds.sizes["distinguishability"] == 2
    np.testing.assert_allclose(ds["scale_spread"].values, [0.0, 0.6, 0.95])
    tol = dict(rtol=RTOL, atol=ATOL)
    common = dict(beta=1.5, lr=0.2, steps=12, record_every=4)
    for j, delta in enumerate([0.5, 2.0]):
        gauss = dd.GaussianPreference.single(delta, 3)
        pop = dd.population_trajectory(gauss, **common)  # the moment-matched prediction, the same for every a
        np.testing.assert_allclose(ds["behavior_distinguishability"].values[:, j, 0], delta, rtol=1e-6)
        for i, a in enumerate([0.0, 0.6, 0.95]):
            for m, v in pop.metrics.items():
                np.testing.assert_allclose(ds[f"population_{m}"].values[i, j], np.asarray(v), **tol, err_msg=m)
            for s in range(2):
                emp = dd.empirical_trajectory(TwoScalePreference(gauss, jnp.asarray(a)), sw.seed_key(3, s),
                                              n=96, n_eval=128, **common)
                for split, metrics in (("train", emp.train), ("eval", emp.eval)):
                    for m, v in metrics.items():
                        np.testing.assert_allclose(ds[m].sel(split=split).values[i, j, s], np.asarray(v), **tol,
                                                   err_msg=f"{split}/{m} a={a}")
    # the family changes the samples: a heavier-tailed law gives other training trajectories
    train = ds["loss"].sel(split="train").values
    assert not np.allclose(train[0], train[2])
    assert not ds["diverged"].values.any()


@struct.dataclass
class _SampleOnly:
    base: dd.GaussianPreference
    num_behaviors = property(lambda self: self.base.num_behaviors)
    dim = property(lambda self: self.base.dim)

    def sample(self, key, n):
        return self.base.sample(key, n)


@struct.dataclass
class _Broken:
    """A family with one deliberate defect (``kind``), for the error tests."""

    base: dd.GaussianPreference
    kind: str = struct.field(pytree_node=False)
    num_behaviors = property(lambda self: self.base.num_behaviors)
    dim = property(lambda self: self.base.dim)

    def sample(self, key, n):
        x, s, beh = self.base.sample(key, n)
        return {"x_narrow": (x[:, :-1], s, beh), "labels_01": (x, (s + 1) / 2, beh),
                "behavior_high": (x, s, beh + 5), "s_2d": (x, s[:, None], beh)}[self.kind]

    def gaussian_equivalent(self):
        return self.base


def _raise(g, p):
    raise RuntimeError("boom in builder")


BROKEN = [
    ("x_narrow", lambda g, p: _Broken(g, "x_narrow"), r"sample\(key, n\) returned x of shape \((\d+), 1\); expected \(n, d\) = \(\1, 2\)"),
    ("labels_01", lambda g, p: _Broken(g, "labels_01"), r"labels s with values \[0.0\]; expected \+1 \(chosen = a\) or -1"),
    ("behavior_high", lambda g, p: _Broken(g, "behavior_high"), r"behavior indices in \[5, 5\]; expected integers in \[0, K\) = \[0, 1\)"),
    ("s_2d", lambda g, p: _Broken(g, "s_2d"), r"returned s \(.*, 1\) and behavior .*; expected \(.*,\) each"),
    ("raises", _raise, r"RuntimeError: boom in builder"),
    ("not_traceable", lambda g, p: _Broken(g, "x_narrow") if float(p["q"]) > 0 else g,
     r"ConcretizationTypeError.*keep them traceable"),
    ("returns_float", lambda g, p: 3.0, r"builder returned float, not a distribution"),
    ("sample_only", lambda g, p: _SampleOnly(g), r"without components\(\) or gaussian_equivalent\(\).*mode = \"empirical\""),
]


@pytest.mark.parametrize("name,build,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_custom_family_is_refused_in_one_line(tmp_path, capsys, name, build, message):
    import re

    sw.register_family(f"broken_{name}", build, params={"q": 1.0} if name == "not_traceable" else None, replace=True)
    cfg = _cfg(tmp_path, f"[base]\nd = 2\nn = 8\nn_eval = 8\nsteps = 2\nfamily = \"broken_{name}\"\n")
    code = main(["sweep", str(cfg), "--out", str(tmp_path / "r.zarr"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "r.zarr").exists()


def test_empirical_only_family_runs_without_analytic_methods(tmp_path):
    sw.register_family("sample_only", lambda g, p: _SampleOnly(g), replace=True)
    tiny = "[base]\nd = 2\nn = 8\nn_eval = 8\nsteps = 2\nfamily = \"sample_only\"\nmode = \"empirical\"\n"
    cfg = sw.load_config(_cfg(tmp_path, tiny))
    ds = xr.open_zarr(sw.run_sweep(cfg, tmp_path / "c.zarr", progress=False).path).load()
    gauss, head = sw.build_distribution(sw.configuration_fields(cfg, ()), d=2)
    emp = dd.empirical_trajectory(gauss, sw.seed_key(0, 0), n=8, n_eval=8, beta=1.0, lr=0.1, steps=2)
    np.testing.assert_allclose(ds["loss"].sel(split="train").values[0], emp.train["loss"], rtol=RTOL, atol=ATOL)
    assert "population_loss" not in ds


def test_register_family_refuses_bad_definitions():
    with pytest.raises(ValueError, match="'lr'.*clashes with the sweep field 'lr'"):
        sw.register_family("clash", lambda g, p: g, params={"lr": 1.0})
    with pytest.raises(ValueError, match="'label_noise'"):
        sw.register_family("clash", lambda g, p: g, params={"label_noise_0": 1.0})
    with pytest.raises(ValueError, match="family 'laplace' is already registered"):
        sw.register_family("laplace", lambda g, p: g)
    with pytest.raises(ValueError, match=r"default.*out of range"):
        sw.register_family("bad_default", lambda g, p: g, params={"bad_q": {"default": 3.0, "high": 1.0}})
    with pytest.raises(ValueError, match="must be a Python identifier"):
        sw.register_family("not a name", lambda g, p: g)
    assert "clash" not in sw.FAMILIES and "bad_default" not in sw.FAMILIES and "bad_q" not in sw.FIELDS


PLUGIN = '''
import jax, jax.numpy as jnp
from flax import struct
from sims.sweep import register_family

@struct.dataclass
class Uniform:
    base: object
    num_behaviors = property(lambda self: self.base.num_behaviors)
    dim = property(lambda self: self.base.dim)
    def sample(self, key, n):  # uniform noise with the Gaussian's isotropic covariance
        kg, ku = jax.random.split(key)
        _, s, beh = self.base.sample(kg, n)
        mu = jnp.where(s[:, None] > 0, self.base.mu_pos[beh], self.base.mu_neg[beh])
        sd = jnp.sqrt(jnp.diagonal(self.base.cov_pos[beh], axis1=-2, axis2=-1))
        return mu + jnp.sqrt(3.0) * sd * jax.random.uniform(ku, mu.shape, minval=-1, maxval=1), s, beh
    def gaussian_equivalent(self):
        return self.base

register_family("plugin_uniform", lambda g, p: Uniform(g), replace=True)
'''


def test_cli_import_registers_a_family(tmp_path, capsys):
    plugin = tmp_path / "my_families.py"
    plugin.write_text(PLUGIN)
    cfg = _cfg(tmp_path, "seeds = 1\n[base]\nfamily = \"plugin_uniform\"\nd = 2\nn = 16\nn_eval = 16\nsteps = 2\n")
    code = main(["sweep", str(cfg), "--out", str(tmp_path / "u.zarr"), "--import", str(plugin), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    ds = xr.open_zarr(tmp_path / "u.zarr")
    assert '"family": "plugin_uniform"' in ds.attrs["config"]
    x = ds["loss"].sel(split="train").values
    assert np.isfinite(x).all() and x[0, 0] == pytest.approx(math.log(2), rel=1e-6)
    digest = json.loads(ds.attrs["config"])["family_code"]["plugin_uniform"]
    assert digest["builder"].endswith(":<lambda>") and len(digest["source_sha256"]) == 64
    capsys.readouterr()
    # the same plugin twice is imported once; rerunning resumes the finished store
    args = ["sweep", str(cfg), "--out", str(tmp_path / "u.zarr"), "--no-progress"]
    assert main(args + ["--import", str(plugin), "--import", str(plugin)]) == 0
    assert "1 resumed" in capsys.readouterr().out
    # an edited plugin is another sweep: refused on the old store (no silent resume of stale results)
    plugin.write_text(PLUGIN.replace("jnp.sqrt(3.0) * sd", "2.0 * jnp.sqrt(3.0) * sd"))
    sw.unregister_family("plugin_uniform")
    sw._IMPORTED.clear()
    assert main(args + ["--import", str(plugin)]) == 2
    assert "family_code" in capsys.readouterr().err
    sw.unregister_family("plugin_uniform")
    with pytest.raises(ValueError, match="shipped family"):
        sw.unregister_family("laplace")
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "v.zarr"), "--no-progress"]) == 2
    assert "--import" in capsys.readouterr().err  # an unregistered family: the hint says how to register it
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "v.zarr"), "--import", str(tmp_path / "nope.py")]) == 2
    assert "--import" in capsys.readouterr().err and not (tmp_path / "v.zarr").exists()
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "v.zarr"), "--import", "no_such_module_xyz"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shipped families
def test_shipped_families_through_the_sweep(tmp_path):
    """family × its parameter: mixture (exact components), Student-t (moment-matched), Laplace."""
    cfg, ds = _run(tmp_path, """
        seeds = 1
        [base]
        mode = "population"
        d = 2
        distinguishability = 1.5
        sigma = 0.7
        steps = 20
        record_every = 10
        lr = 0.5
        [grid]
        family = ["gaussian", "mixture", "student_t", "laplace"]
        mixture_spread = [0.0, 0.9]
        nu = [2.5, 30.0]
    """)
    assert cfg.base["nu"] == 5.0 and cfg.base["mixture_spread"] == 0.5
    loss = ds["population_loss"]
    gauss = dd.GaussianPreference.single(1.5, 2, sigma=0.7)
    common = dict(beta=1.0, lr=0.5, steps=20, record_every=10)
    ref = np.asarray(dd.population_trajectory(gauss, **common).metrics["loss"])
    for fam in ("gaussian", "student_t", "laplace"):  # the moment-matched Gaussian's prediction, for every ν
        np.testing.assert_allclose(loss.sel(family=fam).values, np.broadcast_to(ref, (2, 2, 3)), rtol=1e-5)
    # mixture, spread 0: exactly the Gaussian; spread 0.9: its exact bimodal law, which learns differently
    np.testing.assert_allclose(loss.sel(family="mixture", mixture_spread=0.0).values, np.broadcast_to(ref, (2, 3)),
                               rtol=1e-5)
    mix = dd.GaussianMixturePreference.from_gaussian(gauss, 0.9)
    exact = np.asarray(dd.population_trajectory(mix, **common).metrics["loss"])
    np.testing.assert_allclose(loss.sel(family="mixture", mixture_spread=0.9).values, np.broadcast_to(exact, (2, 3)),
                               rtol=1e-5)
    assert abs(exact[-1] - ref[-1]) > 1e-3


def test_mixture_family_population_matches_large_sample(tmp_path):
    """The mixture's exact analytic layer against full-batch GD on 2^15 of its samples."""
    cfg, ds = _run(tmp_path, """
        seeds = 1
        [base]
        family = "mixture"
        mixture_spread = 0.95
        d = 2
        distinguishability = 1.0
        n = 32768
        n_eval = 32768
        steps = 20
        record_every = 10
        lr = 1.0
    """)
    pop = ds["population_reward_accuracy"].values
    emp = ds["reward_accuracy"].sel(split="eval").values[0]
    # held-out accuracy of the trained head: binomial sd √(1/4n) ≈ 0.003, plus the head's own
    # sampling error; the moment-matched Gaussian predicts Φ(1/2) ≈ 0.69, the mixture ≈ 0.54
    np.testing.assert_allclose(emp[1:], pop[1:], atol=0.015)
    gauss = dd.population_trajectory(dd.GaussianPreference.single(1.0, 2), beta=1.0, lr=1.0, steps=20,
                                     record_every=10).metrics["reward_accuracy"]
    np.testing.assert_allclose(gauss[1:], PHI(0.5), atol=1e-5)
    assert (np.abs(np.asarray(gauss[1:]) - pop[1:]) > 0.1).all()


@pytest.mark.parametrize("text,message", [
    ("[base]\nfamily = \"student_t\"\nnu = 2.0\n", "base.nu: nu = 2.0 is out of range; pass a value > 2"),
    ("[base]\nfamily = \"student_t\"\n[grid]\nnu = [1.5, 5.0]\n", "grid.nu[0]: nu = 1.5 is out of range"),
    ("[base]\nnu = 5.0\n", "base.nu: nu is a parameter of family 'student_t', which this sweep does not use"),
    ("[base]\nfamily = \"mixture\"\nmixture_spread = 1.0\n", "base.mixture_spread: mixture_spread = 1.0 is out of range"),
    ("[base]\nfamily = \"cauchy\"\n", "base.family: unknown value 'cauchy'"),
    ("[base]\nlabel_noise = 0.6\n", "base.label_noise: label_noise = 0.6 is out of range; pass a value in [0, 0.5]"),
    ("[grid]\nlabel_noise = [0.1, -0.1]\n", "grid.label_noise[1]: label_noise = -0.1 is out of range"),
    ("[base]\nloss_weight = -1.0\n", "base.loss_weight: loss_weight = -1.0 is out of range; pass a value >= 0"),
    ("[base]\ndistinguishability = [1.0, 2.0]\nloss_weight = [1.0, 1.0, 1.0]\n",
     "base.loss_weight: has 3 values but distinguishability gives K = 2"),
    ("[base]\ndistinguishability = [1.0, 2.0]\n[grid]\nweight_0 = [0.5, 1.2]\n", "grid.weight_0[1]: weight = 1.2 is out of range"),
    ("[base]\ndistinguishability = [1.0, 2.0]\n[grid]\nweight = [0.5]\n", "grid.weight: sampling weights are swept one "
     "behaviour at a time: use weight_0, weight_1"),
    ("[grid]\nweight_0 = [0.5]\n", "grid.weight_0: sampling weights are swept one behaviour at a time: with one behaviour"),
    ("[base]\ndistinguishability = [1.0, 2.0, 1.0]\n[grid]\nweight_0 = [0.5, 0.7]\nweight_1 = [0.4]\n",
     "weight_0 + weight_1 = 1.1 > 1 for [0.7, 0.4]"),
    ("[base]\ndistinguishability = [1.0, 2.0]\n[grid]\nweight_0 = [0.3, 0.5]\nweight_1 = [0.5]\n",
     "every behaviour's weight is swept, so each combination must sum to 1"),
    ("[base]\ninit_offset = \"far\"\n", "base.init_offset: expected a number"),
])
def test_bad_intervention_and_family_input(tmp_path, capsys, text, message):
    code = main(["sweep", str(_cfg(tmp_path, text)), "--out", str(tmp_path / "r.zarr"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r.zarr").exists()


# ----------------------------------------------------------------------------- interventions
def test_label_noise_axis_scales_the_first_step_and_cancels_at_one_half(tmp_path):
    """C1 with flip rate ρ: δ_1 = (1 − 2ρ) η β m̄, ‖m̄‖ = Δ/2; ρ = 1/2 gives a zero population gradient."""
    cfg, ds = _run(tmp_path, """
        seeds = 2
        [base]
        d = 3
        distinguishability = 2.0
        n = 64
        n_eval = 64
        steps = 6
        lr = 0.3
        beta = 0.8
        [grid]
        label_noise = [0.0, 0.25, 0.5]
    """)
    wc = ds["population_weight_change"].values  # ‖W_t − W_0‖_F = ‖δ_t − δ_0‖/√2
    for i, rho in enumerate([0.0, 0.25, 0.5]):
        np.testing.assert_allclose(wc[i, 1], (1 - 2 * rho) * 0.3 * 0.8 * 1.0 / math.sqrt(2), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(wc[2], 0.0)
    assert (np.diff(ds["population_loss"].values[0]) < 0).all()
    gauss = dd.GaussianPreference.single(2.0, 3)
    for i, rho in enumerate([0.0, 0.25, 0.5]):
        for s in range(2):
            emp = dd.empirical_trajectory(gauss, sw.seed_key(0, s), n=64, n_eval=64, beta=0.8, lr=0.3, steps=6,
                                          label_noise=jnp.asarray([rho]))
            np.testing.assert_allclose(ds["loss"].sel(split="eval").values[i, s], emp.eval["loss"], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(ds["weight_change"].sel(split="train").values[i, s], emp.train["weight_change"],
                                       rtol=RTOL, atol=ATOL)


def test_loss_weight_sampling_weight_and_init_offset_axes(tmp_path):
    """K = 2 orthogonal behaviours: λ_1 = 0 leaves behaviour 1 at accuracy 1/2; ω from weight_0;
    an initial head offset c along m̄ gives reward accuracy Φ(±Δ_k/2σ-type) closed forms at step 0."""
    cfg, ds = _run(tmp_path, """
        seeds = 2
        [base]
        d = 3
        distinguishability = [2.0, 1.0]
        n = 64
        n_eval = 4096
        steps = 4
        lr = 0.5
        [grid]
        loss_weight_1 = [1.0, 0.0]
        weight_0 = [0.2, 0.8]
        init_offset = [-1.0, 0.0, 1.5]
    """)
    assert sw.configuration_fields(cfg, (0, 0, 0))["weight"] == pytest.approx([0.2, 0.8])
    assert sw.configuration_fields(cfg, (0, 1, 0))["weight"] == pytest.approx([0.8, 0.2])
    # m_k = (Δ_k/2) e_k (p = 1/2), m̄ = Σ ω_k m_k: m_kᵀm̄ = ω_k Δ_k²/4
    for j, w0 in enumerate([0.2, 0.8]):
        np.testing.assert_allclose(ds["behavior_projection"].values[0, j, 0], [w0 * 1.0, (1 - w0) * 0.25], rtol=1e-5)
    acc = ds["population_behavior_reward_accuracy"].values  # (λ1, ω0, offset, step, behavior)
    np.testing.assert_allclose(acc[1, :, 1, 1:, 1], 0.5, atol=1e-6)  # λ_1 = 0, start at the reference
    assert (acc[0, :, 1, -1, 1] > 0.52).all()  # λ_1 = 1: behaviour 1 is learned
    # step 0 with δ_0 = c m̄/‖m̄‖: behaviour k's margin δ_0ᵀz ~ N(c ω_k Δ_k²/(4‖m̄‖), c²σ²) → Φ(sign(c) ·)
    for j, w0 in enumerate([0.2, 0.8]):
        m = np.array([w0 * 1.0, (1 - w0) * 0.5])  # m̄ along (e_0, e_1)
        proj = np.array([1.0, 0.5]) * m / np.linalg.norm(m)  # m_kᵀ m̄/‖m̄‖
        for o, c in enumerate([-1.0, 0.0, 1.5]):
            want = [PHI(math.copysign(1, c) * p) if c else 0.0 for p in proj]
            np.testing.assert_allclose(acc[:, j, o, 0], np.broadcast_to(want, (2, 2)), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ds["population_rewards_margin"].values[:, j, o, 0], c * np.linalg.norm(m),
                                       rtol=1e-5, atol=1e-6)
            # held-out pairs at step 0 (4096 per seed): within 4 binomial standard errors
            emp = ds["behavior_reward_accuracy"].sel(split="eval").values[:, j, o, :, 0]
            per_k = np.array([4096 * [w0, 1 - w0][k] for k in range(2)])
            assert (np.abs(emp - np.asarray(want)) <= 4 * np.sqrt(0.25 / per_k) + 1e-6).all()
    np.testing.assert_array_equal(ds["population_weight_change"].values[..., 0], 0.0)
    # empirical runs equal direct calls with the same interventions and head
    f = sw.configuration_fields(cfg, (1, 0, 2))
    gauss, head = sw.build_distribution(f, d=3)
    np.testing.assert_allclose(head.delta_init, 1.5 * np.array([0.2, 0.4, 0.0]) / np.linalg.norm([0.2, 0.4]),
                               rtol=1e-6)
    emp = dd.empirical_trajectory(gauss, sw.seed_key(0, 1), n=64, n_eval=4096, beta=1.0, lr=0.5, steps=4, head=head,
                                  loss_weight=jnp.asarray([1.0, 0.0]))
    for m, v in emp.train.items():
        np.testing.assert_allclose(ds[m].sel(split="train").values[1, 0, 2, 1], np.asarray(v), rtol=RTOL, atol=ATOL,
                                   err_msg=m)


def test_weight_axes_rescale_the_unswept_behaviours(tmp_path):
    cfg = sw.load_config(_cfg(tmp_path, """
        [base]
        distinguishability = [1.0, 1.0, 1.0]
        weight = [0.5, 0.3, 0.2]
        [grid]
        weight_0 = [0.0, 0.6]
    """))
    # the others keep their 3 : 2 proportion and share 1 − ω_0
    assert sw.configuration_fields(cfg, (0,))["weight"] == pytest.approx([0.0, 0.6, 0.4])
    assert sw.configuration_fields(cfg, (1,))["weight"] == pytest.approx([0.6, 0.24, 0.16])
    assert sw.rescale_weights([1.0, 0.0, 0.0], {0: 0.4}) == pytest.approx([0.4, 0.3, 0.3])


def test_shipped_interventions_config(capsys):
    cfg = sw.load_config("builtin:interventions")
    assert cfg.axes == ("loss_weight_1", "label_noise_0", "weight_1", "init_offset", "optimizer", "family")
    assert cfg.shape == (3, 2, 2, 2, 2, 3) and cfg.base["nu"] == 3.0 and "mixture_spread" in cfg.base
    assert len(sw._static_combos(cfg)) == 6  # optimizer × family compile groups
    f = sw.configuration_fields(cfg, (2, 1, 1, 1, 1, 2))
    assert f["loss_weight"] == [1.0, 16.0] and f["label_noise"] == [0.2, 0.0]
    assert f["weight"] == pytest.approx([0.2, 0.8]) and f["init_offset"] == 1.0
    assert (f["optimizer"], f["family"]) == ("adam", "mixture")
    assert main(["sweep", "builtin:interventions", "--out", "unused.zarr", "--dry-run"]) == 0
    assert "144 configurations x 8 seeds, " in capsys.readouterr().out


def test_orthogonal_behaviours_stay_orthogonal_under_adam(tmp_path):
    """angle = 90 builds exactly orthogonal directions, so λ_1 = 0 leaves behaviour 1 at accuracy 1/2
    even under Adam, whose per-coordinate scaling would amplify a float32 leak of cos(90°)."""
    cfg, ds = _run(tmp_path, """
        [base]
        mode = "population"
        optimizer = "adam"
        distinguishability = [2.0, 1.0, 0.5]
        d = 4
        steps = 20
        record_every = 10
        [grid]
        loss_weight_1 = [0.0, 1.0]
    """)
    gauss, _ = sw.build_distribution(sw.configuration_fields(cfg, (0,)), d=4)
    np.testing.assert_array_equal(np.asarray(gauss.mu_pos), np.diag([1.0, 0.5, 0.25, 0.0])[:3])
    acc = ds["population_behavior_reward_accuracy"].values  # (λ1, step, behavior)
    np.testing.assert_array_equal(acc[0, 1:, 1], 0.5)
    assert (acc[1, 1:, 1] > 0.55).all()  # λ_1 = 1: learned


@pytest.mark.parametrize("text,where", [
    ("[base]\ndistinguishability = 0.0\ninit_offset = 1.0\n", "base.init_offset"),
    ("[base]\ndistinguishability = [1.0, 1.0]\nangle = 180.0\naligned_head_norm = 0.5\n", "base.aligned_head_norm"),
    ("[base]\ninit_offset = 1.0\n[grid]\ndistinguishability = [1.0, 0.0]\n", "base.init_offset"),
])
def test_head_offset_needs_a_preference_direction(tmp_path, text, where):
    with pytest.raises(UsageError, match=rf"{where}: .* the preference mean m̄ is 0 at .*use .* = 0 there"):
        sw.load_config(_cfg(tmp_path, text))
    # with weights that leave m̄ ≠ 0 the same head is fine
    sw.load_config(_cfg(tmp_path, "[base]\ndistinguishability = [1.0, 1.0]\nangle = 180.0\nweight = [0.6, 0.4]\n"
                                  "aligned_head_norm = 0.5\n"))


def test_label_smoothing_applies_to_the_smoothed_losses_only(tmp_path):
    cfg, ds = _run(tmp_path, """
        [base]
        mode = "population"
        label_smoothing = 0.2
        distinguishability = 1.5
        d = 2
        steps = 10
        [grid]
        loss = ["sigmoid", "cdpo"]
    """)
    g = dd.GaussianPreference.single(1.5, 2)
    for i, (loss, label_smoothing) in enumerate([("sigmoid", 0.0), ("cdpo", 0.2)]):
        want = dd.population_trajectory(g, beta=1.0, lr=0.1, steps=10, loss=loss, label_smoothing=label_smoothing).metrics["loss"]
        np.testing.assert_allclose(ds["population_loss"].values[i], want, rtol=1e-5)
