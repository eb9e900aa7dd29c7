"""`dpo-sims reproduce --quick`: files, and the report's numbers ordered as claims C1/C2/C4/C5 of docs/theory.md §4 say.

Budget: one quick run (~20 s on 2 idle cores) plus a resumed rerun.
"""
from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import xarray as xr

from sims.cli import main
from sims.reproduce import PHENOMENA, phenomenon_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    code = main(["reproduce", "--quick", "--out", str(out), "--no-progress"])
    return code, out, (out / "report.md").read_text()


def _tables(report: str) -> dict:
    """Section title → list of tables (each a list of {header: cell} rows) from the markdown."""
    sections, current, table = {}, None, None
    for line in report.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
            table = None
        elif line.startswith("|") and current is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if table is None:
                table = {"header": cells, "rows": []}
                sections[current].append(table)
            elif not all(set(c) <= {"-"} for c in cells):
                table["rows"].append(cells)
        else:
            table = None
    return sections


def _col(table, prefix, index=0, exact=False):
    hits = [i for i, h in enumerate(table["header"]) if (h == prefix if exact else h.startswith(prefix))]
    assert hits, (prefix, table["header"])
    return [r[hits[index]] for r in table["rows"]]


def _num(cells):
    return np.array([math.inf if c == "never" else float(c.split()[0]) for c in cells])


def _section(tables, key):
    return next(v[0] for k, v in tables.items() if key in k)


def test_quick_writes_every_file(quick):
    code, out, report = quick
    assert code == 0
    for name in PHENOMENA:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        ds = xr.open_zarr(out / "results" / f"{name}.zarr")
        assert ds["chunk_done"].values.all() and {"seed", "split", "step"} <= set(ds.dims)
        assert f"![{name}]({name}.png)" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["all_checks_pass"] is True
    assert "arXiv:2403.18742" in report and "Im and Y. Li" in report
    head = _tables(report)["Headline numbers"][0]
    assert [r[0] for r in head["rows"]] == ["(i) distinguishability", "(ii) priority", "(iii) misalignment"]
    assert all(r[-1] == "yes" for r in head["rows"])


def test_distinguishability_orders_and_c1_closed_form(quick):
    cfg, settings = phenomenon_config("distinguishability", quick=True)
    t = _section(_tables(quick[2]), "(i)")
    delta = _num(_col(t, "Δ"))
    np.testing.assert_array_equal(delta, cfg.grid["distinguishability"])
    # C1: first population step ‖W₁ − W₀‖ = η β Δ/(2√2) for one balanced behaviour
    c1 = cfg.base["lr"] * cfg.base["beta"] * delta / (2 * math.sqrt(2))
    np.testing.assert_allclose(_num(_col(t, "C1 ‖W₁−W₀‖")), c1, rtol=1e-3)
    np.testing.assert_allclose(_num(_col(t, "population")), c1, rtol=1e-3)
    # finite n: RMS of η β ‖z̄_n‖/√2 is η β √(Δ²/4 + d σ²/n)/√2 (z = s x has Cov σ² I here)
    rms = cfg.base["lr"] * np.sqrt(delta**2 / 4 + cfg.base["d"] / cfg.base["n"]) / math.sqrt(2)
    np.testing.assert_allclose(_num(_col(t, "C1 at n")), rms, rtol=1e-3)
    assert np.all(_num(_col(t, "C2: max")) <= 1.0)  # C2 never violated
    drop_pop, drop_emp = _num(_col(t, "loss drop by step")), _num(_col(t, "emp (held-out)"))
    assert np.all(np.diff(drop_pop) > 0) and np.all(np.diff(drop_emp) > 0)  # faster for larger Δ
    w_pop, w_emp = _num(_col(t, "steps to ‖W_t−W₀‖ ≥")), _num(_col(t, "emp", exact=True))  # the first bare "emp": steps to the weight threshold
    assert np.all(np.diff(w_pop) < 0) and np.all(np.diff(w_emp) < 0)
    learn = _num(_col(t, "steps to loss ≤"))
    assert np.all(np.diff(learn) <= 0) and learn[0] > learn[-1]


def test_priority_gap_predicts_the_measured_order(quick):
    t = _section(_tables(quick[2]), "(ii)")
    d0, d1 = _num(_col(t, "Δ₀")), _num(_col(t, "Δ₁"))
    gap = _num(_col(t, "gap₀₁"))
    assert np.all(np.sign(gap) == np.sign(d0 - d1))  # gap₀₁ ∝ Δ₀² − Δ₁² for balanced behaviours
    predicted = _col(t, "predicted first")
    assert predicted == [f"behaviour {0 if a > b else 1}" for a, b in zip(d0, d1)]  # the more distinguishable
    assert _col(t, "measured first (pop)") == predicted
    agree = [tuple(map(int, c.split("/"))) for c in _col(t, "seeds agreeing")]
    assert all(2 * a > n for a, n in agree)
    rates = [tuple(map(float, c.split(" : "))) for c in _col(t, "rate")]
    assert all((r0 > r1) == (a > b) for (r0, r1), a, b in zip(rates, d0, d1))


def test_misalignment_is_faster_for_larger_kappa(quick):
    t = _section(_tables(quick[2]), "(iii)")
    kappa = _num(_col(t, "κ"))
    assert np.all(np.diff(kappa) > 0)
    loss_pop = _num(_col(t, "misalignment loss at step"))
    assert np.all(np.diff(loss_pop) < 0) and np.all(loss_pop < math.log(2))
    steps_pop, steps_emp = _num(_col(t, "steps until original")), _num(_col(t, "emp (mean"))
    assert np.all(np.isfinite(steps_pop)) and np.all(np.diff(steps_pop) < 0) and np.all(np.diff(steps_emp) < 0)
    start = _num(_col(t, "original policy acc. at start"))
    # the aligned head starts right: accuracy Φ(κΔ/(2σ)) on the original labels (Δ = σ = 1)
    from scipy.stats import norm

    np.testing.assert_allclose(start, norm.cdf(kappa / 2), rtol=2e-3)


def test_real_flags(quick, tmp_path, monkeypatch, capsys):
    code = main(["reproduce", "--full-real", "--out", str(tmp_path / "a")])
    assert code == 2 and "--full-real only applies with --real" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sims.real", None)  # as if the [embed] extra were missing
    code = main(["reproduce", "--quick", "--real", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "[embed]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    calls = []
    fake = types.ModuleType("sims.real")
    fake.real_report_section = lambda out_dir, full: calls.append((out_dir, full)) or "## Real embeddings\n\nfake section"
    fake.register = lambda sub: None  # sims.cli imports it as a subcommand module
    monkeypatch.setitem(sys.modules, "sims.real", fake)
    out = quick[1]
    code = main(["reproduce", "--quick", "--real", "--full-real", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and calls == [(out, True)]
    assert (out / "report.md").read_text().rstrip().endswith("fake section")
    assert err.count("chunks already done") == 3  # the stores were resumed, not recomputed
