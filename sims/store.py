"""The results store of a sweep: one ``xarray.Dataset`` in a zarr directory.

Layout (``docs/sweeps.md`` describes every variable):

* every data variable is chunked so that one *compute chunk* of the sweep
  (a block of configurations) owns exactly one zarr chunk file per variable;
  a chunk is written when it finishes, then its checksum (``chunk_digest``) and
  its flag in ``chunk_done`` (dim ``chunk``, one zarr chunk per entry) are set.
  zarr writes each file atomically (write to a temporary file, then rename), so
  ``kill -9`` loses at most the chunk being computed;
* the store is first built in a temporary directory next to the target
  (``.NAME.tmp-PID@HOST``, removed on any error; one left by a killed process is
  removed by the next start) and renamed into place, so a half-created store
  never carries the target name;
* the attributes hold the resolved config (JSON), its SHA-256 fingerprint, the
  compute-chunk layout, the versions of the package, its code (a digest of the
  numerics' source files), JAX, jaxlib, NumPy, zarr and xarray, and the devices.
  The attribute ``dpo_sims_store`` marks a directory this package wrote: only
  such a directory is ever replaced (``--overwrite``), and only when it holds
  nothing but the store's own files.

The root attributes ``store_arrays`` (every array: variables and coordinates) and
``store_array_metadata`` (JSON: each variable's ``.zarray`` and ``.zattrs``) are recorded when the
store is created, so a variable whose folder was deleted (``rm -r STORE/loss``, or the
``chunk_digest`` / ``chunk_done`` bookkeeping) is found by :func:`verify_store` even after
``.zmetadata`` was rebuilt, recreated by ``verify --repair`` (a coordinate only by a resume, from
the template) and its chunks recomputed.

One writer at a time: ``dpo-sims sweep`` and ``verify --repair`` hold an advisory lock
(``fcntl.flock`` on ``.NAME.lock`` next to the store ``NAME``, a file that names the holder
``PID@HOST``; outside the store, so zarr never lists it) while they write; a second writer is refused in one line naming the holder. The kernel drops the lock when
its process ends, so a lock left by a killed process (its file still naming a dead PID) is taken
over. On a filesystem without ``flock`` the file alone decides: a live PID of this host holds
it, a dead one is taken over.

Rules when a store is reopened (:meth:`ResultsStore.prepare`): another config
(its fingerprint; the labels ``name`` and ``description`` are not part of it) is
refused unless overwriting; another package, code, JAX or jaxlib version is
refused unless ``allow_version_change`` (then recorded in the attribute
``resumes``); every finished chunk is checked against its checksum and a damaged
one is recomputed; a missing ``.zmetadata`` is rebuilt (:func:`verify_store`).

The store is zarr format 2 with consolidated metadata (read by
``xarray.open_zarr`` with zarr-python 2 or 3). Unwritten float entries read as
NaN, unwritten booleans as False; ``chunk_done`` tells which are final.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np

from .cli import UsageError

__all__ = [
    "STORE_FORMAT",
    "ENGINE_VERSION_KEYS",
    "config_fingerprint",
    "fingerprint_matches",
    "environment",
    "code_digest",
    "available_memory",
    "check_output_dir",
    "check_output_file",
    "ResultsStore",
    "VerifyReport",
    "verify_store",
    "open_results",
    "diverged_summary",
    "LOCK_FILE",
    "store_lock_holder",
    "release_all_locks",
]

#: version of the on-disk layout described above (attribute ``dpo_sims_store``)
STORE_FORMAT = 1
_ZARR_FORMAT = 2
#: top-level keys of a resolved config that are labels, not part of the fingerprint
LABEL_KEYS = ("name", "description")
#: versions whose change refuses a resume (unless ``allow_version_change``): they can change the numbers
ENGINE_VERSION_KEYS = ("dynamics_version", "code_digest", "jax_version", "jaxlib_version")
#: versions recorded and reported on a resume, but not refused (they do not change the numbers)
OTHER_VERSION_KEYS = ("numpy_version", "zarr_version", "xarray_version", "python_version")
_META_FILES = (".zgroup", ".zattrs", ".zmetadata")
_BOOKKEEPING = ("chunk_done", "chunk_digest")
#: the advisory lock of a store's writer, next to the store (``fcntl.flock``; it names the holder PID@HOST)
LOCK_FILE = ".{name}.lock"


# --------------------------------------------------------------------------- fingerprints, versions
def config_fingerprint(resolved: dict) -> str:
    """SHA-256 hex digest of the canonical JSON of a resolved config (sorted keys).

    The labels ``name`` and ``description`` (top level) are left out: editing them does not
    make another sweep.
    """
    core = {k: v for k, v in resolved.items() if k not in LABEL_KEYS}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _legacy_fingerprint(resolved: dict) -> str:
    """The fingerprint stores written before labels were left out carry (labels included)."""
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_matches(attrs: dict, resolved: dict) -> bool:
    """Whether a store's attributes ``attrs`` hold the sweep ``resolved`` (labels aside)."""
    return attrs.get("config_fingerprint") in (config_fingerprint(resolved), _legacy_fingerprint(resolved))


