"""The representation study (sims/representation_study.py): its analysis helpers against hand-computed values,
its bad-input errors, and (slow) the end-to-end ``dpo-sims study representation --quick``."""
import json

import numpy as np
import pytest

from sims import representation_study as rs
from sims.cli import main


def test_crossing_step_first_record_below_half():
    """Accuracy 0.7, 0.6, 0.55, 0.49, 0.3 at steps 0, 5, 10, 15, 20: first record < 1/2 is step 15 (not the
    interpolated 14.0); one that never falls is NaN; leading axes pass through."""
    step = np.array([0, 5, 10, 15, 20])
    acc = np.array([0.7, 0.6, 0.55, 0.49, 0.3])
    assert rs.crossing_step(step, acc) == 15.0
    assert rs.crossing_step(step, acc, threshold=0.6) == 10.0  # 0.6 is not < 0.6
    got = rs.crossing_step(step, np.stack([acc, np.full(5, 0.9)]))
    assert got[0] == 15.0 and np.isnan(got[1])
    with pytest.raises(ValueError, match="expected"):
        rs.crossing_step(step[:-1], acc)


def test_kappa_orders_and_errors():
    """κ = Σ ω_k Δ_k(after)/Δ_k(before): ratios 1.2 and 1.5, weights 0.25/0.75 → 1.425; equal weights → 1.35."""
    assert rs.kappa_of([1.0, 0.6], [1.2, 0.9], [0.25, 0.75]) == pytest.approx(0.25 * 1.2 + 0.75 * 1.5)
    assert rs.kappa_of([1.0, 0.6], [1.2, 0.9]) == pytest.approx(1.35)
    with pytest.raises(ValueError, match="> 0"):
        rs.kappa_of([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="same"):
        rs.kappa_of([1.0], [1.0, 2.0])
    assert rs.predicted_order([0.5, 1.0, 2.0]) == [2, 1, 0]
    assert rs.observed_order([np.nan, 8.0, 3.0]) == [2, 1, 0]  # never learned: last


@pytest.mark.parametrize("argv, needle", [
    (["--part", "5"], "unknown part '5'"),
    (["--part", "1,a"], "unknown part 'a'"),
])
def test_study_representation_bad_part_exits_2(tmp_path, capsys, argv, needle):
    assert main(["study", "representation", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing ran


def test_study_representation_bad_out_exits_2(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["study", "representation", "--out", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a folder" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_study_representation_quick_end_to_end(tmp_path):
    """``--quick`` (about a minute on 2 cores): every file, the top-level keys, and numbers with a stated bound:
    |L_pop − L_emp| within a few N^{-1/2} at N = 2·10⁴, the learned distinguishability larger than at the
    start (alignment stretches the preference directions, docs/theory.md §10.5), and κ(0) = 1 for the base."""
    assert main(["study", "representation", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "representation.json").read_text())
    for part in rs.PARTS:
        assert (tmp_path / f"representation_{part}.png").stat().st_size > 10_000
        assert part in res
    for key in ("distinguishability_before", "distinguishability_after", "misalign_steps_base",
                "misalign_steps_aligned", "max_abs_pop_emp_loss", "config", "seconds"):
        assert key in res
    cfg = rs.config(quick=True)
    assert res["max_abs_pop_emp_loss"]["n"] == cfg["n"] and res["max_abs_pop_emp_loss"]["max"] < 0.02
    np.testing.assert_allclose(res["distinguishability_before"], cfg["distinguishability"], rtol=1e-5)
    assert all(a > b for a, b in zip(res["distinguishability_after"], res["distinguishability_before"]))
    assert res["2"]["per_alignment"]["align_steps=0"]["kappa"] == pytest.approx(1.0)
    assert set(res["misalign_steps_base"]) == {f"beta={b:g}" for b in cfg["misalign_betas"]}
    p3 = res["3"]["runs"]
    assert all(abs(r["w_yes_change"]) < 1e-6 for r in p3.values())  # a pair's margin never moves W_Yes
    assert "Command: `dpo-sims study representation --quick" in (tmp_path / "representation.md").read_text()
