"""``dpo-sims sweep``: many configurations, compiled once per shape, stored in zarr.

A sweep config (TOML, ``docs/sweeps.md``) has a ``[base]`` configuration and
``[grid]`` axes over its scalar fields; the sweep runs the cartesian product of
the axes, each with ``seeds`` PRNG seeds, through the core functions
:func:`dynamics.population_trajectory` and :func:`dynamics.empirical_trajectory`.

Execution (no Python loop over configurations):

* fields that set array shapes or the compiled program (``loss``,
  ``optimizer``, ``method``, ``n``, ``n_eval``, ``batch_size``, ``steps``,
  ``record_every``, ``d``, ``family``) are *static*; the others (``beta``,
  ``lr``, ``eps``, the distribution parameters and sampling weights, ``kappa``,
  ``flip_labels``, ``aligned_head_norm``, ``init_offset``, ``label_noise``,
  ``loss_weight``, the families' parameters such as ``nu``) are *dynamic* and
  are ``jax.vmap``-ed;
* ``family`` picks the embedding law given the Gaussian's moments
  (``gaussian``, ``laplace``, ``student_t``, ``mixture`` or one registered with
  :func:`register_family`);
* the grid is cut into compute chunks: blocks of configurations that share the
  static values (static axes have block length 1; dynamic axes fill the block
  from the last axis inwards, up to ``--chunk-size`` configurations). Every
  chunk of a group is padded to the full block size, so one group compiles once
  (one ``jax.jit`` of a ``jax.vmap`` over configurations of a ``jax.vmap`` over
  seeds) and the padding is dropped before writing;
* each chunk is written to the store when it finishes (``sims.store``); a rerun
  of the same command skips finished chunks.

Seeds: the PRNG key of seed index ``s`` is
``jax.random.fold_in(jax.random.key(seed), s)`` (``seed`` is the config's base
seed, default 0) — the same for every configuration (common random numbers), so
a stored run is reproduced exactly by
``dynamics.empirical_trajectory(dist, seed_key(seed, s), ...)`` with ``dist,
head = build_distribution(fields)`` (:func:`configuration_fields`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.resources
import itertools
import json
import math
import platform
import sys
import time
import tomllib
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dynamics as dd
from dynamics import transforms as tf
from dynamics._train import OPTIMIZERS
from dynamics.empirical import check_sample

from . import distributed
from .cli import UsageError
from .store import ResultsStore, available_memory, config_fingerprint, diverged_summary, fingerprint_matches

__all__ = [
    "FIELDS",
    "SweepConfig",
    "load_config",
    "parse_config",
    "builtin_configs",
    "seed_key",
    "build_distribution",
    "configuration_fields",
    "plan_sweep",
    "dim_name",
    "FAMILIES",
    "register_family",
    "unregister_family",
    "build_family",
    "rescale_weights",
    "run_sweep",
    "register",
]

MODES = ("population", "empirical", "both")
DISTRIBUTIONS = ("gaussian", "file")
METHODS = ("gd", "flow")
SPLITS = ("train", "eval")
TOP_KEYS = ("name", "description", "seeds", "seed", "base", "grid", "reproduce")
MAX_AUTO_CHUNK = 256
_MEMORY_FRACTION = 0.5  # share of available memory one chunk may use


# --------------------------------------------------------------------------- fields
@dataclasses.dataclass(frozen=True)
class Field:
    """One configuration field.

    kind: "float" | "int" | "str" | "bool". role: "static" (sets shapes or the
    compiled program; a grid axis over it makes separate groups), "dynamic"
    (vmapped), "base" (settable only in ``[base]``). per_behavior: may be a
    list of K values (one per behaviour), and ``<name>_<k>`` is a grid axis.
    """

    name: str
    kind: str
    default: object
    role: str
    help: str
    per_behavior: bool = False
    choices: tuple = ()
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    generated_only: bool = False  # only for distribution = "gaussian"
    family: str | None = None  # a parameter of this family only (see register_family)


FIELDS = {f.name: f for f in (
    Field("mode", "str", "both", "base", "what to run: population (analytic, N → ∞), empirical "
          "(finite samples, per seed) or both", choices=MODES),
    Field("loss", "str", "sigmoid", "static", "preference loss (TRL loss_type)", choices=tuple(dd.LOSSES)),
    Field("beta", "float", 1.0, "dynamic", "β of the loss", low=0.0, low_open=True),
    Field("eps", "float", 0.0, "dynamic", "label smoothing ε for cdpo / robust", low=0.0, high=0.5, high_open=True),
    Field("optimizer", "str", "sgd", "static", "optimizer on the head W", choices=OPTIMIZERS),
    Field("lr", "float", 0.1, "dynamic", "learning rate η on the head W", low=0.0, low_open=True),
    Field("method", "str", "gd", "static", "population dynamics: gd (discrete steps) or flow "
          "(gradient flow, RK4, time τ = η t; sgd only)", choices=METHODS),
    Field("steps", "int", 100, "static", "optimizer steps", low=1),
    Field("record_every", "int", 1, "static", "record metrics every this many steps (divides steps)", low=1),
    Field("n", "int", 1024, "static", "training pairs per seed (empirical)", low=1),
    Field("n_eval", "int", 2048, "static", "held-out pairs per seed (empirical)", low=1),
    Field("batch_size", "int", 0, "static", "minibatch size; 0 = full batch (GD)", low=0),
    Field("distribution", "str", "gaussian", "base", "gaussian (generated from the fields below) or file "
          "(a .npz distribution at `path`, docs/theory.md §2.4)", choices=DISTRIBUTIONS),
    Field("path", "str", "", "base", "the .npz distribution file (distribution = \"file\"); relative "
          "to the config file"),
    Field("d", "int", 16, "static", "embedding dimension (gaussian; ≥ K)", low=1, generated_only=True),
    Field("distinguishability", "float", 1.0, "dynamic", "Δ_k = ‖μ_k⁺ − μ_k⁻‖ (a list gives K behaviours)",
          per_behavior=True, low=0.0, generated_only=True),
    Field("sigma", "float", 1.0, "dynamic", "per-coordinate std σ_k of the embeddings (Σ = σ² I)",
          per_behavior=True, low=0.0, low_open=True, generated_only=True),
    Field("p", "float", 0.5, "dynamic", "p_k: probability that behaviour k's preferred answer is 'Yes'",
          per_behavior=True, low=0.0, high=1.0, generated_only=True),
    Field("weight", "float", None, "dynamic", "sampling weights ω_k of the behaviours (list of K summing to 1; "
          "default uniform, or the file's). An axis weight_k sets ω_k and rescales the others to keep the sum 1",
          per_behavior=True, low=0.0, high=1.0),
    Field("angle", "float", 90.0, "dynamic", "angle in degrees between every two preference directions b_k",
          low=0.0, high=180.0, generated_only=True),
    Field("kappa", "float", 1.0, "dynamic", "class-separation scale κ: μ^± → (μ⁺+μ⁻)/2 ± κ(μ⁺−μ⁻)/2 (C5)",
          low=0.0),
    Field("flip_labels", "bool", False, "dynamic", "misalignment: swap chosen and rejected (s → −s, C5)"),
    Field("aligned_head_norm", "float", 0.0, "dynamic", "start from (and use as reference) a head aligned "
          "with the preference mean m̄ of the unflipped distribution, ‖W_a − W_b‖ = this; 0 = the zero head",
          low=0.0),
    Field("init_offset", "float", 0.0, "dynamic", "reference ≠ initial head: W_0 − W_ref = init_offset · [v/2; −v/2], "
          "v = m̄/‖m̄‖ (> 0 starts ahead of the reference along the preference mean, < 0 behind); 0 = W_0 = W_ref"),
    Field("label_noise", "float", 0.0, "dynamic", "flip rate of the training labels of behaviour k "
          "(held-out labels and metrics stay clean); 0.5 = pure noise", per_behavior=True, low=0.0, high=0.5),
    Field("loss_weight", "float", 1.0, "dynamic", "loss weight λ_k of behaviour k (re-weighting; 0 removes its "
          "gradient)", per_behavior=True, low=0.0),
    Field("family", "str", "gaussian", "static", "embedding law with the moments built above: gaussian, laplace, "
          "student_t (parameter nu), mixture (parameter mixture_spread) or a registered custom family "
          "(sims.sweep.register_family, --import)", choices=("gaussian",)),
)}

#: the values that set array shapes or the compiled program (one compile each)
STATIC_FIELDS = tuple(n for n, f in FIELDS.items() if f.role == "static")


def dynamic_fields() -> tuple[str, ...]:
    """Names of the vmapped fields, including the parameters of registered families."""
    return tuple(n for n, f in FIELDS.items() if f.role == "dynamic")


# --------------------------------------------------------------------------- families
@dataclasses.dataclass(frozen=True)
class Family:
    """An embedding law of the sweep engine (``family = NAME``); see :func:`register_family`."""

    name: str
    build: object
    params: tuple[str, ...]
    help: str


#: registered families, by name (the shipped ones are registered at import)
FAMILIES: dict[str, Family] = {}


def register_family(name: str, build, *, params: dict | None = None, help: str = "", replace: bool = False) -> Family:
    """Make a distribution family available to sweeps as ``family = "NAME"`` (static axis ``family``).

    The sweep builds, per configuration, the Gaussian of the config fields (means, covariances,
    p, weights, κ, flipped labels; :func:`build_distribution`) and hands it to ``build`` with the
    family's parameters; the result goes through both layers as in docs/custom-distributions.md:
    the empirical layer calls its ``sample(key, n)``, the analytic layer its ``components()`` (exact)
    or ``gaussian_equivalent()`` (moment-matched prediction). Keep the Gaussian's per-class means
    and covariances if the analytic column should be the moment-matched prediction.

    Args:
      name: the family's name (a Python identifier, not already registered unless ``replace``).
      build: ``build(gaussian: dynamics.GaussianPreference, params: dict[str, jax.Array]) ->
        distribution``: pure and traceable (it runs under ``jax.vmap``; each param is a scalar array).
      params: the family's scalar float parameters, ``{name: default}`` or ``{name: {"default": v,
        "low": a, "high": b, "low_open": bool, "high_open": bool, "help": str}}``. Each becomes a
        sweep field (``[base]`` key and ``[grid]`` axis, vmapped), valid only when the family is used.
      help: one line for ``dpo-sims sweep --help``.
      replace: allow re-registering ``name`` (its old parameters are removed first).

    Returns:
      the :class:`Family`.

    Raises:
      ValueError: a bad name, a name already registered (without ``replace``), a parameter name
        that is already a field, a non-numeric default, or a default outside its range.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"family name {name!r} must be a Python identifier, e.g. 'uniform_noise'")
    if not callable(build):
        raise ValueError(f"build for family {name!r} must be callable: build(gaussian, params) -> distribution")
    if name in FAMILIES:
        if not replace:
            raise ValueError(f"family {name!r} is already registered; pick another name or pass replace=True")
        for old in FAMILIES.pop(name).params:
            FIELDS.pop(old, None)
    new_fields = []
    for pname, spec in (params or {}).items():
        spec = dict(spec) if isinstance(spec, dict) else {"default": spec}
        unknown = set(spec) - {"default", "low", "high", "low_open", "high_open", "help"}
        if unknown:
            raise ValueError(f"family {name!r}, parameter {pname!r}: unknown spec keys {sorted(unknown)}; use "
                             "default, low, high, low_open, high_open, help")
        if not isinstance(pname, str) or not pname.isidentifier():
            raise ValueError(f"family {name!r}: parameter name {pname!r} must be a Python identifier")
        if pname in FIELDS or _split_axis(pname)[1] is not None:
            raise ValueError(f"family {name!r}: parameter {pname!r} clashes with the sweep field "
                             f"{_split_axis(pname)[0]!r}; rename it (e.g. {name}_{pname})")
        default = spec.get("default")
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise ValueError(f"family {name!r}, parameter {pname!r}: default must be a number, got {default!r}")
        field = Field(pname, "float", float(default), "dynamic",
                      spec.get("help", f"parameter of family {name}"), low=spec.get("low"),
                      low_open=bool(spec.get("low_open", False)), high=spec.get("high"),
                      high_open=bool(spec.get("high_open", False)), family=name)
        try:
            _check_scalar(f"register_family({name!r})", f"params.{pname}.default", field, float(default))
        except UsageError as e:
            raise ValueError(str(e)) from None
        new_fields.append(field)
    for field in new_fields:
        FIELDS[field.name] = field
    fam = Family(name, build, tuple(f.name for f in new_fields), help)
    FAMILIES[name] = fam
    FIELDS["family"] = dataclasses.replace(FIELDS["family"], choices=tuple(FAMILIES))
    return fam