#: the source files whose code computes the stored numbers (digest: attribute ``code_digest``)
def _code_files() -> list[Path]:
    import importlib.util

    files = []
    spec = importlib.util.find_spec("dynamics")
    if spec is not None and spec.origin:
        files += sorted(Path(spec.origin).parent.glob("*.py"))
    here = Path(__file__).resolve().parent
    files += sorted((here / "sweep").glob("*.py")) + [here / "distributed.py"]  # the sweep package
    return [f for f in files if f.is_file()]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 (first 16 hex digits) of the numerics' source: ``dynamics/*.py``, ``sims/sweep/*.py``,
    ``sims/distributed.py`` (file names and contents; about 1 ms). Cached for the process."""
    h = hashlib.sha256()
    for f in _code_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _dist_version(module: str, dist: str | None = None) -> str:
    mod = sys.modules.get(module)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    import importlib.metadata

    try:
        return importlib.metadata.version(dist or module)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def environment() -> dict:
    """The versions recorded in a store: package, code digest, JAX, jaxlib, NumPy, zarr, xarray, Python."""
    import platform

    return {
        "dynamics_version": _dist_version("dynamics", "dpo-dynamics"),
        "code_digest": code_digest(),
        "jax_version": _dist_version("jax"),
        "jaxlib_version": _dist_version("jaxlib"),
        "numpy_version": np.__version__,
        "zarr_version": _dist_version("zarr"),
        "xarray_version": _dist_version("xarray"),
        "python_version": platform.python_version(),
    }


def available_memory() -> int:
    """Bytes of memory available to this process (``MemAvailable`` on Linux).

    Falls back to ``sysconf`` free pages, then to 4 GiB when neither is known.
    A cgroup memory limit, when set and smaller, wins.
    """
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = 4 << 30
    for cg in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cg).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < avail:
            avail = int(text)
    return int(avail)


# --------------------------------------------------------------------------- output paths
def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory``: ``os.access`` (a read-only filesystem fails it even
    for root), then a real probe file (created and removed)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".dpo-sims-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not (p.exists() or p.is_symlink()) and p.parent != p:
        p = p.parent
    return p


def check_output_dir(path, *, option: str = "--out") -> None:
    """Check, before any computation, that directory ``path`` can be created or written.

    ``path`` itself may exist (a directory) or not; its nearest existing ancestor must be a
    directory in which files can be created.

    Raises:
      UsageError: an existing ancestor is a file, or the location is not writable (a read-only
        filesystem or missing permission), naming ``option``, the path and the fix.
    """
    path = Path(path)
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        where = "is a file" if anc == path else f"{anc} is a file"
        raise UsageError(f"{option} {path}: {where}, not a directory; choose another {option}")
    target = anc
    if not _writable(target):
        raise UsageError(f"{option} {path}: {target} is not writable (read-only filesystem or no permission); "
                         "choose a writable location")


def check_output_file(path, *, option: str = "--out") -> None:
    """Like :func:`check_output_dir` for a file to be written at ``path`` (its parent is created).

    Raises:
      UsageError: ``path`` is a directory, an ancestor is a file, or the location is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory; pass a file path")
    anc = _existing_ancestor(path.parent)
    if not anc.is_dir():
        raise UsageError(f"{option} {path}: {anc} is a file, not a directory; choose another {option}")
    if not _writable(anc):
        raise UsageError(f"{option} {path}: {anc} is not writable (read-only filesystem or no permission); "
                         "choose a writable location")


# --------------------------------------------------------------------------- ownership
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _store_marker(path: Path):
    """The ``dpo_sims_store`` attribute of ``path`` read from ``.zattrs`` or ``.zmetadata`` (no zarr), or None."""
    attrs = _read_json(path / ".zattrs")
    if isinstance(attrs, dict) and "dpo_sims_store" in attrs:
        return attrs["dpo_sims_store"]
    meta = _read_json(path / ".zmetadata")
    if isinstance(meta, dict):
        attrs = (meta.get("metadata") or {}).get(".zattrs")
        if isinstance(attrs, dict) and "dpo_sims_store" in attrs:
            return attrs["dpo_sims_store"]
    return None


def _written_by_us(path: Path) -> bool:
    return path.is_dir() and _store_marker(path) is not None


_CHUNK_FILE = re.compile(r"^\d+(\.\d+)*$|\.partial$")


def _foreign_entries(path: Path) -> list[str]:
    """Entries of a dpo-sims store that its writer did not put there (user files), as relative paths."""
    meta = _read_json(path / ".zmetadata")
    known = {k.split("/")[0] for k in ((meta or {}).get("metadata") or {})} if isinstance(meta, dict) else set()
    foreign = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name in _META_FILES or entry.name.endswith(".partial"):
            continue
        if entry.is_dir(follow_symlinks=False) and (entry.name in known or (Path(entry.path) / ".zarray").exists()):
            for sub in os.scandir(entry.path):
                if sub.name in (".zarray", ".zattrs") or (sub.is_file(follow_symlinks=False)
                                                          and _CHUNK_FILE.search(sub.name)):
                    continue
                foreign.append(f"{entry.name}/{sub.name}")
            continue
        foreign.append(entry.name)
    return foreign


