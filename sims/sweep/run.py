"""Executing a sweep: the chunks' inputs, the compiled runners and :func:`run_sweep`.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dynamics import chunking
from dynamics.empirical import check_sample

from .. import distributed
from ..cli import UsageError
from ..store import ResultsStore, diverged_summary, fingerprint_matches
from .build import _TICK_LISTENER, _chunk_impl, build_distribution, seed_key
from .config import SweepConfig, configuration_fields
from .families import build_family
from .layout import _assemble, _layout, _make_template
from .plan import (GroupSpec, Plan, _fmt_bytes, _fmt_seconds, _group_spec, _static_combos, estimate_cost, plan_sweep,
                   resolve_compile_mode)
from .schema import MAX_CONFIGS, STATIC_FIELDS, dynamic_fields


# --------------------------------------------------------------------------- execution
def _check_program(cfg: SweepConfig, spec0: GroupSpec, params0, keys) -> dict:
    """Trace the first chunk (and one of every other family) and draw one concrete sample per family.

    A family whose builder fails, returns something else than a distribution, or whose
    ``sample`` gives wrong shapes, dtypes or values is refused here, before anything is written.
    Returns the store layout (:func:`_layout`).

    Raises:
      UsageError: one line naming the family, what it returned and what was expected.
    """
    specs = {(spec0.family, spec0.vocab): spec0}
    for combo in _static_combos(cfg):  # one of every family, and of each engine (margin, vocabulary)
        specs.setdefault((combo.family, combo.vocab), combo)
    spec = spec0  # the one being checked, for the messages
    try:
        layout = _layout(cfg, spec0, params0, keys)
        for spec in specs.values():
            if spec is not spec0:
                more = _layout(cfg, spec, params0, keys)
                layout.update({k: v for k, v in more.items() if k not in layout})  # the union of the groups' variables
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


#: the chunk program per compile mode ("fast": dynamics.chunking.FAST_COMPILE_OPTIONS, chosen
#: automatically for sweeps whose compute is small; see resolve_compile_mode)
_RUNNERS = {mode: jax.jit(_chunk_impl, static_argnames=("spec", "progress_every"),
                          compiler_options=chunking.compiler_options(mode))
            for mode in ("optimized", "fast")}
_SHARDED: dict = {}


def _run_chunk(params, keys, file_dist, spec: GroupSpec, compile_mode: str = "optimized", executor=None,
               progress_every: int = 0):
    """Run one chunk with the jitted, vmapped program of ``compile_mode`` ("fast" | "optimized").

    ``executor`` (:func:`sims.distributed.sharded_executor`) splits the chunk's configurations over
    its devices with ``jax.shard_map`` (keys and the file distribution replicated); the leading size
    of ``params`` must then be a multiple of ``executor.chunk_multiple``. ``progress_every > 0``
    (one device only; a separate compile) makes the program report every ``progress_every``-th
    step of its loops to :func:`sims.sweep.build._tick`.
    """
    if executor is None:
        return _RUNNERS[compile_mode](params, keys, file_dist, spec=spec, progress_every=int(progress_every))
    cache = (spec, compile_mode, executor)
    if cache not in _SHARDED:
        _SHARDED[cache] = distributed.shard_over_configs(
            partial(_chunk_impl, spec=spec), executor.mesh, num_config_args=1,
            compiler_options=chunking.compiler_options(compile_mode))
    return _SHARDED[cache](params, keys, file_dist)


def _plan_layout(cfg: SweepConfig, plan: Plan) -> dict:
    """The store layout of a sweep (abstract evaluation of its first chunk; nothing is computed)."""
    keys = seed_key(cfg.seed, jnp.arange(cfg.seeds))
    idx, _, _ = _chunk_configs(cfg, plan, plan.chunks[0])
    params, statics = _chunk_inputs(cfg, idx, plan.chunk_configs)
    return _check_program(cfg, _group_spec(cfg, statics), params, keys)


#: step reports per training loop of a chunk (the progress bar's resolution within a chunk)
PROGRESS_REPORTS = 20


class _ChunkTicks:
    """Listener of one chunk's step reports (:func:`sims.sweep.build._tick`): the share of the
    chunk's steps done, in the progress bar's postfix (at most every half second)."""

    def __init__(self, bar, label: str, total: int):
        self.bar, self.label, self.total = bar, label, max(1, int(total))
        self.done, self.shown = 0, 0.0

    def __call__(self, step: int) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.shown >= 0.5 or self.done >= self.total:
            self.shown = now
            self.bar.set_postfix_str(f"{self.label}, {min(100, 100 * self.done // self.total)}% of its steps",
                                     refresh=True)


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
              allow_version_change: bool = False, allow_huge: bool = False,
              step_progress: bool = False) -> SweepResult:
    """Run (or resume) a sweep and write it to the zarr store ``out``.

    Args:
      cfg: a validated :class:`SweepConfig`.
      out: the store directory (``RESULTS.zarr``).
      chunk_size: configurations per compute chunk (``None`` = automatic);
        ignored when resuming (the store's layout wins).
      overwrite: replace an existing dpo-sims store of a different (or unreadable) config; a
        directory dpo-sims did not write, or a store holding other files, is never deleted.
      progress: show a tqdm bar over chunks (stderr).
      step_progress: with ``progress``, also show the share of the running chunk's steps done
        (its loops report every ``steps // 20``-th step; one device only). Opt-in: it compiles a
        second program, and its cost could not be shown to be below 5 % on a loaded machine.
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

    from .. import cli

    def _on_sigint(signum, frame):
        # a second Ctrl-C (this one counts those the CLI took before the sweep started, e.g. one that an
        # import swallowed): exit 130 at once as the CLI (a raise inside XLA can segfault)
        if cli.note_interrupt() > 1 or stop["requested"]:
            cli.second_interrupt("sweep")
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
            if stop["requested"] or cli.interrupts_received():
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
            # within the chunk: its loops report every `every`-th step (one device; the bar shows the share)
            every = max(1, spec.steps // PROGRESS_REPORTS) if progress and step_progress and executor is None else 0
            if every:
                runs = (spec.mode != "empirical") + cfg.seeds * (spec.mode != "population")
                _TICK_LISTENER[0] = _ChunkTicks(bar, f"chunk {i}: running", runs * (spec.steps // every))
            try:
                outputs = jax.device_get(_run_chunk(params, keys, cfg.file_dist, spec, mode, executor, every))
            finally:
                _TICK_LISTENER[0] = None
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
        from ..store import open_results

        result.diverged = diverged_summary(open_results(out))
    return result