def unregister_family(name: str) -> None:
    """Remove a registered family and its parameter fields (e.g. to re-register an edited one).

    Raises:
      ValueError: an unknown name, or a shipped family (gaussian, laplace, student_t, mixture).
    """
    if name not in FAMILIES:
        raise ValueError(f"no family {name!r} is registered; registered: {sorted(FAMILIES)}")
    if getattr(FAMILIES[name].build, "__module__", None) == __name__:
        raise ValueError(f"{name!r} is a shipped family and cannot be removed")
    for param in FAMILIES.pop(name).params:
        FIELDS.pop(param, None)
    FIELDS["family"] = dataclasses.replace(FIELDS["family"], choices=tuple(FAMILIES))


def build_family(family: str, gaussian: dd.GaussianPreference, fields: dict):
    """The distribution of family ``family`` with the moments of ``gaussian`` (traceable).

    Args:
      family: a registered family name (static).
      gaussian: :class:`dynamics.GaussianPreference` ``(K, d)`` from :func:`build_distribution`.
      fields: the configuration's values; the family's parameters are read from it.

    Raises:
      ValueError: an unknown family (named, with the registered ones).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; registered: {sorted(FAMILIES)} (register_family)")
    fam = FAMILIES[family]
    dtype = gaussian.mu_pos.dtype
    dist = fam.build(gaussian, {k: jnp.asarray(fields[k]).astype(dtype) for k in fam.params})
    missing = [m for m in ("sample", "num_behaviors", "dim") if not hasattr(dist, m)]
    if missing:
        raise ValueError(f"family {family!r}: its builder returned {type(dist).__name__}, not a distribution "
                         f"(missing {missing}); return a pytree with sample(key, n), num_behaviors and dim "
                         "(docs/custom-distributions.md)")
    if (dist.num_behaviors, dist.dim) != (gaussian.num_behaviors, gaussian.dim):
        raise ValueError(f"family {family!r}: its distribution has (K, d) = ({dist.num_behaviors}, {dist.dim}) but "
                         f"the config describes ({gaussian.num_behaviors}, {gaussian.dim}); build it from the "
                         "Gaussian it is given")
    return dist


def _elliptical(kind):
    def build(g, p):
        nu = p["nu"] if kind == "student_t" else jnp.asarray(jnp.inf, g.mu_pos.dtype)
        return dd.EllipticalPreference(g, nu, kind)
    return build


def _fail(source, where, msg):
    raise UsageError(f"{source}: {where}: {msg}")


def _suggest(key, valid):
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    return f" — did you mean {close[0]!r}?" if close else ""


def _type_name(v):
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _check_scalar(source, where, field: Field, value):
    """Type and range check of one scalar value; returns it canonicalised."""
    kind = field.kind
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(source, where, f"expected a number, got {_type_name(value)} {value!r}; write e.g. {where.split('.')[-1].split('[')[0]} = 0.5")
        value = float(value)
        if not math.isfinite(value):
            _fail(source, where, f"got {value}; pass a finite number")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            hint = f"; write {int(value)}" if isinstance(value, float) and float(value).is_integer() else ""
            _fail(source, where, f"expected an integer, got {_type_name(value)} {value!r}{hint}")
    elif kind == "bool":
        if not isinstance(value, bool):
            _fail(source, where, f"expected true or false, got {_type_name(value)} {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            _fail(source, where, f"expected a string, got {_type_name(value)} {value!r}")
        if field.choices and value not in field.choices:
            extra = ("; a custom family must be registered first: sims.sweep.register_family in Python, "
                     "--import MODULE_OR_FILE.py on the command line") if field.name == "family" else ""
            _fail(source, where, f"unknown value {value!r}{_suggest(value, field.choices)}; choose one of "
                  f"{list(field.choices)}{extra}")
    if kind in ("float", "int"):
        lo_ok = field.low is None or (value > field.low if field.low_open else value >= field.low)
        hi_ok = field.high is None or (value < field.high if field.high_open else value <= field.high)
        if not (lo_ok and hi_ok):
            lo = "" if field.low is None else ("(" if field.low_open else "[") + f"{field.low:g}"
            hi = "" if field.high is None else f"{field.high:g}" + (")" if field.high_open else "]")
            rng = f"in {lo}, {hi}" if lo and hi else (f"> {field.low:g}" if field.low_open else f">= {field.low:g}") \
                if lo else f"<= {field.high:g}"
            _fail(source, where, f"{field.name} = {value!r} is out of range; pass a value {rng}")
    return value


def _axis_values(source, where, field: Field, spec):
    """Expand a grid axis (list or {linspace|logspace = [a, b, k]}) to a list."""
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in ("linspace", "logspace"):
            keys = list(spec)
            bad = [k for k in keys if k not in ("linspace", "logspace")]
            hint = _suggest(bad[0], ("linspace", "logspace")) if bad else ""
            _fail(source, where, f"a table axis needs exactly one key, linspace or logspace, got {keys}{hint}; "
                  "write e.g. {linspace = [0.5, 4, 8]} or a list of values")
        how, args = next(iter(spec.items()))
        if field.kind not in ("float", "int"):
            _fail(source, where, f"{how} needs a numeric field; {field.name} is {field.kind} — give a list of values")
        if (not isinstance(args, list) or len(args) != 3 or any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in args)
                or not isinstance(args[2], int) or args[2] < 1):
            _fail(source, where, f"{how} = {args!r}: expected [start, stop, count] with numbers start, stop "
                  "and an integer count >= 1")
        a, b, k = args
        vals = np.linspace(a, b, k) if how == "linspace" else np.logspace(a, b, k)
        if field.kind == "int":
            vals = np.round(vals).astype(int)
        values = vals.tolist()
    elif isinstance(spec, list):
        values = spec
    else:
        _fail(source, where, f"expected a list of values or {{linspace|logspace = [a, b, k]}}, got {_type_name(spec)} {spec!r}")
    if len(values) == 0:
        _fail(source, where, "the axis has no values; give at least one, e.g. [1.0], or remove the axis")
    out = [_check_scalar(source, f"{where}[{i}]", field, v) for i, v in enumerate(values)]
    if len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1}, key=str)
        _fail(source, where, f"repeated value(s) {dup}; list each value once")
    return out


# --------------------------------------------------------------------------- config
@dataclasses.dataclass
class SweepConfig:
    """A parsed, validated sweep.

    Attributes:
      name, description: labels.
      seeds: number of seeds S (dimension ``seed``); seed: the base seed.
      base: every field resolved (per-behaviour fields as lists of K).
      grid: axis name → list of values, in the order written (the dataset's
        dimension order). An axis is a field name or ``<field>_<k>``.
      num_behaviors: K. source: where the config came from (for messages).
      file_dist: the loaded distribution when ``distribution = "file"``.
      file_sha256: the file's digest (part of the fingerprint).
    """

    name: str
    description: str
    seeds: int
    seed: int
    base: dict
    grid: dict
    num_behaviors: int
    source: str
    file_dist: dd.GaussianPreference | None = None
    file_sha256: str | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.grid)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.grid.values())

    @property
    def num_configs(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.grid else 1

    def axis_field(self, axis: str) -> tuple[str, int | None]:
        """``"distinguishability_1"`` → ``("distinguishability", 1)``; ``"lr"`` → ``("lr", None)``."""
        return _split_axis(axis)

    def is_static_axis(self, axis: str) -> bool:
        return FIELDS[_split_axis(axis)[0]].role == "static"

    def resolved(self) -> dict:
        """The JSON-serialisable resolved config (stored in the results; its fingerprint)."""
        out = {"name": self.name, "description": self.description, "seeds": self.seeds, "seed": self.seed,
               "base": dict(self.base), "grid": {k: list(v) for k, v in self.grid.items()},
               "key_derivation": "seed s: jax.random.fold_in(jax.random.key(seed), s)"}
        if self.file_sha256:
            out["distribution_sha256"] = self.file_sha256
        code = {name: _code_digest(FAMILIES[name].build) for name in sorted(self.families)
                if name in FAMILIES and getattr(FAMILIES[name].build, "__module__", None) != __name__}
        if code:  # a custom family: editing its file changes the fingerprint (no silent resume)
            out["family_code"] = code
        return out

    @property
    def families(self) -> set[str]:
        """The families the sweep uses (the ``family`` axis, or the base value)."""
        return _families_in(self.base, self.grid)

    def fingerprint(self) -> str:
        return config_fingerprint(self.resolved())


def _families_in(base: dict, grid: dict) -> set[str]:
    """The families a sweep uses: its ``family`` axis, or the base value."""
    return set(grid.get("family", [base.get("family", "gaussian")]))


def _code_digest(fn) -> dict:
    """Where a custom family's builder lives and the SHA-256 of its source file (``None`` if unknown)."""
    import hashlib
    import inspect

    where = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
    try:
        digest = hashlib.sha256(Path(inspect.getsourcefile(fn)).read_bytes()).hexdigest()
    except (TypeError, OSError):
        digest = None
    return {"builder": where, "source_sha256": digest}