# --------------------------------------------------------------------------- temporaries
def _tmp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}@{socket.gethostname()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier attempt of this process: not in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_stale_temporaries(path: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID[@HOST]`` folders next to ``path`` left by dead processes of this host."""
    removed = []
    if not path.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)(?:@(.+))?$")
    host = socket.gethostname()
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if not m or (m.group(2) is not None and m.group(2) != host) or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            names = {p.name for p in entry.iterdir()}
            if names and not names & set(_META_FILES):
                continue  # not a store under construction: not ours to delete
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# --------------------------------------------------------------------------- the writer's lock
class _Lock:
    """One ``flock`` held by this process on a store's lock file (shared by its holders: counted)."""

    def __init__(self, fd: int, lock_file: Path):
        self.fd, self.lock_file, self.count = fd, lock_file, 1

    def release(self) -> None:
        self.count -= 1
        if self.count > 0 or self.fd < 0:
            return
        try:  # remove the file while still holding the lock (a waiter then sees another inode and retries)
            if os.stat(self.lock_file).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.lock_file)
        except OSError:
            pass
        try:
            os.close(self.fd)  # closing the descriptor drops the flock
        except OSError:
            pass
        self.fd = -1


_LOCKS: dict = {}  # realpath of a store -> the _Lock this process holds on it


def _lock_path(path) -> Path:
    path = Path(path)
    return path.parent / LOCK_FILE.format(name=path.name)


def _parse_holder(text: str):
    """``(pid, host, line)`` from a lock file's first line ``PID@HOST since … (command)``."""
    text = (text or "").strip()
    line = text.splitlines()[0] if text else ""
    m = re.match(r"^(\d+)@(\S+)", line)
    return (int(m.group(1)), m.group(2), line) if m else (None, None, line)


def _read_lock(path) -> str:
    try:
        return _lock_path(path).read_text(errors="replace")
    except OSError:
        return ""


def _in_use_error(path, holder: str) -> UsageError:
    return UsageError(f"{path} is being written by another dpo-sims process ({holder or 'holder unknown'}); wait "
                      "for it to finish or stop it (two writers would interleave chunks), or choose another --out")


def _flock_unsupported(e: OSError) -> bool:
    return e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


def _live_elsewhere(pid, host) -> bool:
    """Whether the holder ``pid@host`` named by a lock file may still run (another host: assumed so)."""
    if pid is None or (pid == os.getpid() and host == socket.gethostname()):
        return False
    return host != socket.gethostname() or _pid_alive(pid)


def store_lock_holder(path):
    """Who holds the writer's lock of the store ``path``: ``"PID@HOST since TIME (command)"``, or None when
    nobody (or this process) does. Does not take it."""
    import fcntl

    path = Path(path)
    if os.path.realpath(path) in _LOCKS:
        return None
    try:
        fd = os.open(_lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse_holder(_read_lock(path))[2] or "holder unknown"
        except OSError as e:
            if not _flock_unsupported(e):
                raise
            pid, host, line = _parse_holder(_read_lock(path))
            return line if _live_elsewhere(pid, host) else None
        return None
    finally:
        os.close(fd)


def _acquire_lock(path, *, log=None):
    """Take the writer's lock of the store ``path`` (existing or about to be created) for this process.

    The lock is ``fcntl.flock`` on ``.NAME.lock`` next to the store, whose text names the holder
    (``PID@HOST since TIME (command)``); re-entrant within a process (counted); the file is removed on
    release. A file left by a dead process is taken over (noted in ``log``). Returns the lock, or None
    where no lock file can be created (a read-only folder, where nobody else can write either).

    Raises:
      UsageError: another live process holds it (``PID@HOST`` named).
    """
    import fcntl

    path = Path(path)
    key = os.path.realpath(path)
    held = _LOCKS.get(key)
    if held is not None and held.fd >= 0:
        held.count += 1
        return held
    lock_file = _lock_path(path)
    for _ in range(20):  # retried only when the file was replaced between open and flock
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            previous = _parse_holder(_read_lock(path))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use_error(path, previous[2]) from None
            except OSError as e:
                if not _flock_unsupported(e):
                    raise
                if _live_elsewhere(previous[0], previous[1]):  # no flock here: the file alone decides
                    raise _in_use_error(path, f"{previous[2]}; delete {lock_file} if that process is gone") \
                        from None
            try:
                same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed meanwhile: lock the file that is there now
                os.close(fd)
                continue
            if previous[0] is not None and log is not None and (previous[0], previous[1]) != (
                    os.getpid(), socket.gethostname()):
                log(f"{path}: took over the writer's lock of {previous[0]}@{previous[1]} (that process is gone)")
            command = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"] + sys.argv[1:3])
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{_identity()} since {_now()} ({command})\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        lock = _Lock(fd, lock_file)
        _LOCKS[key] = lock
        return lock
    raise UsageError(f"{lock_file}: the lock file keeps changing; another process is starting and stopping on "
                     f"{path} — retry later")


def release_all_locks() -> None:
    """Release every writer's lock this process holds (their files removed): for an exit that skips the
    interpreter's teardown (``os._exit`` after Ctrl-C), so no stale lock file is left next to the store."""
    for key, lock in list(_LOCKS.items()):
        lock.count = 1
        _release_lock(lock, key)


def _identity() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _process_index() -> int:
    """``jax.process_index()`` when JAX is imported (a multi-process run), else 0."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 0
    try:
        return int(jax.process_index())
    except Exception:  # noqa: BLE001 — no backend: a single process
        return 0


def _release_lock(lock, key: str) -> None:
    if lock is None:
        return
    lock.release()
    if lock.fd < 0 and _LOCKS.get(key) is lock:
        del _LOCKS[key]


# --------------------------------------------------------------------------- checksums
def _canonical(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    if a.dtype.kind in "fc":  # every NaN alike (zarr fills missing entries with its own NaN)
        a = np.where(np.isnan(a), np.array(np.nan, a.dtype), a)
    return f"{a.dtype.str}{a.shape}".encode() + a.tobytes()


def _digest(values: dict) -> np.uint64:
    h = hashlib.sha256()
    for name in sorted(values):
        h.update(name.encode() + b"\0" + _canonical(values[name]))
    return np.uint64(int.from_bytes(h.digest()[:8], "little") or 1)  # 0 means "no checksum"


def _region_index(arr, region) -> tuple:
    return tuple(region) + (slice(None),) * (arr.ndim - len(region))


def _region_shape(arr, region) -> tuple:
    full = _region_index(arr, region)
    return tuple(len(range(*s.indices(n))) for s, n in zip(full, arr.shape))


def _describe_diff(old: dict, new: dict, prefix="") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _describe_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _consolidate(path: Path) -> None:
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path), zarr_format=_ZARR_FORMAT)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions_text(env: dict, keys) -> str:
    names = {"dynamics_version": "dpo-sims", "code_digest": "code", "jax_version": "jax",
             "jaxlib_version": "jaxlib", "numpy_version": "numpy", "zarr_version": "zarr",
             "xarray_version": "xarray", "python_version": "python"}
    return ", ".join(f"{names[k]} {env.get(k) or 'unknown'}" for k in keys)


def _all_missing(data) -> bool:
    """Whether ``data`` is one missing value broadcast over its shape (``np.broadcast_to`` of NaN / False / 0)."""
    if not isinstance(data, np.ndarray) or data.size <= 1 or any(data.strides):
        return False
    v = data.reshape(-1)[0]
    return bool(np.isnan(v)) if data.dtype.kind in "fc" else (data.dtype.kind in "biu" and not v)


def _write_template(template, encoding: dict, path: Path) -> None:
    """``template.to_zarr(path)`` (zarr 2, consolidated) without touching every chunk of its missing variables.

    A variable that is one missing value broadcast over its shape and has explicit chunks is written
    as a single-element copy (so xarray encodes its metadata) whose ``.zarray`` then gets the full
    shape and chunks: no chunk file is written either way (unwritten chunks read as the fill value),
    but the cost no longer grows with the grid (10⁶ configurations: ~60 s → well under a second).
    """
    lazy = [name for name, v in template.data_vars.items()
            if _all_missing(v.data) and "chunks" in encoding.get(name, {})]
    rest = {k: v for k, v in encoding.items() if k not in lazy}
    template.drop_vars(lazy).to_zarr(str(path), mode="w", encoding=rest, zarr_format=_ZARR_FORMAT,
                                     consolidated=False)
    if lazy:
        import xarray as xr

        mini = xr.Dataset({name: (template[name].dims, np.asarray(template[name].data).reshape(-1)[:1]
                                  .reshape((1,) * template[name].ndim), template[name].attrs) for name in lazy})
        enc = {name: {**encoding[name], "chunks": (1,) * template[name].ndim} for name in lazy}
        scratch = path / ".template-scratch"
        try:
            mini.to_zarr(str(scratch), mode="w", encoding=enc, zarr_format=_ZARR_FORMAT, consolidated=False)
            for name in lazy:
                meta = json.loads((scratch / name / ".zarray").read_text())
                meta["shape"] = list(template[name].shape)
                meta["chunks"] = [int(c) for c in encoding[name]["chunks"]]
                (path / name).mkdir()
                (path / name / ".zarray").write_text(json.dumps(meta, indent=4))
                shutil.copyfile(scratch / name / ".zattrs", path / name / ".zattrs")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    _consolidate(path)


def _full_template(make_template, resolved: dict):
    """The store's template: ``make_template()`` plus the store attributes and the ``chunk_digest`` companion."""
    template, encoding = make_template()
    template.attrs.update(environment())
    template.attrs["config_fingerprint"] = config_fingerprint(resolved)
    template.attrs["dpo_sims_store"] = STORE_FORMAT
    template.attrs["created"] = _now()
    if "chunk_done" in template.data_vars and "chunk_digest" not in template.data_vars:
        covered = sorted(v for v in template.data_vars if v not in _BOOKKEEPING)
        template["chunk_digest"] = (("chunk",), np.zeros(template.sizes["chunk"], np.uint64))
        template["chunk_digest"].attrs.update({
            "variables": covered,
            "description": "SHA-256 (first 8 bytes) of each finished chunk's values; 0 = none recorded",
        })
        encoding = {**encoding, "chunk_digest": {"chunks": (1,)}}
    return template, encoding


def _record_layout(path: Path, template) -> None:
    """Record in the root attributes every array of the store (``store_arrays``) and each variable's zarr
    metadata (``store_array_metadata``, JSON), so that a deleted variable is found and recreated later."""
    import zarr

    meta = {str(name): {f: _read_json(path / str(name) / f) for f in (".zarray", ".zattrs")}
            for name in template.data_vars}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(str(path), mode="r+", zarr_format=_ZARR_FORMAT, use_consolidated=False)
        group.attrs.update({"store_arrays": sorted(str(v) for v in template.variables),
                            "store_array_metadata": json.dumps(meta, sort_keys=True, separators=(",", ":"))})
    _consolidate(path)


def _restore_from_template(path: Path, make_template, resolved: dict, log) -> list[str]:
    """Recreate the arrays of the store ``path`` whose folders are gone (variables and coordinates) from its
    template; returns their names. A variable's finished chunks then fail their checksums and are recomputed;
    a coordinate is written whole from the configuration (no chunk is recomputed)."""
    missing = _metadata_problems(path)[2]
    if not missing:
        return []
    template, encoding = _full_template(make_template, resolved)
    scratch = path.parent / f".{path.name}.tmp-{os.getpid()}@{socket.gethostname()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    done = []
    try:
        _write_template(template, encoding, scratch)
        for name in missing:
            if (scratch / name / ".zarray").is_file():
                shutil.copytree(scratch / name, path / name, dirs_exist_ok=True)
                done.append(name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if done:
        _consolidate(path)
        coords = [n for n in done if n in template.coords]
        data = [n for n in done if n not in template.coords]
        if data:
            log(f"{path}: recreated {', '.join(data)} from the template (deleted?); the finished chunks that held "
                f"{'it' if len(data) == 1 else 'them'} fail their checksums and will be recomputed")
        if coords:
            log(f"{path}: recreated coordinate{'s' if len(coords) > 1 else ''} {', '.join(coords)} from the template "
                "(deleted?) with its values from the configuration; coordinates are derived from the configuration, "
                "so no chunk is recomputed")
    return done


class ResultsStore:
    """A sweep's zarr results store, opened for writing chunks.

    Use :meth:`prepare` to create or resume one; then :meth:`write_chunk` for
    each finished compute chunk. ``path`` is the store directory.
    """

    def __init__(self, path: Path, *, lock: "_Lock | None" = None):
        import zarr

        self.path = Path(path)
        self._group = zarr.open_group(str(self.path), mode="r+", zarr_format=_ZARR_FORMAT)
        # the writer's lock (held while this object lives, or until close())
        self._release = weakref.finalize(self, _release_lock, lock, os.path.realpath(self.path)) if lock else None

    def close(self) -> None:
        """Release the writer's lock (also done when the object is garbage collected or the process ends)."""
        if self._release is not None:
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------ creation
    @classmethod
    def prepare(cls, path, *, resolved: dict, make_template, overwrite: bool = False,
                allow_version_change: bool = False, primary: bool = True, log=None):
        """Create the store at ``path`` or reopen it to resume.

        Args:
          path: the store directory (``RESULTS.zarr``); an absent path or an empty directory is
            created.
          resolved: the resolved config (JSON-serialisable dict); its
            fingerprint decides whether an existing store is the same sweep.
          make_template: ``() -> (xarray.Dataset, encoding dict)``: the
            all-missing dataset (coordinates, variables, attributes) and the
            zarr chunking; called only when a store is created. A ``chunk_done``
            variable (dim ``chunk``) gets a ``chunk_digest`` companion.
          overwrite: replace an existing dpo-sims store (of another config, or unreadable). Only a
            directory carrying this package's ``dpo_sims_store`` attribute and nothing but the
            store's own files is ever deleted.
          allow_version_change: resume a store begun with another package, code, JAX or jaxlib
            version (recorded in the attribute ``resumes``) instead of refusing it.
          primary: this process checks, repairs and records (False for the other processes of a
            multi-process run, which only open the store).
          log: ``print``-like callable for notes (damaged chunks to recompute, repaired metadata,
            minor version changes); default: none.

        Returns:
          ``(store, resumed)``; ``resumed`` is True when an existing store of
          the same config was reopened (its damaged chunks, if any, marked unfinished).

        Raises:
          UsageError: the location is not writable or under a file; the path exists but was not
            written by dpo-sims (never deleted, even with ``overwrite``); a dpo-sims store holding
            other files (with ``overwrite``); an unreadable store or one holding a different
            config without ``overwrite``; another version without ``allow_version_change``.
        """
        log = log or (lambda msg: None)
        path, fresh = cls.check_target(path, overwrite=overwrite, primary=primary)
        lock = _acquire_lock(path, log=log) if primary else None  # refused while another process writes it
        try:
            if primary:
                _clean_stale_temporaries(path)
            if not fresh and not overwrite:
                return cls._reopen(path, resolved, make_template, allow_version_change, primary, log, lock), True
            template, encoding = _full_template(make_template, resolved)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_name(path)
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                _write_template(template, encoding, tmp)
                _record_layout(tmp, template)
                if path.exists() or path.is_symlink():
                    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                        path.rmdir()  # an empty directory
                    else:  # a dpo-sims store holding only its own files (checked above)
                        shutil.rmtree(path)
                os.replace(tmp, path)
            except BaseException:  # any error or Ctrl-C: leave no temporary behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return cls(path, lock=lock), False
        except BaseException:
            _release_lock(lock, os.path.realpath(path))
            raise

    @staticmethod
    def check_target(path, *, overwrite: bool = False, primary: bool | None = None) -> tuple[Path, bool]:
        """Check, before any computation, that ``path`` may hold a new store or is one to reopen.

        ``primary`` (default: JAX process 0, or True without JAX): this process will write the store,
        so a store another process is writing (its lock held, :func:`store_lock_holder`) is refused now.

        Returns:
          ``(path, fresh)``: the path (a symlink to a dpo-sims store resolved) and whether a new
          store is to be created there (absent, or an empty directory).

        Raises:
          UsageError: not writable or under a file (:func:`check_output_dir`); an existing file
            or directory that dpo-sims did not write (never touched, whatever the options); with
            ``overwrite``, a dpo-sims store that also holds other files (named); a store another
            process is writing (its ``PID@HOST`` named).
        """
        path = Path(path)
        check_output_dir(path)
        if path.is_symlink() and _written_by_us(path.resolve()):
            path = path.resolve()
        fresh = not (path.exists() or path.is_symlink()) or (
            path.is_dir() and not path.is_symlink() and not any(path.iterdir()))
        if primary is None:
            primary = _process_index() == 0
        holder = store_lock_holder(path) if primary else None
        if holder:
            raise _in_use_error(path, holder)
        if fresh:
            return path, True
        if not _written_by_us(path):
            what = "a file" if not path.is_dir() else "a directory dpo-sims did not write (no dpo_sims_store " \
                "attribute)"
            raise UsageError(f"{path} exists and is {what}; refusing to touch it (dpo-sims only ever replaces "
                             "a store it wrote) — "
                             "choose another --out")
        if overwrite:
            foreign = _foreign_entries(path)
            if foreign:
                more = " …" if len(foreign) > 5 else ""
                raise UsageError(f"{path} holds files dpo-sims did not write ({', '.join(foreign[:5])}{more}); "
                                 "--overwrite deletes only a store's own files — move them out first, or "
                                 "choose another --out")
        return path, False

    @classmethod
    def _reopen(cls, path: Path, resolved: dict, make_template, allow_version_change: bool, primary: bool, log,
                lock=None):
        if primary and not (path / ".zmetadata").exists() and (path / ".zgroup").exists():
            try:
                _consolidate(path)
                log(f"{path}: .zmetadata was missing; rebuilt it from the per-array metadata")
            except Exception:  # noqa: BLE001 — read_attrs below names the damage
                pass
        old = cls.read_attrs(path)  # raises UsageError when unreadable
        if not fingerprint_matches(old, resolved):
            try:
                diff = _describe_diff(json.loads(old.get("config", "{}")), resolved)
            except (TypeError, ValueError):
                diff = []
            diff = [k for k in diff if k not in LABEL_KEYS]
            what = f" (differs in: {', '.join(diff[:6])}{' …' if len(diff) > 6 else ''})" if diff else ""
            raise UsageError(
                f"{path} holds the results of a different sweep{what}; pass --overwrite to "
                "replace it, or choose another --out"
            )
        now = environment()
        engine = [k for k in ENGINE_VERSION_KEYS if old.get(k) != now[k]]
        other = [k for k in OTHER_VERSION_KEYS if old.get(k) != now[k]]
        if engine and not allow_version_change:
            raise UsageError(
                f"{path} was begun with {_versions_text(old, engine)}, this is {_versions_text(now, engine)}; "
                "resuming would mix versions in one store — pass --allow-version-change to resume anyway (it is "
                "recorded in the store), --overwrite to start again, or choose another --out"
            )
        if primary:  # a deleted variable (its chunks recomputed) or coordinate (from the config): recreated
            _restore_from_template(path, make_template, resolved, log)
        store = cls(path, lock=lock)
        if not primary:
            return store
        updates = {}
        if engine or other:
            changed = {k: [old.get(k), now[k]] for k in engine + other}
            log(f"{path}: resuming with {_versions_text(now, engine + other)} (begun with "
                f"{_versions_text(old, engine + other)}); recorded in the attribute `resumes`")
            updates["resumes"] = list(old.get("resumes", [])) + [
                {"at": _now(), "chunks_done": int(store.done().sum()), "changed": changed}]
            updates.update({k: now[k] for k in engine + other})  # the versions of the latest writer
        try:
            stored = json.loads(old.get("config", "{}"))
        except (TypeError, ValueError):
            stored = {}
        if any(stored.get(k) != resolved.get(k) for k in LABEL_KEYS if k in resolved):
            updates["config"] = json.dumps(resolved, sort_keys=True)
            if "description" in resolved:
                updates["description"] = resolved["description"]
            if "name" in resolved and str(old.get("title", "")).startswith("dpo-sims sweep "):
                updates["title"] = f"dpo-sims sweep {resolved['name']}"
        if updates:
            store._group.attrs.update(updates)
            _consolidate(path)
        report = verify_store(path, repair=True)
        for line in report.notes():
            log(line)
        return store

    @staticmethod
    def read_attrs(path, *, fix: str | None = None) -> dict:
        """Attributes of an existing store.

        Args:
          path: the store directory.
          fix: the advice ending the error message, phrased for the calling
            command (default: the ``dpo-sims sweep`` advice "pass --overwrite
            to replace it, or choose another --out" for a store dpo-sims wrote, "choose another
            --out" for anything else; read-only commands such as ``dpo-sims plot`` pass their
            own, see :func:`open_results`).

        Raises:
          UsageError: not readable, or not a dpo-sims results store (names the
            path and the fix).
        """
        import zarr

        path = Path(path)
        ours = _written_by_us(path)
        if ours:  # its root metadata is damaged but restorable (e.g. .zattrs deleted): verify --repair fixes it
            problems, restorable = _metadata_problems(path)[:2]
            root = [p for p in problems if p.split()[0] in (".zattrs", ".zgroup", "zarr.json")]
            if root and all(p.split()[0] in restorable for p in root):
                raise UsageError(f"{path} is a dpo-sims store whose root metadata is damaged ({'; '.join(root)}); "
                                 f"run `dpo-sims verify --repair {path}` (it restores it from .zmetadata), then rerun")
        if fix is None:
            fix = "pass --overwrite to replace it, or choose another --out" if ours else \
                "dpo-sims did not write it, so it is never replaced — choose another --out"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = zarr.open_group(str(path), mode="r")
                attrs = dict(group.attrs)
                if "chunk_done" not in attrs.get("store_arrays", []):  # recorded stores: recreated if deleted
                    group["chunk_done"]  # noqa: B018 — must exist
        except Exception as e:  # zarr raises many types for a damaged store
            raise UsageError(
                f"{path} is not a readable results store ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"{fix}"
            ) from None
        if attrs.get("dpo_sims_store") != STORE_FORMAT or "config_fingerprint" not in attrs:
            raise UsageError(
                f"{path} is a zarr store but not a dpo-sims results store (format {STORE_FORMAT}); {fix}"
            )
        return attrs

    # --------------------------------------------------------------- state
    @property
    def attrs(self) -> dict:
        return dict(self._group.attrs)

    def done(self) -> np.ndarray:
        """``(n_chunks,)`` bool: which compute chunks are finished."""
        return np.asarray(self._group["chunk_done"][:], dtype=bool)

    def write_chunk(self, index: int, region: tuple, arrays: dict) -> None:
        """Write one finished compute chunk, record its checksum, then mark it done.

        Args:
          index: the chunk number (position in ``chunk_done``).
          region: one ``slice`` per grid axis (the chunk's block); trailing
            dimensions (seed, split, step, behavior) are written whole.
          arrays: variable name → array shaped ``(block extents…, trailing…)``.
            Variables of the checksum not given are read back from the store.
        """
        absent = [name for name in arrays if name not in self._group]
        if absent:
            raise UsageError(f"{self.path}: variable {', '.join(absent)} is missing (its folder was deleted?); run "
                             f"`dpo-sims verify {self.path} --repair`, then rerun the sweep to recompute it")
        values = {}
        for name, value in arrays.items():
            arr = self._group[name]
            data = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=arr.dtype),
                                                        _region_shape(arr, region)))
            arr[_region_index(arr, region)] = data
            values[name] = data
        if "chunk_digest" in self._group:
            digest = self._group["chunk_digest"]
            for name in digest.attrs.get("variables", []):
                if name not in values:
                    arr = self._group[name]
                    values[name] = np.asarray(arr[_region_index(arr, region)])
            digest[index : index + 1] = np.array([_digest(values)], dtype=np.uint64)
        self._group["chunk_done"][index : index + 1] = np.ones(1, dtype=bool)


