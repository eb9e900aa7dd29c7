"""Scale the configuration axis out: over devices (``jax.sharding``) and hosts (``jax.distributed``).

Configurations never talk to each other, so the configuration axis splits
without communication:

* **devices** — :func:`config_mesh` builds a one-axis ``Mesh`` (axis
  ``"config"``) over ``jax.local_devices()`` (or the first N);
  :func:`shard_over_configs` wraps a function whose leading axis is the
  configuration axis in ``jax.shard_map`` (each device runs the same compiled
  program on its block; shared inputs such as the PRNG key are replicated) and
  ``jax.jit``. :func:`sharded_executor` plugs that into the batched engines
  (``dynamics.batched``). On one CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
  (set before JAX starts) gives four devices to test with.
* **hosts** — :func:`initialize` calls ``jax.distributed.initialize`` with the
  coordinator address, process count and process id (arguments, else the
  environment variables ``DPO_COORDINATOR``, ``DPO_NUM_PROCESSES``,
  ``DPO_PROCESS_ID``); CPU processes use the gloo collectives. Each process
  computes the contiguous share :func:`process_share` of the configurations on
  its local devices, and :func:`gather_shares` (``multihost_utils.process_allgather``)
  assembles the whole result on every process; process 0 writes it
  (:func:`run_batched` does all of this).

Results do not depend on the split: with common random numbers every
configuration uses the same key; with independent draws configuration ``c``
uses ``dynamics.batched.config_keys(key, c)`` for its global index ``c``.
Commands for GPU/TPU clusters are in docs/performance.md.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .cli import UsageError

__all__ = [
    "AXIS",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "parse_devices",
    "select_devices",
    "config_mesh",
    "shard_over_configs",
    "ShardedExecutor",
    "sharded_executor",
    "initialize",
    "process_share",
    "gather_shares",
    "trajectory_arrays",
    "run_batched",
    "add_distributed_arguments",
    "distributed_from_args",
]

AXIS = "config"
ENV_COORDINATOR = "DPO_COORDINATOR"
ENV_NUM_PROCESSES = "DPO_NUM_PROCESSES"
ENV_PROCESS_ID = "DPO_PROCESS_ID"


# --------------------------------------------------------------------------- devices
def parse_devices(text) -> str | int:
    """``"all"`` or a positive integer (CLI ``--devices``). Raises ``UsageError`` otherwise."""
    if text is None or text == "all":
        return "all"
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        try:
            value = int(str(text))
        except ValueError:
            raise UsageError(f"--devices must be 'all' or a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"--devices must be 'all' or a positive integer, got {value}")
    return value


def select_devices(devices="all", *, local: bool = True) -> list:
    """The devices to shard over: ``"all"`` or the first ``N`` of ``jax.local_devices()``
    (``local=False``: of ``jax.devices()``, every process's).

    Raises:
      UsageError: N < 1 or more devices than exist (the message names how many exist).
    """
    import jax
    devices = parse_devices(devices)
    pool = jax.local_devices() if local else jax.devices()
    if devices == "all":
        return list(pool)
    if devices > len(pool):
        raise UsageError(f"--devices {devices} but only {len(pool)} {pool[0].platform} device(s) are visible; "
                         f"pass --devices <= {len(pool)} or 'all' (on CPU, XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N makes N devices)")
    return list(pool[:devices])


def config_mesh(devices="all") -> Mesh:
    """A one-axis ``Mesh`` (axis name ``"config"``) over the selected local devices."""
    from jax.sharding import Mesh
    return Mesh(np.asarray(select_devices(devices), dtype=object), (AXIS,))


def shard_over_configs(fn, mesh: Mesh, *, num_config_args: int = 1, compiler_options: dict | None = None):
    """``jax.jit(jax.shard_map(fn))`` with the leading axis of the first ``num_config_args``
    positional arguments (and of every output leaf) split over ``mesh``'s ``"config"`` axis;
    later arguments are replicated. ``compiler_options`` go to ``jax.jit`` (e.g. XLA flags of a
    fast-compile mode).

    The caller passes a configuration count divisible by ``mesh.size`` (the
    batched engines round their chunk up; :func:`run_batched` handles it).
    Each device runs ``fn`` on its block, so ``fn`` must treat configurations
    independently (true of the batched engines and of any ``jax.vmap`` over
    configurations).
    """
    import jax
    from jax.sharding import PartitionSpec as P
    def wrapped(*args):
        specs = tuple(P(AXIS) if i < num_config_args else P() for i in range(len(args)))
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False)(*args)

    return jax.jit(wrapped, compiler_options=compiler_options)


class ShardedExecutor:
    """Executor for ``dynamics.batched`` engines: shards each chunk's configurations over a mesh.

    ``executor(body)`` returns the compiled sharded chunk function;
    ``chunk_multiple`` (= number of devices) makes every chunk divisible.
    Hashable by its devices, so the engines compile once per device set.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.chunk_multiple = int(mesh.size)
        self._key = tuple(int(d.id) for d in mesh.devices.flat)

    def __call__(self, body):
        return shard_over_configs(body, self.mesh, num_config_args=1)

    def __hash__(self):
        return hash(("ShardedExecutor", self._key))

    def __eq__(self, other):
        return isinstance(other, ShardedExecutor) and other._key == self._key

    def __repr__(self):
        return f"ShardedExecutor(devices={list(self._key)})"


@functools.lru_cache(maxsize=16)
def _executor_for(device_ids: tuple) -> ShardedExecutor:
    import jax
    from jax.sharding import Mesh
    by_id = {d.id: d for d in jax.devices()}
    return ShardedExecutor(Mesh(np.asarray([by_id[i] for i in device_ids], dtype=object), (AXIS,)))


def sharded_executor(devices="all") -> ShardedExecutor | None:
    """Executor sharding over the selected local devices; ``None`` (plain ``jax.jit``) for one device."""
    import jax
    devs = select_devices(devices)
    if len(devs) == 1:
        return None
    return _executor_for(tuple(int(d.id) for d in devs))


# --------------------------------------------------------------------------- hosts
def _env_int(name):
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} must be an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 300) -> tuple[int, int]:
    """Join a multi-process run (``jax.distributed.initialize``); return ``(process_id, num_processes)``.

    Args:
      coordinator: ``host:port`` of process 0 (default ``$DPO_COORDINATOR``).
      num_processes: total processes (default ``$DPO_NUM_PROCESSES``; unset or 1 → single process,
        nothing is initialised).
      process_id: this process, 0 … num_processes − 1 (default ``$DPO_PROCESS_ID``).
      timeout_s: how long to wait for the other processes.

    CPU runs use the gloo collectives (``jax_cpu_collectives_implementation``),
    which must be set before the backend starts: call this before any JAX
    computation. Calling it again in an initialised process returns the same pair.

    Raises:
      UsageError: a missing coordinator or process id, or an id outside [0, num_processes).
    """
    import jax
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if num_processes is None or num_processes == 1:
        return 0, 1
    if num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1, got {num_processes}")
    if not coordinator:
        raise UsageError(f"--num-processes {num_processes} needs --coordinator HOST:PORT (or ${ENV_COORDINATOR}), "
                         "the address of process 0")
    if process_id is None or not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id must lie in [0, {num_processes}), got {process_id}; give each process "
                         f"its own id (or set ${ENV_PROCESS_ID})")
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=int(timeout_s))
    return jax.process_index(), jax.process_count()


