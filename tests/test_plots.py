"""Plots: the seed interval, what the lines show, PNG output and the plot CLI (synthetic data; no JAX runs)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from scipy import stats  # noqa: E402

from sims.cli import UsageError, main  # noqa: E402
from sims.plots import mean_interval, plot_metric, plot_results  # noqa: E402
from sims.store import ResultsStore  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mean_interval_matches_scipy_t_interval():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(7, 5))
    mean, lo, hi = mean_interval(v, axis=0)
    for j in range(5):
        a, b = stats.t.interval(0.95, 6, loc=v[:, j].mean(), scale=stats.sem(v[:, j]))
        assert lo[j] == pytest.approx(a, rel=1e-10) and hi[j] == pytest.approx(b, rel=1e-10)
    np.testing.assert_allclose(mean, v.mean(axis=0), rtol=1e-12)
    # non-finite runs (diverged seeds) are left out; one finite value collapses the band
    w = v.copy()
    w[0, 0], w[1, 0] = np.nan, np.inf
    w[1:, 1] = np.nan
    m2, lo2, hi2 = mean_interval(w, axis=0)
    a, b = stats.t.interval(0.95, 4, loc=v[2:, 0].mean(), scale=stats.sem(v[2:, 0]))
    assert m2[0] == pytest.approx(v[2:, 0].mean()) and lo2[0] == pytest.approx(a) and hi2[0] == pytest.approx(b)
    assert m2[1] == lo2[1] == hi2[1] == v[0, 1]
    m3, _, _ = mean_interval(np.full((3, 2), np.nan), axis=0)
    assert np.isnan(m3).all()


def _results(seeds=4):
    """A results-like dataset: loss = a_Δ e^{−t/τ_lr} + noise, population without noise."""
    rng = np.random.default_rng(1)
    deltas, lrs, steps = np.array([0.5, 1.0, 2.0]), np.array([0.1, 0.2]), np.arange(0, 50, 10)
    pop = 0.7 - 0.1 * deltas[:, None, None] * (1 - np.exp(-steps[None, None, :] * lrs[None, :, None]))
    emp = pop[:, :, None, None, :] + 0.01 * rng.normal(size=(3, 2, seeds, 2, len(steps)))
    ds = xr.Dataset(
        {"loss": (("distinguishability", "lr", "seed", "split", "step"), emp.astype(np.float32)),
         "population_loss": (("distinguishability", "lr", "step"), pop.astype(np.float32)),
         "chunk_done": (("chunk",), np.ones(2, bool))},
        coords={"distinguishability": deltas, "lr": lrs, "seed": np.arange(seeds), "split": ["train", "eval"],
                "step": steps},
        attrs={"title": "synthetic"},
    )
    return ds


def test_lines_show_the_seed_mean_and_the_population():
    ds = _results()
    fig, ax = plt.subplots()
    plot_metric(ax, ds.sel(lr=0.2), "loss", hue="distinguishability", split="train")
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(solid) == 3 and len(dashed) == 3
    for j in range(3):
        np.testing.assert_allclose(solid[j].get_ydata(), ds["loss"].values[j, 1, :, 0].mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(dashed[j].get_ydata(), ds["population_loss"].values[j, 1], rtol=1e-6)
        assert solid[j].get_color() == dashed[j].get_color()
    assert ax.get_ylabel() == "loss (train)"
    plt.close(fig)
    # a grid axis on x: the metric at the last step against it
    fig, ax = plt.subplots()
    plot_metric(ax, ds.sel(lr=0.1), "loss", x="distinguishability", split="eval")
    np.testing.assert_allclose(ax.lines[0].get_ydata(), ds["loss"].values[:, 0, :, 1, -1].mean(axis=1), rtol=1e-6)
    plt.close(fig)


def test_plot_results_writes_a_png_with_facets(tmp_path):
    out = plot_results(_results(), "loss", hue="distinguishability", facet="lr", out=tmp_path / "f.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    with pytest.raises(UsageError, match=r"loss varies along lr \(2 values\).*--sel lr=VALUE"):
        plot_results(_results(), "loss", hue="distinguishability", out=tmp_path / "g.png")
    with pytest.raises(UsageError, match="did you mean 'loss'"):
        plot_results(_results(), "los", hue="distinguishability", facet="lr", out=tmp_path / "g.png")
    with pytest.raises(UsageError, match="--sel lr=0.3: no such value"):
        plot_results(_results(), "loss", sel={"lr": "0.3"}, hue="distinguishability", out=tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_plot_cli_on_a_store(tmp_path, capsys):
    ds = _results()
    store = tmp_path / "r.zarr"

    def template():
        t = ds.copy()
        t["chunk_done"] = ("chunk", np.zeros(1, bool))
        return t, {}

    st, _ = ResultsStore.prepare(store, resolved={"x": 1}, make_template=template)
    st.write_chunk(0, (), {})
    png = tmp_path / "cli.png"
    code = main(["plot", str(store), "--y", "loss", "--hue", "distinguishability", "--sel", "lr=0.2",
                 "--split", "train", "--out", str(png)])
    assert code == 0 and png.read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out
    code = main(["plot", str(store), "--y", "loss", "--hue", "distinguishability"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--sel lr=VALUE" in err
    code = main(["plot", str(tmp_path / "missing.zarr"), "--y", "loss"])
    assert code == 2 and "no such results store" in capsys.readouterr().err
    code = main(["plot", str(store), "--y", "loss", "--facet", "lrr", "--hue", "distinguishability"])
    assert code == 2 and "did you mean 'lr'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real (tiny) sweep store
GRID = {"lr": [0.1, 0.2], "distinguishability": [0.5, 1.0, 2.0]}


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A finished 2 × 3 sweep (seeds 2, steps 5, n 32, d 4) in 2 compute chunks of 3 (one per lr)."""
    import sims.sweep as sw

    cfg = sw.parse_config({"seeds": 2, "base": {"steps": 5, "n": 32, "n_eval": 32, "d": 4}, "grid": GRID})
    path = tmp_path_factory.mktemp("sweep") / "r.zarr"
    res = sw.run_sweep(cfg, path, chunk_size=3, progress=False, log=lambda msg: None)
    assert res.n_chunks == 2 and res.computed == 2
    return path