# --------------------------------------------------------------------------- verification
@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
      path: the store. n_chunks: chunks in the store. done: finished chunks.
      checked: finished chunks whose checksum was compared. bad: chunk index → what is wrong
      (unreadable, checksum mismatch). unverified: finished chunks without a checksum (a store
      from a dpo-sims before checksums). metadata: problems with the zarr metadata files.
      missing: arrays whose folders are gone (after any repair: those it could not recreate).
      repaired: what ``repair`` did.
    """

    path: Path
    n_chunks: int = 0
    done: int = 0
    checked: int = 0
    bad: dict = dataclasses.field(default_factory=dict)
    unverified: int = 0
    metadata: list = dataclasses.field(default_factory=list)
    missing: list = dataclasses.field(default_factory=list)
    repaired: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damaged chunk, no missing array and no (remaining) metadata problem."""
        return not self.bad and not self.metadata and not self.missing

    def bad_text(self, limit: int = 3) -> str:
        items = [f"chunk {i} ({why})" for i, why in list(sorted(self.bad.items()))[:limit]]
        more = f" and {len(self.bad) - limit} more" if len(self.bad) > limit else ""
        return f"{len(self.bad)} of {self.done} finished chunks damaged: {'; '.join(items)}{more}"

    def notes(self) -> list[str]:
        """One line per finding, for a log."""
        out = [f"{self.path}: {r}" for r in self.repaired if not r.startswith("marked")]
        if self.metadata:
            out.append(f"{self.path}: metadata problems: {'; '.join(self.metadata[:3])}")
        if self.bad:
            out.append(f"{self.path}: {self.bad_text()}; recomputing them")
        if self.unverified:
            out.append(f"{self.path}: {self.unverified} finished chunks carry no checksum (a store from an older "
                       "dpo-sims); they are not verified")
        return out


