"""Store integrity and safe output paths: overwrite, versions, checksums, output paths, huge grids.

* ``--overwrite`` deletes only a directory dpo-sims wrote (its ``dpo_sims_store`` attribute) that holds
  nothing else; user files and foreign zarr stores are left as they were;
* a resume with another package / code / JAX version is refused unless ``allow_version_change`` (then
  recorded); editing only the description resumes;
* finished chunks carry checksums: a deleted and a truncated chunk file are found by the verify step,
  refused by ``plot`` and recomputed by a rerun of the sweep (values equal to a clean run); a missing
  ``.zmetadata`` is rebuilt;
* an ``--out`` under a file or on a read-only location is refused before any computation;
* grids above 10⁷ configurations need ``--allow-huge``; ``--dry-run`` estimates time and store size;
  no ``.tmp-PID`` folder survives an interrupted or killed store creation.

Budget: one tiny compile group (about 10-20 s on 2 shared cores); everything else is store-level.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

import sims.store as st
from sims import sweep as sw
from sims.cli import UsageError, main
from sims.store import ResultsStore, verify_store
from test_store import _template as store_template

CFG = {"name": "t", "description": "first", "base": {"lr": 0.1}, "grid": {"lr": [0.1, 0.2, 0.3]}, "seeds": 2}


def _template(n_chunks=3):
    """A 6-config grid in 3 blocks of 2 (``chunk_block`` = (2,)), seeds 2, steps 4 — all missing."""
    return store_template(n_chunks, attrs={"title": "dpo-sims sweep t", "chunk_block": [2]})


def _filled(path, resolved=CFG):
    """A store with its three chunks written (loss = 10 i + position, chunk 1 diverged)."""
    store, _ = ResultsStore.prepare(path, resolved=resolved, make_template=_template)
    for i in range(3):
        store.write_chunk(i, (slice(2 * i, 2 * i + 2),),
                          {"loss": 10.0 * i + np.arange(16, dtype=np.float32).reshape(2, 2, 4),
                           "diverged": np.full((2, 2), i == 1)})
    return store


def _one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- 2: --overwrite
def test_overwrite_never_deletes_user_files_or_foreign_stores(tmp_path, capsys):
    # a folder with notes and a stray zarr marker (the case): untouched, --overwrite not suggested
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    (notes / "zarr.json").write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="dpo-sims did not write") as e:
            ResultsStore.prepare(notes, resolved=CFG, make_template=_template, overwrite=overwrite)
        assert "--overwrite" not in str(e.value)
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt", "zarr.json"]
    assert (notes / "notes.txt").read_text() == "mine"

    # a zarr store some other program wrote: untouched, by the API and by the CLI (before any computation)
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"a": ("x", np.arange(5.0))}).to_zarr(foreign, zarr_format=2)
    before = sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*"))
    with pytest.raises(UsageError, match="dpo-sims did not write"):
        ResultsStore.prepare(foreign, resolved=CFG, make_template=_template, overwrite=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[base]\nsteps = 2\nn = 8\nn_eval = 8\nd = 2\n")
    err = _one_line_error(capsys, ["sweep", str(cfg), "--out", str(foreign), "--overwrite", "--no-progress"])
    assert "dpo-sims did not write" in err and "--overwrite to" not in err
    assert sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*")) == before
    np.testing.assert_array_equal(xr.open_zarr(foreign)["a"].values, np.arange(5.0))

    # a dpo-sims store into which the user put files: --overwrite refuses and names them, keeping them
    ours = tmp_path / "ours.zarr"
    _filled(ours)
    (ours / "notes.txt").write_text("analysis notes")
    (ours / "loss" / "mine.csv").write_text("1,2")
    with pytest.raises(UsageError, match=r"holds files dpo-sims did not write \(loss/mine.csv, notes.txt\)"):
        ResultsStore.prepare(ours, resolved={**CFG, "seeds": 3}, make_template=_template, overwrite=True)
    assert (ours / "notes.txt").read_text() == "analysis notes" and (ours / "loss" / "mine.csv").exists()
    assert ResultsStore(ours).done().all()  # the store itself untouched too

    # the same store without the user's files is replaced
    (ours / "notes.txt").unlink()
    (ours / "loss" / "mine.csv").unlink()
    store, resumed = ResultsStore.prepare(ours, resolved={**CFG, "seeds": 3}, make_template=_template,
                                          overwrite=True)
    assert not resumed and not store.done().any()
    assert store.attrs["config_fingerprint"] == st.config_fingerprint({**CFG, "seeds": 3})


def test_empty_directory_needs_no_overwrite(tmp_path):
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    store, resumed = ResultsStore.prepare(empty, resolved=CFG, make_template=_template)
    assert not resumed and store.done().shape == (3,) and (empty / ".zgroup").is_file()


def test_editing_only_the_description_resumes_and_updates_the_labels(tmp_path):
    path = tmp_path / "r.zarr"
    _filled(path)
    edited = {**CFG, "description": "second thoughts", "name": "renamed"}
    store, resumed = ResultsStore.prepare(path, resolved=edited, make_template=_template)
    assert resumed and store.done().all()
    ds = xr.open_zarr(path, consolidated=True)  # the consolidated metadata carries the new labels
    assert ds.attrs["description"] == "second thoughts" and ds.attrs["title"] == "dpo-sims sweep renamed"
    assert json.loads(ds.attrs["config"])["description"] == "second thoughts"
    # any other change is still another sweep
    with pytest.raises(UsageError, match=r"different sweep \(differs in: seeds\)"):
        ResultsStore.prepare(path, resolved={**edited, "seeds": 3}, make_template=_template)


# ----------------------------------------------------------------------------- 4: versions
def test_resume_with_another_version_is_refused_unless_allowed_and_recorded(tmp_path, monkeypatch):
    path = tmp_path / "r.zarr"
    _filled(path)
    attrs = ResultsStore.read_attrs(path)
    real = st.environment()
    for key in ("dynamics_version", "code_digest", "jax_version", "jaxlib_version", "numpy_version",
                "zarr_version", "xarray_version"):
        assert attrs[key] == real[key], key
    assert attrs["jax_version"] == __import__("jax").__version__

    other = {**real, "jax_version": "0.0.1", "code_digest": "0123456789abcdef"}
    monkeypatch.setattr(st, "environment", lambda: dict(other))
    with pytest.raises(UsageError) as e:
        ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "--allow-version-change" in msg
    assert f"jax {real['jax_version']}" in msg and "jax 0.0.1" in msg and "code 0123456789abcdef" in msg
    assert "resumes" not in ResultsStore.read_attrs(path)  # nothing recorded when refused

    notes = []
    store, resumed = ResultsStore.prepare(path, resolved=CFG, make_template=_template, allow_version_change=True,
                                          log=notes.append)
    assert resumed and store.done().all()
    (entry,) = ResultsStore.read_attrs(path)["resumes"]
    assert entry["chunks_done"] == 3
    assert entry["changed"] == {"code_digest": [real["code_digest"], "0123456789abcdef"],
                                "jax_version": [real["jax_version"], "0.0.1"]}
    assert any("resuming with" in n and "jax 0.0.1" in n for n in notes)

    # the store now carries the versions of its latest writer: the same versions resume without the flag
    assert ResultsStore.read_attrs(path)["jax_version"] == "0.0.1"
    _, resumed = ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    assert resumed and len(ResultsStore.read_attrs(path)["resumes"]) == 1

    # a NumPy-only change does not change the numbers of a JAX run: resumed without the flag, but recorded
    monkeypatch.setattr(st, "environment", lambda: {**other, "numpy_version": "9.9"})
    _, resumed = ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    assert resumed
    assert ResultsStore.read_attrs(path)["resumes"][-1]["changed"] == {"numpy_version": [real["numpy_version"], "9.9"]}


def test_a_store_from_before_versions_were_recorded_is_refused(tmp_path):
    path = tmp_path / "old.zarr"
    _filled(path)
    import zarr

    group = zarr.open_group(str(path), mode="r+", zarr_format=2)
    for key in ("code_digest", "jaxlib_version"):
        del group.attrs[key]
    zarr.consolidate_metadata(str(path), zarr_format=2)
    with pytest.raises(UsageError, match=r"begun with code unknown, jaxlib unknown.*--allow-version-change"):
        ResultsStore.prepare(path, resolved=CFG, make_template=_template)


# ----------------------------------------------------------------------------- 7: integrity (store level)
def test_checksums_find_deleted_and_truncated_chunks_and_repair_marks_them(tmp_path):
    path = tmp_path / "r.zarr"
    _filled(path)
    rep = verify_store(path)
    assert rep.ok and rep.checked == 3 and rep.done == 3 and not rep.bad
    # the recorded checksum is an independent SHA-256 of the values (NaN canonical), first 8 bytes
    import hashlib

    ds = xr.open_zarr(path).load()
    h = hashlib.sha256()
    for name in ("diverged", "loss"):
        a = np.ascontiguousarray(ds[name].values[2:4])
        h.update(name.encode() + b"\0" + f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
    assert int(ds["chunk_digest"].values[1]) == int.from_bytes(h.digest()[:8], "little")

    (path / "loss" / "0.0.0").unlink()  # chunk 0: file deleted
    data = (path / "loss" / "2.0.0").read_bytes()
    (path / "loss" / "2.0.0").write_bytes(data[: len(data) // 2])  # chunk 2: truncated
    rep = verify_store(path)
    assert sorted(rep.bad) == [0, 2] and not rep.ok
    assert "loss read as all missing" in rep.bad[0]
    assert "unreadable loss" in rep.bad[2] or "checksum mismatch" in rep.bad[2]  # as blosc decodes the rest
    assert ResultsStore(path).done().all()  # verification alone changes nothing
    rep = verify_store(path, repair=True)
    assert ResultsStore(path).done().tolist() == [False, True, False]
    assert verify_store(path).ok

    # a missing .zmetadata: found, rebuilt by repair (the store is not replaced)
    (path / ".zmetadata").unlink()
    assert any(".zmetadata" in p for p in verify_store(path).metadata)
    assert open_ok(path)  # readers fall back to the per-array metadata meanwhile
    rep = verify_store(path, repair=True)
    assert rep.ok and (path / ".zmetadata").is_file()
    assert xr.open_zarr(path, consolidated=True)["loss"].shape == (6, 2, 4)


def open_ok(path) -> bool:
    return st.open_results(path)["loss"].shape == (6, 2, 4)


# ----------------------------------------------------------------------------- 7: integrity (a real sweep)
GRID = {"lr": [0.1, 0.2], "distinguishability": [0.5, 1.0]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished 2 × 2 sweep (seeds 2, steps 4, n 16, d 3) in 2 compute chunks (one per lr), and its config."""
    root = tmp_path_factory.mktemp("tiny")
    cfg_path = root / "tiny.toml"
    cfg_path.write_text("seeds = 2\n[base]\nsteps = 4\nn = 16\nn_eval = 16\nd = 3\n[grid]\n"
                        "lr = [0.1, 0.2]\ndistinguishability = [0.5, 1.0]\n")
    cfg = sw.load_config(cfg_path)
    res = sw.run_sweep(cfg, root / "clean.zarr", chunk_size=2, progress=False, log=lambda m: None)
    assert res.n_chunks == 2 and res.computed == 2
    return cfg_path, cfg, res.path


