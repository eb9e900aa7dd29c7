"""Embedding-law families of the sweep (``family = NAME``): the registry and the shipped ones.

A family turns the Gaussian a configuration describes into another law with the same moments
(docs/custom-distributions.md). Registering one adds its parameters to :data:`FIELDS`; this
module imports JAX only when a family is built, so ``dpo-sims sweep --help`` lists them JAX-free.
"""
from __future__ import annotations

import dataclasses

from ..cli import UsageError
from .schema import FIELDS, Field, _check_scalar, _split_axis


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
    import jax.numpy as jnp

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


def _is_shipped(name: str) -> bool:
    """Whether family ``name`` is one of the shipped ones (defined in this module)."""
    return getattr(FAMILIES[name].build, "__module__", None) == __name__


def _mixture(g, p):
    import dynamics as dd

    return dd.GaussianMixturePreference.from_gaussian(g, p["mixture_spread"])


def _elliptical(kind):
    def build(g, p):
        import jax.numpy as jnp

        import dynamics as dd

        nu = p["nu"] if kind == "student_t" else jnp.asarray(jnp.inf, g.mu_pos.dtype)
        return dd.EllipticalPreference(g, nu, kind)
    return build


# the shipped families (docs/custom-distributions.md); custom ones use the same call
register_family("gaussian", lambda g, p: g, help="the Gaussian itself (docs/theory.md §2)")


register_family("laplace", _elliptical("laplace"), help="multivariate Laplace with the Gaussian's moments")


register_family("student_t", _elliptical("student_t"),
                params={"nu": {"default": 5.0, "low": 2.0, "low_open": True,
                               "help": "Student-t degrees of freedom ν > 2 (family student_t; finite covariance)"}},
                help="multivariate Student-t (ν) with the Gaussian's moments")


register_family("mixture", _mixture,
                params={"mixture_spread": {"default": 0.5, "low": 0.0, "high": 1.0, "high_open": True,
                                           "help": "family mixture: each class splits into two modes along its "
                                                   "preference direction, keeping its moments; 0 = Gaussian, "
                                                   "→ 1 = two point-like modes"}},
                help="two-mode Gaussian mixture per class with the Gaussian's moments (exact analytic layer)")