def process_share(num_items: int, process_id: int | None = None, num_processes: int | None = None) -> slice:
    """The contiguous block of ``num_items`` configurations process ``process_id`` computes.

    Blocks are balanced (sizes differ by at most one) and cover ``range(num_items)``
    in order. Defaults: ``jax.process_index()`` / ``jax.process_count()``.
    """
    import jax
    pid = jax.process_index() if process_id is None else int(process_id)
    count = jax.process_count() if num_processes is None else int(num_processes)
    if not 0 <= pid < count:
        raise ValueError(f"process_id={pid} must lie in [0, num_processes={count})")
    base, extra = divmod(int(num_items), count)
    lo = pid * base + min(pid, extra)
    return slice(lo, lo + base + (1 if pid < extra else 0))


def gather_shares(local, num_items: int):
    """Assemble every process's share (a pytree of arrays, leading axis = its configurations)
    into the full ``(num_items, ...)`` arrays on every process (``process_allgather``).

    Shares are padded to equal length for the collective and trimmed after.
    A single process returns ``local`` unchanged.
    """
    import jax
    count = jax.process_count()
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    sizes = [process_share(num_items, p, count).stop - process_share(num_items, p, count).start
             for p in range(count)]
    width = max(sizes)

    def pad(v):
        v = np.asarray(v)
        if v.shape[0] == width:
            return v
        fill = np.repeat(v[-1:], width - v.shape[0], axis=0) if v.shape[0] else np.zeros((width,) + v.shape[1:], v.dtype)
        return np.concatenate([v, fill], axis=0)

    gathered = multihost_utils.process_allgather(jax.tree_util.tree_map(pad, local), tiled=False)
    return jax.tree_util.tree_map(
        lambda g: np.concatenate([np.asarray(g)[p, :sizes[p]] for p in range(count)], axis=0), gathered)