def _chunk_regions(attrs: dict, shape: tuple, n_chunks: int):
    """The region (one slice per grid axis) of every chunk, from the ``chunk_block`` attribute."""
    block = attrs.get("chunk_block")
    if block is None:
        return [()] if n_chunks == 1 else None
    block = [int(b) for b in block]
    sizes = shape[: len(block)]
    nblocks = [math.ceil(s / b) for s, b in zip(sizes, block)]
    if int(np.prod(nblocks, dtype=np.int64)) != n_chunks:
        return None
    regions = []
    for i in range(n_chunks):
        idx = np.unravel_index(i, nblocks) if nblocks else ()
        regions.append(tuple(slice(int(j) * b, min((int(j) + 1) * b, s)) for j, b, s in zip(idx, block, sizes)))
    return regions


def _expected_arrays(root: dict, consolidated: dict) -> tuple[dict, set]:
    """Every array a store should hold: name → its known metadata (``{".zarray": …, ".zattrs": …}``, from
    ``.zmetadata`` or the recorded ``store_array_metadata``), and which of them are coordinates (their values
    are not recorded: only a resume, from the template, recreates a deleted one)."""
    try:
        recorded = json.loads(root.get("store_array_metadata") or "{}")
    except (TypeError, ValueError):
        recorded = {}
    recorded = recorded if isinstance(recorded, dict) else {}
    names = set(root.get("store_arrays") or []) | set(recorded)
    names |= {k.split("/")[0] for k in consolidated if k.endswith("/.zarray")}
    meta = {}
    for name in names:
        known = {}
        for f in (".zarray", ".zattrs"):
            value = consolidated.get(f"{name}/{f}") or (recorded.get(name) or {}).get(f)
            if isinstance(value, dict):
                known[f] = value
        meta[name] = known
    if recorded:
        coords = names - set(recorded)
    else:  # a store from before the record: its dimension coordinates
        coords = {n for n, m in meta.items() if (m.get(".zattrs") or {}).get("_ARRAY_DIMENSIONS") == [n]}
    return meta, coords


