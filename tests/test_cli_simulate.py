import subprocess
import sys

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
