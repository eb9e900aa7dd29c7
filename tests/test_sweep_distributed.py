"""`dpo-sims sweep --devices` and a 2-process sweep write the same store as a plain run.

Budget: three short subprocess sweeps (~40 s on 2 cores), each bounded by a timeout.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
name = "tiny"
seeds = 2
[base]
mode = "both"
steps = 6
record_every = 3
n = 32
n_eval = 32
d = 3
[grid]
distinguishability = [0.5, 1.0, 2.0]
lr = [0.05, 0.1]
"""


def _env(devices: int = 1):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for k in ("DPO_COORDINATOR", "DPO_NUM_PROCESSES", "DPO_PROCESS_ID"):
        env.pop(k, None)
    return env


def _sweep(cfg, out, *extra, devices=1):
    return subprocess.Popen([sys.executable, "-m", "sims", "sweep", str(cfg), "--out", str(out), "--no-progress",
                             "--chunk-size", "4", *extra], env=_env(devices), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b):
    a, b = xr.open_zarr(a).load(), xr.open_zarr(b).load()
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        if name == "chunk_digest":  # checksums of the exact values: they differ with float rounding
            continue
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-6, atol=1e-7, err_msg=name)
    return a


def test_sharded_and_two_process_sweeps_equal_plain(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG)
    plain = _sweep(cfg, tmp_path / "plain.zarr")
    assert plain.wait(timeout=300) == 0, plain.stderr.read()[-2000:]
    sharded = _sweep(cfg, tmp_path / "sharded.zarr", "--devices", "all", devices=4)
    assert sharded.wait(timeout=300) == 0, sharded.stderr.read()[-2000:]
    ds = _same(tmp_path / "plain.zarr", tmp_path / "sharded.zarr")
    assert ds["loss"].sizes["distinguishability"] == 3
    port = _free_port()
    procs = [_sweep(cfg, tmp_path / "multi.zarr", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                    "--process-id", str(i)) for i in range(2)]
    try:
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    finally:
        for p in procs:
            p.kill()
    _same(tmp_path / "plain.zarr", tmp_path / "multi.zarr")
