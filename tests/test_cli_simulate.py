import subprocess
import sys

import numpy as np

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
    r = subprocess.run([sys.executable, "-m", "sims", "simulate", "--beta", "-1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "beta must be > 0" in r.stderr


_SMALL = ["simulate", "--d", "3", "--steps", "10", "--n", "128", "--n-eval", "128", "--rows", "2"]


def test_simulate_seed_and_batch_size_are_checked_first(capsys):
    assert main([*_SMALL, "--seed", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seed must be >= 0" in err
    assert main([*_SMALL, "--batch-size", "-3"]) == 2
    assert "--batch-size must be >= 1, or 0" in capsys.readouterr().err
    assert main([*_SMALL, "--batch-size", "129"]) == 2
    assert "exceeds --n 128" in capsys.readouterr().err


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