#: dataset dimension names that differ from the field name (the metric `loss` keeps its name)
DIM_NAMES = {"loss": "loss_type"}


def dim_name(axis: str) -> str:
    """Dataset dimension of a grid axis: the axis name, except ``loss`` → ``loss_type`` (TRL's name)."""
    return DIM_NAMES.get(axis, axis)


def _split_axis(axis: str):
    if axis in FIELDS:
        return axis, None
    head, _, tail = axis.rpartition("_")
    if head in FIELDS and FIELDS[head].per_behavior and tail.isdigit():
        return head, int(tail)
    return axis, None


# the shipped families (docs/custom-distributions.md); custom ones use the same call
register_family("gaussian", lambda g, p: g, help="the Gaussian itself (docs/theory.md §2)")
register_family("laplace", _elliptical("laplace"), help="multivariate Laplace with the Gaussian's moments")
register_family("student_t", _elliptical("student_t"),
                params={"nu": {"default": 5.0, "low": 2.0, "low_open": True,
                               "help": "Student-t degrees of freedom ν > 2 (family student_t; finite covariance)"}},
                help="multivariate Student-t (ν) with the Gaussian's moments")
register_family("mixture", lambda g, p: dd.GaussianMixturePreference.from_gaussian(g, p["mixture_spread"]),
                params={"mixture_spread": {"default": 0.5, "low": 0.0, "high": 1.0, "high_open": True,
                                           "help": "family mixture: each class splits into two modes along its "
                                                   "preference direction, keeping its moments; 0 = Gaussian, "
                                                   "→ 1 = two point-like modes"}},
                help="two-mode Gaussian mixture per class with the Gaussian's moments (exact analytic layer)")


def builtin_configs() -> list[str]:
    """Names of the configs shipped in ``sims/configs`` (use as ``builtin:NAME``)."""
    root = importlib.resources.files("sims") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def read_builtin(name: str) -> str:
    """Text of the shipped config ``name`` (without ``.toml``).

    Raises UsageError for an unknown name, suggesting the closest.
    """
    name = name[:-5] if name.endswith(".toml") else name
    names = builtin_configs()
    if name not in names:
        raise UsageError(f"builtin:{name}: no such shipped config{_suggest(name, names)}; choose one of {names}")
    return (importlib.resources.files("sims") / "configs" / f"{name}.toml").read_text()


def load_config(path) -> SweepConfig:
    """Read and validate a sweep config file (or ``builtin:NAME``).

    Raises:
      UsageError: unreadable file, TOML syntax error, or any invalid entry
        (one line naming the key and the fix).
    """
    spath = str(path)
    if spath.startswith("builtin:"):
        text, base_dir = read_builtin(spath[len("builtin:"):]), Path.cwd()
    else:
        p = Path(spath)
        if not p.is_file():
            raise UsageError(f"{p}: no such config file; pass a TOML sweep config (see docs/sweeps.md), "
                             f"or builtin:NAME with NAME in {builtin_configs()}")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{p}: cannot read the config ({e}); pass a UTF-8 TOML file") from None
        base_dir = p.parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{spath}: not valid TOML ({e}); fix the syntax (see docs/sweeps.md)") from None
    return parse_config(data, source=spath, base_dir=base_dir)


