"""The zarr results store: create, resume, refuse, region writes, done markers (no JAX runs)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import xarray as xr

from sims.cli import UsageError
from sims.store import ResultsStore, available_memory, config_fingerprint, diverged_summary, open_results


def _template(n_chunks=3, attrs=None):
    """A 6-config grid in 3 blocks of 2, seeds 2, steps 4 — all missing (``attrs``: the store's attributes)."""
    ds = xr.Dataset(
        {
            "loss": (("lr", "seed", "step"), np.broadcast_to(np.float32(np.nan), (6, 2, 4))),
            "diverged": (("lr", "seed"), np.zeros((6, 2), bool)),
            "chunk_done": (("chunk",), np.zeros(n_chunks, bool)),
        },
        coords={"lr": np.linspace(0.1, 0.6, 6), "seed": np.arange(2), "step": np.arange(4) * 5},
        attrs=attrs or {"title": "t"},
    )
    enc = {"loss": {"chunks": (2, 2, 4)}, "diverged": {"chunks": (2, 2)}, "chunk_done": {"chunks": (1,)}}
    return ds, enc


CFG = {"base": {"lr": 0.1, "steps": 15}, "grid": {"lr": [0.1, 0.2]}, "seeds": 2}


def test_fingerprint_is_order_free_and_value_sensitive():
    a = config_fingerprint({"x": 1, "y": {"b": 2, "a": [1.0, 2.0]}})
    b = config_fingerprint({"y": {"a": [1.0, 2.0], "b": 2}, "x": 1})
    c = config_fingerprint({"y": {"a": [1.0, 2.5], "b": 2}, "x": 1})
    assert a == b != c
    assert len(a) == 64


def test_create_write_resume_and_read(tmp_path):
    path = tmp_path / "r.zarr"
    store, resumed = ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    assert not resumed and path.is_dir()
    # temporary store renamed away; only the writer's lock (next to the store) while the store is open
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".r.zarr.lock"]
    assert store.done().tolist() == [False, False, False]
    vals = np.arange(16, dtype=np.float32).reshape(2, 2, 4)
    store.write_chunk(1, (slice(2, 4),), {"loss": vals, "diverged": np.array([[True, False], [False, False]])})
    assert store.done().tolist() == [False, True, False]
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds["loss"].values[2:4], vals)
    assert np.isnan(ds["loss"].values[:2]).all() and np.isnan(ds["loss"].values[4:]).all()
    assert ds["diverged"].values.sum() == 1 and ds["diverged"].values[2, 0]
    assert ds.attrs["config_fingerprint"] == config_fingerprint(CFG)
    # only the written block has chunk files (the others were never touched)
    chunk_files = sorted(p.name for p in (path / "loss").iterdir() if not p.name.startswith("."))
    assert chunk_files == ["1.0.0"]
    # the same config resumes with the flags intact
    again, resumed = ResultsStore.prepare(path, resolved=json.loads(json.dumps(CFG)), make_template=_template)
    assert resumed and again.done().tolist() == [False, True, False]
    assert open_results(path)["loss"].shape == (6, 2, 4)


def test_different_config_refused_unless_overwrite(tmp_path):
    path = tmp_path / "r.zarr"
    ResultsStore.prepare(path, resolved=CFG, make_template=_template)[0].write_chunk(
        0, (slice(0, 2),), {"loss": np.zeros((2, 2, 4), np.float32)})
    other = {**CFG, "seeds": 3}
    with pytest.raises(UsageError, match=r"different sweep.*seeds.*--overwrite"):
        ResultsStore.prepare(path, resolved=other, make_template=_template)
    assert ResultsStore(path).done()[0]  # untouched
    store, resumed = ResultsStore.prepare(path, resolved=other, make_template=_template, overwrite=True)
    assert not resumed and not store.done().any()
    assert store.attrs["config_fingerprint"] == config_fingerprint(other)


