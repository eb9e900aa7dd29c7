"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) against one process.

Each process computes its share of the configurations and ``process_allgather`` assembles the
result, which process 0 writes to an .npz; it must equal the single-process run made here.
Both subprocesses are bounded by a timeout (180 s) and killed on expiry. Budget: about 25 s.
"""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from sims.cli import UsageError
from sims.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, initialize, trajectory_arrays

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180

# 7 configurations over 2 processes: shares of 4 and 3 (uneven on purpose)
_SETUP = textwrap.dedent("""
    import numpy as np
    from dynamics.batched import PreferenceBatch
    batch = PreferenceBatch.single(np.linspace(0.5, 2.0, 7), d=5, sigma=np.linspace(0.5, 1.5, 7),
                                   p=np.linspace(0.3, 0.7, 7))
    kw = dict(n=64, n_eval=32, beta=np.linspace(0.5, 1.5, 7), lr=0.3, steps=8, record_every=4,
              draws="independent")
""")

_WORKER = textwrap.dedent("""
    import sys
    import jax
    from sims.distributed import initialize, run_batched
    pid, count = initialize()  # DPO_COORDINATOR, DPO_NUM_PROCESSES, DPO_PROCESS_ID
    assert count == 2 and jax.process_count() == 2, (pid, count)
    jax.config.update("jax_enable_x64", True)
""") + _SETUP + textwrap.dedent("""
    traj = run_batched(batch, jax.random.key(5), out=sys.argv[1], **kw)
    assert traj.delta_final.shape[0] == 7  # every process holds the gathered result
    print("process", pid, "done")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost") / "gathered.npz"
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: "2", ENV_PROCESS_ID: str(pid),
                    "JAX_PLATFORMS": "cpu"})
        # one device per process; backend optimisations off to compile ~2x faster
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(out)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            logs.append((p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"the two-process run did not finish within {TIMEOUT} s")
    for pid, (rc, stdout, stderr) in enumerate(logs):
        assert rc == 0, f"process {pid} failed:\n{stderr[-3000:]}"
        assert f"process {pid} done" in stdout
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_two_processes_equal_one(two_process_result, x64):
    from dynamics.batched import batched_empirical_trajectory

    scope = {}
    exec(_SETUP, scope)
    ref = trajectory_arrays(batched_empirical_trajectory(scope["batch"], jax.random.key(5), **scope["kw"]))
    assert set(two_process_result) == set(ref)
    for name, want in ref.items():
        got = two_process_result[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=name)
    # independent draws: every configuration trained on its own sample, so the results differ
    assert len(np.unique(np.round(ref["train/loss"][:, -1], 12))) == 7


def test_initialize_single_process_and_errors(monkeypatch):
    for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert initialize() == (0, 1)  # nothing to join
    assert initialize(num_processes=1) == (0, 1)
    with pytest.raises(UsageError, match="--coordinator"):
        initialize(num_processes=2, process_id=0)
    with pytest.raises(UsageError, match="--process-id"):
        initialize("127.0.0.1:1", num_processes=2, process_id=2)
    monkeypatch.setenv(ENV_NUM_PROCESSES, "two")
    with pytest.raises(UsageError, match=ENV_NUM_PROCESSES):
        initialize()
