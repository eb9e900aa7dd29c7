"""``dpo-sims sweep``: many configurations, compiled once per shape, stored in zarr.

A sweep config (TOML, ``docs/sweeps.md``) has a ``[base]`` configuration and
``[grid]`` axes over its scalar fields; the sweep runs the cartesian product of
the axes, each with ``seeds`` PRNG seeds, through the engine entry point
:func:`dynamics.trajectories` (the factored engine where it applies, else ``jax.vmap`` of the
core functions :func:`dynamics.population_trajectory` and :func:`dynamics.empirical_trajectory`).

Execution (no Python loop over configurations):

* fields that set array shapes or the compiled program (``loss``,
  ``optimizer``, ``method``, ``n``, ``n_eval``, ``batch_size``, ``steps``,
  ``record_every``, ``d``, ``family``) are *static*; the others (``beta``,
  ``lr``, ``label_smoothing``, the distribution parameters and sampling weights, ``kappa``,
  ``flip_labels``, ``aligned_head_norm``, ``init_offset``, ``label_noise``,
  ``loss_weight``, the families' parameters such as ``nu``) are *dynamic* and
  are ``jax.vmap``-ed;
* ``family`` picks the embedding law given the Gaussian's moments
  (``gaussian``, ``laplace``, ``student_t``, ``mixture`` or one registered with
  :func:`register_family`);
* the grid is cut into compute chunks: blocks of configurations that share the
  static values (static axes have block length 1; dynamic axes fill the block
  from the last axis inwards, up to ``--chunk-size`` configurations, by default as many as
  :mod:`dynamics.chunking`'s memory budget allows). Every
  chunk of a group is padded to the full block size, so one group compiles once
  (one ``jax.jit`` of the chunk program) and the padding is dropped before writing;
* each chunk is written to the store when it finishes (``sims.store``); a rerun
  of the same command skips finished chunks.

Seeds: the PRNG key of seed index ``s`` is
``jax.random.fold_in(jax.random.key(seed), s)`` (``seed`` is the config's base
seed, default 0) — the same for every configuration (common random numbers), so
a stored run is reproduced exactly by
``dynamics.empirical_trajectory(dist, seed_key(seed, s), ...)`` with ``dist,
head = build_distribution(fields)`` (:func:`configuration_fields`).

The package, by concept: :mod:`.schema` (the fields; JAX-free), :mod:`.families`, :mod:`.config`
(parsing and checks), :mod:`.build` (the model and the chunk program), :mod:`.plan` (groups,
chunks, compile mode, cost), :mod:`.layout` (the store's variables), :mod:`.run`
(:func:`run_sweep`) and :mod:`.cli`. Importing ``sims.sweep`` imports no JAX; the names of the
JAX modules load on first use, so ``dpo-sims sweep --help`` stays fast.
"""
from __future__ import annotations

import importlib

from .cli import _EPILOG, _IMPORTED, import_plugins, register
from .config import (SweepConfig, _axis_or_base, _check_head_direction, _code_digest, _cross_checks, _families_in,
                     _grid_axis_names, _preference_mean_norm, builtin_configs, configuration_fields, load_config,
                     parse_config, read_builtin, rescale_weights)
from .families import FAMILIES, Family, build_family, register_family, unregister_family
from .schema import (COMPILE_MODES, DIM_NAMES, DISTRIBUTIONS, FIELDS, LOSS_NAMES, MAX_CONFIGS, METHODS, MODES,
                     OPTIMIZER_NAMES, RENAMED_KEYS, SPLITS, STATIC_FIELDS, TOP_KEYS, Field, _axis_values,
                     _check_scalar, _fail, _split_axis, _suggest, _type_name, add_arguments, dim_name,
                     dynamic_fields, fields_help)

__all__ = [
    "FIELDS",
    "Field",
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
    "add_arguments",
    "fields_help",
]

#: names of the JAX modules of the package, imported on first use (PEP 562)
_LAZY = {name: module for module, names in {
    "build": ("seed_key", "build_distribution", "_chunk_impl", "_chunk_body", "_tick", "_TICK_LISTENER"),
    "plan": ("_FACTORED_FAMILIES", "GroupSpec", "Plan", "_bytes_per_config", "_sweeps_value_other_than",
             "_group_spec", "_static_combos", "plan_sweep", "work_estimate", "resolve_compile_mode",
             "_ESTIMATE_FLOPS_PER_S", "_ESTIMATE_COMPILE_S", "_fmt_seconds", "_fmt_bytes", "_store_bytes",
             "estimate_cost"),
    "layout": ("_SHAPES", "_chunk_shapes", "_layout", "_behavior_names", "_make_template", "_assemble"),
    "run": ("_check_program", "_check_concrete_sample", "_chunk_configs", "_chunk_inputs", "_RUNNERS",
            "_SHARDED", "_run_chunk", "_plan_layout", "SweepResult", "run_sweep", "PROGRESS_REPORTS",
            "_ChunkTicks"),
}.items() for name in names}


_SUBMODULES = ("schema", "families", "config", "build", "plan", "layout", "run", "cli")


def __getattr__(name: str):
    if name in _SUBMODULES:  # e.g. sims.sweep.run before anything imported it
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