def _same_values(a_path, b_path):
    a, b = xr.open_zarr(a_path).load(), xr.open_zarr(b_path).load()
    assert set(a.data_vars) == set(b.data_vars)
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)


def test_damaged_sweep_store_is_refused_by_plot_and_recomputed_by_the_sweep(tiny, tmp_path, capsys):
    cfg_path, cfg, clean = tiny
    bad = tmp_path / "bad.zarr"
    shutil.copytree(clean, bad)
    (bad / "loss" / "0.0.0.0.0").unlink()  # chunk 0 (lr = 0.1): a deleted chunk file
    data = (bad / "weight_change" / "1.0.0.0.0").read_bytes()  # chunk 1 (lr = 0.2): a truncated one
    (bad / "weight_change" / "1.0.0.0.0").write_bytes(data[:20])
    (bad / ".zmetadata").unlink()

    rep = verify_store(bad)
    assert sorted(rep.bad) == [0, 1]
    err = _one_line_error(capsys, ["plot", str(bad), "--y", "loss", "--hue", "lr", "--sel", "distinguishability=1",
                                   "--out", str(tmp_path / "x.png")])
    assert str(bad) in err and "2 of 2 finished chunks damaged" in err
    assert f"rerun `dpo-sims sweep CONFIG.toml --out {bad}`" in err and not (tmp_path / "x.png").exists()
    assert main(["verify", str(bad)]) == 1
    assert "chunk 0" in capsys.readouterr().err

    # the sweep rerun finds both, recomputes exactly them, rebuilds .zmetadata: equal to the clean run
    notes = []
    res = sw.run_sweep(cfg, bad, progress=False, log=notes.append)
    assert res.computed == 2 and res.skipped == 0
    assert any("2 of 2 finished chunks damaged" in n for n in notes)
    assert any(".zmetadata was missing" in n for n in notes)
    _same_values(bad, clean)
    assert main(["verify", str(bad)]) == 0
    assert "intact — 2 of 2" in capsys.readouterr().out

    # one damaged chunk: only that one is recomputed
    (bad / "loss" / "1.0.0.0.0").unlink()
    res = sw.run_sweep(cfg, bad, progress=False, log=lambda m: None)
    assert (res.computed, res.skipped) == (1, 1)
    _same_values(bad, clean)


