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