def test_unreadable_and_foreign_paths(tmp_path):
    # a store dpo-sims wrote whose group metadata is now damaged: refused, --overwrite suggested and honoured
    broken = tmp_path / "broken.zarr"
    ResultsStore.prepare(broken, resolved=CFG, make_template=_template)
    (broken / ".zgroup").write_text("{not json")
    (broken / ".zmetadata").unlink()
    with pytest.raises(UsageError, match=r"broken.zarr is not a readable results store.*--overwrite"):
        ResultsStore.prepare(broken, resolved=CFG, make_template=_template)
    store, _ = ResultsStore.prepare(broken, resolved=CFG, make_template=_template, overwrite=True)
    assert store.done().shape == (3,)

    # the same damage in a directory dpo-sims did not write (no dpo_sims_store marker): never touched, and
    # --overwrite is not suggested (it would not be honoured)
    stray = tmp_path / "stray.zarr"
    stray.mkdir()
    (stray / ".zgroup").write_text("{not json")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="dpo-sims did not write") as e:
            ResultsStore.prepare(stray, resolved=CFG, make_template=_template, overwrite=overwrite)
        assert "--overwrite" not in str(e.value)
    assert (stray / ".zgroup").read_text() == "{not json"

    foreign = tmp_path / "mydata"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="did not write; refusing to touch it|did not write .*refusing"):
            ResultsStore.prepare(foreign, resolved=CFG, make_template=_template, overwrite=overwrite)
    assert (foreign / "precious.txt").read_text() == "keep me"

    a_file = tmp_path / "file.zarr"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="is a file, not a directory"):
        ResultsStore.prepare(a_file, resolved=CFG, make_template=_template, overwrite=True)
    assert a_file.read_text() == "x"

    with pytest.raises(UsageError, match="no such results store"):
        open_results(tmp_path / "missing.zarr")

    plain = tmp_path / "plain.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(plain, zarr_format=2)
    with pytest.raises(UsageError, match="not a dpo-sims results store|not a readable results store") as e:
        ResultsStore.read_attrs(plain)
    assert "--overwrite" not in str(e.value)


def test_available_memory_is_plausible():
    mem = available_memory()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < mem <= total


def test_diverged_summary_names_the_configs():
    ds = xr.Dataset(
        {"diverged": (("lr", "seed"), np.array([[False, False], [True, True], [False, True]])),
         "population_diverged": (("lr",), np.array([False, True, False]))},
        coords={"lr": [0.1, 10.0, 1.0], "seed": [0, 1]},
    )
    s = diverged_summary(ds)
    assert "diverged: 3 of 6 runs" in s and "lr=10.0" in s and "lr=1.0" in s
    assert "population_diverged: 1 of 3 runs (lr=10.0)" in s
    assert diverged_summary(ds.map(lambda v: v & False)) == ""


def test_unreadable_store_hint_fits_the_command(tmp_path, capsys):
    """The sweep (which has --overwrite) is told to pass it; read-only callers (dpo-sims plot) are told which
    command rebuilds the store, not an option they do not have."""
    from sims.cli import main

    broken = tmp_path / "broken.zarr"
    ResultsStore.prepare(broken, resolved=CFG, make_template=_template)  # a store dpo-sims wrote, then damaged
    (broken / ".zgroup").write_text("{not json")
    (broken / ".zmetadata").unlink()
    with pytest.raises(UsageError, match=r"not a readable results store.*; pass --overwrite to replace it"):
        ResultsStore.read_attrs(broken)
    with pytest.raises(UsageError, match=r"not a readable results store.*; look elsewhere$"):
        ResultsStore.read_attrs(broken, fix="look elsewhere")
    with pytest.raises(UsageError) as e:
        open_results(broken)
    msg = str(e.value)
    assert f"rebuild the store with `dpo-sims sweep CONFIG.toml --out {broken} --overwrite`" in msg
    assert "; pass --overwrite" not in msg

    code = main(["plot", str(broken), "--y", "loss"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("dpo-sims plot: error:") and "`dpo-sims sweep CONFIG.toml" in err
    assert "; pass --overwrite" not in err

    plain = tmp_path / "plain.zarr"  # a zarr store that is not a dpo-sims store
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(plain, zarr_format=2)
    code = main(["plot", str(plain), "--y", "a"])
    err = capsys.readouterr().err
    assert code == 2 and "`dpo-sims sweep CONFIG.toml" in err and "; pass --overwrite" not in err
