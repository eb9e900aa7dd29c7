"""The results store of a sweep: one ``xarray.Dataset`` in a zarr directory.

Layout (``docs/sweeps.md`` describes every variable):

* every data variable is chunked so that one *compute chunk* of the sweep
  (a block of configurations) owns exactly one zarr chunk file per variable;
  a chunk is written when it finishes, then its flag in the ``chunk_done``
  variable (dim ``chunk``, one zarr chunk per flag) is set. zarr writes each
  file atomically (write to a temporary file, then rename), so ``kill -9``
  loses at most the chunk being computed;
* the store is first built in a temporary directory next to the target and
  renamed into place, so a half-created store never carries the target name;
* the attributes hold the resolved config (JSON), its SHA-256 fingerprint, the
  compute-chunk layout, the package and JAX versions and the devices. Reopening
  with a different fingerprint is refused unless the caller overwrites.

The store is zarr format 2 with consolidated metadata (read by
``xarray.open_zarr`` with zarr-python 2 or 3). Unwritten float entries read as
NaN, unwritten booleans as False; ``chunk_done`` tells which are final.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .cli import UsageError

__all__ = [
    "STORE_FORMAT",
    "config_fingerprint",
    "available_memory",
    "ResultsStore",
    "open_results",
    "diverged_summary",
]

#: version of the on-disk layout described above (attribute ``dpo_sims_store``)
STORE_FORMAT = 1
_ZARR_FORMAT = 2


def config_fingerprint(resolved: dict) -> str:
    """SHA-256 hex digest of the canonical JSON of a resolved config (sorted keys)."""
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (".zgroup", "zarr.json", ".zmetadata"))


def _describe_diff(old: dict, new: dict, prefix="") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _describe_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


class ResultsStore:
    """A sweep's zarr results store, opened for writing chunks.

    Use :meth:`prepare` to create or resume one; then :meth:`write_chunk` for
    each finished compute chunk. ``path`` is the store directory.
    """

    def __init__(self, path: Path):
        import zarr

        self.path = Path(path)
        self._group = zarr.open_group(str(self.path), mode="r+", zarr_format=_ZARR_FORMAT)

    # ------------------------------------------------------------ creation
    @classmethod
    def prepare(cls, path, *, resolved: dict, make_template, overwrite: bool = False):
        """Create the store at ``path`` or reopen it to resume.

        Args:
          path: the store directory (``RESULTS.zarr``).
          resolved: the resolved config (JSON-serialisable dict); its
            fingerprint decides whether an existing store is the same sweep.
          make_template: ``() -> (xarray.Dataset, encoding dict)``: the
            all-missing dataset (coordinates, variables, attributes) and the
            zarr chunking; called only when a store is created.
          overwrite: replace an existing store (or an unreadable one) instead
            of refusing it.

        Returns:
          ``(store, resumed)``; ``resumed`` is True when an existing store of
          the same config was reopened.

        Raises:
          UsageError: the path exists but is not a zarr store (never deleted,
            even with ``overwrite``); an unreadable store or one holding a
            different config without ``overwrite``.
        """
        path = Path(path)
        fp = config_fingerprint(resolved)
        if path.exists() or path.is_symlink():
            if not _is_zarr_dir(path) and not (path.is_dir() and not any(path.iterdir())):
                raise UsageError(
                    f"{path} exists and is not a zarr store; refusing to touch it — choose another --out"
                )
            if not overwrite:
                old = cls.read_attrs(path)  # raises UsageError when unreadable
                if old.get("config_fingerprint") != fp:
                    try:
                        diff = _describe_diff(json.loads(old.get("config", "{}")), resolved)
                    except (TypeError, ValueError):
                        diff = []
                    what = f" (differs in: {', '.join(diff[:6])}{' …' if len(diff) > 6 else ''})" if diff else ""
                    raise UsageError(
                        f"{path} holds the results of a different sweep{what}; pass --overwrite to "
                        "replace it, or choose another --out"
                    )
                return cls(path), True
        template, encoding = make_template()
        template.attrs["config_fingerprint"] = fp
        template.attrs["dpo_sims_store"] = STORE_FORMAT
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        template.to_zarr(str(tmp), mode="w", encoding=encoding, zarr_format=_ZARR_FORMAT, consolidated=True)
        if path.exists() or path.is_symlink():
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                shutil.rmtree(path)
        os.replace(tmp, path)
        return cls(path), False

    @staticmethod
    def read_attrs(path, *, fix: str | None = None) -> dict:
        """Attributes of an existing store.

        Args:
          path: the store directory.
          fix: the advice ending the error message, phrased for the calling
            command (default: the ``dpo-sims sweep`` advice "pass --overwrite
            to replace it, or choose another --out"; read-only commands such
            as ``dpo-sims plot`` pass their own, see :func:`open_results`).

        Raises:
          UsageError: not readable, or not a dpo-sims results store (names the
            path and the fix).
        """
        import zarr

        path = Path(path)
        fix = fix or "pass --overwrite to replace it, or choose another --out"
        try:
            group = zarr.open_group(str(path), mode="r")
            attrs = dict(group.attrs)
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
        """Write one finished compute chunk, then mark it done.

        Args:
          index: the chunk number (position in ``chunk_done``).
          region: one ``slice`` per grid axis (the chunk's block); trailing
            dimensions (seed, split, step, behavior) are written whole.
          arrays: variable name → array shaped ``(block extents…, trailing…)``.
        """
        for name, value in arrays.items():
            arr = self._group[name]
            full = tuple(region) + (slice(None),) * (arr.ndim - len(region))
            arr[full] = np.asarray(value, dtype=arr.dtype)
        self._group["chunk_done"][index : index + 1] = np.ones(1, dtype=bool)


def _rebuild_hint(path) -> str:
    return (f"check the path, or rebuild the store with `dpo-sims sweep CONFIG.toml --out {path} --overwrite` "
            "(this replaces it)")


def open_results(path, *, fix: str | None = None):
    """Open a results store as an ``xarray.Dataset`` (lazy; ``xarray.open_zarr``), for reading.

    Args:
      path: the store directory. fix: the advice ending an error message
        (default: check the path or rebuild the store with ``dpo-sims sweep …
        --overwrite`` — phrased for read-only commands such as ``dpo-sims
        plot``, which have no ``--overwrite`` of their own).

    Raises:
      UsageError: missing or unreadable path, naming it and the fix.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such results store; run `dpo-sims sweep CONFIG.toml --out {path}` first")
    fix = fix or _rebuild_hint(path)
    ResultsStore.read_attrs(path, fix=fix)
    try:
        return xr.open_zarr(str(path), consolidated=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"{path} could not be opened by xarray ({type(e).__name__}: {first}); {fix}") from None


def diverged_summary(ds) -> str:
    """One line: how many runs diverged (NaN/inf), and at which grid values.

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
        grid_dims = [d for d in da.dims if d != "seed"]
        any_seed = flags.any(axis=da.dims.index("seed")) if "seed" in da.dims else flags
        where = []
        for idx in np.argwhere(any_seed)[:3]:
            where.append(", ".join(f"{d}={ds[d].values[i]}" for d, i in zip(grid_dims, idx)) or "the only config")
        more = " …" if any_seed.sum() > 3 else ""
        parts.append(f"{name}: {int(flags.sum())} of {flags.size} runs ({'; '.join(where)}{more})")
    return "; ".join(parts)