def _metadata_problems(path: Path) -> tuple[list[str], dict, list[str], set]:
    """Missing or unreadable zarr metadata files, those that can be restored (key → JSON), the arrays whose
    folders are gone (``rm -r STORE/loss``), and the store's coordinates.

    A deleted variable's metadata is restorable (from ``.zmetadata`` or the recorded template; its values
    are then recomputed); a deleted coordinate's is not (its values would read as missing)."""
    meta = _read_json(path / ".zmetadata")
    consolidated = meta.get("metadata") if isinstance(meta, dict) else None
    problems = [] if isinstance(consolidated, dict) else [".zmetadata missing or unreadable"]
    consolidated = consolidated if isinstance(consolidated, dict) else {}
    root = _read_json(path / ".zattrs")
    root = root if isinstance(root, dict) else (consolidated.get(".zattrs") or {})
    expected, coords = _expected_arrays(root, consolidated)
    on_disk = {e.name for e in os.scandir(path) if e.is_dir() and (Path(e.path) / ".zarray").exists()}
    restorable, missing = {}, []
    for key in (".zgroup", ".zattrs"):
        if _read_json(path / key) is None:
            problems.append(f"{key} missing or unreadable")
            if key in consolidated:
                restorable[key] = consolidated[key]
    for name in sorted(set(expected) | on_disk):
        known = expected.get(name, {})
        if not (path / name).is_dir():
            missing.append(name)
            if name in coords:
                problems.append(f"coordinate {name} is missing (its folder was deleted); rerun the sweep to "
                                "recreate it")
            else:
                problems.append(f"variable {name} is missing (its folder was deleted)")
                restorable.update({f"{name}/{f}": v for f, v in known.items()})
            continue
        for f in (".zarray", ".zattrs"):
            if _read_json(path / name / f) is None:
                problems.append(f"{name}/{f} missing or unreadable")
                if f in known:
                    restorable[f"{name}/{f}"] = known[f]
    return problems, restorable, missing, coords


