import math
import subprocess
import sys

import numpy as np
import pytest

from sims.cli import main


def test_simulate_prints_side_by_side(capsys):
    assert main(["simulate", "--d", "4", "--steps", "20", "--n", "256", "--n-eval", "256", "--rows", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[1].split()
    assert header[:4] == ["step", "loss:pop", "loss:train", "loss:eval"]
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["0", "10", "20"]
    assert abs(float(rows[0][1]) - 0.6931) < 1e-4  # log 2 at δ = 0
    assert float(rows[-1][1]) < float(rows[0][1])  # the population loss falls


def test_simulate_bad_input_exits_2():
    """A value outside a field's range is refused by the sweep schema's own rule (argparse, exit 2)."""
    for flag, value, msg in (("--beta", "-1", "beta = -1.0 is out of range; pass a value > 0"),
                             ("--steps", "0", "steps = 0 is out of range; pass a value >= 1"),
                             ("--label-smoothing", "0.5", "label_smoothing = 0.5 is out of range")):
        r = subprocess.run([sys.executable, "-m", "sims", "simulate", flag, value], capture_output=True, text=True)
        assert r.returncode == 2, (flag, r.stderr)
        assert msg in r.stderr and f"argument {flag}" in r.stderr and "Traceback" not in r.stderr


_SMALL = ["simulate", "--d", "3", "--steps", "10", "--n", "128", "--n-eval", "128", "--rows", "2"]


def test_simulate_seed_and_batch_size_are_checked_first(capsys):
    assert main([*_SMALL, "--seed", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seed must be >= 0" in err
    assert main([*_SMALL, "--batch-size", "129"]) == 2
    assert "exceeds --n 128" in capsys.readouterr().err
    assert main([*_SMALL, "--distinguishability", "1", "2", "--sigma", "1", "1", "1"]) == 2
    assert "--sigma takes 1 value or one per behaviour (K = 2" in capsys.readouterr().err


def test_simulate_flags_are_the_sweep_schema():
    """Every model flag has the sweep field's default, choices and help; --help imports no JAX."""
    code = ("import sys, argparse\nfrom sims import simulate\np = argparse.ArgumentParser()\n"
            "sub = p.add_subparsers()\nsimulate.register(sub)\nsp = sub.choices['simulate']\n"
            "print('JAX' if 'jax' in sys.modules else 'NO-JAX')\n"
            "import json\nprint(json.dumps({a.dest: [a.default, list(a.choices or []), a.help] for a in sp._actions}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert first == "NO-JAX"
    import json

    from sims import simulate
    from sims.sweep import FIELDS

    actions = json.loads(second)
    for name in simulate.SIMULATE_FIELDS:
        default, choices, help_text = actions[name]
        assert default == FIELDS[name].default and tuple(choices) == tuple(FIELDS[name].choices), name
        assert help_text.startswith(FIELDS[name].help.replace("%", "%%")), name
    assert set(actions) - set(simulate.SIMULATE_FIELDS) == {"help", "seed", "dist", "rows"}
    assert actions["steps"][0] == 100 and actions["n_eval"][0] == 2048  # the sweep's defaults
    r = subprocess.run([sys.executable, "-m", "sims", "simulate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--label-smoothing" in r.stdout and "--no-" not in r.stdout


def test_simulate_two_behaviours_first_step_closed_form(capsys):
    """K = 2 from a list of Δ (orthogonal, equal weights): ‖W_1 − W_0‖ = ηβ‖m̄‖/√2 with m̄ = Σ_k ω_k Δ_k/2 e_k."""
    lr, beta = 0.1, 1.5
    assert main(["simulate", "--distinguishability", "1.0", "2.0", "--d", "3", "--steps", "2", "--rows", "3",
                 "--lr", str(lr), "--beta", str(beta), "--n", "64", "--n-eval", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "K=2, d=3, distinguishability=[1.0, 2.0]" in out[0]
    rows = [line.split() for line in out[2:]]
    mbar = math.hypot(0.5 * 0.5, 0.5 * 1.0)
    assert float(rows[1][7]) == pytest.approx(lr * beta * mbar / math.sqrt(2), abs=6e-5)
    assert float(rows[0][7]) == 0.0 and abs(float(rows[0][1]) - math.log(2)) < 1e-4


def test_simulate_batch_size_zero_is_full_batch(capsys):
    assert main(_SMALL) == 0
    full = capsys.readouterr().out
    assert main([*_SMALL, "--batch-size", "0"]) == 0
    assert capsys.readouterr().out == full
    assert main([*_SMALL, "--batch-size", "32"]) == 0  # a real minibatch changes the empirical columns
    assert capsys.readouterr().out.splitlines()[-1] != full.splitlines()[-1]


def test_simulate_bounded_loss_divergence_exits_1(capsys):
    """DPO at lr = 1e4: every value finite, the loss at hundreds of nats — flagged, exit 1."""
    assert main([*_SMALL, "--lr", "1e4"]) == 1
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines()[2:-1]]
    values = np.array([[float(v) for v in row] for row in table])
    assert np.all(np.isfinite(values)) and values[-1, 1] > 100  # no NaN: the loss itself is the sign
    assert "WARNING: the population and empirical trajectories diverged" in out
