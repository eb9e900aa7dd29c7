"""``dpo-sims plot``: figures from a sweep's results store (matplotlib, Agg).

Empirical curves are the mean over seeds with a 95% Student-t interval
(``mean ± t_{0.975, S−1} · sd / √S``, non-finite runs left out); the
population (N → ∞) curve of the same metric is drawn over it, dashed, in the
same colour. Colours follow ``--hue``; one panel per value of ``--facet``.
"""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path

import numpy as np

from .cli import UsageError

__all__ = ["mean_interval", "select", "plot_metric", "plot_results", "register"]

STYLE_NOTE = "solid: empirical mean ± 95% CI over seeds; dashed: population (N → ∞)"


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_interval(values, axis: int = 0, level: float = 0.95):
    """Mean and Student-t interval over ``axis``, ignoring NaN/inf.

    Args:
      values: array; axis: the seed axis. level: coverage (0.95).

    Returns:
      ``(mean, lo, hi)`` with ``axis`` removed. With fewer than two finite
      values the interval collapses to the mean (NaN where none).
    """
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isfinite(v), v, np.nan)
    count = np.sum(np.isfinite(v), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nansum(v, axis=axis)
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        dev = np.nansum((v - np.expand_dims(mean, axis)) ** 2, axis=axis)
        sd = np.sqrt(dev / np.maximum(count - 1, 1))
        t = stats.t.ppf(0.5 + level / 2, np.maximum(count - 1, 1))
        half = np.where(count > 1, t * sd / np.sqrt(np.maximum(count, 1)), 0.0)
    return mean, mean - half, mean + half


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3g}"
    return str(v.item() if hasattr(v, "item") else v)


def _coord_index(ds, dim: str, value: str):
    coord = ds[dim].values
    if coord.dtype.kind in "fiu":
        try:
            x = float(value)
        except ValueError:
            raise UsageError(f"--sel {dim}={value}: {dim} is numeric; pass one of {[_fmt(c) for c in coord]}") from None
        hits = np.flatnonzero(np.isclose(coord.astype(float), x, rtol=1e-6, atol=1e-12))
    elif coord.dtype.kind == "b":
        hits = np.flatnonzero(coord == (value.lower() in ("1", "true", "yes")))
    else:
        hits = np.flatnonzero(coord.astype(str) == value)
    if not len(hits):
        raise UsageError(f"--sel {dim}={value}: no such value; {dim} takes {[_fmt(c) for c in coord]}")
    return int(hits[0])


def select(ds, sel: dict | None):
    """``ds.isel`` from ``{dim: value}`` with float values matched to 1e-6 (strings exact).

    Raises UsageError naming an unknown dimension or value.
    """
    if not sel:
        return ds
    idx = {}
    for dim, value in sel.items():
        if dim not in ds.dims:
            close = difflib.get_close_matches(dim, list(ds.dims), n=1)
            hint = f" — did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--sel {dim}=…: no such dimension{hint}; dimensions are {list(ds.dims)}")
        idx[dim] = _coord_index(ds, dim, str(value))
    return ds.isel(idx)


def _resolve_metric(ds, y: str):
    if y in ds.data_vars:
        return y
    names = [v for v in ds.data_vars if v not in ("chunk_done",)]
    close = difflib.get_close_matches(y, names, n=1)
    hint = f" — did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"--y {y}: no such metric{hint}; the store has {sorted(names)}")


def _colors(values, numeric: bool):
    plt = _mpl()
    n = len(values)
    if numeric and n > 1:
        cmap = plt.get_cmap("viridis")
        return [cmap(0.05 + 0.85 * i / (n - 1)) for i in range(n)]
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _check_dims(da, used: set, what: str):
    extra = [d for d in da.dims if d not in used and da.sizes[d] > 1]
    if extra:
        d = extra[0]
        raise UsageError(
            f"{what} varies along {d} ({da.sizes[d]} values) which is not plotted; pick one with "
            f"--sel {d}=VALUE, or use it as --hue / --facet"
        )
    return da.squeeze([d for d in da.dims if d not in used], drop=True)


