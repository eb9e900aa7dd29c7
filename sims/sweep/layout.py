"""The results store's layout: variable shapes from an abstract evaluation of a chunk, the
store template (coordinates, attributes, zarr chunks) and a chunk's arrays (padding dropped).
"""
from __future__ import annotations

import json
import platform
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import dynamics as dd

from .build import _chunk_impl
from .config import SweepConfig
from .plan import GroupSpec, Plan
from .schema import SPLITS, dim_name


# --------------------------------------------------------------------------- layout
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
            out[f"population_{m}"] = (("step",) + _metric_tail(m), np.dtype(s.dtype))
    if "train" in shapes:
        for m, s in shapes["train"].items():
            out[m] = (("seed", "split", "step") + _metric_tail(m), np.dtype(s.dtype))
        if "cum_batch_mean_norm" in shapes:  # margin engine only
            out["cum_batch_mean_norm"] = (("seed", "step"), np.dtype(shapes["cum_batch_mean_norm"].dtype))
        out["diverged"] = (("seed",), np.bool_)
    for name, tail in (("population_delta", ("step", "dim")), ("delta", ("seed", "step", "dim"))):
        if name in shapes:  # record_head
            out[name] = (tail, np.dtype(shapes[name].dtype))
    if "population" in shapes:
        out["population_diverged"] = ((), np.bool_)
        if "train" not in shapes:
            out["diverged"] = ((), np.bool_)
    return out


def _metric_tail(name: str) -> tuple:
    """Dimensions of a metric after ``step``: ``behavior`` for ``behavior_*``, ``token`` for ``*probs``
    (the vocabulary metrics, docs/sweeps.md)."""
    return (("behavior",) if name.startswith("behavior_") else ()) + (("token",) if name.endswith("probs") else ())


def _vocab_dim(cfg: SweepConfig) -> int:
    """Size of the ``token`` axis: the sweep's largest vocabulary size V (NaN past a group's own V)."""
    return max(cfg.grid["vocab_size"] if "vocab_size" in cfg.grid else [cfg.base.get("vocab_size", 2)])


def _head_dim(cfg: SweepConfig) -> int:
    """Size of the stored heads' ``dim`` axis (record_head): the sweep's largest ``d`` (a file's dimension)."""
    if cfg.file_dist is not None:
        return cfg.file_dist.dim
    return max(cfg.grid["d"] if "d" in cfg.grid else [cfg.base["d"]])


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
                  "behavior_other": len(names), "chunk": len(plan.chunks), "dim": _head_dim(cfg),
                  "token": _vocab_dim(cfg)})
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
        if name.endswith("probs") and value.shape[-1] < _vocab_dim(cfg):  # the token axis, NaN past this V
            pad = [(0, 0)] * (value.ndim - 1) + [(0, _vocab_dim(cfg) - value.shape[-1])]
            value = np.pad(value, pad, constant_values=np.nan)
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
    for name, step_axis in (("population_delta", 1), ("delta", 2)):
        if name in out:  # record_head: δ's last axis padded to the store's dim (the largest d) with NaN
            v = np.asarray(out[name])
            pad = [(0, 0)] * (v.ndim - 1) + [(0, _head_dim(cfg) - v.shape[-1])]
            put(name, np.pad(v, pad, constant_values=np.nan), step_axis=step_axis)
    if "population" in out:
        for m, v in out["population"].items():
            put(f"population_{m}", v, step_axis=1)
        put("population_diverged", out["population_diverged"])
    if "train" in out:
        for m in out["train"]:
            put(m, np.stack([np.asarray(out["train"][m]), np.asarray(out["eval"][m])], axis=2), step_axis=3)
        if "cum_batch_mean_norm" in out:
            put("cum_batch_mean_norm", out["cum_batch_mean_norm"], step_axis=2)
        put("diverged", out["diverged"])
    elif "population" in out:
        put("diverged", out["population_diverged"])
    return {k: v for k, v in arrays.items() if k in layout}