# --------------------------------------------------------------------------- running the engines
def trajectory_arrays(traj) -> dict:
    """Flatten a batched trajectory into ``{"train/loss": array, …, "delta_final": …}`` (for ``.npz``)."""
    out = {}
    for name in ("step", "delta", "delta_final", "diverged"):
        value = getattr(traj, name, None)
        if value is not None:
            out[name] = np.asarray(value)
    for group in ("train", "eval", "metrics"):
        for m, v in (getattr(traj, group, None) or {}).items():
            out[f"{group}/{m}"] = np.asarray(v)
    return out


def run_batched(batch, key=None, *, engine: str = "empirical", devices="all", out=None, **kwargs):
    """Run a batched engine over local devices and, in a multi-process run, over hosts.

    Args:
      batch: ``dynamics.batched.PreferenceBatch`` with all C configurations
        (every process passes the same one).
      key: PRNG key (empirical engine; see ``batched_empirical_trajectory``).
      engine: ``"empirical"`` or ``"population"``.
      devices: ``"all"`` or N local devices to shard each chunk over.
      out: optional ``.npz`` path; process 0 writes the gathered result there
        (keys from :func:`trajectory_arrays`).
      **kwargs: passed to the engine (n, beta, lr, steps, …).

    Returns:
      The full trajectory (every process gets all C configurations), equal to
      the single-process, single-device run.

    Call :func:`initialize` first for a multi-process run.
    """
    import jax
    from dynamics import batched as _batched
    from dynamics.batched import batched_empirical_trajectory, batched_population_trajectory, config_keys

    if engine not in ("empirical", "population"):
        raise ValueError(f"unknown engine {engine!r}; choose 'empirical' or 'population'")
    c = batch.num_configs
    share = process_share(c)
    local = batch.take(share)
    executor = sharded_executor(devices)
    if engine == "empirical":
        if key is None:
            raise ValueError("the empirical engine needs a PRNG key: pass key=jax.random.key(seed)")
        draws = kwargs.get("draws", "common")
        local_key = key
        if draws == "independent":
            key_arr = _batched._typed_key(key)
            local_key = config_keys(key_arr, np.arange(share.start, share.stop)) if key_arr.ndim == 0 else key_arr[share]
        for name in ("beta", "lr", "label_smoothing"):
            if name in kwargs and np.ndim(kwargs[name]) == 1:
                kwargs[name] = np.asarray(kwargs[name])[share]
        traj = batched_empirical_trajectory(local, local_key, executor=executor, **kwargs)
    else:
        for name in ("beta", "lr", "label_smoothing"):
            if name in kwargs and np.ndim(kwargs[name]) == 1:
                kwargs[name] = np.asarray(kwargs[name])[share]
        traj = batched_population_trajectory(local, executor=executor, **kwargs)
    per_config = {f: getattr(traj, f) for f in traj.__dataclass_fields__ if f != "step"}
    full = gather_shares(per_config, c)
    traj = traj.replace(**full)
    if out is not None and jax.process_index() == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **trajectory_arrays(traj))
    return traj


# --------------------------------------------------------------------------- CLI helpers
def add_distributed_arguments(parser) -> None:
    """Add ``--devices``, ``--coordinator``, ``--num-processes``, ``--process-id`` to an argparse parser."""
    g = parser.add_argument_group("devices and hosts")
    g.add_argument("--devices", default="all",
                   help="shard configurations over 'all' local devices or the first N (default: all)")
    g.add_argument("--coordinator", default=None,
                   help=f"multi-process run: HOST:PORT of process 0 (default ${ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"multi-process run: number of processes (default ${ENV_NUM_PROCESSES}, else 1)")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"multi-process run: this process's id in [0, N) (default ${ENV_PROCESS_ID})")


def distributed_from_args(args) -> tuple[int, int, ShardedExecutor | None]:
    """Initialise from parsed arguments: ``(process_id, num_processes, executor)``.

    Raises ``UsageError`` for bad values (the CLI exits 2 with one line).
    """
    pid, count = initialize(args.coordinator, args.num_processes, args.process_id)
    return pid, count, sharded_executor(parse_devices(args.devices))