def plot_metric(ax, ds, y: str, *, x: str = "step", hue: str | None = None, split: str = "eval",
                population: bool = True, at_step: int | None = None, label_hue: bool = True,
                hue_label=None):
    """Draw metric ``y`` on ``ax``: empirical mean ± 95% CI over seeds (solid,
    band) and the population curve (dashed), one colour per ``hue`` value.

    Args:
      ds: a results dataset already reduced (via :func:`select`) so that only
        ``x``, ``hue``, ``seed`` (and ``split``/``behavior`` when used) vary.
      y: an empirical metric (``loss``, ``reward_accuracy`` …; ``split``
        chooses train/eval) or a ``population_*`` metric (no band).
      x: ``step`` or a grid axis (then ``y`` is taken at ``at_step``, default
        the last recorded step). hue: a dimension (grid axis or ``behavior``).
      hue_label: ``value -> str`` for legend labels.

    Returns: list of legend handles.

    Raises:
      UsageError: unknown metric or dimension, or a dimension that varies but
        is neither plotted nor selected.
    """
    y = _resolve_metric(ds, y)
    if x not in ds.dims:
        raise UsageError(f"--x {x}: no such dimension; use step or one of {[d for d in ds.dims]}")
    if hue is not None and hue not in ds.dims:
        close = difflib.get_close_matches(hue, list(ds.dims), n=1)
        raise UsageError(f"--hue {hue}: no such dimension{' — did you mean ' + repr(close[0]) + '?' if close else ''}; "
                         f"dimensions are {list(ds.dims)}")
    emp = ds[y]
    pop = None
    if not y.startswith("population_") and population and f"population_{y}" in ds:
        pop = ds[f"population_{y}"]
    if y.startswith("population_"):
        pop, emp = emp, None
    if emp is not None and "split" in emp.dims:
        if split not in ("train", "eval"):
            raise UsageError(f"--split {split}: choose train or eval")
        emp = emp.sel(split=split)
    if x != "step":
        last = int(ds["step"].values[-1]) if at_step is None else at_step
        if last not in set(ds["step"].values.tolist()):
            raise UsageError(f"--at-step {last}: not a recorded step; recorded steps are "
                             f"{ds['step'].values[0]} … {ds['step'].values[-1]}")
        emp = emp.sel(step=last) if emp is not None and "step" in emp.dims else emp
        pop = pop.sel(step=last) if pop is not None and "step" in pop.dims else pop
    used = {x, "seed"} | ({hue} if hue else set())
    emp = _check_dims(emp, used, y) if emp is not None else None
    pop = _check_dims(pop, used, f"population_{y}") if pop is not None else None
    hue_values = list(ds[hue].values) if hue else [None]
    numeric = bool(hue) and ds[hue].dtype.kind in "fiu"
    colors = _colors(hue_values, numeric)
    xs = ds[x].values
    handles = []
    for hv, color in zip(hue_values, colors):
        label = None
        if hue and label_hue:
            label = hue_label(hv) if hue_label else f"{hue} = {_fmt(hv)}"
        if emp is not None:
            e = emp.sel({hue: hv}) if hue else emp
            if "seed" in e.dims:
                e = e.transpose("seed", x)
                mean, lo, hi = mean_interval(e.values, axis=0)
            else:
                mean = lo = hi = np.asarray(e.transpose(x).values, dtype=float)
            (line,) = ax.plot(xs, mean, color=color, lw=1.6, label=label)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
            handles.append(line)
            label = None
        if pop is not None:
            pv = pop.sel({hue: hv}) if hue else pop
            (line,) = ax.plot(xs, np.asarray(pv.transpose(x).values, dtype=float), color=color, lw=1.4,
                              ls="--", label=label)
            if emp is None:
                handles.append(line)
    ax.set_xlabel(x)
    ylab = y if emp is None else f"{y} ({split})" if "split" in ds[y].dims else y
    ax.set_ylabel(ylab)
    ax.grid(alpha=0.3)
    return handles


