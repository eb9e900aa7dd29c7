"""Sweep configs: reading and validating TOML (:func:`load_config`, :func:`parse_config`) into a
:class:`SweepConfig`, the cross-field rules, and the field values of one configuration
(:func:`configuration_fields`). JAX is imported only to read a distribution file or look up the
loss registry while parsing.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import math
import tomllib
from pathlib import Path

import numpy as np

from ..cli import UsageError
from ..store import config_fingerprint
from .families import FAMILIES, _is_shipped
from .schema import (FIELDS, OBJECTIVE_HPARAMS, RENAMED_KEYS, TOP_KEYS, parse_token_pairs, _axis_values, _check_scalar, _fail, _split_axis,
                     _suggest, _type_name)


#: the fields of the vocabulary objectives (left out of the resolved config at their defaults)
VOCAB_FIELDS = ("loss_weights", "vocab_size", "token_pairs", *OBJECTIVE_HPARAMS)


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
               "base": {k: v for k, v in self.base.items()
                        if not (k in VOCAB_FIELDS and v == FIELDS[k].default)},  # old stores keep their fingerprint
               "grid": {k: list(v) for k, v in self.grid.items()},
               "key_derivation": "seed s: jax.random.fold_in(jax.random.key(seed), s)"}
        if self.file_sha256:
            out["distribution_sha256"] = self.file_sha256
        code = {name: _code_digest(FAMILIES[name].build) for name in sorted(self.families)
                if name in FAMILIES and not _is_shipped(name)}
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
        if p.is_dir():
            raise UsageError(f"{p}: is a directory, not a config file; pass a TOML sweep config (see docs/sweeps.md)")
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


def _sync_loss_choices() -> None:
    """Give the ``loss`` field the losses of :data:`dynamics.LOSSES` (including ones registered at
    run time; the schema's JAX-free :data:`~sims.sweep.schema.LOSS_NAMES` lists the shipped ones)."""
    from dynamics.losses import LOSSES, OBJECTIVE_NAMES

    choices = tuple(LOSSES) + tuple(n for n in OBJECTIVE_NAMES if n not in LOSSES)
    if FIELDS["loss"].choices != choices:
        FIELDS["loss"] = dataclasses.replace(FIELDS["loss"], choices=choices)


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
    _sync_loss_choices()
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
        if key in RENAMED_KEYS:
            _fail(source, where, f"{key} was renamed; use {RENAMED_KEYS[key]} instead")
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
        import dynamics as dd

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
            if key in RENAMED_KEYS:
                _fail(source, where, f"{key} was renamed; use {RENAMED_KEYS[key]} instead")
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


def takes_hparam(loss: str, name: str) -> bool:
    """Whether one of the objectives of ``loss`` (``'a+b'``) takes the hyper-parameter ``name``."""
    from dynamics.losses import get_objective

    return any(name in get_objective(n).hparams for n in loss.split("+"))


def objective_options(values: dict) -> dict:
    """The objective's arguments of one configuration for :func:`dynamics.trajectories`: ``loss`` (a name
    or a list), ``loss_weights`` (or ``None``) and the hyper-parameters its objectives take that differ
    from their defaults (so a margin loss at its defaults stays on the paper's engine).

    Raises:
      ValueError: ``loss_weights`` that are not numbers or do not match the combined loss.
    """
    from dynamics.losses import get_objective

    names = values["loss"].split("+")
    text = values.get("loss_weights", "") or ""
    weights = None
    if text.strip():
        try:
            weights = tuple(float(w) for w in text.split(","))
        except ValueError:
            raise ValueError(f"loss_weights = {text!r}: write numbers separated by ',' (one per objective of loss)") from None
        if len(weights) != len(names):
            raise ValueError(f"loss_weights = {text!r} has {len(weights)} weights but loss = {values['loss']!r} has "
                             f"{len(names)} objectives; give one weight per objective")
    hp = {}
    for name in OBJECTIVE_HPARAMS:
        v = values.get(name)
        users = [n for n in names if name in get_objective(n).hparams]
        if v is None or not users:
            continue
        if all(v == get_objective(n).hparams[name] for n in users):
            continue
        hp[name] = v
    return {"loss": names[0] if len(names) == 1 else names, "loss_weights": weights, "hparams": hp}


def _check_objectives(cfg: SweepConfig, where) -> None:
    """Every objective setting of the sweep, checked by the registry (one line per problem)."""
    import jax.numpy as jnp
    from dynamics.losses import objective_loss

    src = cfg.source
    for name in OBJECTIVE_HPARAMS:
        vals = [v for v in _axis_or_base(cfg, name) if v is not None]
        if vals and not any(takes_hparam(l, name) for l in _axis_or_base(cfg, "loss")):
            _fail(src, where(name), f"{name} is taken by no loss of the sweep ({sorted(set(_axis_or_base(cfg, 'loss')))}); "
                  "remove it or sweep a loss that takes it")
    for combo in itertools.product(*(_axis_or_base(cfg, n) for n in ("loss", "loss_weights", "vocab_size",
                                                                     "token_pairs", *OBJECTIVE_HPARAMS))):
        values = dict(zip(("loss", "loss_weights", "vocab_size", "token_pairs", *OBJECTIVE_HPARAMS), combo))
        try:
            parse_token_pairs(values["token_pairs"], values["vocab_size"], cfg.num_behaviors)
        except ValueError as e:
            _fail(src, where("token_pairs"), str(e))
        try:
            opts = objective_options(values)
        except ValueError as e:
            _fail(src, where("loss_weights"), str(e))
        z = jnp.zeros((1,))
        for eps in _axis_or_base(cfg, "label_smoothing"):
            ls = {"label_smoothing": eps} if takes_hparam(values["loss"], "label_smoothing") else {}
            try:
                objective_loss(opts["loss"], z, z, z, z, beta=_axis_or_base(cfg, "beta")[0],
                               loss_weights=opts["loss_weights"], **opts["hparams"], **ls)
            except ValueError as e:
                _fail(src, where("loss"), f"loss = {values['loss']!r}: {str(e).splitlines()[0]}")


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
    ls_vals = _axis_or_base(cfg, "label_smoothing")
    if any(e != 0 for e in ls_vals) and not any(takes_hparam(l, "label_smoothing") for l in _axis_or_base(cfg, "loss")):
        _fail(src, where("label_smoothing"), "label_smoothing applies to loss = cdpo or robust only among the margin losses "
              "(and exo_pair, cpo, simpo, aot, aot_unpaired); the sweep has none — remove label_smoothing or sweep one "
              "of those losses")
    _check_objectives(cfg, where)
    if cfg.base["mode"] != "population" and cfg.num_configs * cfg.seeds > 50_000_000:
        _fail(src, "grid", f"{cfg.num_configs} configurations x {cfg.seeds} seeds = {cfg.num_configs * cfg.seeds} "
              "empirical runs is above the hard limit of 50000000 (--allow-huge does not lift it: the per-seed "
              "arrays alone would not fit); shrink the grid or the seeds, or use mode = \"population\"")


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