# ----------------------------------------------------------------------------- 8: output paths
def test_unwritable_or_file_parent_out_is_refused_before_any_computation(tiny, tmp_path, monkeypatch, capsys):
    cfg_path, cfg, _ = tiny

    def no_compute(*a, **k):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(sw.run, "_check_program", no_compute)  # where run_sweep looks them up
    monkeypatch.setattr(sw.run, "_run_chunk", no_compute)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = _one_line_error(capsys, ["sweep", str(cfg_path), "--out", str(a_file / "r.zarr"), "--no-progress"])
    assert f"{a_file} is a file, not a directory" in err

    # a read-only location: os.access says so (as on a read-only mount, even for root)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(st.os, "access", lambda p, mode, *a, **k: False if str(p) == str(ro) else
                        real_access(p, mode, *a, **k))
    err = _one_line_error(capsys, ["sweep", str(cfg_path), "--out", str(ro / "sub" / "r.zarr"), "--no-progress"])
    assert f"{ro} is not writable (read-only filesystem or no permission)" in err
    assert not any(ro.iterdir())
    with pytest.raises(UsageError, match="not writable"):
        sw.run_sweep(cfg, ro / "r.zarr", progress=False)

    # os.access passes but creating a file fails (EROFS seen only on write): the probe catches it
    monkeypatch.setattr(st.os, "access", real_access)

    def erofs(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(st.tempfile, "mkstemp", erofs)
    with pytest.raises(UsageError, match="not writable"):
        sw.run_sweep(cfg, tmp_path / "fine" / "r.zarr", progress=False)
    assert not (tmp_path / "fine").exists()


def test_plot_and_bench_out_under_a_file(tiny, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = _one_line_error(capsys, ["plot", str(tiny[2]), "--y", "loss", "--out", str(a_file / "x.png")])
    assert f"{a_file} is a file, not a directory" in err
    err = _one_line_error(capsys, ["bench", "--json", str(a_file / "x.json")])
    assert "is a file, not a directory" in err and "does not exist" not in err


def test_at_step_error_names_the_stride(tiny, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny[2], store)
    err = _one_line_error(capsys, ["plot", str(store), "--y", "loss", "--x", "lr", "--sel", "distinguishability=1",
                                   "--at-step", "7", "--out", str(tmp_path / "x.png")])
    assert "recorded steps are 0, 1, 2, 3, 4" in err and "nearest: 4" in err
    from sims.plots import _recorded_steps

    assert _recorded_steps(np.arange(0, 101, 5), 7) == "recorded steps are 0, 5, …, 100 (every 5); nearest: 5 or 10"


# ----------------------------------------------------------------------------- 6: huge grids, temporaries
def test_huge_grid_needs_allow_huge_and_dry_run_estimates(tmp_path, capsys):
    text = ('[base]\nmode = "population"\nsteps = 2\nd = 2\n[grid]\nlr = {logspace = [-3, 0, 4000]}\n'
            "beta = {linspace = [0.5, 2.0, 2600]}\n")
    cfg_path = tmp_path / "huge.toml"
    cfg_path.write_text(text)
    out = tmp_path / "huge.zarr"
    err = _one_line_error(capsys, ["sweep", str(cfg_path), "--out", str(out), "--no-progress"])
    assert "10,400,000 configurations exceed 10,000,000" in err and "--allow-huge" in err and "GiB" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert main(["sweep", str(cfg_path), "--out", str(out), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "estimated" in dry and "needs --allow-huge" in dry and not out.exists()


def test_store_size_estimate_matches_the_written_store(tiny):
    _, cfg, clean = tiny
    plan = sw.plan_sweep(cfg, 2)
    secs, nbytes = sw.estimate_cost(cfg, plan, sw._plan_layout(cfg, plan))
    ds = xr.open_zarr(clean)
    stored = sum(ds[v].nbytes for v in ds.data_vars)  # every variable, uncompressed, as xarray counts it
    assert nbytes == stored, (nbytes, stored)
    assert secs > 0


def test_no_temporary_survives_an_interrupted_or_killed_creation(tmp_path, monkeypatch):
    path = tmp_path / "r.zarr"
    # Ctrl-C while the template is written: the temporary is removed, nothing carries the name
    real = xr.Dataset.to_zarr

    def interrupted(self, store, *a, **k):
        real(self, store, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_zarr", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    monkeypatch.setattr(xr.Dataset, "to_zarr", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # a kill -9 leaves one behind: the next start removes it (its process is dead), keeps a live one's
    # and anything that is not a store under construction
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = st.socket.gethostname()
    stale = tmp_path / f".r.zarr.tmp-{dead.pid}@{host}"
    stale.mkdir()
    (stale / ".zgroup").write_text("{}")
    legacy = tmp_path / f".r.zarr.tmp-{dead.pid}"  # the name used before the host was added
    legacy.mkdir()
    (legacy / ".zattrs").write_text("{}")
    live = tmp_path / f".r.zarr.tmp-{os.getppid()}@{host}"
    live.mkdir()
    (live / ".zgroup").write_text("{}")
    user = tmp_path / f".r.zarr.tmp-{dead.pid}@elsewhere"  # another host's: not ours to judge
    user.mkdir()
    other = tmp_path / f".r.zarr.tmp-{dead.pid + 1 if dead.pid + 1 != os.getppid() else dead.pid + 2}"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")  # the name matches, but it holds no store
    ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert stale.name not in names and legacy.name not in names
    assert live.name in names and user.name in names and other.name in names and "r.zarr" in names
    assert (other / "thesis.tex").read_text() == "mine"


def test_fast_template_writes_the_metadata_xarray_writes(tmp_path):
    """The missing variables' metadata is written without touching their chunks: the same .zarray/.zattrs
    as a plain ``to_zarr`` of the whole template, and the same values read back."""
    ds, enc = _template()
    ds["wide"] = (("lr", "seed", "step", "behavior"), np.broadcast_to(np.float32(np.nan), (6, 2, 4, 3)))
    ds["flag"] = (("lr", "seed"), np.broadcast_to(False, (6, 2)))
    ds["given"] = (("lr",), np.arange(6.0))  # real values: written as they are
    enc = {**enc, "wide": {"chunks": (2, 2, 4, 3)}, "flag": {"chunks": (2, 2)}, "given": {"chunks": (2,)}}
    st._write_template(ds, enc, tmp_path / "fast.zarr")
    ds.to_zarr(tmp_path / "plain.zarr", mode="w", encoding=enc, zarr_format=2, consolidated=True)
    fast = json.loads((tmp_path / "fast.zarr" / ".zmetadata").read_text())["metadata"]
    plain = json.loads((tmp_path / "plain.zarr" / ".zmetadata").read_text())["metadata"]
    assert fast == plain
    for v in ("loss", "wide", "flag"):  # no chunk file was written for a missing variable
        assert sorted(p.name for p in (tmp_path / "fast.zarr" / v).iterdir()) == [".zarray", ".zattrs"]
    a, b = xr.open_zarr(tmp_path / "fast.zarr").load(), xr.open_zarr(tmp_path / "plain.zarr").load()
    for v in b.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
    np.testing.assert_array_equal(a["given"].values, np.arange(6.0))


def test_cli_resume_after_editing_only_the_description(tiny, tmp_path, capsys):
    cfg_path, _, clean = tiny
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    edited = tmp_path / "tiny.toml"  # same file name: the default name stays "tiny"
    edited.write_text('description = "now with a description"\n' + cfg_path.read_text())
    code = main(["sweep", str(edited), "--out", str(store), "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0 and "(0 computed, 2 resumed)" in cap.out, cap.err
    assert xr.open_zarr(store).attrs["description"] == "now with a description"


def test_validate_and_bench_outputs_are_checked_before_any_run(tmp_path, capsys):
    """``validate --out`` under a file and ``bench --json`` naming a directory or a place under a file are
    refused in one line (exit 2) before any battery or benchmark runs."""
    afile = tmp_path / "afile"
    afile.write_text("user data\n")
    (tmp_path / "userdir").mkdir()
    err = _one_line_error(capsys, ["validate", "--claims", "C0", "--out", str(afile / "v")])
    assert "is a file, not a directory" in err and "--out" in err
    err = _one_line_error(capsys, ["bench", "--quick", "--json", str(tmp_path / "userdir")])
    assert "is a directory" in err and "--json" in err
    err = _one_line_error(capsys, ["bench", "--quick", "--json", str(afile / "x.json")])
    assert "is a file" in err
    assert afile.read_text() == "user data\n"


# ----------------------------------------------------------------------------- a whole variable deleted
def _zarray(path, name):
    return json.loads((path / name / ".zarray").read_text())


def test_a_deleted_variable_is_found_after_zmetadata_was_rebuilt_and_recreated(tmp_path, capsys):
    """``rm -r STORE/loss`` and a later rebuild of ``.zmetadata`` (which then forgets it): the root attributes
    still name it; verify reports it, --repair recreates it (the same .zarray as written) and marks its chunks
    for recompute; writing them back gives the values and a clean verify (it was a KeyError in write_chunk)."""
    path = tmp_path / "r.zarr"
    _filled(path)
    original = _zarray(path, "loss")
    assert "loss" in ResultsStore.read_attrs(path)["store_arrays"]
    shutil.rmtree(path / "loss")
    st._consolidate(path)  # what a resume or a repair did: .zmetadata now lacks loss
    assert "loss/.zarray" not in json.loads((path / ".zmetadata").read_text())["metadata"]
    rep = verify_store(path)
    assert rep.missing == ["loss"] and not rep.ok and sorted(rep.bad) == [0, 1, 2]
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert "1 array(s) missing (loss)" in err and "--repair" in err

    rep = verify_store(path, repair=True)
    assert rep.missing == [] and any("recreated loss" in r for r in rep.repaired)
    assert _zarray(path, "loss") == original
    assert ResultsStore(path).done().tolist() == [False, False, False]
    store = ResultsStore(path)
    for i in range(3):  # the recompute: no KeyError, and the values come back
        store.write_chunk(i, (slice(2 * i, 2 * i + 2),),
                          {"loss": 10.0 * i + np.arange(16, dtype=np.float32).reshape(2, 2, 4),
                           "diverged": np.full((2, 2), i == 1)})
    assert verify_store(path).ok
    np.testing.assert_array_equal(xr.open_zarr(path)["loss"].values[4:6], 20.0 + np.arange(16).reshape(2, 2, 4))


def test_deleted_bookkeeping_arrays_and_coordinates(tmp_path):
    """A deleted chunk_digest: every finished chunk is unverifiable, so damaged (it was read as an old store
    without checksums and trusted); a deleted chunk_done is recreated all unfinished; a deleted coordinate is
    not restored with missing values by verify, but from the template by a resume."""
    path = tmp_path / "r.zarr"
    _filled(path)
    shutil.rmtree(path / "chunk_digest")
    rep = verify_store(path)
    assert rep.missing == ["chunk_digest"] and sorted(rep.bad) == [0, 1, 2] and rep.unverified == 0
    assert all("checksum is lost" in why for why in rep.bad.values())
    rep = verify_store(path, repair=True)
    assert not rep.missing and ResultsStore(path).done().tolist() == [False] * 3
    np.testing.assert_array_equal(xr.open_zarr(path)["chunk_digest"].values, np.zeros(3, np.uint64))

    _filled(tmp_path / "b.zarr")
    shutil.rmtree(tmp_path / "b.zarr" / "chunk_done")
    st._consolidate(tmp_path / "b.zarr")
    rep = verify_store(tmp_path / "b.zarr")
    assert rep.missing == ["chunk_done"] and not rep.ok
    verify_store(tmp_path / "b.zarr", repair=True)
    assert ResultsStore(tmp_path / "b.zarr").done().tolist() == [False] * 3

    _filled(tmp_path / "c.zarr")
    shutil.rmtree(tmp_path / "c.zarr" / "lr")
    rep = verify_store(tmp_path / "c.zarr", repair=True)
    assert rep.missing == ["lr"] and any("coordinate lr is missing" in p and "rerun the sweep" in p
                                         for p in rep.metadata)
    assert not (tmp_path / "c.zarr" / "lr").exists()  # not recreated as NaN
    notes = []
    _, resumed = ResultsStore.prepare(tmp_path / "c.zarr", resolved=CFG, make_template=_template, log=notes.append)
    assert resumed and any("recreated coordinate lr from the template" in n for n in notes)
    np.testing.assert_allclose(xr.open_zarr(tmp_path / "c.zarr")["lr"].values, np.linspace(0.1, 0.6, 6))
    assert verify_store(tmp_path / "c.zarr").ok


def test_sweep_resume_recomputes_a_deleted_variable(tiny, tmp_path):
    cfg_path, cfg, clean = tiny
    bad = tmp_path / "bad.zarr"
    shutil.copytree(clean, bad)
    shutil.rmtree(bad / "loss")
    st._consolidate(bad)
    notes = []
    res = sw.run_sweep(cfg, bad, progress=False, log=notes.append)
    assert (res.computed, res.skipped) == (2, 0), notes
    _same_values(bad, clean)


# ----------------------------------------------------------------------------- one writer at a time
_HOLDER = """\
import sys, time
from pathlib import Path
import sims.store as st
lock = st._acquire_lock(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def _hold_lock(path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    path = tmp_path / "r.zarr"
    _filled(path)
    holder = _hold_lock(path)
    host = st.socket.gethostname()
    try:
        who = f"{holder.pid}@{host}"
        for call in (lambda: ResultsStore.prepare(path, resolved=CFG, make_template=_template),
                     lambda: verify_store(path, repair=True),
                     lambda: ResultsStore.prepare(tmp_path / "r.zarr", resolved={**CFG, "seeds": 3},
                                                  make_template=_template, overwrite=True)):
            with pytest.raises(UsageError, match=rf"being written by another dpo-sims process \({who} since"):
                call()
        assert verify_store(path).ok  # reading needs no lock
        cfg = tmp_path / "c.toml"
        cfg.write_text("[base]\nsteps = 2\nn = 8\nn_eval = 8\nd = 2\n")
        err = _one_line_error(capsys, ["sweep", str(cfg), "--out", str(path), "--no-progress"])
        assert who in err and "wait for it to finish" in err
        # a fresh store being created is locked too (the lock file lies next to the store)
        fresh = tmp_path / "new.zarr"
        other = _hold_lock(fresh)
        try:
            with pytest.raises(UsageError, match=f"{other.pid}@{host}"):
                ResultsStore.prepare(fresh, resolved=CFG, make_template=_template)
            assert not fresh.exists()
        finally:
            other.kill()
            other.wait()
    finally:
        holder.kill()  # a kill -9: the kernel drops the flock, the file still names the dead process
        holder.wait()
    assert f"{holder.pid}@{host}" in (tmp_path / ".r.zarr.lock").read_text()
    notes = []
    store, resumed = ResultsStore.prepare(path, resolved=CFG, make_template=_template, log=notes.append)
    assert resumed and any(f"took over the writer's lock of {holder.pid}@{host}" in n for n in notes)
    assert (tmp_path / ".r.zarr.lock").read_text().startswith(f"{os.getpid()}@{host} since ")
    store.close()
    assert not (tmp_path / ".r.zarr.lock").exists()  # released: removed


def test_without_flock_the_lock_file_alone_decides(tmp_path, monkeypatch):
    """On a filesystem without flock (ENOLCK): a live PID of this host in the file refuses, a dead one is
    taken over."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "r.zarr"
    host = st.socket.gethostname()
    (tmp_path / ".r.zarr.lock").write_text(f"{os.getppid()}@{host} since then (dpo-sims sweep)\n")
    with pytest.raises(UsageError, match=f"{os.getppid()}@{host}"):
        ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".r.zarr.lock").write_text(f"{dead.pid}@{host} since then (dpo-sims sweep)\n")
    store, _ = ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    store.close()


# ----------------------------------------------------------------------------- messages that say what happens
def test_a_missing_root_zattrs_is_refused_naming_verify_repair_which_fixes_it(tmp_path):
    """The sweep refused it as "not a dpo-sims results store … pass --overwrite" while `verify --repair`
    restores the root attributes from .zmetadata."""
    path = tmp_path / "r.zarr"
    _filled(path)
    (path / ".zattrs").unlink()
    with pytest.raises(UsageError, match=r"root metadata is damaged \(\.zattrs missing or unreadable\); run "
                                         rf"`dpo-sims verify --repair {path}`") as e:
        ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    assert "--overwrite" not in str(e.value) and "\n" not in str(e.value)
    assert verify_store(path, repair=True).ok
    store, resumed = ResultsStore.prepare(path, resolved=CFG, make_template=_template)
    assert resumed and store.done().tolist() == [True] * 3


def test_a_recreated_coordinate_says_no_chunk_is_recomputed(tmp_path):
    """It said "their chunks will be recomputed" while none were (a coordinate comes from the config)."""
    path = tmp_path / "c.zarr"
    _filled(path)
    shutil.rmtree(path / "lr")
    notes = []
    store, _ = ResultsStore.prepare(path, resolved=CFG, make_template=_template, log=notes.append)
    note = [n for n in notes if "recreated" in n]
    assert len(note) == 1 and "coordinate lr" in note[0] and "no chunk is recomputed" in note[0], notes
    assert "will be recomputed" not in note[0]
    assert store.done().tolist() == [True] * 3 and verify_store(path).ok  # true: nothing is left to compute
    # a deleted variable: its chunks are recomputed, and the note says so
    shutil.rmtree(path / "loss")
    notes = []
    store, _ = ResultsStore.prepare(path, resolved=CFG, make_template=_template, log=notes.append)
    assert any("recreated loss" in n and "will be recomputed" in n for n in notes), notes
    assert store.done().tolist() == [False] * 3  # its chunks failed their checksums: the resume recomputes them


def test_the_divergence_summary_says_which_runs_blew_up_without_nan():
    """Finite blow-ups (flagged by the loss rule of dynamics/divergence.py) were labelled NaN/inf."""
    loss = np.full((3, 2, 2, 4), 0.69, np.float32)  # lr, seed, split, step
    loss[1, 0, 0, 2] = np.nan        # lr=10, seed 0: NaN
    loss[1, 1, :, 1:] = 500.0        # lr=10, seed 1: finite, 500 nats
    loss[2, 1, :, 1:] = 40.0         # lr=1, seed 1: finite, 40 nats
    ds = xr.Dataset(
        {"diverged": (("lr", "seed"), np.array([[False, False], [True, True], [False, True]])),
         "loss": (("lr", "seed", "split", "step"), loss),
         "population_diverged": (("lr",), np.array([False, True, False])),
         "population_loss": (("lr", "step"), np.array([[0.7, 0.6, 0.5, 0.4], [0.7, np.inf, 0.6, 0.6],
                                                       [0.7, 0.5, 0.4, 0.3]]))},
        coords={"lr": [0.1, 10.0, 1.0], "seed": [0, 1]},
    )
    s = st.diverged_summary(ds)
    assert "diverged: 3 of 6 runs [1 NaN/inf, 2 finite blow-ups (loss > loss_0 + 10·max(|loss_0|, 1))]" in s, s
    assert "population_diverged: 1 of 3 runs [1 NaN/inf] (lr=10.0)" in s, s