def _parse_sel(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--sel {item}: expected AXIS=VALUE, e.g. --sel lr=0.1")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def plot_results(ds, y: str, *, x: str = "step", hue: str | None = None, facet: str | None = None,
                 split: str = "eval", sel: dict | None = None, out=None, population: bool = True,
                 at_step: int | None = None, title: str | None = None):
    """One figure of ``y`` (see :func:`plot_metric`), one panel per ``facet`` value; saved as PNG.

    Args:
      ds: results dataset (``xarray.open_zarr``) or a store path.
      sel: ``{dim: value}`` fixing the dimensions not plotted.
      out: output PNG path (required).

    Returns: the PNG path.
    Raises: UsageError for unknown names or unplotted varying dimensions.
    """
    from .store import open_results

    if not hasattr(ds, "data_vars"):
        ds = open_results(ds)
    ds = select(ds, sel)
    if facet is not None and facet not in ds.dims:
        close = difflib.get_close_matches(facet, list(ds.dims), n=1)
        raise UsageError(f"--facet {facet}: no such dimension{' — did you mean ' + repr(close[0]) + '?' if close else ''}; "
                         f"dimensions are {list(ds.dims)}")
    if facet is not None and facet in (x, hue):
        raise UsageError(f"--facet {facet} is already --x or --hue; pick another dimension")
    plt = _mpl()
    fvals = list(ds[facet].values) if facet else [None]
    ncols = min(len(fvals), 3)
    nrows = int(np.ceil(len(fvals) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False, sharey=True)
    handles = []
    for i, fv in enumerate(fvals):
        ax = axes[i // ncols][i % ncols]
        sub = ds.isel({facet: i}) if facet else ds
        handles = plot_metric(ax, sub, y, x=x, hue=hue, split=split, population=population, at_step=at_step)
        if facet:
            ax.set_title(f"{facet} = {_fmt(fv)}", fontsize=10)
    for j in range(len(fvals), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if hue:
        axes[0][0].legend(fontsize=8, loc="best")
    done = ds["chunk_done"].values if "chunk_done" in ds else np.ones(1, bool)
    note = STYLE_NOTE + ("" if done.all() else f"; {int((~done).sum())} of {done.size} chunks unfinished")
    fig.suptitle(title or f"{ds.attrs.get('title', 'dpo-sims')}: {y}", fontsize=11)
    fig.text(0.5, 0.005, note, ha="center", fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    if out is None:
        raise UsageError("no output path; pass --out fig.png")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def register(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="plot a metric from a sweep's results store (PNG)",
        description="Plot a metric of a results store: empirical mean ± 95%% CI over seeds with the "
        "population curve drawn over it (dashed); colours by --hue, panels by --facet.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("results", help="results store (RESULTS.zarr) written by `dpo-sims sweep`")
    p.add_argument("--y", required=True, help="metric, e.g. loss, reward_accuracy, weight_change, "
                   "behavior_loss, or population_<metric>")
    p.add_argument("--x", default="step", help="step, or a grid axis (then y at --at-step)")
    p.add_argument("--hue", default=None, help="colour by this axis (a grid axis or behavior)")
    p.add_argument("--facet", default=None, help="one panel per value of this axis")
    p.add_argument("--split", default="eval", choices=("train", "eval"), help="training sample or held-out")
    p.add_argument("--sel", action="append", metavar="AXIS=VALUE", help="fix an axis not plotted (repeatable)")
    p.add_argument("--at-step", type=int, default=None, help="step used when --x is a grid axis (default: last)")
    p.add_argument("--no-population", action="store_true", help="leave out the population curve")
    p.add_argument("--out", default=None, help="PNG path (default: RESULTS_<y>.png next to the store)")
    p.set_defaults(func=run)


def run(args) -> int:
    path = Path(args.results)
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}_{args.y}.png")
    png = plot_results(path, args.y, x=args.x, hue=args.hue, facet=args.facet, split=args.split,
                       sel=_parse_sel(args.sel), out=out, population=not args.no_population, at_step=args.at_step)
    print(f"# wrote {png}")
    return 0