def parse_config(data: dict, *, source: str = "<config>", base_dir=None) -> SweepConfig:
    """Validate a config mapping (as read from TOML) into a :class:`SweepConfig`.

    Checks every key (unknown keys get the closest valid name), every type and
    range, axes that are empty or repeat a value, and the cross-field rules
    (``record_every`` divides ``steps``, ``batch_size ≤ n``, ``d ≥ K``,
    list lengths = K, weights sum to 1, the angle admits K directions,
    ``method = "flow"`` needs ``optimizer = "sgd"``, ε only for cdpo/robust).

    Raises:
      UsageError: one line ``SOURCE: KEY: problem; fix``.
    """
    base_dir = Path.cwd() if base_dir is None else Path(base_dir)
    if not isinstance(data, dict):
        _fail(source, "top level", "expected a TOML table")
    for key in data:
        if key not in TOP_KEYS:
            hint = _suggest(key, TOP_KEYS)
            if key in FIELDS:
                hint = f" — put it under [base] (or [grid] to sweep it)"
            _fail(source, key, f"unknown top-level key{hint}; top-level keys are {list(TOP_KEYS)}")
    # [reproduce]: analysis settings read by `dpo-sims reproduce`; not part of the sweep
    default_name = source[len("builtin:"):] if source.startswith("builtin:") else Path(source).stem
    name = data.get("name", default_name if default_name and not default_name.startswith("<") else "sweep")
    description = data.get("description", "")
    for key, val in (("name", name), ("description", description)):
        if not isinstance(val, str):
            _fail(source, key, f"expected a string, got {_type_name(val)} {val!r}")
    seeds = data.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        _fail(source, "seeds", f"expected an integer >= 1 (the number of seeds), got {seeds!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < 2**32):
        _fail(source, "seed", f"expected an integer in [0, 2**32) (the base PRNG seed), got {seed!r}")
    base_in = data.get("base", {})
    grid_in = data.get("grid", {})
    for key, val in (("base", base_in), ("grid", grid_in)):
        if not isinstance(val, dict):
            _fail(source, key, f"expected a table [{key}], got {_type_name(val)}")

    # ------------------------------------------------------------- base
    base = {}
    for key, val in base_in.items():
        where = f"base.{key}"
        if key not in FIELDS:
            _fail(source, where, f"unknown key{_suggest(key, FIELDS)}; valid keys are listed in docs/sweeps.md "
                  "and `dpo-sims sweep --help`")
        field = FIELDS[key]
        if isinstance(val, list) and field.per_behavior:
            if not val:
                _fail(source, where, "empty list; give one value per behaviour, or a single number")
            base[key] = [_check_scalar(source, f"{where}[{i}]", field, v) for i, v in enumerate(val)]
        elif isinstance(val, (list, dict)):
            _fail(source, where, f"expected a single {field.kind} value, got {_type_name(val)}; "
                  f"to sweep {key}, put it under [grid]")
        else:
            base[key] = _check_scalar(source, where, field, val)
    kind = base.get("distribution", "gaussian")
    file_dist = file_sha = None
    if kind == "file":
        for key in base:
            if FIELDS[key].generated_only:
                _fail(source, f"base.{key}", "not used with distribution = \"file\" (the file fixes the "
                      "distribution); remove it")
        if not base.get("path"):
            _fail(source, "base.path", "distribution = \"file\" needs path = \"DIST.npz\" (a .npz file, docs/theory.md §2.4)")
        fpath = Path(base["path"])
        fpath = fpath if fpath.is_absolute() else base_dir / fpath
        if not fpath.is_file():
            _fail(source, "base.path", f"{fpath}: no such file; pass an existing .npz distribution file")
        try:
            file_dist = dd.GaussianPreference.load(fpath)
        except (ValueError, OSError) as e:
            _fail(source, "base.path", f"{fpath}: {e}")
        import hashlib

        file_sha = hashlib.sha256(fpath.read_bytes()).hexdigest()
        k = file_dist.num_behaviors
        base["d"] = file_dist.dim
    else:
        if "path" in base:
            _fail(source, "base.path", "only used with distribution = \"file\"; remove it or set distribution = \"file\"")
        dlist = base.get("distinguishability", FIELDS["distinguishability"].default)
        k = len(dlist) if isinstance(dlist, list) else 1
    origin = "the distribution file has" if kind == "file" else "distinguishability gives"
    for key, val in base.items():
        if FIELDS[key].per_behavior and isinstance(val, list) and len(val) != k:
            fix = "give K weights summing to 1" if key == "weight" else \
                "give one value per behaviour or a single number"
            _fail(source, f"base.{key}", f"has {len(val)} values but {origin} K = {k} behaviours; {fix}")
    # resolve defaults
    for key, field in FIELDS.items():
        if key in base:
            continue
        if kind == "file" and field.generated_only:
            continue
        base[key] = field.default
    base["distribution"] = kind
    for key, field in FIELDS.items():
        if field.per_behavior and key != "weight" and key in base and not isinstance(base[key], list):
            base[key] = [base[key]] * k
    if base["weight"] is None:
        base["weight"] = ([float(f"{w:.7g}") for w in np.asarray(file_dist.weight, np.float64)] if kind == "file"
                          else [1.0 / k] * k)
    elif not isinstance(base["weight"], list):
        _fail(source, "base.weight", f"expected a list of K = {k} weights summing to 1")
    if abs(sum(base["weight"]) - 1.0) > 1e-6:
        _fail(source, "base.weight", f"sums to {sum(base['weight']):.6g}; behaviour weights must sum to 1 — "
              "divide by their sum")
    if kind == "file":
        base.pop("path", None)
        base["path"] = str(base_in["path"])

    # ------------------------------------------------------------- grid
    grid = {}
    for key, spec in grid_in.items():
        where = f"grid.{key}"
        fname, idx = _split_axis(key)
        valid_axes = _grid_axis_names(kind, k)
        if fname not in FIELDS or key not in valid_axes:
            if fname in FIELDS and FIELDS[fname].role == "base":
                _fail(source, where, f"{fname} cannot be swept (a base-only setting); set it in [base]")
            if fname in FIELDS and FIELDS[fname].generated_only and kind == "file":
                _fail(source, where, f"{fname} is fixed by the distribution file; remove the axis")
            if fname == "weight" and (idx is None or k == 1):
                _fail(source, where, "sampling weights are swept one behaviour at a time: "
                      + (f"use {', '.join(f'weight_{i}' for i in range(k))} (the others are rescaled to keep "
                         "the sum 1)" if k > 1 else "with one behaviour ω = 1; there is nothing to sweep"))
            if fname in FIELDS and FIELDS[fname].per_behavior and idx is None and k > 1:
                _fail(source, where, f"there are K = {k} behaviours; sweep one of them with "
                      f"{', '.join(f'{fname}_{i}' for i in range(k))}")
            if idx is not None and fname in FIELDS:
                use = f"{fname} (or {fname}_0)" if k == 1 else f"{fname}_0 … {fname}_{k - 1}"
                _fail(source, where, f"behaviour index {idx} is out of range for K = {k}; use {use}")
            if key == "seed" or key == "seeds":
                _fail(source, where, "seeds are not a grid axis; set seeds = S at the top level")
            _fail(source, where, f"unknown axis{_suggest(key, valid_axes)}; sweepable fields are {sorted(valid_axes)}")
        grid[key] = _axis_values(source, where, FIELDS[fname], spec)
    # an element axis and a whole-field axis of the same field both set it
    for key in grid:
        fname, idx = _split_axis(key)
        if idx is not None and fname in grid:
            _fail(source, f"grid.{key}", f"both grid.{fname} and grid.{key} set {fname}; keep one")

    # family parameters: only those of the families the sweep uses (a family registered later
    # does not change the resolved config of sweeps that do not use it)
    used = _families_in(base, grid)
    for key in list(base):
        fam = FIELDS[key].family
        if fam is None or fam in used:
            continue
        if key in base_in or key in grid:
            where = f"grid.{key}" if key in grid else f"base.{key}"
            _fail(source, where, f"{key} is a parameter of family {fam!r}, which this sweep does not use; set "
                  f"family = \"{fam}\" (or sweep family with it), or remove {key}")
        del base[key]
    cfg = SweepConfig(name=name, description=description, seeds=seeds, seed=seed, base=base, grid=grid,
                      num_behaviors=k, source=source, file_dist=file_dist, file_sha256=file_sha)
    _cross_checks(cfg)
    _check_head_direction(cfg)
    return cfg


def _grid_axis_names(kind: str, k: int) -> set[str]:
    names = set()
    for key, field in FIELDS.items():
        if field.role == "base" or (kind == "file" and field.generated_only):
            continue
        if key == "weight":
            if k > 1:  # ω_k of one behaviour (the others rescaled); one behaviour always has ω = 1
                names.update(f"{key}_{i}" for i in range(k))
        elif field.per_behavior:
            if k == 1:
                names.add(key)
            names.update(f"{key}_{i}" for i in range(k))
        else:
            names.add(key)
    if k > 1:  # a whole-field axis sets every behaviour
        names.update({"label_noise", "loss_weight"} | ({"sigma", "p"} if kind == "gaussian" else set()))
    return names


def _axis_or_base(cfg: SweepConfig, name: str) -> list:
    """All values a scalar field takes over the grid (the axis, or the base value)."""
    return list(cfg.grid[name]) if name in cfg.grid else [cfg.base[name]]


def _cross_checks(cfg: SweepConfig) -> None:
    src, b, k = cfg.source, cfg.base, cfg.num_behaviors
    where = lambda name: f"grid.{name}" if name in cfg.grid else f"base.{name}"
    steps, rec = _axis_or_base(cfg, "steps"), _axis_or_base(cfg, "record_every")
    for s, r in itertools.product(steps, rec):
        if s % r:
            _fail(src, where("record_every"), f"record_every = {r} does not divide steps = {s}; pick steps = m * record_every")
    for bs, n in itertools.product(_axis_or_base(cfg, "batch_size"), _axis_or_base(cfg, "n")):
        if bs > n:
            _fail(src, where("batch_size"), f"batch_size = {bs} exceeds n = {n}; pass batch_size <= n, or 0 for full batch")
    if b["distribution"] == "gaussian":
        for d in _axis_or_base(cfg, "d"):
            if d < k:
                _fail(src, where("d"), f"d = {d} is smaller than K = {k} behaviours; pass d >= {k}")
        if k > 2:
            for a in _axis_or_base(cfg, "angle"):
                if math.cos(math.radians(a)) < -1.0 / (k - 1) - 1e-12:
                    _fail(src, where("angle"), f"angle = {a}° between every pair of K = {k} directions is impossible "
                          f"(needs cos(angle) >= -1/(K-1)); pass angle <= {math.degrees(math.acos(-1 / (k - 1))):.4g}")
    for m, o in itertools.product(_axis_or_base(cfg, "method"), _axis_or_base(cfg, "optimizer")):
        if m == "flow" and o != "sgd":
            _fail(src, where("method"), f"method = \"flow\" is plain gradient flow; it needs optimizer = \"sgd\", got {o!r}")
    waxes = [a for a in cfg.grid if _split_axis(a)[0] == "weight"]
    for combo in itertools.product(*(cfg.grid[a] for a in waxes)) if waxes else ():
        total = sum(combo)
        if total > 1 + 1e-9:
            _fail(src, f"grid.{waxes[-1]}", f"{' + '.join(waxes)} = {total:.6g} > 1 for {list(combo)}; sampling "
                  "weights of the swept behaviours must leave 1 − their sum ≥ 0 to the others")
        if len(waxes) == k and abs(total - 1) > 1e-6:
            _fail(src, f"grid.{waxes[-1]}", f"every behaviour's weight is swept, so each combination must sum to 1; "
                  f"{list(combo)} sums to {total:.6g} — sweep K − 1 of them (the last is 1 − their sum)")
    eps_vals = _axis_or_base(cfg, "eps")
    if any(e != 0 for e in eps_vals) and not any(dd.losses.uses_label_smoothing(l) for l in _axis_or_base(cfg, "loss")):
        _fail(src, where("eps"), "eps is label smoothing for loss = cdpo or robust; the sweep has neither — "
              "remove eps or sweep one of those losses")
    if cfg.base["mode"] != "population" and cfg.num_configs * cfg.seeds > 50_000_000:
        _fail(src, "grid", f"{cfg.num_configs} configurations x {cfg.seeds} seeds is too many; shrink the grid")


_HEAD_FIELDS = ("distinguishability", "weight", "angle", "kappa", "p", "init_offset", "aligned_head_norm")
_HEAD_CHECK_MAX = 50_000  # configurations of the relevant axes checked at parse time


def _preference_mean_norm(cfg: SweepConfig, f: dict) -> tuple[float, float]:
    """``(‖m̄‖, scale)`` of a configuration in float64, before flipping (m̄ = Σ_k ω_k E[z | k])."""
    w = np.asarray(f["weight"], np.float64)
    kappa = float(f["kappa"])
    if cfg.file_dist is None:  # b_k = Δ_k L_k with L Lᵀ = G, m̄ = κ Σ ω_k b_k / 2: ‖m̄‖² = κ²/4 aᵀGa, a = ω Δ
        a = w * np.asarray(f["distinguishability"], np.float64)
        c = math.sin(math.radians(90.0 - f["angle"]))
        gram = (1.0 - c) * np.eye(len(a)) + c
        return 0.5 * kappa * math.sqrt(max(float(a @ gram @ a), 0.0)), 0.5 * kappa * float(np.abs(a).sum())
    fd = cfg.file_dist
    mp, mn = np.asarray(fd.mu_pos, np.float64), np.asarray(fd.mu_neg, np.float64)
    p = np.asarray(fd.p_pos, np.float64)[:, None]
    m = (2 * p - 1) * (mp + mn) / 2 + kappa * (mp - mn) / 2  # E[z | k] after κ
    return float(np.linalg.norm(w @ m)), float(np.abs(w @ np.abs(m)).sum())


def _check_head_direction(cfg: SweepConfig) -> None:
    """``init_offset`` / ``aligned_head_norm`` ≠ 0 point the head along m̄/‖m̄‖: refuse m̄ = 0."""
    if all(v == 0 for v in _axis_or_base(cfg, "init_offset") + _axis_or_base(cfg, "aligned_head_norm")):
        return
    axes = [i for i, a in enumerate(cfg.grid) if _split_axis(a)[0] in _HEAD_FIELDS]
    sizes = [cfg.shape[i] for i in axes]
    if int(np.prod(sizes, dtype=np.int64)) > _HEAD_CHECK_MAX:
        return  # too many to check here; such configurations run with the zero direction
    for combo in itertools.product(*(range(n) for n in sizes)):
        index = [0] * len(cfg.grid)
        for i, j in zip(axes, combo):
            index[i] = j
        f = configuration_fields(cfg, tuple(index))
        if f["init_offset"] == 0 and f["aligned_head_norm"] == 0:
            continue
        norm, scale = _preference_mean_norm(cfg, f)
        if norm <= 1e-9 * max(scale, 1e-30) or norm == 0:
            at = ", ".join(f"{cfg.axes[i]} = {cfg.grid[cfg.axes[i]][j]}" for i, j in zip(axes, combo)) or "[base]"
            name = "init_offset" if f["init_offset"] != 0 else "aligned_head_norm"
            _fail(cfg.source, f"grid.{name}" if name in cfg.grid else f"base.{name}",
                  f"{name} = {f[name]} points the head along m̄/‖m̄‖, but the preference mean m̄ is 0 at {at} "
                  f"(no direction); use {name} = 0 there, or a distribution with m̄ ≠ 0")


# --------------------------------------------------------------------------- model build
def seed_key(seed: int, s):
    """PRNG key of seed index ``s`` (int or array): ``fold_in(key(seed), s)``, the same for every configuration."""
    root = jax.random.key(seed)
    s = jnp.asarray(s)
    if s.ndim == 0:
        return jax.random.fold_in(root, s)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(s.reshape(-1)).reshape(s.shape)


def build_distribution(fields: dict, *, d: int | None = None, file_dist: dd.GaussianPreference | None = None):
    """The distribution and head of one configuration (pure; traceable under ``jax.vmap``).

    Args:
      fields: dynamic values (scalars, or ``(K,)`` for ``distinguishability``,
        ``sigma``, ``p``, ``weight``): ``distinguishability`` Δ_k, ``sigma`` σ_k,
        ``p`` p_k, ``weight`` ω_k, ``angle`` (degrees), ``kappa`` κ,
        ``flip_labels`` (bool), ``aligned_head_norm`` (≥ 0), ``init_offset``.
        Missing keys take their defaults (``weight``: uniform, or the file's).
      d: embedding dimension (static; generated distributions).
      file_dist: a fixed distribution (``distribution = "file"``); then the
        generated-distribution fields are ignored.

    Construction (docs/sweeps.md):

    1. generated: preference directions ``b_k = Δ_k · row k of L`` padded to
       ``d``, where ``L`` is the Cholesky factor of the K×K matrix with 1 on the
       diagonal and cos(angle) elsewhere (behaviour 0 lies along e₁, behaviour
       1 in the e₁–e₂ plane, …); ``μ_k^± = ±b_k/2``, ``Σ_k^± = σ_k² I``.
       For K = 1 this is exactly ``GaussianPreference.single(Δ, d, σ, p)``.
    2. separation (docs/theory.md §4.5): ``μ^± → (μ⁺+μ⁻)/2 ± κ (μ⁺−μ⁻)/2``.
    3. head: ``v = m̄/‖m̄‖`` (m̄ of step 2's distribution; ``v = 0`` when
       ``m̄ = 0``), ``u = aligned_head_norm · v``, ``W_ref = [u/2; −u/2]`` (V = 2,
       rows a, b) and ``W_0 = W_ref + init_offset · [v/2; −v/2]``, so
       ``δ_0 = init_offset · v``; the zero head when both are 0.
    4. ``flip_labels``: every label flipped, ``s → −s`` (chosen ↔ rejected):
       ``mu_pos``/``mu_neg`` and ``cov_pos``/``cov_neg`` swap and ``p → 1 − p``
       (:func:`dynamics.transforms.flip_labels`, the same transform as C5's
       ``theory.c5_flip_labels``).

    Steps 1, 2 and 4 are :mod:`dynamics.transforms` (``preference_directions``,
    ``scale_separation``, ``flip_labels``); ``GaussianPreference.from_angles``
    builds the same basis (``angles_deg=angle``).

    Returns:
      ``(dist, head)``: :class:`dynamics.GaussianPreference` (K, d) and
      :class:`dynamics.Head` (2, d).
    """
    f = {k: jnp.asarray(v) for k, v in fields.items() if k in dynamic_fields()}
    if file_dist is None:
        delta = jnp.atleast_1d(f["distinguishability"]).astype(jnp.result_type(float))
        k = delta.shape[0]
        if d is None:
            raise ValueError("d is required for a generated distribution")
        cosines = tf.angle_cosines(f["angle"].astype(delta.dtype), k, unit="degrees")
        b = tf.preference_directions(delta, cosines, d)
        sigma = jnp.broadcast_to(f["sigma"].astype(delta.dtype), (k,))
        p = jnp.broadcast_to(f["p"].astype(delta.dtype), (k,))
        weight = jnp.broadcast_to(f["weight"].astype(delta.dtype), (k,)) if "weight" in f \
            else jnp.full((k,), 1.0 / k, delta.dtype)
        dist = dd.GaussianPreference.create(b / 2, -b / 2, dd.isotropic_cov(sigma, d, k), p_pos=p, weight=weight)
    else:
        dist = file_dist
        if "weight" in f:
            dist = dist.replace(weight=jnp.broadcast_to(f["weight"].astype(dist.weight.dtype), dist.weight.shape))
    dtype = dist.mu_pos.dtype
    dist = tf.scale_separation(dist, f.get("kappa", jnp.asarray(1.0)).astype(dtype))
    mbar = dist.mean
    norm = jnp.linalg.norm(mbar)
    hn = f.get("aligned_head_norm", jnp.asarray(0.0)).astype(dtype)
    v = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0) * mbar
    u = hn * v
    off = f.get("init_offset", jnp.asarray(0.0)).astype(dtype) * v
    w = jnp.stack([u / 2, -u / 2])
    head = dd.Head.create(w, w + jnp.stack([off / 2, -off / 2]))
    dist = tf.flip_labels(dist, f.get("flip_labels", jnp.asarray(False)).astype(bool))
    return dist, head