def _unfinished_copy(src, dst, chunks):
    """Copy a finished store and undo the given compute chunks: their zarr chunk files are removed and their
    ``chunk_done`` flags cleared — the on-disk state of a sweep killed before writing them."""
    import itertools
    import json
    import shutil

    import zarr

    shutil.copytree(src, dst)
    ds = xr.open_zarr(dst)
    sizes = [ds.sizes[d] for d in GRID]
    block = ds.attrs["chunk_block"]
    blocks = list(itertools.product(*(range(-(-s // b)) for s, b in zip(sizes, block))))
    meta = json.loads((dst / "loss" / ".zarray").read_text())
    sep = meta.get("dimension_separator") or "."
    removed = 0
    for c in chunks:
        prefix = sep.join(str(i) for i in blocks[c])
        for var in ds.data_vars:
            if tuple(ds[var].dims[:len(GRID)]) != tuple(GRID):
                continue
            for f in (dst / var).iterdir():
                if f.name == prefix or f.name.startswith(prefix + sep):
                    f.unlink()
                    removed += 1
    assert removed > 0
    group = zarr.open_group(str(dst), mode="r+", zarr_format=2)
    for c in chunks:
        group["chunk_done"][c : c + 1] = np.zeros(1, bool)
    return dst


def _seed_mean(da):
    """Mean over seeds of the finite values, NumPy float64 (independent of plots.mean_interval)."""
    v = np.asarray(da.values, np.float64)
    return np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=da.dims.index("seed"))


@pytest.mark.parametrize("argv, needles", [
    # --hue split: split is chosen with --split; valid hues are named
    (["--y", "loss", "--hue", "split", "--sel", "distinguishability=1.0"],
     ["--hue split", "--split", "choose one of ['lr']"]),
    (["--y", "loss", "--hue", "split"], ["--hue split", "choose one of ['lr', 'distinguishability']"]),
    (["--y", "loss", "--hue", "behavior", "--sel", "lr=0.1"],
     ["--hue behavior", "loss does not vary along behavior", "behavior_loss", "['distinguishability']"]),
    (["--y", "loss", "--hue", "seed", "--sel", "lr=0.1"], ["--hue seed", "--sel seed=N", "['distinguishability']"]),
    (["--y", "loss", "--hue", "lrr"], ["--hue lrr", "did you mean 'lr'", "['lr', 'distinguishability']"]),
    (["--y", "loss", "--x", "seed"], ["--x seed", "choose one of ['step', 'lr', 'distinguishability']"]),
    (["--y", "loss", "--facet", "behavior", "--hue", "lr"],
     ["--facet behavior", "['distinguishability', 'seed', 'split']"]),
    # --sel: unknown axis, value not in the coordinate, non-numeric, repeated, step
    (["--y", "loss", "--hue", "lr", "--sel", "foo=1"],
     ["--sel foo=1: no such dimension", "'lr', 'distinguishability'", "'behavior'"]),
    (["--y", "loss", "--hue", "distinguishability", "--sel", "lr=0.3"], ["--sel lr=0.3: no such value", "['0.1', '0.2']"]),
    (["--y", "loss", "--hue", "lr", "--sel", "distinguishability=big"],
     ["--sel distinguishability=big", "numeric", "['0.5', '1', '2']"]),
    (["--y", "loss", "--hue", "lr", "--sel", "seed=7"], ["--sel seed=7: no such value", "['0', '1']"]),
    (["--y", "loss", "--hue", "lr", "--sel", "split=test"], ["--sel split=test", "['train', 'eval']"]),
    (["--y", "loss", "--hue", "lr", "--sel", "lr=0.1"], ["--hue lr", "also fixed by --sel lr=0.1"]),
    (["--y", "loss", "--hue", "lr", "--sel", "distinguishability=1", "--sel", "distinguishability=2"],
     ["--sel distinguishability", "given twice"]),
    (["--y", "loss", "--hue", "lr", "--sel", "step=3"], ["--sel step=3", "--x AXIS --at-step 3"]),
    (["--y", "loss", "--hue", "lr", "--sel", "lr"], ["--sel lr", "AXIS=VALUE"]),
])
def test_plot_cli_bad_axes_name_option_value_and_choices(sweep_store, tmp_path, capsys, argv, needles):
    png = tmp_path / "bad.png"
    code = main(["plot", str(sweep_store), *argv, "--out", str(png)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not png.exists()


def test_plot_variables_without_a_step_dimension(sweep_store, tmp_path, capsys):
    ds = xr.open_zarr(sweep_store)
    # refused on the default --x step, with the variables' valid grid axes
    for var, per in (("behavior_distinguishability", "per configuration)"), ("diverged", "per configuration and seed")):
        code = main(["plot", str(sweep_store), "--y", var, "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"--y {var} has no step dimension" in err and per in err
        assert "pass --x AXIS with AXIS one of ['lr', 'distinguishability']" in err
    code = main(["plot", str(sweep_store), "--y", "priority_gap", "--x", "lr", "--at-step", "3"])
    assert code == 2 and "--at-step 3: priority_gap has no step dimension" in capsys.readouterr().err

    # against a grid axis: Δ_k = ‖μ⁺ − μ⁻‖ is the configured distinguishability (docs/theory.md §2.3), for every lr
    fig, ax = plt.subplots()
    plot_metric(ax, ds, "behavior_distinguishability", x="distinguishability", hue="lr")
    assert len(ax.lines) == 2 and ax.get_xlabel() == "distinguishability"
    for line, lr in zip(ax.lines, GRID["lr"]):
        np.testing.assert_allclose(line.get_xdata(), GRID["distinguishability"])
        np.testing.assert_allclose(line.get_ydata(), GRID["distinguishability"], rtol=1e-5)
        np.testing.assert_allclose(line.get_ydata(), ds["behavior_distinguishability"].sel(lr=lr).values[:, 0])
    plt.close(fig)
    # a boolean per-seed variable: the fraction of seeds (solid) and the population flag (dashed)
    fig, ax = plt.subplots()
    plot_metric(ax, ds, "diverged", x="lr", hue="distinguishability")
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(solid) == len(dashed) == 3 and ax.get_ylabel() == "diverged (fraction of seeds)"
    for j in range(3):
        np.testing.assert_allclose(solid[j].get_ydata(), _seed_mean(ds["diverged"].isel(distinguishability=j)))
        np.testing.assert_allclose(dashed[j].get_ydata(), ds["population_diverged"].values[:, j].astype(float))
    plt.close(fig)
    # a per-step metric against a grid axis at --at-step: the seed mean at that step
    fig, ax = plt.subplots()
    plot_metric(ax, ds.sel(distinguishability=2.0), "loss", x="lr", at_step=3, split="train")
    np.testing.assert_allclose(ax.lines[0].get_ydata(),
                               _seed_mean(ds["loss"].sel(distinguishability=2.0, step=3, split="train")), rtol=1e-6)
    np.testing.assert_allclose(ax.lines[1].get_ydata(),
                               ds["population_loss"].sel(distinguishability=2.0, step=3).values, rtol=1e-6)
    assert not np.allclose(ax.lines[0].get_ydata(), np.log(2))  # it learned something by step 3
    plt.close(fig)
    png = tmp_path / "gap.png"
    code = main(["plot", str(sweep_store), "--y", "behavior_distinguishability", "--x", "distinguishability",
                 "--hue", "lr", "--out", str(png)])
    assert code == 0 and png.read_bytes()[:8] == PNG_MAGIC


def test_plot_unfinished_stores(sweep_store, tmp_path, capsys):
    # nothing finished: refused in one line, no figure
    empty = _unfinished_copy(sweep_store, tmp_path / "empty.zarr", [0, 1])
    assert np.isnan(xr.open_zarr(empty)["loss"].values).all()
    png = tmp_path / "empty.png"
    code = main(["plot", str(empty), "--y", "loss", "--hue", "lr", "--sel", "distinguishability=1", "--out", str(png)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no finished chunks (0 of 2" in err and f"dpo-sims sweep CONFIG.toml --out {empty}` to resume" in err
    assert not png.exists()

    # half finished (lr = 0.2 missing): plotted, with a warning naming how many chunks are missing
    half = _unfinished_copy(sweep_store, tmp_path / "half.zarr", [1])
    png = tmp_path / "half.png"
    code = main(["plot", str(half), "--y", "loss", "--hue", "lr", "--sel", "distinguishability=1", "--out", str(png)])
    cap = capsys.readouterr()
    assert code == 0 and png.read_bytes()[:8] == PNG_MAGIC and "wrote" in cap.out
    assert "warning: 1 of 2 chunks" in cap.err and "unfinished" in cap.err and "to resume" in cap.err
    # what is drawn: lr = 0.1 as in the finished store, lr = 0.2 missing
    full, part = xr.open_zarr(sweep_store), xr.open_zarr(half)
    fig, ax = plt.subplots()
    plot_metric(ax, part.sel(distinguishability=1.0), "loss", hue="lr")
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    np.testing.assert_allclose(solid[0].get_ydata(),
                               _seed_mean(full["loss"].sel(distinguishability=1.0, lr=0.1, split="eval")), rtol=1e-6)
    assert np.isnan(solid[1].get_ydata()).all()
    plt.close(fig)
    # a selection lying wholly in the missing chunk: refused, naming the unfinished chunks
    code = main(["plot", str(half), "--y", "loss", "--sel", "lr=0.2", "--sel", "distinguishability=1",
                 "--out", str(tmp_path / "none.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "nothing to plot" in err and "lr=0.2" in err and "1 of 2 chunks" in err
    assert not (tmp_path / "none.png").exists()
    # the finished store: no warning
    code = main(["plot", str(sweep_store), "--y", "loss", "--hue", "lr", "--sel", "distinguishability=1",
                 "--out", str(tmp_path / "full.png")])
    assert code == 0 and "warning" not in capsys.readouterr().err


def test_plot_refuses_an_unknown_image_extension_and_a_foreign_folder_first(tmp_path, capsys):
    """``--out p.txt`` (and no extension) is refused before the store is read, naming the extensions
    matplotlib writes (it was matplotlib's own error after drawing); a folder dpo-sims did not write is called
    that, without advising ``--overwrite`` (the plot has none, and the sweep would refuse it)."""
    from matplotlib.backend_bases import FigureCanvasBase

    missing = tmp_path / "missing.zarr"  # never read: the extension is checked first
    for out, what in (("p.txt", "extension .txt is not an image format"), ("p", "has no extension")):
        code = main(["plot", str(missing), "--y", "loss", "--out", str(tmp_path / out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and what in err, err
        assert all(f".{ext}" in err for ext in FigureCanvasBase.get_supported_filetypes()) and ".png" in err
        assert not (tmp_path / out).exists()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "a.txt").write_text("mine")
    code = main(["plot", str(foreign), "--y", "loss", "--out", str(tmp_path / "f.pdf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{foreign} is not a dpo-sims results store" in err and "--overwrite" not in err, err
    assert (foreign / "a.txt").read_text() == "mine" and not (tmp_path / "f.pdf").exists()
