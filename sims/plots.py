"""``dpo-sims plot``: figures from a sweep's results store (matplotlib, Agg).

Empirical curves are the mean over seeds with a 95% Student-t interval
(``mean ± t_{0.975, S−1} · sd / √S``, non-finite runs left out); the
population (N → ∞) curve of the same metric is drawn over it, dashed, in the
same colour. Colours follow ``--hue``; one panel per value of ``--facet``.
"""
from __future__ import annotations

import argparse
import difflib
import sys
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


def _fmt(v, digits: int = 3) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}g}"
    return str(v.item() if hasattr(v, "item") else v)


def _coord_index(ds, dim: str, value: str):
    coord = ds[dim].values
    if coord.dtype.kind in "fiu":
        try:
            x = float(value)
        except ValueError:
            raise UsageError(f"--sel {dim}={value}: {dim} is numeric; pass one of {[_fmt(c, 10) for c in coord]}") from None
        hits = np.flatnonzero(np.isclose(coord.astype(float), x, rtol=1e-6, atol=1e-12))
    elif coord.dtype.kind == "b":
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if value.lower() not in words:
            raise UsageError(f"--sel {dim}={value}: {dim} is true/false; pass one of {[_fmt(c, 10) for c in coord]}")
        hits = np.flatnonzero(coord == words[value.lower()])
    else:
        hits = np.flatnonzero(coord.astype(str) == value)
    if not len(hits):
        raise UsageError(f"--sel {dim}={value}: no such value; {dim} takes {[_fmt(c, 10) for c in coord]}")
    return int(hits[0])


#: dimensions of a results store that are not grid axes (the docs/sweeps.md layout)
_TRAILING = ("seed", "split", "step", "behavior", "behavior_other", "chunk")


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" — did you mean {close[0]!r}?" if close else ""


def select(ds, sel: dict | None):
    """``ds.isel`` from ``{dim: value}`` with float values matched to 1e-6 (strings exact).

    Args:
      ds: results dataset. sel: ``{dimension: value}`` (values as given on the
        command line, e.g. ``{"lr": "0.1", "behavior": "behavior_0"}``).

    Returns: ``ds`` with the selected dimensions dropped.

    Raises:
      UsageError: an unknown dimension (names the valid ones), ``step`` (use
        ``--x AXIS --at-step``), or a value not in the dimension's coordinate
        (names its values).
    """
    if not sel:
        return ds
    idx = {}
    dims = [d for d in ds.dims if d != "chunk"]
    for dim, value in sel.items():
        if dim == "step":
            raise UsageError(f"--sel step={value}: step is not selectable; to plot against a grid axis at one "
                             f"step pass --x AXIS --at-step {value}")
        if dim not in dims:
            raise UsageError(f"--sel {dim}={value}: no such dimension{_did_you_mean(dim, dims)}; "
                             f"dimensions are {dims}")
        idx[dim] = _coord_index(ds, dim, str(value))
    return ds.isel(idx)


def _resolve_metric(ds, y: str):
    if y in ds.data_vars and y not in ("chunk_done", "chunk_digest"):
        return y
    names = [v for v in ds.data_vars if v not in ("chunk_done", "chunk_digest")]
    close = difflib.get_close_matches(y, names, n=1)
    hint = f" — did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"--y {y}: no such metric{hint}; the store has {sorted(names)}")


def _metric_dims(ds, y: str) -> list:
    """Dimensions of ``y`` and of ``population_<y>`` (when present), in ``ds[y]`` order."""
    dims = list(ds[y].dims)
    pop = f"population_{y}"
    if not y.startswith("population_") and pop in ds.data_vars:
        dims += [d for d in ds[pop].dims if d not in dims]
    return dims


def _grid_axes(dims) -> list:
    return [d for d in dims if d not in _TRAILING]


def _why_not_axis(name: str, y: str, ds, dims) -> str:
    if name == "split":
        return "train/held-out is chosen with --split (or shown side by side with --facet split)"
    if name == "seed":
        return "seeds are averaged into the 95% interval (fix one with --sel seed=N)"
    if name == "step":
        return "step is the x axis (for a grid axis on x pass --at-step)"
    if name in ("behavior", "behavior_other") and name in dims:
        return f"behaviours are not an ordered axis (colour by them with --hue {name})"
    if name in ds.dims:
        per = f" (per-behaviour values are in behavior_{y})" if name == "behavior" and f"behavior_{y}" in ds else ""
        return f"{y} does not vary along {name}{per}"
    return f"no such dimension{_did_you_mean(name, [d for d in ds.dims if d != 'chunk'])}"