def configuration_fields(cfg: SweepConfig, index) -> dict:
    """All field values of one configuration (grid ``index``, one int per axis).

    Returns a dict with every static field (python values) and every dynamic
    field (floats, or K-lists for per-behaviour ones), ready for
    :func:`build_distribution` and the core calls. Raises IndexError for an
    index outside the grid.
    """
    index = tuple(int(i) for i in np.atleast_1d(index)) if cfg.grid else ()
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in cfg.base.items()}
    fixed = {}
    for (axis, values), i in zip(cfg.grid.items(), index):
        fname, idx = _split_axis(axis)
        v = values[i]
        if fname == "weight":
            fixed[idx] = v
        elif idx is not None:
            out[fname][idx] = v
        elif FIELDS[fname].per_behavior and isinstance(out[fname], list):
            out[fname] = [v] * len(out[fname])
        else:
            out[fname] = v
    if fixed:
        out["weight"] = rescale_weights(cfg.base["weight"], fixed)
    return out


def rescale_weights(base: list, fixed: dict) -> list:
    """Sampling weights with ``ω_i = fixed[i]`` and the other behaviours sharing ``1 − Σ fixed``.

    The unswept weights keep their proportions in ``base`` (equal shares when those are all 0), so
    with K = 2 an axis ``weight_0 = [0.2, 0.8]`` gives ω = (0.2, 0.8) and (0.8, 0.2).
    """
    rest = [i for i in range(len(base)) if i not in fixed]
    remainder = max(0.0, 1.0 - sum(fixed.values()))
    base_rest = sum(base[i] for i in rest)
    out = [float(fixed.get(i, 0.0)) for i in range(len(base))]
    for i in rest:
        out[i] = base[i] * remainder / base_rest if base_rest > 0 else remainder / len(rest)
    return out


# --------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """Static values of one compile group (hashable; a ``jax.jit`` static argument)."""

    mode: str
    kind: str
    num_behaviors: int
    d: int
    loss: str
    optimizer: str
    method: str
    n: int
    n_eval: int
    batch_size: int
    steps: int
    record_every: int
    family: str = "gaussian"
    label_noise: bool = False  # the sweep flips some training labels (else the core gets None)
    loss_weight: bool = False  # the sweep re-weights some behaviour (else the core gets None)

    @property
    def num_records(self) -> int:
        return self.steps // self.record_every + 1


@dataclasses.dataclass
class Plan:
    """How a sweep is cut into compute chunks.

    block: configurations per chunk along each grid axis (static axes 1).
    chunks: list of per-axis block indices (C order). steps: the union of the
    recorded steps over groups (the ``step`` coordinate).
    """

    block: tuple[int, ...]
    chunks: list[tuple[int, ...]]
    steps: np.ndarray
    bytes_per_config: int
    memory_available: int

    @property
    def chunk_configs(self) -> int:
        return int(np.prod(self.block, dtype=np.int64)) if self.block else 1


def _bytes_per_config(cfg: SweepConfig, spec: GroupSpec) -> int:
    """Rough peak memory (bytes) one configuration with all its seeds needs (×2 safety)."""
    item = jnp.dtype(jnp.result_type(float)).itemsize
    k, d, t = spec.num_behaviors, spec.d, spec.num_records
    total = 0
    if spec.mode in ("empirical", "both"):
        per_seed = (spec.n + spec.n_eval) * d * (2 * k + 4) + spec.n * d + t * (2 * (9 + 3 * k) + 2 + d)
        total += cfg.seeds * per_seed
    if spec.mode in ("population", "both"):
        total += t * (8 + 3 * k + d) + 8 * k * d * d
    return int(2 * item * total + 4096)


def _sweeps_value_other_than(cfg: SweepConfig, name: str, value: float) -> bool:
    """Whether any configuration has a per-behaviour ``name`` entry ≠ ``value``."""
    vals = list(cfg.base[name])
    for axis, axis_values in cfg.grid.items():
        if _split_axis(axis)[0] == name:
            vals += list(axis_values)
    return any(v != value for v in vals)


def _group_spec(cfg: SweepConfig, values: dict) -> GroupSpec:
    return GroupSpec(mode=cfg.base["mode"], kind=cfg.base["distribution"], num_behaviors=cfg.num_behaviors,
                     d=values["d"], loss=values["loss"], optimizer=values["optimizer"], method=values["method"],
                     n=values["n"], n_eval=values["n_eval"], batch_size=values["batch_size"],
                     steps=values["steps"], record_every=values["record_every"], family=values["family"],
                     label_noise=_sweeps_value_other_than(cfg, "label_noise", 0.0),
                     loss_weight=_sweeps_value_other_than(cfg, "loss_weight", 1.0))


def _static_combos(cfg: SweepConfig):
    """Every combination of static values in the grid → GroupSpec."""
    axes = [a for a in cfg.grid if cfg.is_static_axis(a)]
    out = []
    for combo in itertools.product(*(cfg.grid[a] for a in axes)):
        vals = {k: cfg.base[k] for k in STATIC_FIELDS}
        vals.update(dict(zip(axes, combo)))
        out.append(_group_spec(cfg, vals))
    return out


