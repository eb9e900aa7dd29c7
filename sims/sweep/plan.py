"""Planning a sweep: compile groups (:class:`GroupSpec`), chunks (:func:`plan_sweep`, sized by
:mod:`dynamics.chunking`), the compile mode and the cost estimate (``--dry-run``).
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

import jax.numpy as jnp

from dynamics import chunking

from ..cli import UsageError
from ..store import available_memory
from .config import SweepConfig, _split_axis, objective_options
from .schema import STATIC_FIELDS, parse_token_pairs


# --------------------------------------------------------------------------- planning
#: families whose draws the factored engine runs (the others run jax.vmap of the core)
_FACTORED_FAMILIES = ("gaussian", "laplace", "student_t")


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
    record_head: bool = False  # keep δ_t (the base field record_head)
    zero_head: bool = False  # every configuration starts from the zero head = reference (the engine then
    #                          skips the head's projections; else it cannot tell under tracing)
    vocab_size: int = 2  # V, the head's rows
    token_pairs: tuple | None = None  # one (a_k, b_k) per behaviour (None: (0, 1) for all)
    loss_weights: tuple | None = None  # weights of a combined loss 'a+b'
    hparams: tuple = ()  # (name, value) of the objective's hyper-parameters that differ from its defaults

    @property
    def num_records(self) -> int:
        return self.steps // self.record_every + 1

    @property
    def objective(self):
        """The ``loss`` of :func:`dynamics.trajectories`: a name, or a list for a combined loss ``'a+b'``."""
        names = self.loss.split("+")
        return names[0] if len(names) == 1 else names

    @property
    def vocab(self) -> bool:
        """Whether the group runs the vocabulary layers (an objective other than the margin losses, V > 2,
        per-behaviour token pairs, or a hyper-parameter off its default; docs/sweeps.md)."""
        from dynamics.losses import LOSSES

        pairs = self.token_pairs is not None and any(p != (0, 1) for p in self.token_pairs)
        return (self.loss not in LOSSES or self.vocab_size > 2 or pairs or bool(self.hparams)
                or self.loss_weights is not None)


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
    """Working bytes one configuration of ``spec``'s group needs, all seeds included
    (:mod:`dynamics.chunking`'s model of the engine that runs it).

    Empirical: the factored engine's per-pair temporaries (Gaussian, Laplace and Student-t
    families; the others run ``jax.vmap`` of the core, which holds each configuration's
    embeddings), one seed at a time (the seeds run one after another), with every seed's recorded
    metrics. Population: the factored kernel's components (2K; 4K for the mixture family).
    """
    item = jnp.dtype(jnp.result_type(float)).itemsize
    k, d, t = spec.num_behaviors, spec.d, spec.num_records
    total = 0
    if spec.mode in ("empirical", "both"):
        impl = "factored" if spec.family in _FACTORED_FAMILIES else "vmap"
        roots = 1 if spec.kind == "gaussian" else 2
        total += chunking.empirical_bytes_per_config(
            n=spec.n, n_eval=spec.n_eval, d=d, num_behaviors=k, records=t * cfg.seeds, num_roots=roots,
            itemsize=item, implementation=impl)
    if spec.mode in ("population", "both"):
        comps = 4 * k if spec.family == "mixture" else 2 * k
        total += chunking.population_bytes_per_config(d=d, num_components=comps, num_behaviors=k, records=t,
                                                      full_cov=spec.kind == "file" or spec.family == "mixture",
                                                      itemsize=item)
    return int(total)


def _sweeps_value_other_than(cfg: SweepConfig, name: str, value: float) -> bool:
    """Whether any configuration has a per-behaviour ``name`` entry ≠ ``value``."""
    vals = list(cfg.base[name])
    for axis, axis_values in cfg.grid.items():
        if _split_axis(axis)[0] == name:
            vals += list(axis_values)
    return any(v != value for v in vals)


def _group_spec(cfg: SweepConfig, values: dict) -> GroupSpec:
    opts = objective_options(values)
    return GroupSpec(mode=cfg.base["mode"], kind=cfg.base["distribution"], num_behaviors=cfg.num_behaviors,
                     d=values["d"], loss=values["loss"], optimizer=values["optimizer"], method=values["method"],
                     n=values["n"], n_eval=values["n_eval"], batch_size=values["batch_size"],
                     steps=values["steps"], record_every=values["record_every"], family=values["family"],
                     label_noise=_sweeps_value_other_than(cfg, "label_noise", 0.0),
                     loss_weight=_sweeps_value_other_than(cfg, "loss_weight", 1.0),
                     record_head=bool(cfg.base.get("record_head", False)),
                     zero_head=all(v == 0 for name in ("aligned_head_norm", "init_offset")
                                   for v in cfg.grid.get(name, [cfg.base[name]])),
                     vocab_size=values.get("vocab_size", 2),
                     token_pairs=parse_token_pairs(values.get("token_pairs", ""), values.get("vocab_size", 2),
                                                   cfg.num_behaviors),
                     loss_weights=opts["loss_weights"], hparams=tuple(sorted(opts["hparams"].items())))


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
      chunk_size: configurations per chunk (``None``: automatic, by the one chunking policy of
        the engines, :func:`dynamics.chunking.configs_per_chunk`: as many as fit the engine's
        working-memory budget (:data:`dynamics.chunking.CHUNK_BUDGET`, at most half the available
        memory), at most 4096 (16384 for population-only sweeps) and at most the dynamic
        sub-grid, evened out over the chunks). block: force a block shape (resuming a store).
      memory: available bytes (default :func:`sims.store.available_memory`).

    Raises:
      UsageError: one configuration (all seeds) needs more memory than is
        available, or ``chunk_size`` does not fit.
    """
    memory = available_memory() if memory is None else int(memory)
    specs = _static_combos(cfg)
    per = max(_bytes_per_config(cfg, s) for s in specs)
    budget = min(chunking.CHUNK_BUDGET, int(memory * chunking.MEMORY_FRACTION))
    if per > memory:
        big = max(specs, key=lambda s: _bytes_per_config(cfg, s))
        few = _bytes_per_config(cfg, dataclasses.replace(big, steps=big.record_every))  # 2 recorded steps
        if 2 * few < per:  # the recorded metrics dominate: it is steps (name it, not seeds/n/d)
            why = (f"it records {big.num_records:,} steps (steps / record_every + 1); lower steps or raise "
                   "record_every")
        else:
            why = "seeds x (n + n_eval) x d x ...; lower seeds, n, n_eval or d"
        raise UsageError(
            f"{cfg.source}: one configuration needs about {per / 2**30:.3g} GiB but only "
            f"{memory / 2**30:.3g} GiB is available: {why}"
        )
    sizes = cfg.shape
    dyn = [i for i, a in enumerate(cfg.grid) if not cfg.is_static_axis(a)]
    dyn_total = int(np.prod([sizes[i] for i in dyn], dtype=np.int64)) if dyn else 1
    if block is None:
        if chunk_size is None:
            cap = chunking.MAX_POPULATION_CHUNK if cfg.base["mode"] == "population" else chunking.MAX_EMPIRICAL_CHUNK
            want = chunking.configs_per_chunk(dyn_total, per, budget=budget, cap=cap)
            want = chunking.balanced_chunk(dyn_total, want)
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
    """"auto" → "fast" when :func:`work_estimate` is below :data:`dynamics.chunking.FAST_WORK_LIMIT`
    (2e10 flops), else "optimized" (:func:`dynamics.chunking.compile_mode`).

    Raises:
      UsageError: an unknown mode.
    """
    if compile_mode not in chunking.COMPILE_MODES:
        raise UsageError(f"--compile {compile_mode!r}: choose one of {list(chunking.COMPILE_MODES)}")
    return chunking.compile_mode(work_estimate(cfg) if compile_mode == "auto" else 0.0, compile_mode)


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
    sizes = {"seed": cfg.seeds, "split": 2, "step": len(plan.steps), "behavior": k, "behavior_other": k,
             "token": max(cfg.grid.get("vocab_size", [cfg.base.get("vocab_size", 2)]))}
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