_WHOLE_READ_BYTES = 256 << 20  # verify reads a variable whole when it is smaller than this


def _region_reader(arr, regions, whole_read: bool):
    """``i -> values of chunk i`` for one array: one whole read on first use when ``whole_read`` and the
    array is small (then sliced in memory), else one read per chunk."""
    cache = {}

    def read(i):
        if "whole" not in cache:
            cache["whole"] = None
            if whole_read and arr.nbytes <= _WHOLE_READ_BYTES:
                try:
                    cache["whole"] = np.asarray(arr[...])
                except Exception:  # noqa: BLE001 — a damaged chunk: fall back to reading chunk by chunk
                    pass
        whole = cache["whole"]
        if whole is not None:
            return whole[_region_index(whole, regions[i])]
        return np.asarray(arr[_region_index(arr, regions[i])])

    return read


def _read_flags(arr, bad: dict, what: str) -> np.ndarray:
    try:
        return np.asarray(arr[:])
    except Exception:  # noqa: BLE001 — one file per entry: read them one by one
        out = np.zeros(arr.shape, arr.dtype)
        for i in range(arr.shape[0]):
            try:
                out[i] = arr[i]
            except Exception:  # noqa: BLE001
                bad[i] = f"its {what} entry is unreadable"
        return out


def verify_store(path, *, repair: bool = False) -> VerifyReport:
    """Check a results store's metadata and every finished chunk against its checksum.

    A chunk's checksum (``chunk_digest``, the first 8 bytes of a SHA-256 over its values, NaN
    canonicalised) is recorded when the chunk is written; a deleted chunk file (it reads back as
    missing values) or a truncated or altered one (it fails to decode, or decodes to other
    values) no longer matches. Cost: one read of the store.

    Args:
      path: the store directory (written by ``dpo-sims sweep``).
      repair: rebuild missing metadata (``.zmetadata`` from the per-array files; a per-array file
        from ``.zmetadata``), recreate a deleted variable (``rm -r STORE/loss``, ``chunk_digest``,
        ``chunk_done``) from the template recorded in the root attributes, and mark damaged chunks
        unfinished (``chunk_done`` False) so that rerunning the sweep recomputes exactly them. Holds
        the writer's lock meanwhile.

    Returns:
      :class:`VerifyReport` (``metadata``: the problems left after any repair).

    Raises:
      UsageError: no such path, not a store dpo-sims wrote, metadata damaged beyond repair, or
        (``repair``) a store another process is writing (naming the path and the fix).
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such results store; run `dpo-sims sweep CONFIG.toml --out {path}` first")
    if not _written_by_us(path):
        raise UsageError(f"{path} is not a dpo-sims results store (no dpo_sims_store attribute); pass a store "
                         "written by `dpo-sims sweep`")
    report = VerifyReport(path=path)
    lock = _acquire_lock(path) if repair else None  # refused while a sweep writes the store
    try:
        return _verify(path, repair, report)
    finally:
        if lock is not None:
            _release_lock(lock, os.path.realpath(path))


def _verify(path: Path, repair: bool, report: VerifyReport) -> VerifyReport:
    import zarr

    problems, restorable, missing, _ = _metadata_problems(path)
    if repair and problems:
        for key, value in restorable.items():
            (path / key).parent.mkdir(parents=True, exist_ok=True)
            (path / key).write_text(json.dumps(value, indent=4))
            if key.split("/")[0] not in missing:
                report.repaired.append(f"restored {key} from .zmetadata")
        recreated = sorted({k.split("/")[0] for k in restorable} & set(missing))
        if recreated:
            report.repaired.append(f"recreated {', '.join(recreated)} (its folder was deleted) from the store's "
                                   "recorded metadata; the chunks it held are recomputed")
        if restorable or any(p.startswith(".zmetadata") for p in problems):
            try:
                _consolidate(path)
                report.repaired.append("rebuilt .zmetadata from the per-array metadata")
            except Exception:  # noqa: BLE001 — reported as a remaining problem below
                pass
        problems, _, missing, _ = _metadata_problems(path)
    report.metadata, report.missing = problems, missing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the arrays as they are on disk (a stale .zmetadata could still list a deleted one)
            group = zarr.open_group(str(path), mode="r+" if repair else "r", zarr_format=_ZARR_FORMAT,
                                    use_consolidated=False)
            attrs = dict(group.attrs)
            flags_arr = group["chunk_done"] if "chunk_done" in group or "chunk_done" not in missing else None
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{path} is not a readable results store ({type(e).__name__}: {e}); rebuild it with "
                         f"`dpo-sims sweep CONFIG.toml --out {path} --overwrite`") from None
    if flags_arr is None:  # chunk_done deleted: which chunks are finished is unknown (a resume recomputes all)
        report.n_chunks = int(attrs.get("n_chunks", 0) or 0)
        return report
    n = int(flags_arr.shape[0])
    report.n_chunks = n
    flags = _read_flags(flags_arr, report.bad, "chunk_done").astype(bool)
    digests = group["chunk_digest"] if "chunk_digest" in group else None
    # a store that records its layout always checksums its finished chunks: a zero checksum is a lost one
    checksummed = "chunk_digest" in (attrs.get("store_arrays") or [])
    if digests is None and checksummed:
        for i in np.flatnonzero(flags):
            report.bad[int(i)] = "its checksum is lost (chunk_digest is missing)"
    covered = list(digests.attrs.get("variables", [])) if digests is not None else []
    arrays = {name: group[name] for name in covered if name in group}
    missing = [name for name in covered if name not in arrays]
    shape = next(iter(arrays.values())).shape if arrays else ()
    regions = _chunk_regions(attrs, shape, n) if digests is not None else None
    expected = _read_flags(digests, report.bad, "chunk_digest") if regions is not None else None
    whole_read = 4 * int(flags.sum()) >= n  # most chunks finished: one read per variable beats one per chunk
    readers = {name: _region_reader(arr, regions, whole_read) for name, arr in arrays.items()} \
        if regions is not None else {}
    report.done = int(flags.sum()) + sum(1 for i in report.bad if not flags[i])
    for i in np.flatnonzero(flags):
        i = int(i)
        if int(i) in report.bad:
            continue
        if regions is None or expected[i] == 0:
            if checksummed and regions is not None:
                report.bad[i] = "no checksum recorded (its chunk_digest entry was lost)"
                continue
            report.unverified += 1
            continue
        values, unreadable, empty = {}, [], []
        for name, read in readers.items():
            try:
                v = values[name] = read(i)
            except Exception as e:  # noqa: BLE001 — a truncated or corrupt chunk file
                unreadable.append(f"{name}: {type(e).__name__}")
                continue
            if v.size and v.dtype.kind in "fc" and np.isnan(v).all():  # as unwritten (a deleted file)
                empty.append(name)
        report.checked += 1
        if unreadable:
            report.bad[i] = "unreadable " + ", ".join(unreadable[:3]) + (" …" if len(unreadable) > 3 else "")
        elif missing:
            report.bad[i] = f"variables {missing} are missing"
        elif _digest(values) != np.uint64(expected[i]):
            hint = f"; {', '.join(empty[:3])} read as all missing: chunk file deleted?" if empty else ""
            report.bad[i] = f"checksum mismatch{hint}"
    if repair and report.bad:
        for i in sorted(report.bad):
            flags_arr[i : i + 1] = np.zeros(1, bool)
            if digests is not None:
                digests[i : i + 1] = np.zeros(1, np.uint64)
        report.repaired.append(f"marked {len(report.bad)} damaged chunk(s) unfinished: "
                               f"{sorted(report.bad)[:10]}{' …' if len(report.bad) > 10 else ''}")
    return report


def _rebuild_hint(path) -> str:
    return (f"check the path, or rebuild the store with `dpo-sims sweep CONFIG.toml --out {path} --overwrite` "
            "(this replaces it)")


def open_results(path, *, fix: str | None = None, verify: bool = False):
    """Open a results store as an ``xarray.Dataset`` (lazy; ``xarray.open_zarr``), for reading.

    Args:
      path: the store directory. fix: the advice ending an error message
        (default: check the path or rebuild the store with ``dpo-sims sweep …
        --overwrite`` — phrased for read-only commands such as ``dpo-sims
        plot``, which have no ``--overwrite`` of their own).
      verify: first check every finished chunk against its checksum (:func:`verify_store`;
        reads the whole store once).

    A store whose ``.zmetadata`` is missing is read from its per-array metadata (nothing is
    written; ``dpo-sims verify STORE --repair`` or a resume rebuilds it).

    Raises:
      UsageError: missing or unreadable path, a path dpo-sims did not write (no ``--overwrite`` advice:
        it would not be honoured), or (``verify``) a damaged chunk, naming it and the fix.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such results store; run `dpo-sims sweep CONFIG.toml --out {path}` first")
    if not _written_by_us(path):  # a folder of other files, or a zarr store some other program wrote
        raise UsageError(f"{path} is not a dpo-sims results store (no dpo_sims_store attribute); pass a store "
                         "written by `dpo-sims sweep CONFIG.toml --out STORE`")
    fix = fix or _rebuild_hint(path)
    ResultsStore.read_attrs(path, fix=fix)
    if verify:
        report = verify_store(path)
        if report.bad:
            raise UsageError(f"{path}: {report.bad_text()}; rerun `dpo-sims sweep CONFIG.toml --out {path}` "
                             "to recompute them (or `dpo-sims verify " f"{path} --repair` first)")
    consolidated = (path / ".zmetadata").exists()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(str(path), consolidated=consolidated)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"{path} could not be opened by xarray ({type(e).__name__}: {first}); {fix}") from None