def plan_sweep(cfg: SweepConfig, chunk_size: int | None = None, *, block: tuple | None = None,
               memory: int | None = None) -> Plan:
    """Cut the grid into compute chunks and check memory.

    Args:
      chunk_size: configurations per chunk (``None``: automatic, the most that
        fit in half the available memory, at most 256 and at most the
        dynamic sub-grid). block: force a block shape (resuming a store).
      memory: available bytes (default :func:`sims.store.available_memory`).

    Raises:
      UsageError: one configuration (all seeds) needs more memory than is
        available, or ``chunk_size`` does not fit.
    """
    memory = available_memory() if memory is None else int(memory)
    specs = _static_combos(cfg)
    per = max(_bytes_per_config(cfg, s) for s in specs)
    budget = int(memory * _MEMORY_FRACTION)
    if per > memory:
        raise UsageError(
            f"{cfg.source}: one configuration needs about {per / 2**30:.3g} GiB (seeds x (n + n_eval) x d x ...) "
            f"but only {memory / 2**30:.3g} GiB is available; lower seeds, n, n_eval or d"
        )
    fit = max(1, budget // per)
    sizes = cfg.shape
    dyn = [i for i, a in enumerate(cfg.grid) if not cfg.is_static_axis(a)]
    dyn_total = int(np.prod([sizes[i] for i in dyn], dtype=np.int64)) if dyn else 1
    if block is None:
        if chunk_size is None:
            want = min(fit, MAX_AUTO_CHUNK, dyn_total)
        else:
            if chunk_size < 1:
                raise UsageError(f"--chunk-size must be >= 1, got {chunk_size}")
            if chunk_size * per > memory:
                raise UsageError(
                    f"--chunk-size {chunk_size} needs about {chunk_size * per / 2**30:.3g} GiB but "
                    f"{memory / 2**30:.3g} GiB is available; pass --chunk-size <= {max(1, memory // per)} or omit it"
                )
            want = chunk_size
        blk = [1] * len(sizes)
        remaining = want
        for i in reversed(dyn):
            c = max(1, min(sizes[i], remaining))
            blk[i] = c
            remaining = max(1, remaining // c)
        block = tuple(blk)
    block = tuple(int(b) for b in block)
    nblocks = [math.ceil(s / b) for s, b in zip(sizes, block)]
    chunks = list(itertools.product(*(range(n) for n in nblocks)))
    steps = np.unique(np.concatenate([np.arange(0, s.steps + 1, s.record_every) for s in specs]))
    return Plan(block=block, chunks=chunks, steps=steps, bytes_per_config=per, memory_available=memory)


# --------------------------------------------------------------------------- execution
def _check_program(cfg: SweepConfig, spec0: GroupSpec, params0, keys) -> dict:
    """Trace the first chunk (and one of every other family) and draw one concrete sample per family.

    A family whose builder fails, returns something else than a distribution, or whose
    ``sample`` gives wrong shapes, dtypes or values is refused here, before anything is written.
    Returns the store layout (:func:`_layout`).

    Raises:
      UsageError: one line naming the family, what it returned and what was expected.
    """
    specs = {spec0.family: spec0}
    for combo in _static_combos(cfg):
        specs.setdefault(combo.family, combo)
    spec = spec0  # the one being checked, for the messages
    try:
        layout = _layout(cfg, spec0, params0, keys)
        for spec in specs.values():
            if spec is not spec0:
                _layout(cfg, spec, params0, keys)
            if spec.family != "gaussian":
                _check_concrete_sample(cfg, spec, params0)
    except UsageError:
        raise
    except jax.errors.JAXTypeError as e:  # float()/bool()/if on a traced parameter, …
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{cfg.source}: family {spec.family!r}: {type(e).__name__}: {first} — the family's builder "
                         "and its sample() run under jax.vmap/jit: keep them traceable (jnp operations, no "
                         "float()/int()/if on parameters)") from None
    except Exception as e:  # a user family's own error: one line, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{cfg.source}: cannot build the sweep's program: {type(e).__name__}: {first}") from None
    return layout


def _check_concrete_sample(cfg: SweepConfig, spec: GroupSpec, params0) -> None:
    """Draw 64 pairs of the first configuration's ``spec.family`` law eagerly and check the values."""
    p = jax.tree.map(lambda a: jnp.asarray(a)[0], params0)
    gaussian, _ = build_distribution(p, d=spec.d, file_dist=cfg.file_dist)
    dist = build_family(spec.family, gaussian, p)
    check_sample(dist.sample(jax.random.key(0), 64), 64, f"family {spec.family!r}: sample(key, n)",
                 dim=gaussian.dim, num_behaviors=gaussian.num_behaviors, values=True)


# --------------------------------------------------------------------------- chunks
def _chunk_configs(cfg: SweepConfig, plan: Plan, chunk):
    """Grid indices of a chunk's configurations (C order) and the block region."""
    region, extents, ranges = [], [], []
    for b, size, blen in zip(chunk, cfg.shape, plan.block):
        lo, hi = b * blen, min((b + 1) * blen, size)
        region.append(slice(lo, hi))
        extents.append(hi - lo)
        ranges.append(range(lo, hi))
    idx = np.array(list(itertools.product(*ranges)), dtype=np.int64).reshape(-1, len(cfg.grid)) if ranges \
        else np.zeros((1, 0), dtype=np.int64)  # no grid: the base configuration alone
    return idx, tuple(region), tuple(extents)


def _chunk_inputs(cfg: SweepConfig, idx: np.ndarray, pad_to: int):
    """Stacked dynamic parameters ``(pad_to, …)`` and the chunk's static values."""
    rows = [configuration_fields(cfg, i) for i in idx] if len(idx) else [configuration_fields(cfg, ())]
    rows = rows + [rows[-1]] * (pad_to - len(rows))
    statics = {k: rows[0][k] for k in STATIC_FIELDS}
    dtype = jnp.result_type(float)
    params = {}
    for name in dynamic_fields():
        if name not in rows[0]:  # generated-only fields of a file distribution; unused families' parameters
            continue
        if name == "flip_labels":
            params[name] = np.array([r[name] for r in rows], dtype=bool)
        else:
            params[name] = np.asarray([r[name] for r in rows], dtype=dtype)
    return params, statics


def _chunk_impl(params, keys, file_dist, spec: GroupSpec):
    """All configurations of a chunk (leading axis of ``params``) × all seeds (``keys``).

    The distributions and heads are built per configuration (``jax.vmap`` of
    :func:`build_distribution` and the family), then each layer runs through the engine entry point
    :func:`dynamics.trajectories` with ``implementation="auto"``: the factored common-random-number
    engine wherever it applies (Gaussian, Laplace and Student-t draws; every population law), else
    ``jax.vmap`` of the core (one warning line says why). The seeds run one after another
    (``jax.lax.map`` over ``keys``); every configuration of a seed uses its key, as the core called
    per configuration would.
    """
    opt = None if spec.optimizer == "sgd" else spec.optimizer
    batch = spec.batch_size or None
    smoothed = dd.losses.uses_label_smoothing(spec.loss)

    def build(p):
        gaussian, head = build_distribution(p, d=spec.d, file_dist=file_dist)
        dist = build_family(spec.family, gaussian, p)
        # Δ_k, m_kᵀm̄ and the priority gap of the law's moments (the moment-matched Gaussian)
        moments = dist.gaussian_equivalent() if hasattr(dist, "gaussian_equivalent") else gaussian
        out = {
            "behavior_distinguishability": moments.distinguishability,
            "behavior_projection": moments.behavior_mean @ moments.mean,
            "priority_gap": moments.priority_gap,
        }
        return dist, head, out

    dists, heads, out = jax.vmap(build)(params)
    # ε only means something for cdpo / robust; with a loss axis the other groups get 0
    common = dict(
        beta=params["beta"], lr=params["lr"], eps=params["eps"] if smoothed else jnp.zeros_like(params["eps"]),
        steps=spec.steps, loss=spec.loss, optimizer=opt, record_every=spec.record_every, head=heads,
        label_noise=params["label_noise"] if spec.label_noise else None,
        loss_weight=params["loss_weight"] if spec.loss_weight else None,
        # generated laws are isotropic (σ_k² I); a file's covariances are traced here, so taken as full
        cov_kind="isotropic" if file_dist is None else "full", implementation="auto", return_delta=False)
    if spec.mode in ("population", "both"):
        if not (hasattr(dists, "components") or hasattr(dists, "gaussian_equivalent")):
            raise ValueError(f"family {spec.family!r} gives a distribution without components() or "
                             "gaussian_equivalent(), so the analytic layer cannot run; set mode = \"empirical\" "
                             "or add gaussian_equivalent() (docs/custom-distributions.md)")
        pop = dd.trajectories(dists, layer="population", method=spec.method, **common)
        out["population"] = pop.metrics
        out["population_diverged"] = pop.diverged
    if spec.mode in ("empirical", "both"):
        # seeds one after another (lax.map): each runs the engine at full GEMM speed, where a vmap over
        # seeds would turn its GEMMs into slower batched products
        emp = jax.lax.map(lambda key: dd.trajectories(dists, key, layer="empirical", n=spec.n, n_eval=spec.n_eval,
                                                      batch_size=batch, **common), keys)
        seeds_second = lambda tree: jax.tree_util.tree_map(lambda v: jnp.swapaxes(v, 0, 1), tree)  # (C, S, …)
        out["train"], out["eval"] = seeds_second(emp.train), seeds_second(emp.eval)
        out["diverged"] = seeds_second(emp.diverged)
        out["cum_batch_mean_norm"] = seeds_second(emp.cum_batch_mean_norm)
    return out


#: XLA options of the "fast" compile: backend optimisation off (compiles ~3x faster,
#: runs ~2-3x slower), chosen automatically for sweeps whose compute is small
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_RUNNERS = {
    "optimized": jax.jit(_chunk_impl, static_argnames=("spec",)),
    "fast": jax.jit(_chunk_impl, static_argnames=("spec",), compiler_options=_FAST_COMPILE),
}
COMPILE_MODES = ("auto", "fast", "optimized")
_FAST_WORK_LIMIT = 2e10  # estimated flops below which compile time dominates


_SHARDED: dict = {}


def _run_chunk(params, keys, file_dist, spec: GroupSpec, compile_mode: str = "optimized", executor=None):
    """Run one chunk with the jitted, vmapped program of ``compile_mode`` ("fast" | "optimized").

    ``executor`` (:func:`sims.distributed.sharded_executor`) splits the chunk's configurations over
    its devices with ``jax.shard_map`` (keys and the file distribution replicated); the leading size
    of ``params`` must then be a multiple of ``executor.chunk_multiple``.
    """
    if executor is None:
        return _RUNNERS[compile_mode](params, keys, file_dist, spec=spec)
    cache = (spec, compile_mode, executor)
    if cache not in _SHARDED:
        _SHARDED[cache] = distributed.shard_over_configs(
            partial(_chunk_impl, spec=spec), executor.mesh, num_config_args=1,
            compiler_options=_FAST_COMPILE if compile_mode == "fast" else None)
    return _SHARDED[cache](params, keys, file_dist)


def work_estimate(cfg: SweepConfig) -> float:
    """Rough floating-point operations of the whole sweep (for ``compile = "auto"``)."""
    total = 0.0
    per_group = cfg.num_configs / max(1, len(_static_combos(cfg)))
    for spec in _static_combos(cfg):
        k, d, t = spec.num_behaviors, spec.d, spec.num_records
        w = 0.0
        if spec.mode in ("empirical", "both"):
            batch = spec.batch_size or spec.n
            w += cfg.seeds * (spec.steps * batch * d * 8 + t * (spec.n + spec.n_eval) * d * 12)
        if spec.mode in ("population", "both"):
            w += (spec.steps + t) * 2 * k * (d * d * 4 + 400)
        total += per_group * w
    return total


def resolve_compile_mode(cfg: SweepConfig, compile_mode: str = "auto") -> str:
    """"auto" → "fast" when :func:`work_estimate` is below 2e10 flops, else "optimized"."""
    if compile_mode not in COMPILE_MODES:
        raise UsageError(f"--compile {compile_mode!r}: choose one of {list(COMPILE_MODES)}")
    if compile_mode == "auto":
        return "fast" if work_estimate(cfg) < _FAST_WORK_LIMIT else "optimized"
    return compile_mode


_SHAPES: dict = {}


def _chunk_shapes(spec: GroupSpec, params, keys, file_dist):
    """``jax.eval_shape`` of a chunk, cached per (spec, input shapes and dtypes) for the process
    (tracing the chunk program takes seconds; its output shapes depend on nothing else)."""
    sig = lambda tree: (jax.tree_util.tree_structure(tree),
                        tuple((jnp.shape(a), jnp.result_type(a)) for a in jax.tree_util.tree_leaves(tree)))
    cache_key = (spec, sig(params), sig(keys), sig(file_dist))
    if cache_key not in _SHAPES:
        if len(_SHAPES) > 64:
            _SHAPES.clear()
        _SHAPES[cache_key] = jax.eval_shape(partial(_chunk_impl, spec=spec), params, keys, file_dist)
    return _SHAPES[cache_key]


def _layout(cfg: SweepConfig, spec: GroupSpec, params, keys):
    """Variable name → (dims after the grid dims, dtype) from an abstract evaluation."""
    shapes = _chunk_shapes(spec, params, keys, cfg.file_dist)
    out = {}
    for name in ("behavior_distinguishability", "behavior_projection"):
        out[name] = (("behavior",), np.float32)
    out["priority_gap"] = (("behavior", "behavior_other"), np.float32)
    if "population" in shapes:
        for m, s in shapes["population"].items():
            out[f"population_{m}"] = (("step", "behavior") if len(s.shape) == 3 else ("step",), np.dtype(s.dtype))
    if "train" in shapes:
        for m, s in shapes["train"].items():
            out[m] = (("seed", "split", "step", "behavior") if len(s.shape) == 4 else ("seed", "split", "step"),
                      np.dtype(s.dtype))
        out["cum_batch_mean_norm"] = (("seed", "step"), np.dtype(shapes["cum_batch_mean_norm"].dtype))
        out["diverged"] = (("seed",), np.bool_)
    if "population" in shapes:
        out["population_diverged"] = ((), np.bool_)
        if "train" not in shapes:
            out["diverged"] = ((), np.bool_)
    return out


def _behavior_names(cfg: SweepConfig) -> list[str]:
    if cfg.file_dist is not None and cfg.file_dist.names:
        return list(cfg.file_dist.names)
    return [f"behavior_{i}" for i in range(cfg.num_behaviors)]


def _make_template(cfg: SweepConfig, plan: Plan, layout: dict):
    import xarray as xr

    coords = {dim_name(axis): np.asarray(values) for axis, values in cfg.grid.items()}
    names = _behavior_names(cfg)
    coords.update({"seed": np.arange(cfg.seeds), "split": np.asarray(SPLITS), "step": plan.steps,
                   "behavior": np.asarray(names), "behavior_other": np.asarray(names)})
    sizes = {dim_name(axis): len(v) for axis, v in cfg.grid.items()}
    sizes.update({"seed": cfg.seeds, "split": 2, "step": len(plan.steps), "behavior": len(names),
                  "behavior_other": len(names), "chunk": len(plan.chunks)})
    grid_dims = tuple(dim_name(a) for a in cfg.grid)
    data_vars, encoding = {}, {}
    for name, (tail, dtype) in layout.items():
        dims = grid_dims + tuple(tail)
        shape = tuple(sizes[d] for d in dims)
        fill = False if dtype == np.bool_ else np.nan
        data_vars[name] = (dims, np.broadcast_to(np.asarray(fill, dtype=dtype), shape))
        encoding[name] = {"chunks": tuple(plan.block) + tuple(sizes[d] for d in tail)}
    data_vars["chunk_done"] = (("chunk",), np.zeros(len(plan.chunks), dtype=bool))
    encoding["chunk_done"] = {"chunks": (1,)}
    ds = xr.Dataset(data_vars, coords={k: v for k, v in coords.items() if k in sizes})
    ds = ds.drop_vars([c for c in ("seed", "split") if c in ds.coords and c not in
                       {d for v in ds.data_vars.values() for d in v.dims}])
    resolved = cfg.resolved()
    devices = [str(dv) for dv in jax.devices()]
    ds.attrs.update({
        "title": f"dpo-sims sweep {cfg.name}",
        "description": cfg.description,
        "config": json.dumps(resolved, sort_keys=True),
        "dynamics_version": dd.__version__,
        "jax_version": jax.__version__,
        "jax_devices": devices,
        "python_version": platform.python_version(),
        "chunk_block": list(plan.block),
        "n_chunks": len(plan.chunks),
        "key_derivation": resolved["key_derivation"],
        "source": "Im & Li, Understanding the Learning Dynamics of Alignment with Human Feedback, ICML 2024 "
                  "(arXiv:2403.18742); model in docs/theory.md",
    })
    return ds, encoding


def _assemble(cfg: SweepConfig, spec: GroupSpec, plan: Plan, out: dict, n_valid: int, extents, layout) -> dict:
    """Device output of a chunk → variable name → array over the region (padding dropped)."""
    step_pos = np.searchsorted(plan.steps, np.arange(0, spec.steps + 1, spec.record_every))
    full_steps = len(step_pos) == len(plan.steps)
    arrays = {}

    def put(name, value, step_axis=None):
        value = np.asarray(value)[:n_valid]
        if step_axis is not None and not full_steps:
            shape = list(value.shape)
            shape[step_axis] = len(plan.steps)
            fill = np.full(shape, np.nan, dtype=value.dtype)
            sl = [slice(None)] * len(shape)
            sl[step_axis] = step_pos
            fill[tuple(sl)] = value
            value = fill
        arrays[name] = value.reshape(tuple(extents) + value.shape[1:])

    for name in ("behavior_distinguishability", "behavior_projection", "priority_gap"):
        put(name, out[name])
    if "population" in out:
        for m, v in out["population"].items():
            put(f"population_{m}", v, step_axis=1)
        put("population_diverged", out["population_diverged"])
    if "train" in out:
        for m in out["train"]:
            put(m, np.stack([np.asarray(out["train"][m]), np.asarray(out["eval"][m])], axis=2), step_axis=3)
        put("cum_batch_mean_norm", out["cum_batch_mean_norm"], step_axis=2)
        put("diverged", out["diverged"])
    elif "population" in out:
        put("diverged", out["population_diverged"])
    return {k: v for k, v in arrays.items() if k in layout}


#: grids above this many configurations need ``allow_huge`` (``--allow-huge``)
MAX_CONFIGS = 10_000_000
#: for :func:`estimate_cost`: the sustained rate of the compiled engine in :func:`work_estimate` flops
#: per second, and the seconds of one group's compile (measured with builtin:example on 2 shared, loaded
#: CPU cores: 2.8e9 flops/s, a 23 s "fast" compile; an accelerator runs faster)
_ESTIMATE_FLOPS_PER_S = 2e9
_ESTIMATE_COMPILE_S = {"fast": 10.0, "optimized": 30.0}


def _fmt_seconds(secs: float) -> str:
    if secs < 90:
        return f"{secs:.0f} s"
    if secs < 5400:
        return f"{secs / 60:.0f} min"
    return f"{secs / 3600:.1f} h"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _store_bytes(cfg: SweepConfig, plan: Plan, layout: dict) -> int:
    """Uncompressed bytes of the store's variables (the disk use is at most about this)."""
    k = cfg.num_behaviors
    sizes = {"seed": cfg.seeds, "split": 2, "step": len(plan.steps), "behavior": k, "behavior_other": k}
    total = 0
    for tail, dtype in layout.values():
        total += cfg.num_configs * int(np.prod([sizes[d] for d in tail], dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(total + 9 * len(plan.chunks))  # chunk_done, chunk_digest


def estimate_cost(cfg: SweepConfig, plan: Plan, layout: dict, compile_mode: str = "auto") -> tuple[float, int]:
    """``(seconds, bytes)``: a rough run time and the uncompressed store size of a sweep.

    Seconds: :func:`work_estimate` at about 2 GFLOP/s (2 CPU cores; measured) plus one compile
    per group; a guide to the order of magnitude, not a promise. Bytes: every stored variable
    (``layout`` from the program's shapes) over the whole grid.
    """
    mode = resolve_compile_mode(cfg, compile_mode)
    secs = work_estimate(cfg) / _ESTIMATE_FLOPS_PER_S + _ESTIMATE_COMPILE_S[mode] * len(_static_combos(cfg))
    return float(secs), _store_bytes(cfg, plan, layout)


def _plan_layout(cfg: SweepConfig, plan: Plan) -> dict:
    """The store layout of a sweep (abstract evaluation of its first chunk; nothing is computed)."""
    keys = seed_key(cfg.seed, jnp.arange(cfg.seeds))
    idx, _, _ = _chunk_configs(cfg, plan, plan.chunks[0])
    params, statics = _chunk_inputs(cfg, idx, plan.chunk_configs)
    return _check_program(cfg, _group_spec(cfg, statics), params, keys)


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` did: the store path, chunk counts, timing and a divergence note."""

    path: Path
    n_chunks: int
    computed: int
    skipped: int
    seconds: float
    resumed: bool
    interrupted: bool = False
    diverged: str = ""


def run_sweep(cfg: SweepConfig, out, *, chunk_size: int | None = None, overwrite: bool = False,
              progress: bool = True, log=None, compile_mode: str = "auto", executor=None,
              allow_version_change: bool = False, allow_huge: bool = False) -> SweepResult:
    """Run (or resume) a sweep and write it to the zarr store ``out``.

    Args:
      cfg: a validated :class:`SweepConfig`.
      out: the store directory (``RESULTS.zarr``).
      chunk_size: configurations per compute chunk (``None`` = automatic);
        ignored when resuming (the store's layout wins).
      overwrite: replace an existing dpo-sims store of a different (or unreadable) config; a
        directory dpo-sims did not write, or a store holding other files, is never deleted.
      progress: show a tqdm bar over chunks (stderr).
      log: ``print``-like callable for status lines (default: stderr).
      compile_mode: "auto" (default), "fast" or "optimized" — see
        :func:`resolve_compile_mode`; results agree to float rounding.
      executor: ``None`` (default device) or :func:`sims.distributed.sharded_executor` (``--devices``):
        each chunk's configurations are split over the devices (chunks padded to a multiple of
        their number). In a multi-process run (:func:`sims.distributed.initialize` first) process 0
        creates the store, process ``p`` of ``P`` computes and writes the chunks ``i ≡ p (mod P)``
        (zarr chunks are separate files), and all processes wait for each other at the end.
      allow_version_change: resume a store begun with another package, code, JAX or jaxlib
        version (recorded in its attribute ``resumes``) instead of refusing it.
      allow_huge: run a grid of more than :data:`MAX_CONFIGS` configurations.

    Resuming an existing store first checks every finished chunk against its checksum and
    recomputes the damaged ones (:func:`sims.store.verify_store`); a missing ``.zmetadata`` is
    rebuilt.

    Returns:
      :class:`SweepResult`. On Ctrl-C, the finished chunks are kept and
      ``interrupted`` is True.

    Raises:
      UsageError: before any computation: an ``out`` that is not writable, lies under a file, or
        is not a dpo-sims store; a grid above :data:`MAX_CONFIGS` without ``allow_huge``; memory;
        a store of another config (without ``overwrite``) or another version (without
        ``allow_version_change``); an unreadable store (nothing written).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    out, fresh = ResultsStore.check_target(out, overwrite=overwrite)  # writable, ours: before any computation
    block = None
    if not fresh and not overwrite:
        attrs = ResultsStore.read_attrs(out)
        if fingerprint_matches(attrs, cfg.resolved()):
            block = tuple(attrs["chunk_block"])
    plan = plan_sweep(cfg, chunk_size, block=block)
    mode = resolve_compile_mode(cfg, compile_mode)
    multiple = getattr(executor, "chunk_multiple", 1)
    pad_to = -(-plan.chunk_configs // multiple) * multiple  # the same number of configurations per device
    pid, nproc = jax.process_index(), jax.process_count()
    keys = seed_key(cfg.seed, jnp.arange(cfg.seeds))
    first_idx, _, _ = _chunk_configs(cfg, plan, plan.chunks[0])
    params0, statics0 = _chunk_inputs(cfg, first_idx, pad_to)
    spec0 = _group_spec(cfg, statics0)
    layout = _check_program(cfg, spec0, params0, keys)
    if cfg.num_configs > MAX_CONFIGS and not allow_huge:
        secs, nbytes = estimate_cost(cfg, plan, layout)
        raise UsageError(f"{cfg.source}: {cfg.num_configs:,} configurations exceed {MAX_CONFIGS:,} (about "
                         f"{_fmt_seconds(secs)} and {_fmt_bytes(nbytes)} uncompressed); shrink the grid, or "
                         "pass --allow-huge to run it anyway")

    def prepare(ow):
        return ResultsStore.prepare(out, resolved=cfg.resolved(),
                                    make_template=lambda: _make_template(cfg, plan, layout), overwrite=ow,
                                    allow_version_change=allow_version_change, primary=pid == 0, log=log)

    if nproc > 1:  # process 0 creates the store; the others open it once it exists
        from jax.experimental import multihost_utils

        if pid == 0:
            store, resumed = prepare(overwrite)
        multihost_utils.sync_global_devices("dpo-sims sweep: store ready")
        if pid != 0:
            store, resumed = prepare(False)
    else:
        store, resumed = prepare(overwrite)
    done = store.done()
    pending = [i for i, ok in enumerate(done) if not ok]
    todo = [i for i in pending if i % nproc == pid]  # this process's share of the chunks
    resumed = resumed and len(pending) < len(plan.chunks)
    if resumed and pid == 0:
        log(f"resuming {out}: {len(plan.chunks) - len(pending)} of {len(plan.chunks)} chunks already done")
    result = SweepResult(path=out, n_chunks=len(plan.chunks), computed=0, skipped=len(plan.chunks) - len(pending),
                         seconds=0.0, resumed=resumed)
    from tqdm import tqdm

    bar = tqdm(total=len(plan.chunks), initial=result.skipped, unit="chunk", desc=f"sweep {cfg.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    # Ctrl-C: finish the running chunk (a KeyboardInterrupt inside XLA compilation can crash the
    # process), save it, then stop; a second Ctrl-C aborts at once, losing only the running chunk.
    stop = {"requested": False}

    def _on_sigint(signum, frame):
        if stop["requested"]:  # CLI: exit 130 at once (a raise inside XLA can segfault)
            from .cli import second_interrupt

            second_interrupt("sweep")
        stop["requested"] = True
        log("interrupt: saving the running chunk, then stopping (Ctrl-C again to abort now)")

    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        seen_groups: set = set()
        n_groups = len(_static_combos(cfg))
        for i in todo:
            if stop["requested"]:
                raise KeyboardInterrupt
            idx, region, extents = _chunk_configs(cfg, plan, plan.chunks[i])
            params, statics = _chunk_inputs(cfg, idx, pad_to)
            spec = _group_spec(cfg, statics)
            # what the bar is waiting for: a group's first chunk includes its compile (tens of seconds on CPU)
            if spec not in seen_groups:
                seen_groups.add(spec)
                bar.set_postfix_str(f"chunk {i}: compiling group {len(seen_groups)}/{n_groups}, then running",
                                    refresh=True)
            else:
                bar.set_postfix_str(f"chunk {i}: running", refresh=True)
            outputs = jax.device_get(_run_chunk(params, keys, cfg.file_dist, spec, mode, executor))
            arrays = _assemble(cfg, spec, plan, outputs, len(idx), extents, layout)
            store.write_chunk(i, region, arrays)
            result.computed += 1
            bar.set_postfix_str("", refresh=False)
            bar.update(1)
        if stop["requested"] and result.computed + result.skipped < len(plan.chunks):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        result.interrupted = True
        result.computed = int(store.done().sum()) - result.skipped
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        bar.close()
    if nproc > 1 and not result.interrupted:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dpo-sims sweep: all chunks written")
    result.seconds = time.perf_counter() - t0
    if not result.interrupted:
        from .store import open_results

        result.diverged = diverged_summary(open_results(out))
    return result


# --------------------------------------------------------------------------- CLI
def _fields_help() -> str:
    lines = []
    for name, f in FIELDS.items():
        default = "uniform" if f.default is None else json.dumps(f.default)
        role = {"static": "static, sweepable", "dynamic": "sweepable", "base": "base only"}[f.role]
        if f.family:
            role += f", family {f.family} only"
        extra = " (or a list of K)" if f.per_behavior else ""
        choices = f" {{{', '.join(f.choices)}}}" if f.choices else ""
        lines.append(f"  {name:<19} {f.kind}{extra}{choices} = {default}; {role}. {f.help}")
    return "\n".join(lines)


_EPILOG = """\
config (TOML; full reference in docs/sweeps.md):
  name = "my-sweep"            # optional label
  seeds = 4                    # seeds per configuration (dimension `seed`)
  seed = 0                     # base seed: seed s uses fold_in(key(seed), s)
  [base]                       # one configuration; every field has a default
  mode = "both"
  distinguishability = 1.0
  lr = 0.1
  steps = 100
  [grid]                       # axes: lists or {{linspace|logspace = [a, b, k]}}
  distinguishability = [0.5, 1.0, 2.0, 4.0]
  lr = {{logspace = [-2, -1, 3]}}
  # per-behaviour element: distinguishability_1 = [0.5, 1, 2]

fields ([base] keys; sweepable ones are [grid] axes):
{fields}

shipped configs (pass builtin:NAME): {builtins}
results: xarray.open_zarr(RESULTS.zarr); rerun the same command to resume.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of configurations (TOML) into a zarr results store",
        description="Run every configuration of a TOML sweep config (base + grid axes, seeds), "
        "compiled once per shape and vmapped, in chunks written as they finish; rerun to resume.",
        epilog=_EPILOG.format(fields=_fields_help(), builtins=", ".join(builtin_configs())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="sweep config .toml, or builtin:NAME for a shipped one")
    p.add_argument("--out", required=True, help="results store directory (e.g. results.zarr)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="configurations per compute chunk (default: automatic from memory, at most 256)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dpo-sims store of a different config (only a directory dpo-sims "
                   "wrote, holding nothing else, is ever deleted)")
    p.add_argument("--allow-version-change", action="store_true",
                   help="resume a store begun with another dpo-sims, code, JAX or jaxlib version (recorded in the "
                   "store's `resumes` attribute; default: refused)")
    p.add_argument("--allow-huge", action="store_true",
                   help=f"run a grid of more than {MAX_CONFIGS:,} configurations (default: refused; see --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (configs, chunks, memory, estimated time and store size) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto", dest="compile_mode",
                   help="XLA compile: fast (quick compile, slower run), optimized, or auto (fast for small sweeps)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a Python module (dotted name) or file (path.py) before reading the config, e.g. "
                   "one that calls sims.sweep.register_family for a custom family; repeatable")
    distributed.add_distributed_arguments(p)
    p.set_defaults(func=run)


_IMPORTED: set[str] = set()


def import_plugins(specs) -> None:
    """Import each ``MODULE`` (dotted name) or ``FILE.py`` (``--import``), e.g. to register custom families.

    Raises:
      UsageError: a file that does not exist, a module that cannot be found, or an error while
        importing it (its message included).
    """
    import importlib
    import importlib.util

    for spec in specs:
        path = Path(spec)
        ident = str(path.resolve()) if (spec.endswith(".py") or path.is_file()) else spec
        if ident in _IMPORTED:  # the same plugin twice: once is enough
            continue
        try:
            if spec.endswith(".py") or path.is_file():
                if not path.is_file():
                    raise UsageError(f"--import {spec}: no such file; pass an existing .py file or a module name")
                mod_name = f"dpo_sims_plugin_{path.stem}"
                module_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[mod_name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
            _IMPORTED.add(ident)
        except UsageError:
            raise
        except ModuleNotFoundError as e:
            raise UsageError(f"--import {spec}: {e}; pass an importable module name or a .py file path") from None
        except Exception as e:  # the plugin's own error, named
            raise UsageError(f"--import {spec}: importing it failed: {type(e).__name__}: {e}") from None


def run(args) -> int:
    # first, before any JAX computation: join a multi-process run (--coordinator, --num-processes,
    # --process-id or $DPO_COORDINATOR, $DPO_NUM_PROCESSES, $DPO_PROCESS_ID) and pick --devices
    pid, nproc, executor = distributed.distributed_from_args(args)
    import_plugins(args.imports)
    cfg = load_config(args.config)
    out = Path(args.out)
    if args.dry_run:
        plan = plan_sweep(cfg, args.chunk_size)
        groups = len(_static_combos(cfg))
        secs, nbytes = estimate_cost(cfg, plan, _plan_layout(cfg, plan), args.compile_mode)
        cap = (f"; above {MAX_CONFIGS:,} configurations: needs --allow-huge" if cfg.num_configs > MAX_CONFIGS
               else "")
        print(f"# sweep {cfg.name}: {cfg.num_configs} configurations x {cfg.seeds} seeds, axes "
              f"{dict(zip(cfg.axes, cfg.shape))}; {groups} compile group(s); {len(plan.chunks)} chunks of "
              f"{plan.chunk_configs} configurations (block {plan.block}); about "
              f"{plan.bytes_per_config * plan.chunk_configs / 2**20:.1f} MiB per chunk of "
              f"{plan.memory_available / 2**30:.1f} GiB available; compile "
              f"{resolve_compile_mode(cfg, args.compile_mode)} (~{work_estimate(cfg):.2g} flops); estimated "
              f"{_fmt_seconds(secs)} on 2 CPU cores and a store of at most {_fmt_bytes(nbytes)} "
              f"(uncompressed){cap}")
        return 0
    res = run_sweep(cfg, out, chunk_size=args.chunk_size, overwrite=args.overwrite,
                    progress=not args.no_progress and pid == 0, compile_mode=args.compile_mode, executor=executor,
                    allow_version_change=args.allow_version_change, allow_huge=args.allow_huge)
    if pid != 0:  # process 0 reports for the whole run
        return 130 if res.interrupted else 0
    if res.interrupted:
        print(f"interrupted: {res.skipped + res.computed} of {res.n_chunks} chunks are saved in {out}; "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"# wrote {out}: {res.n_chunks} chunks ({res.computed} computed, {res.skipped} resumed) in "
          f"{res.seconds:.1f} s; open with xarray.open_zarr({str(out)!r})")
    if res.diverged:
        print(f"# diverged (NaN/inf; see the `diverged` variable): {res.diverged}")
    return 0
