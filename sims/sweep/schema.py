"""The sweep's configuration schema: one :class:`Field` record per config key (JAX-free).

:data:`FIELDS` lists every ``[base]`` key and ``[grid]`` axis of a sweep config (docs/sweeps.md):
its kind, default, role (static / dynamic / base), range and help. The single-value checks
(:func:`_check_scalar`, :func:`_axis_values`) and the argparse helpers (:func:`add_arguments`,
:func:`fields_help`) work from these records. Nothing here imports JAX, so ``dpo-sims sweep
--help`` stays fast; the loss and optimizer names are kept as tuples that the tests compare with
``dynamics.LOSSES`` and ``dynamics._train.OPTIMIZERS`` (and :func:`sims.sweep.config.parse_config`
adds losses registered at run time).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math

import numpy as np

from ..cli import UsageError

MODES = ("population", "empirical", "both")
DISTRIBUTIONS = ("gaussian", "file")
METHODS = ("gd", "flow")
SPLITS = ("train", "eval")
TOP_KEYS = ("name", "description", "seeds", "seed", "base", "grid", "reproduce", "study")
#: dynamics.LOSSES (TRL loss_type names) and dynamics._train.OPTIMIZERS, without importing JAX
LOSS_NAMES = ("sigmoid", "cdpo", "robust", "hinge", "ipo")
#: dynamics.losses.OBJECTIVE_NAMES (every objective of the registry), without importing JAX
OBJECTIVE_NAMES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "cdpo", "rpo", "cpo",
                   "simpo", "orpo", "kto", "apo_zero_unpaired", "dpop", "beta_dpo")
#: the ``loss`` choices: the margin losses first, then the other objectives
LOSS_CHOICES = LOSS_NAMES + tuple(n for n in OBJECTIVE_NAMES if n not in LOSS_NAMES)
#: dynamics.losses.F_DIVERGENCES (TRL's ``f_divergence_type``)
F_DIVERGENCE_NAMES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: the objectives' hyper-parameters the sweep sets (``None``: the objective's default); each is
#: passed only to the objectives that take it (``dynamics.get_objective(name).hparams``)
OBJECTIVE_HPARAMS = ("rpo_alpha", "cpo_alpha", "simpo_gamma", "f_divergence_type", "f_alpha_divergence_coef",
                     "dpop_lambda", "discopop_tau", "bco_delta")
OPTIMIZER_NAMES = ("sgd", "momentum", "adam")
#: the ``--compile`` choices (dynamics.chunking.COMPILE_MODES)
COMPILE_MODES = ("auto", "fast", "optimized")
#: grids above this many configurations need ``allow_huge`` (``--allow-huge``)
MAX_CONFIGS = 10_000_000


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


#: old TOML keys that were renamed: a one-line error names the new key (no silent alias)
RENAMED_KEYS = {"eps": "label_smoothing"}


FIELDS = {f.name: f for f in (
    Field("mode", "str", "both", "base", "what to run: population (analytic, N → ∞), empirical "
          "(finite samples, per seed) or both", choices=MODES),
    Field("loss", "str", "sigmoid", "static", "objective (TRL loss_type, or CPO/SimPO/ORPO/KTO/DPOP/RPO/β-DPO); "
          "'a+b' combines objectives with loss_weights. The margin losses with vocab_size = 2 run the paper's "
          "engine, the others the vocabulary layers (docs/theory.md §7, §8)", choices=LOSS_CHOICES),
    Field("loss_weights", "str", "", "static", "weights of a combined loss 'a+b' as 'w_a,w_b' (TRL loss_weights); "
          "'' = all 1"),
    Field("vocab_size", "int", 2, "static", "answer vocabulary size V of the head (V > 2 runs the vocabulary "
          "layers)", low=2),
    Field("token_pairs", "str", "", "static", "chosen/rejected token pair of each behaviour as 'a_0,b_0;a_1,b_1;…' "
          "(tokens in [0, V)); '' = every behaviour (0,1)"),
    Field("rpo_alpha", "float", None, "static", "RPO's NLL weight α (loss rpo)", low=0.0),
    Field("cpo_alpha", "float", None, "static", "CPO/SimPO's NLL weight (loss cpo, simpo)", low=0.0),
    Field("simpo_gamma", "float", None, "static", "SimPO's target reward margin γ (loss simpo)", low=0.0),
    Field("f_divergence_type", "str", None, "static", "TRL's f-divergence of the log-ratios (DPOTrainer losses)",
          choices=F_DIVERGENCE_NAMES),
    Field("f_alpha_divergence_coef", "float", None, "static", "α of f_divergence_type = alpha_divergence"),
    Field("dpop_lambda", "float", None, "static", "DPOP's penalty λ (loss dpop)", low=0.0),
    Field("discopop_tau", "float", None, "static", "DiscoPOP's temperature τ (loss discopop)", low=0.0, low_open=True),
    Field("bco_delta", "float", None, "static", "BCO's reward shift δ (loss bco_pair)"),
    Field("beta", "float", 1.0, "dynamic", "β of the loss", low=0.0, low_open=True),
    Field("label_smoothing", "float", 0.0, "dynamic", "label smoothing ε for cdpo / robust", low=0.0, high=0.5, high_open=True),
    Field("optimizer", "str", "sgd", "static", "optimizer on the head W", choices=OPTIMIZER_NAMES),
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
    Field("record_head", "bool", False, "base", "also store the reduced head δ_t = w_a − w_b at the recorded "
          "steps: population_delta (step, dim) and delta (seed, step, dim); dim = the largest d (NaN past a "
          "configuration's own d)"),
    Field("family", "str", "gaussian", "static", "embedding law with the moments built above: gaussian, laplace, "
          "student_t (parameter nu), mixture (parameter mixture_spread) or a registered custom family "
          "(sims.sweep.register_family, --import)", choices=("gaussian",)),
)}


#: the values that set array shapes or the compiled program (one compile each)
STATIC_FIELDS = tuple(n for n, f in FIELDS.items() if f.role == "static")


def dynamic_fields() -> tuple[str, ...]:
    """Names of the vmapped fields, including the parameters of registered families."""
    return tuple(n for n, f in FIELDS.items() if f.role == "dynamic")


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
    if value is None and field.default is None and field.name in OBJECTIVE_HPARAMS:
        return None
    if field.name == "loss" and isinstance(value, str) and "+" in value:  # a combined objective 'a+b'
        parts = value.split("+")
        for part in parts:
            _check_scalar(source, where, dataclasses.replace(field, name="loss part"), part)
        if len(set(parts)) != len(parts):
            _fail(source, where, f"loss {value!r} repeats an objective; list each once")
        return value
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


def fields_help(fields) -> str:
    """One line per field (name, kind, choices, default, role, help), for ``--help`` epilogs.

    Args:
      fields: :class:`Field` records (e.g. ``FIELDS.values()``).
    """
    lines = []
    for f in fields:
        default = _default_text(f, f.default)
        role = {"static": "static, sweepable", "dynamic": "sweepable", "base": "base only"}[f.role]
        if f.family:
            role += f", family {f.family} only"
        extra = " (or a list of K)" if f.per_behavior else ""
        choices = f" {{{', '.join(f.choices)}}}" if f.choices else ""
        lines.append(f"  {f.name:<19} {f.kind}{extra}{choices} = {default}; {role}. {f.help}")
    return "\n".join(lines)


def _default_text(field: Field, default) -> str:
    if default is None:
        return "the objective's default" if field.name in OBJECTIVE_HPARAMS else "uniform"
    return json.dumps(default)


def parse_token_pairs(text: str, vocab_size: int, num_behaviors: int) -> tuple | None:
    """``'a_0,b_0;a_1,b_1'`` → ``((a_0, b_0), (a_1, b_1))`` checked against V and K; ``''`` → ``None``.

    One pair is used by every behaviour. Raises ValueError naming ``token_pairs`` and the fix.
    """
    if not text.strip():
        return None
    pairs = []
    for k, item in enumerate(text.split(";")):
        parts = item.split(",")
        try:
            a, b = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"token_pairs: pair {k} is {item.strip()!r}; write two token indices 'a,b' per behaviour, "
                             "separated by ';' (e.g. '0,1;1,2')") from None
        if not (0 <= a < vocab_size and 0 <= b < vocab_size):
            raise ValueError(f"token_pairs: pair {k} ({a},{b}) names a token outside the vocabulary [0, V={vocab_size}); "
                             f"use tokens in [0, {vocab_size}) or raise vocab_size")
        if a == b:
            raise ValueError(f"token_pairs: pair {k} ({a},{b}) has chosen = rejected; pass two different tokens")
        pairs.append((a, b))
    if len(pairs) == 1 and num_behaviors > 1:
        pairs = pairs * num_behaviors
    if len(pairs) != num_behaviors:
        raise ValueError(f"token_pairs gives {len(pairs)} pairs but there are K = {num_behaviors} behaviours; give one "
                         "pair per behaviour (or one for all)")
    return tuple(pairs)


def _range_text(field: Field) -> str:
    lo = "" if field.low is None else ("(" if field.low_open else "[") + f"{field.low:g}"
    hi = "" if field.high is None else f"{field.high:g}" + (")" if field.high_open else "]")
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>' if field.low_open else '>='} {field.low:g}"
    return f" {'<' if field.high_open else '<='} {field.high:g}" if hi else ""


def _argparse_type(field: Field, flag: str):
    """An argparse ``type=`` that parses one value of ``field`` and applies its checks."""
    def parse(text: str):
        if field.kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        elif field.kind == "int":
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        else:
            value = text
        try:
            return _check_scalar(flag, "value", field, value)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 2)[-1]) from None
    parse.__name__ = field.kind
    return parse


class _Combinable(tuple):
    """The ``loss`` choices for argparse: a name, or names joined by ``+`` (a combined objective)."""

    def __contains__(self, value) -> bool:
        return isinstance(value, str) and all(tuple.__contains__(self, part) for part in value.split("+"))


def add_arguments(parser, fields, *, defaults: dict | None = None) -> None:
    """Add one ``--NAME`` flag per :class:`Field` to an argparse parser (or argument group).

    The flag is the field name with ``-`` for ``_`` (``label_smoothing`` → ``--label-smoothing``);
    its value lands in ``args.NAME``. Numbers are parsed and range-checked by the field's own rule
    (a bad value is argparse's usage error, exit 2, naming the flag and the valid range); strings
    with choices get them; booleans are ``--NAME`` / ``--no-NAME``; per-behaviour fields take one
    or more values (``nargs="+"``).

    Args:
      parser: an ``argparse.ArgumentParser`` or argument group.
      fields: :class:`Field` records, or a mapping name → Field.
      defaults: name → default overriding the field's default (e.g. a command's own settings).

    Raises:
      ValueError: a name in ``defaults`` that is not one of ``fields``.
    """
    records = list(fields.values()) if isinstance(fields, dict) else list(fields)
    names = {f.name for f in records}
    unknown = sorted(set(defaults or {}) - names)
    if unknown:
        raise ValueError(f"defaults for {unknown} name no field of {sorted(names)}; pass defaults only for these")
    for f in records:
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        shown = _default_text(f, default)
        help_text = f"{f.help} (default {shown}".replace("%", "%%")
        if f.kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text + ")")
            continue
        kwargs = {"dest": f.name, "default": default, "type": _argparse_type(f, flag),
                  "help": help_text + (f"; {_range_text(f).strip()}" if _range_text(f) else "") + ")"}
        if f.choices:
            kwargs["choices"] = _Combinable(f.choices) if f.name == "loss" else f.choices
            kwargs["metavar"] = "{" + ",".join(f.choices) + "}"
        if f.per_behavior:
            kwargs["nargs"] = "+"
        parser.add_argument(flag, **kwargs)