def diverged_summary(ds) -> str:
    """One line: how many runs diverged, of what kind (NaN/inf, or a finite loss blow-up: the rule of
    ``dynamics/divergence.py``), and at which grid values.

    ``ds`` is a results dataset; reads ``diverged`` (and
    ``population_diverged`` when present). Returns "" when none diverged.
    """
    parts = []
    for name in ("diverged", "population_diverged"):
        if name not in ds:
            continue
        flags = np.asarray(ds[name].values, dtype=bool)
        if not flags.any():
            continue
        da = ds[name]
        kinds = _divergence_kinds(ds, da, flags, "loss" if name == "diverged" else "population_loss")
        grid_dims = [d for d in da.dims if d != "seed"]
        any_seed = flags.any(axis=da.dims.index("seed")) if "seed" in da.dims else flags
        where = []
        for idx in np.argwhere(any_seed)[:3]:
            where.append(", ".join(f"{d}={ds[d].values[i]}" for d, i in zip(grid_dims, idx)) or "the only config")
        more = " …" if any_seed.sum() > 3 else ""
        parts.append(f"{name}: {int(flags.sum())} of {flags.size} runs{kinds} ({'; '.join(where)}{more})")
    return "; ".join(parts)


def _divergence_kinds(ds, da, flags, loss_name: str) -> str:
    """`` [a NaN/inf, b finite blow-up]`` for the flagged runs of ``da``, read from their loss variable
    (``dynamics/divergence.py``: NaN/inf, or a loss far above its start with every value finite); "" when
    the loss is not stored."""
    if loss_name not in ds:
        return ""
    loss = ds[loss_name]
    extra = [d for d in loss.dims if d not in da.dims]
    if any(d not in loss.dims for d in da.dims):
        return ""
    bad = (~np.isfinite(loss)).any(dim=extra) if extra else ~np.isfinite(loss)
    nonfinite = int((np.asarray(bad.transpose(*da.dims).values, dtype=bool) & flags).sum())
    finite = int(flags.sum()) - nonfinite
    words = ([f"{nonfinite} NaN/inf"] if nonfinite else []) + \
        ([f"{finite} finite blow-up{'s' if finite > 1 else ''} (loss > loss_0 + {_rise_factor():g}·max(|loss_0|, 1))"]
         if finite else [])
    return f" [{', '.join(words)}]"


def _rise_factor() -> float:
    from dynamics.divergence import LOSS_RISE_FACTOR

    return LOSS_RISE_FACTOR