def _check_x_hue(ds, y: str, x: str, hue: str | None, at_step) -> list:
    """Validate ``--x``/``--hue``/``--at-step`` for metric ``y``; returns its dimensions.

    Raises UsageError naming the option, the bad value and the valid choices.
    """
    dims = _metric_dims(ds, y)
    grid = _grid_axes(dims)
    if x == "step":
        if "step" not in dims:
            per = "per configuration and seed" if "seed" in dims else "per configuration"
            if not grid:
                raise UsageError(f"--y {y} has no step dimension (one value {per}) and this selection has no "
                                 "grid axis to plot it against")
            raise UsageError(f"--y {y} has no step dimension (one value {per}); plot it against a grid axis: "
                             f"pass --x AXIS with AXIS one of {grid}")
        if at_step is not None:
            raise UsageError(f"--at-step {at_step}: only used with --x AXIS (a grid axis); drop it or pass --x "
                             f"one of {grid}")
    else:
        x_choices = (["step"] if "step" in dims else []) + grid
        if x not in x_choices:
            raise UsageError(f"--x {x}: {_why_not_axis(x, y, ds, dims)}; choose one of {x_choices}")
        if at_step is not None and "step" not in dims:
            raise UsageError(f"--at-step {at_step}: {y} has no step dimension; drop --at-step")
    if hue is not None:
        hue_choices = [d for d in dims if d not in ("seed", "split", "step", "chunk", x)]
        if hue not in hue_choices:
            why = "already --x" if hue == x else _why_not_axis(hue, y, ds, dims)
            choose = f"choose one of {hue_choices}" if hue_choices else \
                "this selection leaves no dimension to colour by (drop --hue, or one of the --sel)"
            raise UsageError(f"--hue {hue}: {why}; {choose}")
    return dims


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
        chooses train/eval) or a ``population_*`` metric (no band). A
        variable without a ``step`` dimension (``behavior_distinguishability``,
        ``priority_gap``, ``diverged`` …; one value per configuration) needs
        ``x`` = a grid axis; a boolean one (``diverged``) is drawn as the
        fraction of seeds.
      x: ``step`` or a grid axis of ``y`` (then ``y`` is taken at
        ``at_step``, default the last recorded step). hue: a dimension of
        ``y`` other than seed/split/step (a grid axis or ``behavior``).
      at_step: a recorded step; only with ``x`` a grid axis and ``y`` per step.
      hue_label: ``value -> str`` for legend labels.

    Returns: list of legend handles.

    Raises:
      UsageError: unknown metric; ``x``/``hue``/``at_step`` not valid for
        ``y`` (names the valid choices); a dimension that varies but is
        neither plotted nor selected.
    """
    y = _resolve_metric(ds, y)
    dims = _check_x_hue(ds, y, x, hue, at_step)
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
    if x != "step" and "step" in dims:
        last = int(ds["step"].values[-1]) if at_step is None else at_step
        if last not in set(ds["step"].values.tolist()):
            raise UsageError(f"--at-step {last}: not a recorded step; {_recorded_steps(ds['step'].values, last)}")
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
            pv = pop.sel({hue: hv}) if hue and hue in pop.dims else pop
            (line,) = ax.plot(xs, np.asarray(pv.transpose(x).values, dtype=float), color=color, lw=1.4,
                              ls="--", label=label)
            if emp is None:
                handles.append(line)
    ax.set_xlabel(x)
    ylab = y if emp is None else f"{y} ({split})" if "split" in ds[y].dims else y
    if emp is not None and ds[y].dtype == bool and "seed" in ds[y].dims:
        ylab = f"{ylab} (fraction of seeds)"
    ax.set_ylabel(ylab)
    ax.grid(alpha=0.3)
    return handles


def _recorded_steps(steps, wanted=None) -> str:
    """"recorded steps are 0, 5, …, 100 (every 5); nearest: 5" — the stride, and the nearest steps to ``wanted``."""
    steps = np.asarray(steps).astype(int)
    if len(steps) <= 6:
        text = f"recorded steps are {', '.join(map(str, steps))}"
    else:
        gaps = np.unique(np.diff(steps))
        every = f" (every {gaps[0]})" if len(gaps) == 1 else " (irregular: several record_every values)"
        text = f"recorded steps are {steps[0]}, {steps[1]}, …, {steps[-1]}{every}"
    if wanted is not None and len(steps):
        below, above = steps[steps <= wanted], steps[steps >= wanted]
        near = sorted({int(v[i]) for v, i in ((below, -1), (above, 0)) if len(v)})
        text += f"; nearest: {' or '.join(map(str, near))}"
    return text


def _parse_sel(items) -> dict:
    """``["lr=0.1", …]`` → ``{"lr": "0.1", …}``; UsageError for a malformed or repeated item."""
    out = {}
    for item in items or []:
        k, eq, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not eq or not k or not v:
            raise UsageError(f"--sel {item}: expected AXIS=VALUE, e.g. --sel lr=0.1")
        if k in out:
            raise UsageError(f"--sel {k}: given twice ({k}={out[k]} and {k}={v}); pass each axis once")
        out[k] = v
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def check_image_path(out, option: str = "--out") -> None:
    """Refuse an output file whose extension matplotlib cannot write (``p.txt``, or none at all).

    Raises:
      UsageError: naming ``option``, the path and the supported extensions.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in formats:
        what = f"extension .{suffix} is not an image format" if suffix else "has no extension"
        raise UsageError(f"{option} {out}: {what}; end it with one of "
                         f"{', '.join('.' + f for f in formats)} (e.g. fig.png)")


def plot_results(ds, y: str, *, x: str = "step", hue: str | None = None, facet: str | None = None,
                 split: str = "eval", sel: dict | None = None, out=None, population: bool = True,
                 at_step: int | None = None, title: str | None = None, log=None):
    """One figure of ``y`` (see :func:`plot_metric`), one panel per ``facet`` value; saved as PNG.

    Args:
      ds: results dataset (``xarray.open_zarr``) or a store path.
      sel: ``{dim: value}`` fixing the dimensions not plotted.
      facet: a dimension of ``y`` (grid axis, ``behavior``, ``split`` or ``seed``)
        other than ``x``/``hue``: one panel per value.
      out: output PNG path (required).
      log: ``print``-like callable for warnings (default: stderr). A store with
        unfinished chunks (``chunk_done`` False) is plotted with a warning
        naming how many of its chunks are missing. A store path is first
        verified (:func:`sims.store.verify_store`): a finished chunk that no
        longer matches its checksum (deleted or truncated file) is refused.

    Returns: the PNG path.

    Raises:
      UsageError: unknown names or unplotted varying dimensions (names the
        valid choices); an output path under a file, not writable, or with an
        extension matplotlib cannot write (:func:`check_image_path`); a damaged
        store; a store none of whose chunks is finished; a selection
        with no finite value of ``y`` (nothing would be drawn). No PNG is
        written then.
    """
    from .store import check_output_file, open_results

    log = log or _stderr
    name = "the store"
    if out is not None:
        check_image_path(out)
        check_output_file(out)  # before reading or drawing anything
    if not hasattr(ds, "data_vars"):
        name = str(ds)
        ds = open_results(ds, verify=True)  # a damaged chunk is refused, naming the fix
    resume = f"rerun the same `dpo-sims sweep CONFIG.toml --out {name}` to resume it" if name != "the store" \
        else "rerun the same sweep to resume it"
    done = np.asarray(ds["chunk_done"].values, dtype=bool) if "chunk_done" in ds.data_vars else None
    if done is not None and done.size and not done.any():
        raise UsageError(f"{name} has no finished chunks (0 of {done.size}; every value is missing); {resume}")
    y = _resolve_metric(ds, y)
    sel = dict(sel or {})
    for option, value in (("--x", x), ("--hue", hue), ("--facet", facet)):
        if value not in (None, "step") and value in sel:
            raise UsageError(f"{option} {value}: also fixed by --sel {value}={sel[value]}; drop one of them")
    ds = select(ds, sel)
    if facet is not None:
        dims = _metric_dims(ds, y)
        choices = [d for d in dims if d not in ("step", "chunk", x, hue)]
        if facet not in choices:
            why = f"already {'--x' if facet == x else '--hue'}" if facet in (x, hue) else \
                "step is the x axis" if facet == "step" else _why_not_axis(facet, y, ds, dims)
            raise UsageError(f"--facet {facet}: {why}; choose one of {choices}")
    plt = _mpl()
    fvals = list(ds[facet].values) if facet else [None]
    ncols = min(len(fvals), 3)
    nrows = int(np.ceil(len(fvals) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False, sharey=True)
    try:
        for i, fv in enumerate(fvals):
            ax = axes[i // ncols][i % ncols]
            sub = ds.isel({facet: i}) if facet else ds
            plot_metric(ax, sub, y, x=x, hue=hue, split=split, population=population, at_step=at_step)
            if facet:
                ax.set_title(f"{facet} = {_fmt(fv)}", fontsize=10)
        unfinished = int((~done).sum()) if done is not None else 0
        drawn = any(np.isfinite(np.asarray(ln.get_ydata(), dtype=float)).any()
                    for row in axes for ax in row for ln in ax.lines)
        if not drawn:
            where = ", ".join(f"{k}={v}" for k, v in sel.items()) or "the whole store"
            cause = (f"{unfinished} of {done.size} chunks of {name} are unfinished ({resume}), or the runs diverged"
                     if unfinished else "the runs diverged (see the diverged variable)")
            raise UsageError(f"nothing to plot: every value of {y} for {where} is missing or non-finite; {cause}")
        for j in range(len(fvals), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        if hue:
            axes[0][0].legend(fontsize=8, loc="best")
        note = STYLE_NOTE + (f"; {unfinished} of {done.size} chunks unfinished" if unfinished else "")
        fig.suptitle(title or f"{ds.attrs.get('title', 'dpo-sims')}: {y}", fontsize=11)
        fig.text(0.5, 0.005, note, ha="center", fontsize=8, color="0.35")
        fig.tight_layout(rect=(0, 0.03, 1, 0.97))
        if out is None:
            raise UsageError("no output path; pass --out fig.png")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    if unfinished:
        log(f"warning: {unfinished} of {done.size} chunks of {name} are unfinished, so their configurations are "
            f"missing from the plot; {resume}")
    return out


_EPILOG = """\
what can be plotted (the variables are described in docs/sweeps.md):
  per-step metrics (dims … seed, split, step): loss, reward_accuracy, policy_accuracy, rewards_margin,
    weight_change, behavior_loss (… behavior) …: against --x step (default), or against a grid
    axis with --x AXIS at --at-step (default: the last step); --split picks train or eval
  population_<metric> (dims … step): the analytic (N → ∞) curve alone, no seed band
  per-configuration variables without a step dimension: behavior_distinguishability,
    behavior_projection, priority_gap, diverged, population_diverged: need --x AXIS (a grid
    axis); diverged is drawn as the fraction of seeds that diverged
  every other dimension of the variable must be fixed with --sel AXIS=VALUE, or be --hue / --facet.
  A store with unfinished chunks is plotted with a warning (the missing configurations are gaps);
  one with no finished chunk is refused: rerun the same `dpo-sims sweep CONFIG.toml --out STORE`.

examples:
  dpo-sims plot example.zarr --y loss --hue distinguishability --facet lr
  dpo-sims plot example.zarr --y reward_accuracy --x lr --hue distinguishability --at-step 50
  dpo-sims plot example.zarr --y diverged --x lr --hue distinguishability
"""


def register(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="plot a metric from a sweep's results store (PNG)",
        description="Plot a variable of a results store: empirical mean ± 95% CI over seeds (solid, "
        "band) with the population curve drawn over it (dashed); colours by --hue, panels by --facet.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", help="results store (RESULTS.zarr) written by `dpo-sims sweep`")
    p.add_argument("--y", required=True, help="variable to plot, e.g. loss, reward_accuracy, weight_change, "
                   "behavior_loss, population_<metric>, or (with --x AXIS) behavior_distinguishability, "
                   "priority_gap, diverged")
    p.add_argument("--x", default="step", help="x axis: step (default), or a grid axis of the store (then --y at --at-step); "
                   "variables without a step dimension need a grid axis")
    p.add_argument("--hue", default=None, help="colour by this dimension of --y: a grid axis or behavior "
                   "(not seed/split/step; default: one colour)")
    p.add_argument("--facet", default=None, help="one panel per value of this dimension of --y (a grid axis, "
                   "behavior, split or seed; default: one panel)")
    p.add_argument("--split", default="eval", choices=("train", "eval"),
                   help="empirical metrics on the training sample or on the held-out sample (default: eval)")
    p.add_argument("--sel", action="append", metavar="AXIS=VALUE",
                   help="fix a dimension that is not plotted, e.g. lr=0.1 or behavior=behavior_0 (repeatable; "
                   "floats match to 1e-6)")
    p.add_argument("--at-step", type=int, default=None,
                   help="recorded step (optimizer steps) used when --x is a grid axis (default: the last)")
    p.add_argument("--no-population", action="store_true", help="leave out the population (dashed) curve (default: drawn)")
    p.add_argument("--out", default=None, help="PNG path (default: RESULTS_<y>.png next to the store)")
    p.set_defaults(func=run)


def run(args) -> int:
    path = Path(args.results)
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}_{args.y}.png")
    png = plot_results(path, args.y, x=args.x, hue=args.hue, facet=args.facet, split=args.split,
                       sel=_parse_sel(args.sel), out=out, population=not args.no_population, at_step=args.at_step,
                       log=lambda msg: print(f"dpo-sims plot: {msg}", file=sys.stderr))
    print(f"# wrote {png}")
    return 0
